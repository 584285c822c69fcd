"""Out-of-distribution (OOD) scores from a network's own penultimate features (the input of its final
linear layer during the plain, unmirrored pass: the score costs nothing extra at prediction time).

Per network: probabilistic PCA of (a seeded, stratified subsample of) the training films' features,
mean ``mu``, top ``k`` directions ``V`` with variances ``lambda``, one variance ``sigma2`` for the rest:

    d(f) = sqrt( (sum_i z_i^2 / lambda_i + |r|^2 / sigma2) / D ),   z = V (f - mu),   r = (f - mu) - V^T z

The threshold ``t`` is the ``acceptance`` quantile (95%) of ``d`` over validation films; the score is
``d / t`` (above 1: further out than 95% of them). An ensemble's score is its members' mean, flagged
above its ``ood_threshold``. ``python -m xray.ood ckpt=... data.root=...`` fits them (conf/ood.yaml).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xray.core.config_checks import is_positive_finite
from xray.data.transforms import rescale
from xray.models import flip_tta_logits

OOD_KEY = "ood"
OOD_FORMAT = 1
DEFAULT_ACCEPTANCE = 0.95
DEFAULT_COMPONENTS = 128


class OodError(ValueError):
    """Stored OOD statistics that are malformed, or a fit that cannot be done."""


def manifest_section(
    acceptance: float = DEFAULT_ACCEPTANCE, components: int = DEFAULT_COMPONENTS
) -> dict[str, Any]:
    """``ensemble.json``'s ``ood`` entry: how the members' scores combine (flagged above 1.0)."""
    return {
        "threshold": 1.0,
        "score": "mean over members of (PPCA Mahalanobis distance / the member's threshold)",
        "acceptance": float(acceptance),
        "components": int(components),
    }


# ------------------------------------------------------------------------------------------- features
def classifier_layer(net: nn.Module) -> nn.Linear:
    """The final classifier: the last ``nn.Linear`` in module order (every network here ends in one)."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise OodError(f"the network {type(net).__name__} has no nn.Linear layer to take features from")
    return linears[-1]


def logits_and_features(net: nn.Module, x: Tensor, tta: bool) -> tuple[Tensor, Tensor]:
    """float (B,C,S,S) in [0, 1] -> (logits (B,), features (B, D) of the plain pass)."""
    captured: list[Tensor] = []

    def grab(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if not captured:
            captured.append(args[0].flatten(1))

    handle = classifier_layer(net).register_forward_pre_hook(grab)
    try:
        logits = flip_tta_logits(net, x) if tta else net(x)
    finally:
        handle.remove()
    return logits.float().reshape(-1), captured[0].float()


def extract_features(
    net: nn.Module,
    images: Tensor,
    tta: bool = False,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """uint8 (N,1,S,S) -> (logits (N,), features (N,D)), float32 on the CPU, in eval mode."""
    net = net.to(device).eval()
    logits, feats = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = rescale(images[start : start + batch_size].to(device))
            z, f = logits_and_features(net, x, tta)
            logits.append(z.cpu())
            feats.append(f.cpu())
    if not logits:
        raise OodError("no images to compute features of")
    return torch.cat(logits), torch.cat(feats)


# ------------------------------------------------------------------------------------- the statistics
@dataclass
class FeatureGaussian:
    """One network's feature Gaussian (probabilistic PCA) and its acceptance threshold."""

    mean: Tensor  # (D,)
    components: Tensor  # (k, D), orthonormal rows
    variances: Tensor  # (k,)
    residual_variance: float
    threshold: float = math.nan  # distance accepting `acceptance` of the validation films
    acceptance: float = DEFAULT_ACCEPTANCE
    n_fit: int = 0
    n_val: int = 0
    fitted_on: str = ""

    @classmethod
    def fit(
        cls, features: Tensor, n_components: int = DEFAULT_COMPONENTS, fitted_on: str = ""
    ) -> FeatureGaussian:
        """PPCA by SVD of the centred features (float64); ``k`` is capped by the sample and feature size."""
        x = torch.as_tensor(features, dtype=torch.float64)
        if x.ndim != 2 or len(x) < 3:
            raise OodError(f"need at least 3 feature vectors of shape (N, D) to fit, got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise OodError("features contain NaN or infinite values")
        n, dim = x.shape
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        eig = s**2 / (n - 1)
        k = int(max(1, min(n_components, n - 2, dim - 1)))
        total = float(eig.sum())
        floor = max(total / dim, 1e-12) * 1e-6  # a dead (always-zero) feature must not divide by 0
        residual = max((total - float(eig[:k].sum())) / (dim - k), floor)
        return cls(
            mean=mean.float(),
            components=vh[:k].float().contiguous(),
            variances=eig[:k].clamp(min=floor).float(),
            residual_variance=float(residual),
            n_fit=int(n),
            fitted_on=fitted_on,
        )

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    def distance(self, features: Tensor) -> Tensor:
        """(N, D) -> (N,) float64: the PPCA Mahalanobis distance, divided by sqrt(D)."""
        f = torch.as_tensor(features, dtype=torch.float64)
        centred = f - self.mean.double()
        z = centred @ self.components.double().T
        inside = (z**2 / self.variances.double()).sum(1)
        residual = (centred - z @ self.components.double()).pow(2).sum(1) / self.residual_variance
        return ((inside + residual) / self.dim).sqrt()

    def calibrate(self, val_features: Tensor, acceptance: float = DEFAULT_ACCEPTANCE) -> FeatureGaussian:
        """Set the threshold to the ``acceptance`` quantile of the validation films' distances."""
        if not 0.5 <= acceptance < 1.0:
            raise OodError(f"acceptance must be in [0.5, 1), got {acceptance}")
        d = self.distance(val_features)
        if len(d) < 2:
            raise OodError("need at least 2 validation films to choose the OOD threshold")
        self.threshold = float(torch.quantile(d, acceptance))
        self.acceptance = float(acceptance)
        self.n_val = len(d)
        return self

    def score(self, features: Tensor) -> Tensor:
        """(N, D) -> (N,) float64: distance / threshold (above 1: outside the accepted region)."""
        if not math.isfinite(self.threshold) or self.threshold <= 0:
            raise OodError("OOD statistics have no threshold; calibrate them on validation films")
        return self.distance(features) / self.threshold

    # -- storage in a checkpoint's xray section: tensors and plain values only (weights_only=True)
    def to_meta(self) -> dict[str, Any]:
        return {
            "format": OOD_FORMAT,
            "method": "ppca_mahalanobis",
            "mean": self.mean.float().clone(),
            "components": self.components.float().clone(),
            "variances": self.variances.float().clone(),
            "residual_variance": float(self.residual_variance),
            "threshold": float(self.threshold),
            "acceptance": float(self.acceptance),
            "n_fit": int(self.n_fit),
            "n_val": int(self.n_val),
            "fitted_on": str(self.fitted_on),
        }

    @classmethod
    def from_meta(cls, meta: Any, where: str) -> FeatureGaussian:
        """Checked reconstruction; a malformed entry is an :class:`OodError` naming ``where``."""
        if not isinstance(meta, dict) or meta.get("format") != OOD_FORMAT:
            raise OodError(f"{where}: OOD statistics are not of format {OOD_FORMAT}")
        try:
            mean, comps, var = meta["mean"], meta["components"], meta["variances"]
            threshold, residual = meta["threshold"], meta["residual_variance"]
        except KeyError as err:
            raise OodError(f"{where}: OOD statistics lack {err}") from None
        ok = (
            all(isinstance(t, Tensor) for t in (mean, comps, var))
            and mean.ndim == 1
            and comps.ndim == 2
            and comps.shape[1] == mean.numel()
            and var.shape == (comps.shape[0],)
            and bool((var > 0).all())
            and is_positive_finite(threshold)
            and is_positive_finite(residual)
        )
        if not ok:
            raise OodError(
                f"{where}: OOD statistics are malformed (shapes, or non-positive variances/threshold)"
            )
        return cls(
            mean=mean.float(),
            components=comps.float(),
            variances=var.float(),
            residual_variance=float(residual),
            threshold=float(threshold),
            acceptance=float(meta.get("acceptance", DEFAULT_ACCEPTANCE)),
            n_fit=int(meta.get("n_fit", 0)),
            n_val=int(meta.get("n_val", 0)),
            fitted_on=str(meta.get("fitted_on", "")),
        )


def combine_scores(member_scores: Sequence[Tensor]) -> Tensor:
    """An ensemble's OOD score: the mean of its members' scores (each already divided by its threshold)."""
    return torch.stack([torch.as_tensor(s, dtype=torch.float64) for s in member_scores]).mean(0)


# ------------------------------------------------------------------------------------ fitting networks
def stratified_subsample(labels: Sequence[int], n: int | None, seed: int) -> list[int]:
    """Indices of ``n`` items keeping the class mix (seeded, sorted); all when ``n`` is None or larger."""
    if n is None or n >= len(labels):
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        k = max(1, round(n * len(members) / len(labels)))
        picked += rng.choice(members, min(k, len(members)), replace=False).tolist()
    return sorted(picked)


def fit_network(
    net: nn.Module,
    train_images: Tensor,
    val_images: Tensor,
    components: int = DEFAULT_COMPONENTS,
    acceptance: float = DEFAULT_ACCEPTANCE,
    fitted_on: str = "",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> FeatureGaussian:
    """Fit one network's feature Gaussian on training films and its threshold on validation films."""
    _, train_features = extract_features(net, train_images, batch_size=batch_size, device=device)
    _, val_features = extract_features(net, val_images, batch_size=batch_size, device=device)
    stats = FeatureGaussian.fit(train_features, components, fitted_on=fitted_on)
    return stats.calibrate(val_features, acceptance)

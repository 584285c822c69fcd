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

from xray.config_checks import is_num
from xray.models import flip_tta_logits
from xray.transforms import rescale

OOD_KEY = "ood"
OOD_FORMAT = 1
DEFAULT_ACCEPTANCE = 0.95
DEFAULT_COMPONENTS = 128


class OodError(ValueError):
    """Stored OOD statistics that are malformed, or a fit that cannot be done."""


def is_positive_finite(value: Any) -> bool:
    """A finite real number > 0 (``True`` is no number here)."""
    return is_num(value) and math.isfinite(value) and value > 0


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


# ------------------------------------------------------------------------------ python -m xray.ood
def member_split(
    model: Any, records: list[Any], cfg: Any, index: int, n_members: int
) -> tuple[list[Any], list[Any], str]:
    """(training records, validation records, description) of one network, as it was trained: from the
    checkpoint's stored ``split``, else ``data.n_folds``/``data.fold``, else ``fold<k>`` in the file name
    (one fold per member, the shipped ensemble), else the patient-grouped ``val_fraction`` split."""
    import re

    from xray.data.records import patient_folds, scan_split, split_by_patient

    stored = model.meta.get("split") or {}
    if stored.get("val_source") == "official":
        return records, scan_split(cfg.data.root, "val"), "the official val/ folder"
    seed = int(stored.get("split_seed", cfg.data.split_seed))
    n_folds, fold = stored.get("n_folds"), stored.get("fold")
    if n_folds is None and cfg.data.get("n_folds") is not None:
        n_folds = int(cfg.data.n_folds)
        fold = int(cfg.data.fold) if cfg.data.get("fold") is not None and n_members == 1 else index
    if n_folds is None:
        match = re.search(r"fold(\d+)", model.path.stem)
        if match and n_members > 1:
            n_folds, fold = n_members, int(match.group(1))
    if n_folds is not None:
        folds = patient_folds(records, int(n_folds), seed)
        train = [r for r, f in zip(records, folds, strict=True) if f != int(fold)]
        val = [r for r, f in zip(records, folds, strict=True) if f == int(fold)]
        return train, val, f"fold {fold} of {n_folds} (split seed {seed})"
    fraction = float(stored.get("val_fraction", cfg.data.val_fraction))
    train, val = split_by_patient(records, fraction, seed)
    return train, val, f"patient-grouped split, validation fraction {fraction} (seed {seed})"


def member_films(
    member: Any, records: list[Any], cfg: Any, k: int, n: int
) -> tuple[list[Any], list[Any], list[Any], str]:
    """(training films to fit on, validation films for the threshold, the other validation films, where):
    seeded, so that ``evaluate=true`` later holds out exactly the films the threshold did not see."""
    train, val, where = member_split(member, records, cfg, k, n)
    keep = set(stratified_subsample([r.label for r in val], cfg.n_val, int(cfg.seed) + k))
    fit = [train[i] for i in stratified_subsample([r.label for r in train], cfg.n_fit, int(cfg.seed) + k)]
    return (
        fit,
        [r for i, r in enumerate(val) if i in keep],
        [r for i, r in enumerate(val) if i not in keep],
        where,
    )


def load_images(records: Sequence[Any], size: int, interpolation: str) -> Tensor:
    from xray.transforms import load_resized

    return torch.stack(
        [torch.from_numpy(load_resized(r.path, size, interpolation)) for r in records]
    ).unsqueeze(1)


def run_ood(cfg: Any) -> int:
    """Fit (``write=true``) and/or evaluate (``evaluate=true``) the OOD statistics of ``ckpt``."""
    from xray.checkpoints import update_checkpoint_meta
    from xray.config_checks import ConfigError
    from xray.data.records import scan_split
    from xray.inference import resolve_device
    from xray.predictor import MANIFEST_NAME, load_predictor, resolve_checkpoint, update_ensemble_manifest

    if not 0.5 <= float(cfg.acceptance) < 1:
        raise ConfigError(f"acceptance must be in [0.5, 1), got {cfg.acceptance}")
    device = resolve_device(cfg.device)
    target = resolve_checkpoint(str(cfg.ckpt), cfg.log_dir)
    predictor = load_predictor(str(cfg.ckpt), cfg.log_dir)
    records = scan_split(cfg.data.root, "train")
    n = len(predictor.members)
    if cfg.fit:
        for k, member in enumerate(predictor.members):
            train, val, _, where = member_films(member, records, cfg, k, n)
            print(
                f"{member.path.name}: {where}; fitting on {len(train)} training films, threshold on {len(val)} validation films",
                flush=True,
            )
            stats = fit_network(
                member.net,
                load_images(train, member.image_size, member.interpolation),
                load_images(val, member.image_size, member.interpolation),
                int(cfg.components),
                float(cfg.acceptance),
                fitted_on=f"{where}: {len(train)} training films (stratified subsample, seed {int(cfg.seed) + k}), "
                f"threshold on {len(val)} validation films",
                batch_size=int(cfg.batch_size),
                device=device,
            )
            member.meta[OOD_KEY] = stats.to_meta()
            print(
                f"  threshold {stats.threshold:.4f} (distance at {100 * stats.acceptance:.0f}% of validation films)",
                flush=True,
            )
            if cfg.write:
                update_checkpoint_meta(member.path, ood=member.meta[OOD_KEY])
        if cfg.write:
            if target.is_dir() and (target / MANIFEST_NAME).is_file():
                update_ensemble_manifest(
                    target, ood=manifest_section(float(cfg.acceptance), int(cfg.components))
                )
            print(f"OOD statistics written into {target}")
    if cfg.evaluate:
        from xray.ood_check import evaluate_separation

        evaluate_separation(predictor, records, cfg, device)
    return 0


def main() -> None:
    """``python -m xray.ood key=value ...`` (Hydra, conf/ood.yaml); user errors exit 2 with one line."""
    from xray.cli import hydra_entry

    hydra_entry("ood", run_ood)


if __name__ == "__main__":
    main()

"""A deterministic "shift validation" suite: the validation images under seeded acquisition shifts.

Unseen patients from the training distribution saturate validation (AUROC ~0.997), while the test split
differs mainly by acquisition (exposure, processing, resolution, compression, positioning); mild,
label-preserving acquisition shifts give a selection signal for that without touching the test split.
Each image's magnitudes come from a generator seeded by ``(seed, shift index, image index)``, so results
do not depend on batching. (``invert_windowing`` was dropped: with a linear window it is an affine map
with clipping, which the contrast and brightness shifts already cover.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.v2 import functional as TF

from xray.core.constants import CLASSES
from xray.data.acquisition import SHIFT_FAMILIES
from xray.evaluation.calibration import apply_temperature, fit_temperature, log_loss
from xray.evaluation.metrics import choose_threshold, classification_metrics

METRICS: tuple[str, ...] = (
    "auroc",
    "log_loss",
    "brier",
    "sensitivity",
    "specificity",
    "accuracy",
    "balanced_accuracy",
)
"""Metrics computed per shift by :func:`shift_metrics`."""

_LOWER_IS_BETTER = frozenset({"log_loss", "brier"})
SUMMARY_ROWS = ("mean", "worst")
"""Rows of :func:`shift_metrics` that summarise over the shifts rather than name one."""
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_generator(seed: int, shift_index: int, image_index: int) -> torch.Generator:
    """CPU generator for one (seed, shift, image): independent of batching."""
    h = _mix64(seed & _MASK64)
    h = _mix64(h ^ (shift_index & _MASK64))
    h = _mix64(h ^ (image_index & _MASK64))
    return torch.Generator(device="cpu").manual_seed(h >> 1)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of a float (1,H,W) image with reflect padding (kernel limited to the image)."""
    _, h, w = x.shape
    size = min(2 * math.ceil(3 * sigma) + 1, 2 * ((min(h, w) - 1) // 2) + 1)
    return TF.gaussian_blur(x, kernel_size=[size, size], sigma=[sigma, sigma])


def _resize(x: Tensor, h: int, w: int) -> Tensor:
    return TF.resize(x, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


# Each shift: float (1,H,W) image in [0,255] and its generator -> float (1,H,W) (clamped later).
_Shift = Callable[[Tensor, torch.Generator], Tensor]


def _contrast(low: float, high: float) -> _Shift:
    return lambda x, g: x.mean() + _uniform(g, low, high) * (x - x.mean())


def _gamma(low: float, high: float) -> _Shift:
    return lambda x, g: 255.0 * (x / 255.0).clamp(0, 1) ** _uniform(g, low, high)


def _brightness(sign: float) -> _Shift:
    return lambda x, g: x + sign * _uniform(g, 20.0, 35.0)


def _blur(x: Tensor, g: torch.Generator) -> Tensor:
    return _gaussian_blur(x, _uniform(g, 1.0, 2.0))


def _sharpen(x: Tensor, g: torch.Generator) -> Tensor:
    amount, sigma = _uniform(g, 1.0, 2.0), _uniform(g, 1.0, 2.0)
    return x + amount * (x - _gaussian_blur(x, sigma))


def _noise(x: Tensor, g: torch.Generator) -> Tensor:
    std = _uniform(g, 5.0, 10.0)
    return x + std * torch.randn(x.shape, generator=g).to(x.device)


def _jpeg(x: Tensor, g: torch.Generator) -> Tensor:
    quality = int(torch.randint(15, 36, (), generator=g))
    encoded = encode_jpeg(x.round().clamp(0, 255).to(torch.uint8).cpu(), quality=quality)
    return decode_jpeg(encoded).to(device=x.device, dtype=torch.float32)


def _resample(x: Tensor, g: torch.Generator) -> Tensor:
    _, h, w = x.shape
    scale = _uniform(g, 0.4, 0.5)
    small = _resize(x, max(2, round(h * scale)), max(2, round(w * scale)))
    return _resize(small, h, w)


def _zoom_in(x: Tensor, g: torch.Generator) -> Tensor:
    _, h, w = x.shape
    fraction = _uniform(g, 0.80, 0.88)
    ch, cw = max(2, round(h * fraction)), max(2, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return _resize(x[:, top : top + ch, left : left + cw], h, w)


def _zoom_out(x: Tensor, g: torch.Generator) -> Tensor:
    _, h, w = x.shape
    scale = _uniform(g, 0.75, 0.85)
    sh, sw = max(2, round(h * scale)), max(2, round(w * scale))
    fill = torch.quantile(x.flatten(), 0.01).round()
    out = fill.expand(x.shape).clone()
    top, left = (h - sh) // 2, (w - sw) // 2
    out[:, top : top + sh, left : left + sw] = _resize(x, sh, sw)
    return out


def _rotate(x: Tensor, g: torch.Generator) -> Tensor:
    _, h, w = x.shape
    angle = _uniform(g, 5.0, 10.0)
    angle = math.radians(angle if float(torch.rand((), generator=g)) < 0.5 else -angle)  # random sign
    c, s = math.cos(angle), math.sin(angle)
    # rotation about the centre in pixel units, expressed in affine_grid's normalised coordinates
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


_SHIFT_FNS: dict[str, _Shift] = {
    "contrast_low": _contrast(0.6, 0.8),
    "contrast_high": _contrast(1.25, 1.5),
    "gamma_low": _gamma(0.6, 0.8),
    "gamma_high": _gamma(1.25, 1.6),
    "brightness_down": _brightness(-1.0),
    "brightness_up": _brightness(1.0),
    "blur": _blur,
    "sharpen": _sharpen,
    "noise": _noise,
    "jpeg": _jpeg,
    "resample": _resample,
    "zoom_in": _zoom_in,
    "zoom_out": _zoom_out,
    "rotate": _rotate,
    # acquisition cues that carry no label (xray.data.acquisition): burned-in text and markers, tight
    # collimation, shutters and padding; last, so the earlier shifts keep their seeds
    **SHIFT_FAMILIES,
}
SHIFTS: tuple[str, ...] = tuple(_SHIFT_FNS)  # fixed order: the index is part of each image's seed
ACQUISITION_SHIFTS: tuple[str, ...] = tuple(SHIFT_FAMILIES)
"""The shifts that add or remove an acquisition cue (the counterfactual check reads these)."""


def check_names(names: Iterable[str]) -> None:
    """ValueError naming every unknown shift and the valid ones."""
    unknown = [name for name in names if name not in _SHIFT_FNS]
    if unknown:
        raise ValueError(f"unknown shift(s) {unknown}; valid shifts: {', '.join(SHIFTS)}")


def apply_shift(images: Tensor, name: str, indices: Sequence[int] | Tensor, seed: int = 0) -> Tensor:
    """Apply shift ``name`` to uint8 ``(B,1,H,W)`` images whose global indices are ``indices`` (which,
    with ``seed``, seed each image's magnitudes)."""
    check_names([name])
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"expected uint8 images of shape (B,1,H,W), got {images.dtype} {tuple(images.shape)}"
        )
    if min(images.shape[-2:]) < 16:
        raise ValueError(f"images must be at least 16x16, got {tuple(images.shape[-2:])}")
    index_list = [int(i) for i in (indices.flatten().tolist() if isinstance(indices, Tensor) else indices)]
    if len(index_list) != images.shape[0]:
        raise ValueError(f"got {len(index_list)} indices for {images.shape[0]} images")
    shift_index = SHIFTS.index(name)
    fn = _SHIFT_FNS[name]
    out = torch.empty_like(images)
    for row, index in enumerate(index_list):
        shifted = fn(images[row].float(), seeded_generator(seed, shift_index, index))
        out[row] = shifted.round().clamp(0, 255).to(torch.uint8)
    return out


def shift_logits(
    logits_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    seed: int = 0,
    batch_size: int = 64,
    shifts: Sequence[str] = SHIFTS,
) -> dict[str, Tensor]:
    """Logits ``(N,)`` (float32, CPU) of ``logits_fn`` (given float ``(b,1,H,W)`` in [0,1]) on the clean
    images, key ``"clean"`` first, then under each of ``shifts``."""
    check_names(shifts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    result: dict[str, Tensor] = {}
    with torch.inference_mode():
        for name in ("clean", *shifts):
            chunks = []
            for start in range(0, n, batch_size):
                batch = images[start : start + batch_size]
                if name != "clean":
                    batch = apply_shift(batch, name, range(start, start + batch.shape[0]), seed)
                logits = logits_fn(batch.float() / 255.0).detach().reshape(-1)
                if logits.numel() != batch.shape[0]:
                    raise ValueError(
                        f"logits_fn returned {logits.numel()} logits for {batch.shape[0]} images"
                    )
                chunks.append(logits.float().cpu())
            result[name] = torch.cat(chunks) if chunks else torch.empty(0)
    return result


def _binary_metrics(logits: Tensor, labels: Tensor, threshold: float, temperature: float) -> dict[str, float]:
    probs = torch.sigmoid(logits.detach().double().cpu().reshape(-1) / temperature)
    m = classification_metrics(probs, labels, threshold)
    row = {"log_loss": log_loss(logits.detach().cpu(), labels.cpu(), temperature)}
    return row | {k: m[k] for k in METRICS if k != "log_loss"}


def shift_youden_threshold(
    logits_by_shift: dict[str, Tensor], labels: Tensor, temperature: float = 1.0
) -> float:
    """Youden's J on the clean and shifted scores pooled (the ``shift_youden`` rule): an operating point
    that holds when acquisition changes, where a clean-only one sits anywhere in a wide gap."""
    pooled = torch.cat([z.reshape(-1) for z in logits_by_shift.values()])
    probs = apply_temperature(pooled, temperature)
    return choose_threshold(probs, labels.reshape(-1).repeat(len(logits_by_shift)), rule="youden")


TEMPERATURE_SOURCES: tuple[str, ...] = ("clean", "shifts")
"""What a temperature is fitted on: the clean validation logits, or those pooled with their shifted copies."""


def shift_temperature(logits_by_shift: dict[str, Tensor], labels: Tensor) -> float:
    """Temperature fitted on the clean and shifted validation logits pooled (``temperature_on=shifts``):
    clean validation of this data is nearly separable, so a temperature fitted on it alone sharpens
    probabilities that a changed acquisition then makes confidently wrong."""
    pooled = torch.cat([z.reshape(-1) for z in logits_by_shift.values()])
    return fit_temperature(pooled, labels.reshape(-1).repeat(len(logits_by_shift)))


def shift_metrics(
    logits_by_shift: dict[str, Tensor], labels: Tensor, threshold: float, temperature: float = 1.0
) -> dict[str, dict[str, float]]:
    """Metrics per key (probs = sigmoid(logits / temperature)), plus ``"mean"`` and ``"worst"`` rows over
    the shifts only (not ``"clean"``); worst is the max for log loss and Brier, the min otherwise."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    reserved = [key for key in SUMMARY_ROWS if key in logits_by_shift]
    if reserved:
        raise ValueError(f"{reserved} are reserved row names")
    ordered = sorted(logits_by_shift, key=lambda key: key != "clean")  # stable: clean first
    rows = {key: _binary_metrics(logits_by_shift[key], labels, threshold, temperature) for key in ordered}
    shifted = [rows[key] for key in ordered if key != "clean"]
    if shifted:
        rows["mean"] = {m: sum(r[m] for r in shifted) / len(shifted) for m in METRICS}
        rows["worst"] = {m: (max if m in _LOWER_IS_BETTER else min)(r[m] for r in shifted) for m in METRICS}
    return rows


COUNTERFACTUAL_COLUMNS: tuple[str, ...] = ("abs_change", "mean_change", "flipped")


def counterfactual_changes(
    logits_by_shift: dict[str, Tensor], labels: Tensor, threshold: float, temperature: float = 1.0
) -> dict[str, dict[str, float]]:
    """The counterfactual check: the same film with and without an acquisition cue. Per acquisition shift
    present and per class (``NORMAL_*``, ``PNEUMONIA_*``): the mean |change| and mean change of the
    calibrated logit (logit / temperature, what the probability is made of) from the clean film, and the
    share of decisions at ``threshold`` that flip; a ``"mean"`` row over those shifts. A model that reads
    the lungs moves by little and flips nothing."""
    if "clean" not in logits_by_shift:
        raise ValueError("the counterfactual check needs the clean logits (key 'clean')")
    clean = logits_by_shift["clean"].double().reshape(-1) / temperature
    labels = labels.reshape(-1)
    cut = (
        math.log(threshold / (1 - threshold))
        if 0 < threshold < 1
        else math.copysign(math.inf, threshold - 0.5)
    )
    rows: dict[str, dict[str, float]] = {}
    for name in (k for k in ACQUISITION_SHIFTS if k in logits_by_shift):
        shifted = logits_by_shift[name].double().reshape(-1) / temperature
        row: dict[str, float] = {}
        for label, cls in enumerate(CLASSES):
            keep = labels == label
            change = (shifted - clean)[keep]
            flipped = (shifted[keep] >= cut) != (clean[keep] >= cut)
            row[f"{cls}_abs_change"] = float(change.abs().mean()) if keep.any() else math.nan
            row[f"{cls}_mean_change"] = float(change.mean()) if keep.any() else math.nan
            row[f"{cls}_flipped"] = float(flipped.double().mean()) if keep.any() else math.nan
        rows[name] = row
    if rows:
        rows["mean"] = {k: sum(r[k] for r in rows.values()) / len(rows) for k in next(iter(rows.values()))}
    return rows


def log_shift_metrics(metrics: dict[str, dict[str, float]], loggers: Any, step: int | None = None) -> None:
    """Log every value as ``val_shift/<shift>/<metric>`` to each Lightning logger (one or a sequence)."""
    flat = {
        f"val_shift/{shift}/{name}": float(value)
        for shift, row in metrics.items()
        for name, value in row.items()
    }
    for logger in [loggers] if hasattr(loggers, "log_metrics") else list(loggers or []):
        logger.log_metrics(flat, step=step)

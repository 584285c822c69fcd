"""How well an OOD score tells films from non-films: synthetic non-film families made from films, and
the separation table that ``python -m xray.ood evaluate=true`` prints (AUROC of the score, films vs each
family, and the share flagged)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from xray.data.transforms import resize_image
from xray.inference.ood import OodError


def _uint8(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return np.zeros(x.shape, np.uint8) if hi <= lo else np.rint((x - lo) * 255 / (hi - lo)).astype(np.uint8)


def _gradient(rng: np.random.Generator, size: int, film: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    if rng.random() < 0.5:  # radial
        cx, cy = rng.uniform(0.2, 0.8, 2)
        ramp = np.hypot(xx - cx, yy - cy)
    lo, hi = sorted(rng.uniform(0, 255, 2))
    return np.rint(lo + (hi - lo) * (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)).astype(np.uint8)


def _texture(rng: np.random.Generator, size: int, film: np.ndarray) -> np.ndarray:
    """1/f^a noise (a = 1.5..2.5): the power spectrum of natural photographs, no anatomy."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.hypot(fx, fy)
    radius[0, 0] = 1.0
    amplitude = radius ** (-rng.uniform(1.5, 2.5) / 2)
    amplitude[0, 0] = 0.0
    phase = rng.uniform(0, 2 * np.pi, amplitude.shape)
    return _uint8(np.fft.irfft2(amplitude * np.exp(1j * phase), s=(size, size)))


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    return resize_image(torch.from_numpy(np.ascontiguousarray(image))[None], size)[0].numpy()


def _crop(rng: np.random.Generator, size: int, film: np.ndarray) -> np.ndarray:
    side = max(2, int(size * rng.uniform(0.15, 0.3)))
    y, x = rng.integers(0, size - side + 1, 2)
    return _resized(film[y : y + side, x : x + side], size)


def _tiny(rng: np.random.Generator, size: int, film: np.ndarray) -> np.ndarray:
    side = int(rng.integers(3, 9))
    return _resized(_resized(film, side), size)


def _elongated(rng: np.random.Generator, size: int, film: np.ndarray) -> np.ndarray:
    width = int(rng.integers(4, 13))
    x = int(rng.integers(0, size - width + 1))
    strip = film[:, x : x + width]
    return _resized(strip if rng.random() < 0.5 else strip.T, size)


OOD_FAMILIES: dict[str, Callable[[np.random.Generator, int, np.ndarray], np.ndarray]] = {
    "noise": lambda rng, size, film: rng.integers(0, 256, (size, size), dtype=np.uint8),
    "gradient": _gradient,
    "texture": _texture,
    "inverted": lambda rng, size, film: 255 - film,
    "crop": _crop,
    "tiny": _tiny,
    "elongated": _elongated,
}
"""Inputs that are not paediatric frontal films, each made from a square uint8 film (or from nothing)
at the model's input size, as ``predict.py`` would see them after resizing."""


def ood_families(films: Tensor, n: int, seed: int = 0) -> dict[str, Tensor]:
    """``n`` images per family of :data:`OOD_FAMILIES` from uint8 films (N,1,S,S): {name: (n,1,S,S)}."""
    if films.ndim != 4 or films.dtype != torch.uint8 or len(films) == 0:
        raise OodError(f"films must be uint8 (N,1,S,S), got {films.dtype}{tuple(films.shape)}")
    size = int(films.shape[-1])
    out: dict[str, Tensor] = {}
    for f, (name, make) in enumerate(OOD_FAMILIES.items()):
        rng = np.random.default_rng([seed, f])
        picks = rng.integers(0, len(films), n)
        images = [make(rng, size, films[int(i), 0].numpy()) for i in picks]
        out[name] = torch.from_numpy(np.stack(images)).unsqueeze(1).contiguous()
    return out


def separation(
    in_scores: Tensor, out_scores: dict[str, Tensor], threshold: float
) -> dict[str, dict[str, float]]:
    """AUROC of the score (in-distribution films = 0, each family = 1; torchmetrics) and flag rates."""
    from torchmetrics.functional.classification import binary_auroc

    def unit(x: Tensor) -> Tensor:
        """A monotone map to [0, 1): torchmetrics would squash raw scores by a sigmoid."""
        x = x.double().clamp(min=0)
        return x / (1 + x)

    inside = torch.as_tensor(in_scores, dtype=torch.float64)
    table = {"films": {"n": len(inside), "flagged": float((inside > threshold).double().mean())}}
    for name, scores in out_scores.items():
        scores = torch.as_tensor(scores, dtype=torch.float64)
        target = torch.cat([torch.zeros(len(inside)), torch.ones(len(scores))]).long()
        auroc = float(binary_auroc(unit(torch.cat([inside, scores])), target))
        table[name] = {
            "n": len(scores),
            "auroc": auroc,
            "flagged": float((scores > threshold).double().mean()),
        }
    return table


def format_separation(table: dict[str, dict[str, float]], title: str) -> list[str]:
    """Markdown rows of :func:`separation`: family, n, AUROC, flagged."""
    films = table["films"]
    lines = [
        f"### {title}",
        "",
        f"validation films: n={films['n']}, accepted {100 * (1 - films['flagged']):.1f}%",
        "",
        "| family | n | AUROC (films vs family) | flagged |",
        "|---|---:|---:|---:|",
    ]
    for name, row in table.items():
        if name != "films":
            lines.append(f"| {name} | {row['n']} | {row['auroc']:.3f} | {100 * row['flagged']:.1f}% |")
    return lines

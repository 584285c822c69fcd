"""Figures for a run: ``make_<name>_figure(...) -> Figure`` (for loggers' ``add_figure``), and
:func:`save_figure` to write any of them as a PNG.

Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas, never through ``pyplot``:
no global registry to leak into, no GUI backend, and the process-wide backend is left alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

from xray.core.constants import CLASSES
from xray.evaluation.metrics import (
    ECE_BINS,
    _ArrayLike,
    classification_metrics,
    expected_calibration_error,
    prepare_probs_labels,
)

DPI = 120
_SPLIT_COLORS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
_FALLBACK_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)  # attach the Agg canvas so the figure can render without pyplot
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = DPI, close: bool = True) -> Path:
    """Save ``fig`` as PNG (parents created) and, unless ``close=False``, release it (so log it first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    if close:
        fig.clear()  # not a pyplot figure: no registry to leave, clearing frees its artists
    return path


def _color(split: str, i: int) -> str:
    return _SPLIT_COLORS.get(split, _FALLBACK_COLORS[i % len(_FALLBACK_COLORS)])


# ---------------------------------------------------------------------------------------------- curves
def _series(history: Sequence[Mapping[str, Any]], split: str, metric: str) -> tuple[list[float], list[float]]:
    """(epochs, values) for e.g. ("val", "loss"), accepting Lightning's key variants."""
    aliases = [metric] + (["accuracy"] if metric == "acc" else [])
    keys = [f"{split}/{m}{suffix}" for m in aliases for suffix in ("", "_epoch")]
    keys += [f"{split}_{m}" for m in aliases]
    xs, ys = [], []
    for i, row in enumerate(history):
        for key in keys:
            value = row.get(key)
            if value is None:
                continue
            value = float(value.item() if isinstance(value, Tensor) else value)
            if math.isfinite(value):
                xs.append(float(row.get("epoch", i)))
                ys.append(value)
            break
    return xs, ys


def make_curves_figure(history: Sequence[Mapping[str, Any]], title: str = "Training curves") -> Figure:
    """Per-epoch train vs val loss and accuracy, two panels; missing keys/epochs are skipped."""
    fig = _new_figure((10, 4))
    axes = fig.subplots(1, 2)
    for ax, metric, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        plotted = 0
        for i, split in enumerate(("train", "val")):
            xs, ys = _series(history, split, metric)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, color=_color(split, i), label=split)
                plotted += 1
        if plotted == 0:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        if plotted > 1:
            ax.legend()
        ax.set(title=label.capitalize(), xlabel="epoch", ylabel=label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ ROC and PR
def _split_metrics(
    curves: Mapping[str, tuple[_ArrayLike, _ArrayLike]], thresholds: Mapping[str, float] | None
) -> Iterator[tuple[str, str, Tensor, Tensor, dict[str, float]]]:
    """(split, colour, probs, labels, metrics at the split's threshold or 0.5) per split."""
    for i, (split, (probs, labels)) in enumerate(curves.items()):
        p, y = prepare_probs_labels(probs, labels)
        yield split, _color(split, i), p, y, classification_metrics(p, y, (thresholds or {}).get(split, 0.5))


def _mark_point(ax: Any, x: float, y: float, color: Any, label: str) -> None:
    """The operating point on a curve: a black-edged dot in the split's colour."""
    ax.plot(
        x, y, marker="o", markersize=8, color=color, markeredgecolor="black", linestyle="none", label=label
    )


def _finish(fig: Figure, ax: Any, xlabel: str, ylabel: str, title: str, legend_loc: str) -> Figure:
    """Unit-square axes with labels, grid and legend, laid out."""
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend_loc, fontsize="small")
    fig.tight_layout()
    return fig


def make_roc_figure(
    curves: Mapping[str, tuple[_ArrayLike, _ArrayLike]],
    thresholds: Mapping[str, float] | None = None,
    title: str = "ROC",
) -> Figure:
    """ROC per split with AUROC in the legend, the chance diagonal and each operating point."""
    fig = _new_figure((5.5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="chance (AUROC 0.5)")
    for split, color, p, y, m in _split_metrics(curves, thresholds):
        if math.isnan(m["auroc"]):  # one class
            ax.plot([], [], color=color, label=f"{split}: one class, ROC undefined")
            continue
        fpr, tpr, _ = binary_roc(p, y)
        ax.plot(
            fpr.numpy(), tpr.numpy(), color=color, linewidth=1.8, label=f"{split} (AUROC {m['auroc']:.3f})"
        )
        if split in (thresholds or {}):
            label = (
                f"{split} @ {m['threshold']:.3f}: sens {m['sensitivity']:.3f}, spec {m['specificity']:.3f}"
            )
            _mark_point(ax, 1 - m["specificity"], m["sensitivity"], color, label)
    ax.set_aspect("equal")
    return _finish(
        fig,
        ax,
        "1 - specificity (false positive rate)",
        "sensitivity (true positive rate)",
        title,
        "lower right",
    )


def make_pr_figure(
    curves: Mapping[str, tuple[_ArrayLike, _ArrayLike]],
    thresholds: Mapping[str, float] | None = None,
    title: str = "Precision-recall (PNEUMONIA positive)",
) -> Figure:
    """Precision-recall per split with AP in the legend, the prevalence baseline and operating points."""
    fig = _new_figure((5.5, 5))
    ax = fig.subplots()
    for split, color, p, y, m in _split_metrics(curves, thresholds):
        prevalence = float(y.double().mean())
        ax.axhline(
            prevalence, color=color, linestyle=":", linewidth=1, label=f"{split} prevalence {prevalence:.3f}"
        )
        if int(y.sum()) == 0:
            ax.plot([], [], color=color, label=f"{split}: no positives, PR undefined")
            continue
        precision, recall, _ = binary_precision_recall_curve(p, y)
        ax.step(
            recall.numpy(),
            precision.numpy(),
            where="post",
            color=color,
            linewidth=1.8,
            label=f"{split} (AP {m['average_precision']:.3f})",
        )
        if split in (thresholds or {}) and not math.isnan(m["ppv"]):
            label = f"{split} @ {m['threshold']:.3f}: recall {m['sensitivity']:.3f}, precision {m['ppv']:.3f}"
            _mark_point(ax, m["sensitivity"], m["ppv"], color, label)
    return _finish(fig, ax, "recall (sensitivity)", "precision (PPV)", title, "lower left")


# ------------------------------------------------------------------------------------ confusion matrix
def make_confusion_matrix_figure(
    tn: int, fp: int, fn: int, tp: int, title: str = "Confusion matrix"
) -> Figure:
    """2x2 counts with row percentages (share of each true class)."""
    counts = np.array([[tn, fp], [fn, tp]], dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    fig = _new_figure((5.2, 4.4))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    for r in range(2):
        for c in range(2):
            text = f"{counts[r, c]}\n{100 * share[r, c]:.1f}%"
            color = "white" if share[r, c] > 0.5 else "black"
            ax.text(c, r, text, ha="center", va="center", fontsize=12, color=color)
    ax.set_xticks([0, 1], labels=list(CLASSES))
    ax.set_yticks([0, 1], labels=list(CLASSES), rotation=90, va="center")
    ax.set(xlabel="Predicted", ylabel="True", title=title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- calibration
def make_calibration_figure(
    probs: _ArrayLike, labels: _ArrayLike, n_bins: int = 10, title: str = "Calibration"
) -> Figure:
    """Reliability diagram over a per-class histogram of p(PNEUMONIA); its legend gives the report's ECE."""
    p, y = prepare_probs_labels(probs, labels)
    pn, yn = p.double().numpy(), y.numpy()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(pn, edges[1:-1], right=False), 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    filled = counts > 0
    mean_p, frac_pos = (
        np.bincount(bins, weights=w, minlength=n_bins)[filled] / counts[filled]
        for w in (pn, yn.astype(float))
    )
    ece = expected_calibration_error(p, y)

    fig = _new_figure((5.5, 6))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    ax.plot(mean_p, frac_pos, marker="o", color="tab:blue", label=f"model (ECE {ece:.3f}, {ECE_BINS} bins)")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed fraction PNEUMONIA", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    hist.hist(
        [pn[yn == 0], pn[yn == 1]],
        bins=edges,
        stacked=True,
        color=["tab:cyan", "tab:red"],
        label=[f"true {CLASSES[0]}", f"true {CLASSES[1]}"],
    )
    hist.set(xlabel="predicted p(PNEUMONIA)", ylabel="cases")
    hist.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------- mistakes
def _to_display(image: Tensor) -> np.ndarray:
    """(1,H,W)/(H,W)/(3,H,W) uint8 or float [0,1] -> array imshow can draw."""
    img = image.detach().cpu()
    img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float().clamp(0.0, 1.0)
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    elif img.ndim == 3 and img.shape[0] == 3:
        img = img.permute(1, 2, 0)
    return img.numpy()


def _short(name: str, width: int = 26) -> str:
    name = Path(name).name
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def make_mistakes_figure(
    images: Tensor,
    probs: _ArrayLike,
    labels: _ArrayLike,
    names: Sequence[str],
    k: int = 16,
    threshold: float = 0.5,
    title: str = "Most confident mistakes",
) -> Figure:
    """Grid of the ``k`` most confident mistakes (largest |p - label| among wrong calls at ``threshold``)."""
    p, y = prepare_probs_labels(probs, labels)
    if len(images) != p.numel() or len(names) != p.numel():
        raise ValueError(
            f"images ({len(images)}), names ({len(names)}) and probs ({p.numel()}) differ in length"
        )
    wrong = torch.nonzero((p >= threshold).long() != y).reshape(-1)
    if wrong.numel() == 0:
        fig = _new_figure((6, 3))
        ax = fig.subplots()
        message = f"No mistakes at threshold {threshold:.3f}\n({p.numel()} images)"
        ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14)
        ax.set_axis_off()
        ax.set_title(title)
        return fig
    error = (p[wrong].double() - y[wrong].double()).abs()
    chosen = wrong[torch.argsort(error, descending=True, stable=True)[: max(int(k), 1)]].tolist()
    cols = min(len(chosen), math.ceil(math.sqrt(len(chosen))))
    rows = math.ceil(len(chosen) / cols)
    fig = _new_figure((2.6 * cols, 2.9 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax, i in zip(axes, chosen, strict=False):
        ax.imshow(_to_display(images[i]), cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(
            f"{_short(str(names[i]))}\ntrue {CLASSES[int(y[i])]}, p(PNEU)={float(p[i]):.3f}", fontsize=8
        )
        ax.set_axis_off()
    for ax in axes[len(chosen) :]:
        ax.set_axis_off()
    fig.suptitle(f"{title} (threshold {threshold:.3f}; {len(chosen)} of {wrong.numel()} wrong)")
    fig.tight_layout()
    return fig

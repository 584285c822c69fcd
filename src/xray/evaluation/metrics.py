"""Clinical metrics on tensors, shared by training, prediction and ``xray.evaluation.folds``: one operating point,
bootstrap intervals and the threshold choice.

Label 1 = PNEUMONIA. A case is positive when ``prob >= threshold`` (torchmetrics' ``threshold=`` is
strict, so we count the confusion matrix ourselves). Probabilities outside [0, 1] are rejected (torchmetrics
would silently sigmoid them). An undefined metric (zero denominator, one class) is nan, never 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_calibration_error,
    binary_roc,
    multilabel_auroc,
    multilabel_average_precision,
)

THRESHOLD_RULES: tuple[str, ...] = ("youden", "sensitivity", "fixed")

BOOTSTRAP_METRICS: tuple[str, ...] = (
    "accuracy",
    "auroc",
    "average_precision",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "balanced_accuracy",
    "brier",
)

ECE_BINS = 15  # equal-width bins of the one (L1) ECE the project reports

_ArrayLike = Tensor | np.ndarray | Sequence[float]


def prepare_probs_labels(probs: _ArrayLike, labels: _ArrayLike) -> tuple[Tensor, Tensor]:
    """Validate and flatten to CPU (probs float32/float64, labels int64); fail loudly on bad input."""
    p = torch.as_tensor(probs).detach().cpu().reshape(-1)
    y = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if p.numel() != y.numel():
        raise ValueError(f"probs and labels differ in size: {p.numel()} vs {y.numel()}")
    if p.numel() == 0:
        raise ValueError("no cases to evaluate (empty probs/labels)")
    if not p.is_floating_point():
        raise ValueError(f"probs must be floating point probabilities, got dtype {p.dtype}")
    if p.dtype != torch.float64:
        p = p.float()
    if not bool(torch.isfinite(p).all()) or float(p.min()) < 0.0 or float(p.max()) > 1.0:
        raise ValueError("probs must be finite probabilities in [0, 1] (apply sigmoid to logits first)")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    return p, y.long()


def count_metrics(tp: Tensor, fp: Tensor, fn: Tensor, tn: Tensor) -> dict[str, Tensor]:
    """Threshold-dependent metrics from confusion counts, elementwise (one point or many resamples)."""
    tp, fp, fn, tn = (torch.as_tensor(c, dtype=torch.float64) for c in (tp, fp, fn, tn))

    def div(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(b > 0, a / b.clamp_min(1), math.nan)

    sens, spec = div(tp, tp + fn), div(tn, tn + fp)
    return {
        "accuracy": div(tp + tn, tp + tn + fp + fn),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": div(tp, tp + fp),
        "npv": div(tn, tn + fn),
        "f1": div(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (sens + spec) / 2,
    }


def _confusion_counts(pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(tp, fp, fn, tn) summed over the last dimension."""
    return (
        (pred & y).sum(-1),
        (pred & ~y).sum(-1),
        (~pred & y).sum(-1),
        (~pred & ~y).sum(-1),
    )


def _ece(p: Tensor, y: Tensor) -> float:
    return float(binary_calibration_error(p, y, n_bins=ECE_BINS, norm="l1"))


def expected_calibration_error(probs: _ArrayLike, labels: _ArrayLike) -> float:
    return _ece(*prepare_probs_labels(probs, labels))


def classification_metrics(probs: _ArrayLike, labels: _ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Clinical metrics at one operating point; undefined ranking metrics are nan, never computed (no warnings)."""
    p, y = prepare_probs_labels(probs, labels)
    threshold = float(threshold)
    tp, fp, fn, tn = (int(c) for c in _confusion_counts(p >= threshold, y.bool()))
    n, n_pos = int(y.numel()), tp + fn
    return {
        # undefined -> the one math.nan object, so equal payloads compare equal (nan != nan otherwise)
        **{k: math.nan if v.isnan() else float(v) for k, v in count_metrics(tp, fp, fn, tn).items()},
        "auroc": float(binary_auroc(p, y)) if 0 < n_pos < n else math.nan,
        "average_precision": float(binary_average_precision(p, y)) if n_pos > 0 else math.nan,
        "brier": float(((p.double() - y) ** 2).mean()),
        "ece": _ece(p, y),
        **dict(tn=tn, fp=fp, fn=fn, tp=tp, n=n, n_pos=n_pos, threshold=threshold),
    }


def _bootstrap_samples(
    p: Tensor, y: Tensor, threshold: float, n_boot: int, seed: int, metrics: Sequence[str]
) -> dict[str, Tensor]:
    """Per-resample metric values, shape (n_boot,), nan where undefined; AUROC/AP treat each resample as a label."""
    n = p.numel()
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    pb, yb = p[idx], y[idx]  # (B, n)
    counts = _confusion_counts(pb >= threshold, yb.bool())  # compared in p's dtype, as the point does
    out = {k: v for k, v in count_metrics(*counts).items() if k in metrics}
    if "brier" in metrics:
        out["brier"] = ((pb.double() - yb) ** 2).mean(1)
    n_pos = yb.sum(1)
    both = (n_pos > 0) & (n_pos < n)
    with warnings.catch_warnings():  # one-class resamples warn; they are masked to nan below
        warnings.simplefilter("ignore")
        if "auroc" in metrics:
            auc = multilabel_auroc(pb.T, yb.T, num_labels=n_boot, average=None).double()
            out["auroc"] = torch.where(both, auc, math.nan)
        if "average_precision" in metrics:
            ap = multilabel_average_precision(pb.T, yb.T, num_labels=n_boot, average=None).double()
            out["average_precision"] = torch.where(n_pos > 0, ap, math.nan)
    return out


def bootstrap_ci(
    probs: _ArrayLike,
    labels: _ArrayLike,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    metrics: Sequence[str] = ("accuracy", "auroc", "sensitivity", "specificity"),
) -> dict[str, tuple[float, float]]:
    """Seeded percentile bootstrap over cases -> {metric: (low, high)}; resamples where a metric is
    undefined are skipped for it, and all-undefined gives (nan, nan)."""
    unknown = [m for m in metrics if m not in BOOTSTRAP_METRICS]
    if unknown:
        raise ValueError(
            f"bootstrap_ci: unsupported metric(s) {unknown}; supported: {list(BOOTSTRAP_METRICS)}"
        )
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    p, y = prepare_probs_labels(probs, labels)
    samples = _bootstrap_samples(p, y, float(threshold), int(n_boot), int(seed), list(metrics))
    q = torch.tensor([alpha / 2.0, 1.0 - alpha / 2.0], dtype=torch.float64)
    result: dict[str, tuple[float, float]] = {}
    for name in metrics:
        values = samples[name]
        low, high = (math.nan, math.nan) if values.isnan().all() else torch.nanquantile(values, q).tolist()
        result[name] = (low, high)
    return result


def choose_threshold(
    probs: _ArrayLike, labels: _ArrayLike, rule: str = "youden", target_sensitivity: float = 0.95
) -> float:
    """The operating threshold in (0, 1] on (validation) scores; 0.5 for ``fixed`` or one class.

    ``youden`` maximises sensitivity + specificity - 1 (exact ties: closest to 0.5, then larger);
    ``sensitivity`` takes the largest threshold reaching ``target_sensitivity``. Counts are redone with
    ``>=`` at each ROC threshold so the result reproduces its point; a chosen 0.0 becomes float32 tiny.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {list(THRESHOLD_RULES)}")
    if rule == "sensitivity" and not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    p, y = prepare_probs_labels(probs, labels)
    n_pos = int(y.sum())
    n_neg = int(y.numel()) - n_pos
    if rule == "fixed" or n_pos == 0 or n_neg == 0:
        return 0.5

    _, _, thresholds = binary_roc(p, y)  # decreasing; index 0 is a "nothing positive" sentinel
    cand = thresholds[1:].to(p.dtype)
    pos_sorted = p[y == 1].sort().values
    neg_sorted = p[y == 0].sort().values
    tp = n_pos - torch.searchsorted(pos_sorted, cand, right=False)  # positives with p >= t
    fp = n_neg - torch.searchsorted(neg_sorted, cand, right=False)

    if rule == "youden":
        j = tp * n_neg - fp * n_pos  # = J * P * N, an exact integer: ties are exact
        best = torch.nonzero(j == j.max()).reshape(-1)
        dist = (cand[best].double() - 0.5).abs()
        close = best[dist == dist.min()]
        t = float(cand[close].max())
    else:  # "sensitivity": candidates are decreasing, sensitivity increasing
        ok = torch.nonzero(tp.double() / n_pos >= target_sensitivity - 1e-12).reshape(-1)
        t = float(cand[ok[0]])
    if t <= 0.0:
        t = float(torch.finfo(torch.float32).tiny)
    return min(t, 1.0)


def evaluate(
    probs: _ArrayLike,
    labels: _ArrayLike,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Metrics at 0.5 and at ``threshold`` plus bootstrap CIs at ``threshold`` (JSON-ready)."""
    p, y = prepare_probs_labels(probs, labels)
    ci = bootstrap_ci(
        p, y, threshold=threshold, n_boot=n_boot, seed=seed, alpha=alpha, metrics=BOOTSTRAP_METRICS
    )
    return {
        "at_0.5": classification_metrics(p, y, 0.5),
        "at_threshold": classification_metrics(p, y, threshold),
        "ci": {k: [lo, hi] for k, (lo, hi) in ci.items()},
        "threshold": float(threshold),
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "alpha": float(alpha)},
    }

"""Clinical evaluation: metrics, bootstrap intervals, threshold choice, metrics.json and report.md.

Pure library code on tensors (no Lightning Trainer), so the LightningModule, ``train.py`` and
``predict.py`` all report the same numbers computed the same way.

Conventions (one place, used everywhere):

* label 1 = PNEUMONIA (positive class), 0 = NORMAL.
* A case is predicted positive when ``prob >= threshold``. torchmetrics' own ``threshold=`` argument
  uses ``prob > threshold`` (strict), while its ROC thresholds mean ``>=``; to keep one meaning we
  binarise here and hand torchmetrics integer predictions, which it does not threshold again.
* Probabilities must already be in [0, 1]: torchmetrics silently applies a sigmoid to float inputs
  with any value outside [0, 1], so out-of-range input is rejected instead of "fixed".
* A metric whose denominator is zero (e.g. sensitivity with no positive cases, AUROC with one class)
  is ``nan``, never the 0 torchmetrics returns, so an undefined number is not mistaken for a bad one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_average_precision,
    binary_calibration_error,
    binary_confusion_matrix,
    binary_f1_score,
    binary_precision,
    binary_recall,
    binary_roc,
    binary_specificity,
)

from xray.atomic import atomic_write_text
from xray.constants import CLASSES

__all__ = [
    "ANCHORS",
    "BOOTSTRAP_METRICS",
    "CLASS_NAMES",
    "PLOT_FILES",
    "THRESHOLD_RULES",
    "bootstrap_ci",
    "choose_threshold",
    "classification_metrics",
    "evaluate",
    "prepare_probs_labels",
    "render_report",
    "write_metrics_json",
    "write_report",
]

CLASS_NAMES: tuple[str, ...] = CLASSES  # index = label: NORMAL=0, PNEUMONIA=1
THRESHOLD_RULES: tuple[str, ...] = ("youden", "sensitivity", "fixed")

# Published figures on the official 624-image test split (234 NORMAL / 390 PNEUMONIA), so a run's
# test numbers can be read against them. None = not reported by the source.
ANCHORS: list[dict[str, Any]] = [
    {
        "name": "Keras original",
        "source": "the Keras notebook this project ports",
        "model": "Keras CNN",
        "accuracy": 0.87,
        "sensitivity": None,
        "specificity": None,
        "auroc": None,
        "note": "selected on the test split (leakage): optimistic",
    },
    {
        "name": "Kermany et al. 2018",
        "source": "Cell 172(5):1122-1131",
        "model": "Inception-v3, ImageNet transfer",
        "accuracy": 0.928,
        "sensitivity": 0.932,
        "specificity": 0.901,
        "auroc": 0.968,
        "note": "",
    },
    {
        "name": "MedMNIST+ (PneumoniaMNIST)",
        "source": "Doerrich et al. 2024, MedMNIST+ benchmark",
        "model": "ResNet-18, 224 px, end-to-end (best)",
        "accuracy": 0.911,
        "sensitivity": None,
        "specificity": None,
        "auroc": 0.980,
        "note": "",
    },
    {
        "name": "Majority class",
        "source": "baseline",
        "model": "always PNEUMONIA",
        "accuracy": 0.625,
        "sensitivity": 1.0,
        "specificity": 0.0,
        "auroc": 0.5,
        "note": "390/624: the floor any model must beat",
    },
]

# Metrics bootstrap_ci can resample (all vectorised over resamples).
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

# Plot files a run directory may hold, in report order, with their captions.
PLOT_FILES: tuple[tuple[str, str], ...] = (
    ("curves.png", "Training curves"),
    ("roc.png", "ROC"),
    ("pr.png", "Precision-recall"),
    ("confusion_matrix.png", "Confusion matrix"),
    ("calibration.png", "Calibration"),
    ("mistakes.png", "Most confident mistakes"),
)

_ArrayLike = Tensor | np.ndarray | Sequence[float]


# --------------------------------------------------------------------------------------------- inputs
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
    if y.is_floating_point() and not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    y = y.long()
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    return p, y


def _f(x: Tensor | float) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


# -------------------------------------------------------------------------------------------- metrics
ECE_BINS = 15
"""Equal-width bins of the one ECE the project reports (torchmetrics, L1): report, metrics, figures."""


def expected_calibration_error(probs: _ArrayLike, labels: _ArrayLike) -> float:
    p, y = prepare_probs_labels(probs, labels)
    return _f(binary_calibration_error(p, y, n_bins=ECE_BINS, norm="l1"))


def classification_metrics(probs: _ArrayLike, labels: _ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Clinical metrics at one operating point (``prob >= threshold``), via torchmetrics.

    Undefined metrics (zero denominator, one-class AUROC/AP) are nan rather than torchmetrics' 0,
    and are not computed at all, so there are no warnings to spam the log.
    """
    p, y = prepare_probs_labels(probs, labels)
    threshold = float(threshold)
    pred = (p >= threshold).long()  # integer preds: torchmetrics uses them as-is (no '>' threshold)
    (tn, fp), (fn, tp) = binary_confusion_matrix(pred, y).tolist()
    n, n_pos = int(y.numel()), int(tp + fn)
    n_neg = n - n_pos

    sens = _f(binary_recall(pred, y)) if n_pos > 0 else math.nan
    spec = _f(binary_specificity(pred, y)) if n_neg > 0 else math.nan
    return {
        "accuracy": _f(binary_accuracy(pred, y)),
        "auroc": _f(binary_auroc(p, y)) if 0 < n_pos < n else math.nan,
        "average_precision": _f(binary_average_precision(p, y)) if n_pos > 0 else math.nan,
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _f(binary_precision(pred, y)) if tp + fp > 0 else math.nan,
        "npv": _ratio(tn, tn + fn),  # torchmetrics has no NPV
        "f1": _f(binary_f1_score(pred, y)) if 2 * tp + fp + fn > 0 else math.nan,
        "balanced_accuracy": (sens + spec) / 2.0,
        # torchmetrics (1.9) has no binary Brier score: Brier = MSE of the probability vs the 0/1 label.
        "brier": _f(mean_squared_error(p, y.to(p.dtype))),
        "ece": expected_calibration_error(p, y),
        "tn": int(tn),
        "fp": int(fp),
        "fn": int(fn),
        "tp": int(tp),
        "n": n,
        "n_pos": n_pos,
        "threshold": threshold,
    }


# ------------------------------------------------------------------------------------------ bootstrap
def _bootstrap_samples(
    p: Tensor, y: Tensor, threshold: float, n_boot: int, seed: int, metrics: Sequence[str]
) -> dict[str, Tensor]:
    """Per-resample metric values, shape (n_boot,), nan where a resample leaves it undefined."""
    n = p.numel()
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    pb = p[idx]  # (B, n)
    yb = y[idx].bool()
    pred = pb >= threshold  # compared in p's own dtype, exactly as classification_metrics does
    pb = pb.double()
    tp = (pred & yb).sum(1).double()
    fp = (pred & ~yb).sum(1).double()
    fn = (~pred & yb).sum(1).double()
    tn = (~pred & ~yb).sum(1).double()
    n_pos = tp + fn
    n_neg = tn + fp
    nan = torch.tensor(math.nan, dtype=torch.float64)

    def div(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(b > 0, a / b.clamp_min(1), nan)

    out: dict[str, Tensor] = {}
    sens, spec = div(tp, n_pos), div(tn, n_neg)
    simple = {
        "accuracy": lambda: (tp + tn) / n,
        "sensitivity": lambda: sens,
        "specificity": lambda: spec,
        "ppv": lambda: div(tp, tp + fp),
        "npv": lambda: div(tn, tn + fn),
        "f1": lambda: div(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": lambda: (sens + spec) / 2,
        "brier": lambda: ((pb - yb.double()) ** 2).mean(1),
    }
    for name in metrics:
        if name in simple:
            out[name] = simple[name]()

    if "auroc" in metrics or "average_precision" in metrics:
        # Sort each resample once; tie groups via searchsorted on the sorted rows.
        s, order = pb.sort(dim=1)
        ys = yb.gather(1, order).double()
        left = torch.searchsorted(s, s, right=False)  # first index of each value's tie group
        right = torch.searchsorted(s, s, right=True)  # one past its last index
        if "auroc" in metrics:
            # Mann-Whitney U with mid-ranks for ties: AUROC = (R_pos - P(P+1)/2) / (P N).
            midrank = (left + right + 1).double() / 2.0
            r_pos = (midrank * ys).sum(1)
            auc = (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg).clamp_min(1)
            out["auroc"] = torch.where((n_pos > 0) & (n_neg > 0), auc, nan)
        if "average_precision" in metrics:
            # AP (step-wise, as torchmetrics/sklearn): mean over positives of the precision at the
            # threshold equal to their score, i.e. over all cases scoring >= it (ties included).
            cum_pos = torch.cat([torch.zeros(n_boot, 1, dtype=ys.dtype), ys.cumsum(1)], dim=1)
            pos_at_or_above = n_pos[:, None] - cum_pos.gather(1, left)
            prec = pos_at_or_above / (n - left).double()
            ap = (prec * ys).sum(1) / n_pos.clamp_min(1)
            out["average_precision"] = torch.where(n_pos > 0, ap, nan)
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
    """Seeded percentile bootstrap (cases resampled with replacement) -> {metric: (low, high)}.

    Vectorised over an (n_boot, n) index matrix; resamples where a metric is undefined (e.g. one
    class for AUROC) are skipped for that metric. All-undefined gives (nan, nan).
    """
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
        if bool(torch.isnan(values).all()):
            result[name] = (math.nan, math.nan)
            continue
        low, high = torch.nanquantile(values, q).tolist()
        result[name] = (float(low), float(high))
    return result


# ------------------------------------------------------------------------------------------ threshold
def choose_threshold(
    probs: _ArrayLike, labels: _ArrayLike, rule: str = "youden", target_sensitivity: float = 0.95
) -> float:
    """Pick the operating threshold on (validation) scores; apply it as ``prob >= threshold``.

    * ``youden``: maximise sensitivity + specificity - 1 over torchmetrics' ROC thresholds; exact ties
      go to the threshold closest to 0.5 (then the larger one).
    * ``sensitivity``: the largest threshold whose sensitivity >= ``target_sensitivity``.
    * ``fixed``: 0.5.

    The first ROC threshold torchmetrics returns is a sentinel for the "nothing positive" point (1.0
    in torchmetrics >= 1.x, max+1 in older ones) that ``>=`` cannot reproduce when a score equals 1.0,
    so it is dropped. Counts are recomputed exactly with ``>=`` at each candidate, so the returned
    threshold reproduces the chosen point. With one class present the ROC is undefined: returns 0.5.
    The result lies in (0, 1]; a chosen threshold of exactly 0.0 becomes float32 ``tiny``.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {list(THRESHOLD_RULES)}")
    if rule == "sensitivity" and not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    p, y = prepare_probs_labels(probs, labels)
    if rule == "fixed":
        return 0.5
    n_pos = int(y.sum())
    n_neg = int(y.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.5

    _, _, thresholds = binary_roc(p, y)  # decreasing; index 0 is the sentinel
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


# ----------------------------------------------------------------------------------------- evaluation
def evaluate(
    probs: _ArrayLike,
    labels: _ArrayLike,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Metrics at 0.5 and at ``threshold`` plus bootstrap CIs at ``threshold``: JSON-ready.

    AUROC, average precision and Brier do not depend on the threshold, so their CIs hold at 0.5 too.
    """
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


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; nan/inf -> None (strict JSON has no nan)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Tensor):
        return _jsonable(obj.item() if obj.numel() == 1 else obj.tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def write_metrics_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """metrics.json: sorted keys, nan -> null, written atomically. Returns the path."""
    path = Path(path)
    text = json.dumps(_jsonable(payload), sort_keys=True, indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    return path


# --------------------------------------------------------------------------------------------- report
REPORT_ROWS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy"),
    ("auroc", "AUROC"),
    ("sensitivity", "Sensitivity (recall PNEUMONIA)"),
    ("specificity", "Specificity"),
    ("ppv", "PPV (precision)"),
    ("npv", "NPV"),
    ("f1", "F1"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("average_precision", "Average precision"),
    ("brier", "Brier score"),
    ("ece", f"ECE ({ECE_BINS} bins)"),
)
THRESHOLD_FREE = frozenset({"auroc", "average_precision", "brier", "ece"})
_SPLIT_ORDER = ("train", "val", "test")


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    x = float(x)
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    if x is None or math.isnan(float(x)):
        return "–"
    return f"{100 * float(x):.1f}".removesuffix(".0")


def _cell(value: Any, ci: Sequence[Any] | None) -> str:
    text = _num(value)
    if ci is not None and text != "n/a" and ci[0] is not None and ci[1] is not None:
        lo, hi = float(ci[0]), float(ci[1])
        if not (math.isnan(lo) or math.isnan(hi)):
            text += f" ({lo:.3f}-{hi:.3f})"
    return text


def _ordered(keys: Sequence[str]) -> list[str]:
    return sorted(keys, key=lambda k: (_SPLIT_ORDER.index(k) if k in _SPLIT_ORDER else len(_SPLIT_ORDER), k))


def _md_escape(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_report(
    *,
    results: Mapping[str, Mapping[str, Any]] | None = None,
    counts: Mapping[str, Mapping[str, int]] | None = None,
    config: Mapping[str, Any] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    title: str = "Chest X-ray classifier: run report",
    test_used_for_selection: bool = False,
) -> str:
    """report.md text for one run.

    ``results``: split name -> :func:`evaluate` payload (``val``, ``test``; others allowed).
    ``counts``: split -> {"NORMAL": n, "PNEUMONIA": m}. ``config``: flat dict of the settings that
    matter. ``run_dir``: where plots are looked for (only existing PNGs are embedded, by relative
    name, so report.md must sit in ``run_dir``). Missing pieces are stated, not crashed on.
    """
    results = dict(results or {})
    lines: list[str] = [f"# {title}", ""]

    # -- data
    lines += ["## Data", ""]
    if counts:
        lines += ["| split | NORMAL | PNEUMONIA | total | % PNEUMONIA |", "|---|---:|---:|---:|---:|"]
        for split in _ordered(list(counts)):
            c = counts[split]
            neg, pos = int(c.get(CLASS_NAMES[0], 0)), int(c.get(CLASS_NAMES[1], 0))
            tot = neg + pos
            share = f"{100 * pos / tot:.1f}" if tot else "n/a"
            lines.append(f"| {split} | {neg} | {pos} | {tot} | {share} |")
        if "test" not in counts:
            lines += ["", "No test split in this run."]
    else:
        lines.append("Data counts were not recorded.")
    lines.append("")

    # -- config
    lines += ["## Configuration", ""]
    if config:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {_md_escape(k)} | {_md_escape(v)} |" for k, v in config.items()]
    else:
        lines.append("Configuration was not recorded.")
    lines.append("")

    # -- metrics
    lines += ["## Metrics", ""]
    evaluated = [s for s in results if isinstance(results[s], Mapping) and "at_threshold" in results[s]]
    splits = _ordered([s for s in evaluated if s != "train"]) or _ordered(evaluated)
    if splits:
        header, columns = ["metric"], []
        for split in splits:
            r = results[split]
            t = r.get("threshold")
            header += [f"{split} @ 0.5", f"{split} @ {_num(t)}" if t is not None else f"{split} @ threshold"]
            columns += [(r, "at_0.5"), (r, "at_threshold")]
        lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for key, label in REPORT_ROWS:
            cells = []
            for r, which in columns:
                ci_all = r.get("ci") or {}
                thresh = r.get("threshold")
                # CIs are computed at the chosen threshold; threshold-free metrics' CIs hold at 0.5 too.
                use_ci = which == "at_threshold" or key in THRESHOLD_FREE or thresh == 0.5
                cells.append(_cell((r.get(which) or {}).get(key), ci_all.get(key) if use_ci else None))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        confusion = []
        for r, which in columns:
            m = r.get(which) or {}
            confusion.append("/".join(str(m.get(k, "?")) for k in ("tn", "fp", "fn", "tp")))
        lines.append("| TN/FP/FN/TP | " + " | ".join(confusion) + " |")
        boot = next((results[s].get("bootstrap") for s in splits if results[s].get("bootstrap")), None)
        ci_note = "Intervals: percentile bootstrap over cases"
        if boot:
            ci_note += f" ({boot.get('n_boot')} resamples, seed {boot.get('seed')}, {100 * (1 - float(boot.get('alpha', 0.05))):.0f}%)"
        lines += ["", ci_note + "; PNEUMONIA is the positive class; a case is positive when p >= threshold."]
        if "test" not in results:
            lines += ["", "The test split was not evaluated in this run."]
    else:
        lines.append("No evaluation results were given.")
    lines.append("")
    calibration = results.get("calibration")
    if calibration:
        lines += [
            "## Calibration (temperature scaling on validation)",
            "",
            f"Temperature {_num(calibration.get('temperature'))}: validation log loss "
            f"{_num(calibration.get('log_loss_before'))} -> {_num(calibration.get('log_loss_after'))}, "
            f"ECE {_num(calibration.get('ece_before'))} -> {_num(calibration.get('ece_after'))}. "
            "Probabilities above are calibrated; the ranking (AUROC) is unchanged.",
            "",
        ]
    if results.get("val_shift"):
        from xray.shifts import render_shift_table

        lines += ["## Shift validation", "", render_shift_table(results["val_shift"]), ""]

    # -- anchors
    lines += [
        "## Published anchors (official 624-image test split)",
        "",
        "| reference | model | accuracy (%) | sensitivity (%) | specificity (%) | AUROC | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for a in ANCHORS:
        lines.append(
            f"| {a['name']} ({a['source']}) | {a['model']} | {_pct(a['accuracy'])} | {_pct(a['sensitivity'])} "
            f"| {_pct(a['specificity'])} | {_num(a['auroc']) if a['auroc'] is not None else '–'} | {a['note']} |"
        )
    if "test" in results:
        m = results["test"].get("at_threshold") or {}
        lines.append(
            f"| **this run** (test @ {_num(results['test'].get('threshold'))}) | {_md_escape((config or {}).get('model', ''))} "
            f"| {_pct(m.get('accuracy'))} | {_pct(m.get('sensitivity'))} | {_pct(m.get('specificity'))} "
            f"| {_num(m.get('auroc'))} | |"
        )
    lines.append("")
    if test_used_for_selection:
        lines.append(
            "Note: this run used the official test split for a selection decision, so its test numbers are "
            "optimistic, like the Keras original's (which selected on the test split)."
        )
    else:
        lines.append(
            "Note: the official test split was never used for selection here (model, epoch and threshold "
            "were chosen on validation data); the Keras original selected on the test split, so its 87% is optimistic."
        )
    lines.append("")

    # -- plots
    lines += ["## Plots", ""]
    present = []
    if run_dir is not None:
        base = Path(run_dir)
        present = [(f, cap) for f, cap in PLOT_FILES if (base / f).is_file()]
    if present:
        for fname, caption in present:
            lines += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    else:
        lines += ["No plots were written for this run.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(
    run_dir: str | os.PathLike[str],
    *,
    results: Mapping[str, Mapping[str, Any]] | None = None,
    counts: Mapping[str, Mapping[str, int]] | None = None,
    config: Mapping[str, Any] | None = None,
    title: str = "Chest X-ray classifier: run report",
    test_used_for_selection: bool = False,
    filename: str = "report.md",
) -> Path:
    """Render and atomically write ``run_dir/report.md`` (plots referenced relative to it)."""
    run_dir = Path(run_dir)
    text = render_report(
        results=results,
        counts=counts,
        config=config,
        run_dir=run_dir,
        title=title,
        test_used_for_selection=test_used_for_selection,
    )
    path = run_dir / filename
    atomic_write_text(path, text)
    return path

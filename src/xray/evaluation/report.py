"""What a run writes about its evaluation (numbers from :mod:`xray.evaluation.metrics`): metrics.json, report.md,
cv_report.md and the figures (also to TensorBoard)."""

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

from xray.core.atomic import atomic_write_text
from xray.core.constants import CLASSES
from xray.evaluation import plots
from xray.evaluation.metrics import ECE_BINS, classification_metrics
from xray.evaluation.shifts import SUMMARY_ROWS

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

# Plot files a run directory may hold, in report order, with their captions.
PLOT_FILES: tuple[tuple[str, str], ...] = (
    ("curves.png", "Training curves"),
    ("roc.png", "ROC"),
    ("pr.png", "Precision-recall"),
    ("confusion_matrix.png", "Confusion matrix"),
    ("calibration.png", "Calibration"),
    ("mistakes.png", "Most confident mistakes"),
)


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
    if obj is None or isinstance(obj, (int, str)):
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


def fmt_num(x: Any, digits: int = 3) -> str:
    """A number for a markdown table; ``n/a`` for None, nan and inf."""
    if x is None or not math.isfinite(float(x)):
        return "n/a"
    return f"{float(x):.{digits}f}"


def _pct(x: Any) -> str:
    if x is None or math.isnan(float(x)):
        return "–"
    return f"{100 * float(x):.1f}".removesuffix(".0")


def fmt_ci(value: Any, ci: Sequence[Any] | None) -> str:
    """``0.912 (0.890-0.930)``: a value with its interval, when both ends are finite numbers."""
    text = fmt_num(value)
    if text != "n/a" and ci is not None and len(ci) == 2 and all(fmt_num(c) != "n/a" for c in ci):
        text += f" ({float(ci[0]):.3f}-{float(ci[1]):.3f})"
    return text


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "lr") -> list[str]:
    """A GitHub markdown table; ``align`` is l/r per column, its last letter repeated for the rest."""
    align = align.ljust(len(header), align[-1])
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---|" if a == "l" else "---:|" for a in align)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


_TABLE_COLUMNS = (
    ("auroc", "AUROC"),
    ("log_loss", "log loss"),
    ("brier", "Brier"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("balanced_accuracy", "balanced accuracy"),
)


def render_shift_table(
    metrics: dict[str, dict[str, float]], *, threshold: float | None = None, seed: int | None = None
) -> str:
    """GitHub markdown table: clean, the shifts, then **mean** and **worst**, 3 decimals, with a caption."""
    details = [f"threshold {threshold:.3f}"] if threshold is not None else []
    details += [f"seed {seed}"] if seed is not None else []
    suffix = f" ({', '.join(details)})" if details else ""
    keys = sorted((k for k in metrics if k not in SUMMARY_ROWS), key=lambda k: k != "clean")  # stable
    keys += [k for k in SUMMARY_ROWS if k in metrics]
    rows = []
    for key in keys:
        cells = [key] + [f"{metrics[key][m]:.3f}" for m, _ in _TABLE_COLUMNS]
        rows.append([f"**{c}**" for c in cells] if key in SUMMARY_ROWS else cells)
    lines = [
        f"Validation images under seeded acquisition shifts{suffix}; mean/worst are over the shifts.",
        "",
        *md_table(["shift", *(title for _, title in _TABLE_COLUMNS)], rows),
    ]
    return "\n".join(lines) + "\n"


def render_counterfactual_table(rows: Mapping[str, Mapping[str, float]], *, threshold: float) -> str:
    """The counterfactual check as a table: per acquisition shift and class, how far the calibrated logit
    moves when the cue is added (mean |change| and mean change) and the share of calls that flip."""
    header = ["shift"] + [
        f"{c} {what}" for c in CLASSES for what in ("mean abs change", "mean change", "flipped")
    ]
    body = []
    for name, row in rows.items():
        cells = [name]
        for c in CLASSES:
            values = [row[f"{c}_{k}"] for k in ("abs_change", "mean_change", "flipped")]
            if any(math.isnan(v) for v in values):  # no film of this class among the shifted ones
                cells += ["–"] * 3
                continue
            cells += [f"{values[0]:.2f}", f"{values[1]:+.2f}", f"{_pct(values[2])}%"]
        body.append([f"**{c}**" for c in cells] if name == "mean" else cells)
    lines = [
        "The same films with and without an acquisition cue (burned-in text, markers, collimation, shutters,"
        f" padding): change of the calibrated logit from the clean film, and calls flipped at {threshold:.3f}.",
        "",
        *md_table(header, body),
    ]
    return "\n".join(lines) + "\n"


def _confusion(m: Mapping[str, Any]) -> str:
    return "/".join(str(m.get(k, "?")) for k in ("tn", "fp", "fn", "tp"))


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
    """report.md text for one run: ``results`` maps split -> :func:`evaluate` payload, ``counts`` split ->
    class counts; only PNGs present in ``run_dir`` are embedded. Missing pieces are stated, not crashed on.
    """
    results = dict(results or {})
    lines: list[str] = [f"# {title}", "", "## Data", ""]
    if counts:
        rows = []
        for split in _ordered(list(counts)):
            neg, pos = (int(counts[split].get(c, 0)) for c in CLASSES)
            tot = neg + pos
            rows.append([split, str(neg), str(pos), str(tot), f"{100 * pos / tot:.1f}" if tot else "n/a"])
        lines += md_table(["split", *CLASSES, "total", "% PNEUMONIA"], rows)
        if "test" not in counts:
            lines += ["", "No test split in this run."]
    else:
        lines.append("Data counts were not recorded.")
    lines += ["", "## Configuration", ""]
    if config:
        lines += md_table(
            ["setting", "value"], [[_md_escape(k), _md_escape(v)] for k, v in config.items()], "l"
        )
    else:
        lines.append("Configuration was not recorded.")
    lines += ["", "## Metrics", ""]
    evaluated = [s for s in results if isinstance(results[s], Mapping) and "at_threshold" in results[s]]
    splits = _ordered([s for s in evaluated if s != "train"]) or _ordered(evaluated)
    if splits:
        columns = [(results[s], which) for s in splits for which in ("at_0.5", "at_threshold")]
        header = ["metric"]
        for split in splits:
            t = results[split].get("threshold")
            header += [f"{split} @ 0.5", f"{split} @ {fmt_num(t) if t is not None else 'threshold'}"]
        rows = []
        for key, label in REPORT_ROWS:
            cells = [label]
            for r, which in columns:
                # CIs are computed at the chosen threshold; threshold-free metrics' CIs hold at 0.5 too.
                use_ci = which == "at_threshold" or key in THRESHOLD_FREE or r.get("threshold") == 0.5
                cells.append(
                    fmt_ci((r.get(which) or {}).get(key), (r.get("ci") or {}).get(key) if use_ci else None)
                )
            rows.append(cells)
        rows.append(["TN/FP/FN/TP"] + [_confusion(r.get(which) or {}) for r, which in columns])
        lines += md_table(header, rows)
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
            f"Temperature {fmt_num(calibration.get('temperature'))}: validation log loss "
            f"{fmt_num(calibration.get('log_loss_before'))} -> {fmt_num(calibration.get('log_loss_after'))}, "
            f"ECE {fmt_num(calibration.get('ece_before'))} -> {fmt_num(calibration.get('ece_after'))}. "
            "Probabilities above are calibrated; the ranking (AUROC) is unchanged.",
            "",
        ]
    if results.get("val_shift"):
        lines += ["## Shift validation", "", render_shift_table(results["val_shift"]), ""]
    if results.get("val_counterfactual"):
        threshold = results["val"]["threshold"]
        lines += [
            "## Counterfactual check (acquisition cues)",
            "",
            render_counterfactual_table(results["val_counterfactual"], threshold=threshold),
            "",
        ]

    lines += [
        "## Published anchors (official 624-image test split)",
        "",
        "| reference | model | accuracy (%) | sensitivity (%) | specificity (%) | AUROC | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for a in ANCHORS:
        lines.append(
            f"| {a['name']} ({a['source']}) | {a['model']} | {_pct(a['accuracy'])} | {_pct(a['sensitivity'])} "
            f"| {_pct(a['specificity'])} | {fmt_num(a['auroc']) if a['auroc'] is not None else '–'} | {a['note']} |"
        )
    if "test" in results:
        m = results["test"].get("at_threshold") or {}
        lines.append(
            f"| **this run** (test @ {fmt_num(results['test'].get('threshold'))}) | {_md_escape((config or {}).get('model', ''))} "
            f"| {_pct(m.get('accuracy'))} | {_pct(m.get('sensitivity'))} | {_pct(m.get('specificity'))} "
            f"| {fmt_num(m.get('auroc'))} | |"
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
    lines += ["", "## Plots", ""]
    present = [(f, cap) for f, cap in PLOT_FILES if run_dir is not None and (Path(run_dir) / f).is_file()]
    for fname, caption in present:
        lines += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    if not present:
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


def _log_figure(loggers: list[Any], tag: str, fig: Any) -> None:
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(tag, fig, close=False)


def write_plots(
    run_dir: Path,
    splits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    threshold: float,
    loggers: list[Any],
    datamodule: Any,
    mistakes: int = 16,
) -> list[Path]:
    """roc.png, pr.png, confusion_matrix.png, calibration.png, mistakes.png (validation)."""
    curves = {split: (p, y) for split, (p, y, _) in splits.items() if p.numel()}
    if not curves:
        return []
    thresholds = dict.fromkeys(curves, threshold)
    main_split = "test" if "test" in curves else "val"
    m = classification_metrics(*curves[main_split], threshold)
    figures: dict[str, Any] = {
        "roc": plots.make_roc_figure(curves, thresholds=thresholds),
        "pr": plots.make_pr_figure(curves, thresholds=thresholds),
        "confusion_matrix": plots.make_confusion_matrix_figure(
            *(int(m[k]) for k in ("tn", "fp", "fn", "tp")),
            title=f"Confusion matrix ({main_split}, threshold {threshold:.3f})",
        ),
        "calibration": plots.make_calibration_figure(
            *curves["val" if "val" in curves else main_split], title="Calibration (validation)"
        ),
    }
    if "val" in splits and mistakes > 0:
        probs, labels, index = splits["val"]
        dataset = datamodule.datasets["val"]
        # all the mistakes, so the figure can say how many there are; it shows the top k
        order = torch.nonzero((probs >= threshold).long() != labels).reshape(-1)
        if order.numel():
            images = torch.stack([dataset.image(i) for i in index[order].tolist()])
        else:  # the figure then says there were no mistakes
            order = torch.arange(probs.numel())
            images = torch.zeros(probs.numel(), 1, 8, 8, dtype=torch.uint8)
        names = [dataset.records[i].path.name for i in index[order].tolist()]
        figures["mistakes"] = plots.make_mistakes_figure(
            images,
            probs[order],
            labels[order],
            names,
            k=mistakes,
            threshold=threshold,
            title="Most confident validation mistakes",
        )
    written = []
    for name, fig in figures.items():
        _log_figure(loggers, f"eval/{name}", fig)
        written.append(plots.save_figure(fig, run_dir / f"{name}.png"))
    return written


# ------------------------------------------------------------------------ the cross-validation report
_CV_LABELS = {
    "auroc": "AUROC",
    "accuracy": "accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "log_loss": "log loss",
    "brier": "Brier",
}

# the run report's rows, AUROC first: ranking is what pooling out-of-fold predictions measures best
_CV_POOLED_ROWS = tuple(sorted(REPORT_ROWS, key=lambda row: row[0] != "auroc"))


def _mean_pm_std(stat: Mapping[str, Any]) -> str:
    if stat.get("mean") is None:
        return "n/a"
    std = stat.get("std")
    return fmt_num(stat["mean"]) + (f" ± {std:.3f}" if std is not None else " ± n/a")


def _confidence(temperature: float) -> str:
    if temperature > 1.0:
        return "T > 1: the raw logits were over-confident and are softened"
    if temperature < 1.0:
        return "T < 1: the raw logits were under-confident and are sharpened"
    return "T = 1: no change"


def render_cv_report(result: Mapping[str, Any]) -> str:
    """``cv_report.md`` text for an :func:`xray.evaluation.folds.aggregate` result."""
    k, pooled, cal = result["n_folds"], result["pooled"], result["calibration"]
    t, temp, t4 = result["threshold"], fmt_num(result["temperature"]), fmt_num(result["threshold"], 4)
    rule = result["threshold_rule"]
    if rule == "sensitivity":
        rule += f" (target sensitivity {result['target_sensitivity']:.2f})"
    lines = [
        f"# Cross-validation report: {k}-fold, out-of-fold",
        "",
        f"{len(result['folds_present'])} of {k} folds, {result['n_images']} out-of-fold validation images "
        f"({result['n_pos']} PNEUMONIA, {result['n_images'] - result['n_pos']} NORMAL).",
        "",
    ]
    if result["warnings"]:
        lines += [*(f"> **Warning:** {w}" for w in result["warnings"]), ""]

    ci = pooled.get("ci") or {}
    rows = [
        [
            label,
            fmt_ci((pooled["at_0.5"] or {}).get(key), ci.get(key) if key in THRESHOLD_FREE else None),
            fmt_ci((pooled["at_threshold"] or {}).get(key), ci.get(key)),
        ]
        for key, label in _CV_POOLED_ROWS
    ]
    rows.append(["Log loss", fmt_num(pooled.get("log_loss")), fmt_num(pooled.get("log_loss"))])
    rows.append(["TN/FP/FN/TP", _confusion(pooled["at_0.5"]), _confusion(pooled["at_threshold"])])
    boot = pooled.get("bootstrap") or {}
    lines += ["## Pooled out-of-fold metrics", "", *md_table(["metric", "@ 0.5", f"@ {t4} (95% CI)"], rows)]
    lines += [
        "",
        f"Probabilities are sigmoid(logit / {temp}). Intervals: percentile bootstrap "
        f"over images ({boot.get('n_boot')} resamples, seed {boot.get('seed')}); PNEUMONIA is the positive "
        "class; a case is positive when p >= threshold.",
        "",
        "## Operating point and calibration",
        "",
        f"- Threshold: **{t4}**, rule {rule}, chosen on the pooled calibrated out-of-fold probabilities.",
        f"- Temperature: **{temp}**, fitted once on the pooled out-of-fold logits"
        + (" and their shifted copies" if result.get("temperature_on") == "shifts" else "")
        + f" ({_confidence(result['temperature'])}).",
        "",
    ]
    cal_rows = [
        [name, t_text] + [fmt_num(cal[key][m]) for m in ("log_loss", "ece", "brier")]
        for name, t_text, key in (
            ("uncalibrated (T = 1)", "1.000", "uncalibrated"),
            ("each run's own T", "per run", "per_run_temperature"),
            ("pooled T", temp, "pooled_temperature"),
        )
    ]
    lines += [*md_table(["probabilities", "T", "log loss", f"ECE ({ECE_BINS} bins)", "Brier"], cal_rows), ""]
    if result.get("pooled_shift"):
        lines += [
            "## Pooled shift validation (out-of-fold images under acquisition shifts)",
            "",
            render_shift_table(result["pooled_shift"], threshold=t),
            "",
        ]
    if result.get("pooled_counterfactual"):
        lines += [
            "## Counterfactual check (out-of-fold images with and without acquisition cues)",
            "",
            render_counterfactual_table(result["pooled_counterfactual"], threshold=t),
            "",
        ]

    # per fold: at each run's own operating point, then at the pooled one
    folds, summary = result["folds"], result["fold_summary"]
    fold_metrics, shift_metrics = list(summary["val"]), list(summary["val_shift_mean"])
    mean_row = ["**mean ± std**", str(sum(f["n"] for f in folds))]
    header = ["fold", "n", "threshold", "T"] + [_CV_LABELS[m] for m in fold_metrics]
    header += [f"shift {_CV_LABELS[m]}" for m in shift_metrics]
    rows = [
        [str(f["fold"]), str(f["n"]), fmt_num(f["threshold"], 4), fmt_num(f["temperature"])]
        + [fmt_num(f["val"][m]) for m in fold_metrics]
        + [fmt_num(f["val_shift_mean"][m]) if f["val_shift_mean"] else "n/a" for m in shift_metrics]
        for f in folds
    ]
    rows.append(
        [*mean_row, "", ""]
        + [_mean_pm_std(summary["val"][m]) for m in fold_metrics]
        + [_mean_pm_std(summary["val_shift_mean"][m]) for m in shift_metrics]
    )
    lines += ["## Per-fold metrics (each run's own threshold and temperature)", "", *md_table(header, rows)]
    lines += [
        "",
        "Clean columns: the run's own validation fold at its own threshold and temperature (metrics.json). "
        "Shift columns: the mean over the run's shifted copies of that fold (val_shift.mean); n/a where the "
        "run did not evaluate shifts. std is the sample standard deviation (ddof = 1) over folds.",
    ]
    recomputed = sorted({m for f in folds for m in f["recomputed_from_csv"]})
    if recomputed:
        lines.append(
            f"Recomputed from val_predictions.csv (missing from some metrics.json): {', '.join(recomputed)}."
        )
    rows = [
        [str(f["fold"]), str(f["n"])] + [fmt_num(f["at_pooled_operating_point"][m]) for m in fold_metrics]
        for f in folds
    ]
    rows.append(mean_row + [_mean_pm_std(summary["at_pooled_operating_point"][m]) for m in fold_metrics])
    lines += [
        "",
        f"## Per-fold metrics at the pooled operating point (threshold {t4}, T {temp})",
        "",
        *md_table(["fold", "n"] + [_CV_LABELS[m] for m in fold_metrics], rows),
        "",
        "## What these numbers mean",
        "",
        "- Out-of-fold (OOF): every training image in the pooled set was scored once, by the fold model "
        "that never saw its patient (folds are grouped by patient and stratified by class). The pooled "
        "numbers are therefore an honest estimate on the whole training split, not on one small fold.",
        "- The threshold and temperature above were fitted on these same OOF predictions, so the pooled "
        "threshold-dependent metrics are slightly optimistic; the official test split remains the "
        "untouched check.",
        "- The per-fold spread (± std) is how much one run's validation numbers move with the choice of "
        "fold; the table at the pooled operating point compares the folds at one common threshold.",
        "- Each fold model is a different network: the pooled numbers describe the training recipe, not "
        "one checkpoint.",
        "",
        "## Runs",
        "",
        *md_table(["fold", "run directory"], [[str(f["fold"]), f"`{f['run_dir']}`"] for f in folds], "l"),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_cv_report(result: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``cv_metrics.json`` and ``cv_report.md`` into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    json_path = write_metrics_json(out_dir / "cv_metrics.json", result)
    md_path = out_dir / "cv_report.md"
    atomic_write_text(md_path, render_cv_report(result))  # readers never see half a report
    return json_path, md_path

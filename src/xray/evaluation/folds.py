"""Cross-validation: pool the out-of-fold predictions of k fold runs into one estimate.

After ``python train.py -m data.n_folds=5 data.fold=0,1,2,3,4`` every training image was scored once
by a model that never saw its patient: a k-times larger validation set than one run's, on which one
temperature and one threshold are fitted (``python -m xray.cv`` writes the report).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xray.evaluation.calibration import apply_temperature, fit_temperature, log_loss
from xray.evaluation.metrics import THRESHOLD_RULES, choose_threshold, classification_metrics, evaluate
from xray.evaluation.shifts import (
    TEMPERATURE_SOURCES,
    counterfactual_changes,
    shift_metrics,
    shift_temperature,
    shift_youden_threshold,
)

PREDICTIONS_FILE = "val_predictions.csv"
SHIFT_PREDICTIONS_FILE = "val_shift_predictions.csv"
METRICS_FILE = "metrics.json"
CV_THRESHOLD_RULES: tuple[str, ...] = (*THRESHOLD_RULES, "shift_youden")
# Per-fold columns: the run's own clean validation metrics, and the mean over its shifted validations.
FOLD_METRICS: tuple[str, ...] = ("auroc", "accuracy", "sensitivity", "specificity", "log_loss", "brier")
SHIFT_METRICS: tuple[str, ...] = ("auroc", "log_loss", "brier", "sensitivity", "specificity")


class CVError(ValueError):
    """The fold runs cannot be aggregated; the one-line message names the path or fold at fault."""


@dataclass
class Predictions:
    """One run's validation predictions, as written to ``val_predictions.csv``."""

    paths: list[str]
    labels: Tensor  # int64, 0 NORMAL / 1 PNEUMONIA
    logits: Tensor  # float64, raw (TTA-averaged) logits, before any temperature
    probs: Tensor  # float64, the run's own sigmoid(logit / T)


@dataclass
class FoldRun:
    """A training run that held out fold ``fold`` of ``n_folds`` as its validation set."""

    run_dir: Path
    fold: int
    n_folds: int
    predictions: Predictions
    metrics: dict[str, Any] = field(default_factory=dict)
    # shift name -> (labels, raw logits) of the run's shift-validation images, when it wrote them
    shifted: dict[str, tuple[Tensor, Tensor]] | None = None


# ------------------------------------------------------------------------------------------ discovery
def _read_predictions(path: Path) -> Predictions:
    """Parse ``val_predictions.csv``; any malformed row is an error naming the file and line."""
    rows: list[tuple[str, int, float, float]] = []  # prob nan when absent: rebuilt as sigmoid(logit), T = 1
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("path", "label", "logit") if c not in (reader.fieldnames or [])]
            if missing:
                raise CVError(f"{path}: missing column(s) {missing}; expected header path,label,logit,prob")
            for row in reader:
                line = reader.line_num
                try:
                    label = float(row["label"])
                    logit = float(row["logit"])
                    prob = float(row["prob"]) if row.get("prob") not in (None, "") else math.nan
                except (TypeError, ValueError):
                    raise CVError(f"{path}:{line}: label/logit/prob is not a number") from None
                if label not in (0.0, 1.0):
                    raise CVError(
                        f"{path}:{line}: label must be 0 (NORMAL) or 1 (PNEUMONIA), got {row['label']}"
                    )
                if not math.isfinite(logit):
                    raise CVError(f"{path}:{line}: logit is not finite ({row['logit']})")
                rows.append((row["path"], int(label), logit, prob))
    except OSError as err:
        raise CVError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise CVError(f"{path}: not a UTF-8 CSV file") from None
    if not rows:
        raise CVError(f"{path}: no predictions (empty file)")
    paths, labels, logits, probs = (list(column) for column in zip(*rows, strict=True))
    if len(set(paths)) != len(paths):
        dup = next(p for i, p in enumerate(paths) if p in paths[:i])
        raise CVError(f"{path}: image {dup!r} appears more than once")
    logit_t, prob_t = torch.tensor(logits, dtype=torch.float64), torch.tensor(probs, dtype=torch.float64)
    prob_t = torch.where(prob_t.isfinite(), prob_t, torch.sigmoid(logit_t)).clamp(0.0, 1.0)
    return Predictions(paths, torch.tensor(labels, dtype=torch.int64), logit_t, prob_t)


def _read_metrics(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CVError(f"{path}: not found (each run directory needs its metrics.json)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CVError(f"{path}: cannot read metrics.json ({err})") from None
    if not isinstance(data, dict):
        raise CVError(f"{path}: metrics.json does not hold a JSON object")
    return data


def _int_or_none(value: Any, what: str, path: Path) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise CVError(f"{path}: {what} must be an integer or null, got {value!r}")
    return int(value)


def _load_run(run_dir: Path) -> FoldRun:
    metrics_path = run_dir / METRICS_FILE
    metrics = _read_metrics(metrics_path)
    fold = _int_or_none(metrics.get("fold"), "fold", metrics_path)
    n_folds = _int_or_none(metrics.get("n_folds"), "n_folds", metrics_path)
    if fold is None or n_folds is None:
        raise CVError(
            f"{metrics_path}: not a cross-validation run (fold={fold}, n_folds={n_folds}); "
            "train with data.n_folds=K data.fold=i"
        )
    if n_folds < 2 or not 0 <= fold < n_folds:
        raise CVError(f"{metrics_path}: fold {fold} is not in [0, n_folds) with n_folds={n_folds} >= 2")
    predictions = _read_predictions(run_dir / PREDICTIONS_FILE)
    shifted = _read_shift_predictions(run_dir / SHIFT_PREDICTIONS_FILE)
    return FoldRun(run_dir, fold, n_folds, predictions, metrics, shifted)


def _read_shift_predictions(path: Path) -> dict[str, tuple[Tensor, Tensor]] | None:
    """Parse ``val_shift_predictions.csv`` (shift, label, logit); None when the run wrote none."""
    if not path.is_file():
        return None
    rows: dict[str, tuple[list[int], list[float]]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for line_no, row in enumerate(csv.DictReader(handle), start=2):
            try:
                labels, logits = rows.setdefault(row["shift"], ([], []))
                labels.append(int(row["label"]))
                logits.append(float(row["logit"]))
            except (KeyError, TypeError, ValueError):
                raise CVError(f"{path}:{line_no}: malformed row (expected shift,label,logit)") from None
    return {
        k: (torch.tensor(y, dtype=torch.long), torch.tensor(z, dtype=torch.float64))
        for k, (y, z) in rows.items()
    }


def _run_dirs(path: Path) -> list[Path]:
    """``path`` itself when it is a run directory, else every folder below it holding the predictions."""
    if not path.exists():
        raise CVError(f"{path}: no such directory")
    if not path.is_dir():
        raise CVError(f"{path}: not a directory (give a multirun folder or run directories)")
    if (path / PREDICTIONS_FILE).is_file():
        return [path]
    found = sorted(p.parent for p in path.rglob(PREDICTIONS_FILE) if p.is_file())
    if not found:
        raise CVError(f"{path}: no run directory with {PREDICTIONS_FILE} found below it")
    return found


def check_runs(runs: Sequence[FoldRun]) -> None:
    """The runs must form (part of) one k-fold split: same k, distinct folds, disjoint validation sets."""
    if not runs:
        raise CVError("no fold runs to aggregate")
    first = runs[0]
    by_fold: dict[int, FoldRun] = {}
    owner: dict[str, FoldRun] = {}
    for run in runs:
        if run.n_folds != first.n_folds:
            raise CVError(
                f"{run.run_dir}: n_folds={run.n_folds} but {first.run_dir} has n_folds={first.n_folds} "
                "(runs from different cross-validations)"
            )
        if run.fold in by_fold:
            raise CVError(f"{run.run_dir}: fold {run.fold} is also held out by {by_fold[run.fold].run_dir}")
        by_fold[run.fold] = run
        for image in run.predictions.paths:
            other = owner.get(image)
            if other is not None:
                raise CVError(
                    f"{run.run_dir}: image {image!r} is also in the validation set of {other.run_dir} "
                    f"(folds {other.fold} and {run.fold} overlap; folds must be disjoint)"
                )
            owner[image] = run


def find_fold_runs(paths: Iterable[str | Path]) -> list[FoldRun]:
    """Fold runs under ``paths`` (multirun folders or run directories), sorted by fold and checked by
    :func:`check_runs`; missing folds are allowed (``aggregate`` warns about them)."""
    dirs: dict[Path, Path] = {}  # by resolved path: a multirun folder and one of its own runs given together
    for raw in paths:
        for d in _run_dirs(Path(raw)):
            dirs.setdefault(d.resolve(), d)
    if not dirs:
        raise CVError("no run directories given")
    runs = sorted((_load_run(d) for d in dirs.values()), key=lambda r: r.fold)
    check_runs(runs)
    return runs


# ----------------------------------------------------------------------------------------- metrics
def _as_float(value: Any) -> float | None:
    """A metric value from metrics.json: a number, or a ``{"value": x, "ci": ...}`` dict; null -> None."""
    if isinstance(value, Mapping):
        value = value.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _lookup(section: Any, name: str) -> float | None:
    """``name`` from a metrics section in any format a run writes: flat, ``{"value"}``, or evaluate()'s."""
    if not isinstance(section, Mapping):
        return None
    value = _as_float(section.get(name))
    if value is None and isinstance(section.get("at_threshold"), Mapping):
        value = _as_float(section["at_threshold"].get(name))  # evaluate(): metrics at the run's threshold
    return value


def _run_threshold(run: FoldRun) -> float:
    for value in (run.metrics.get("threshold"), (run.metrics.get("val") or {}).get("threshold")):
        v = _as_float(value)
        if v is not None:
            return v
    return 0.5


def _own_metrics(run: FoldRun) -> tuple[dict[str, float | None], list[str]]:
    """The run's own validation metrics, and the names recomputed from its CSV's calibrated ``prob``
    column at its threshold because metrics.json lacked them (older runs)."""
    val = run.metrics.get("val")
    own = {name: _lookup(val, name) for name in FOLD_METRICS}
    if own["log_loss"] is None:  # evaluate() has no log loss: training stores it beside, in "calibration"
        own["log_loss"] = _as_float((run.metrics.get("calibration") or {}).get("log_loss_after"))
    recomputed = [name for name, v in own.items() if v is None]
    if recomputed:
        p, y = run.predictions.probs, run.predictions.labels
        fresh = classification_metrics(p, y, _run_threshold(run))
        fresh["log_loss"] = float(F.binary_cross_entropy(p, y.double()))
        own.update({name: _as_float(fresh[name]) for name in recomputed})
    return own, recomputed


def _shift_metrics(run: FoldRun) -> dict[str, float | None] | None:
    shift = run.metrics.get("val_shift")
    if not isinstance(shift, Mapping) or not isinstance(shift.get("mean"), Mapping):
        return None
    return {name: _lookup(shift["mean"], name) for name in SHIFT_METRICS}


def _mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample std (ddof=1) over the folds where the value exists; std needs two folds."""
    xs = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    return {
        "mean": float(xs.mean()) if xs.size else None,
        "std": float(xs.std(ddof=1)) if xs.size >= 2 else None,
        "n": int(xs.size),
    }


def _summary(rows: Sequence[Mapping[str, Any] | None], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {name: _mean_std((row or {}).get(name) for row in rows) for name in names}


def aggregate(
    runs: Sequence[FoldRun],
    threshold_rule: str = "youden",
    target_sensitivity: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
    temperature_on: str = "clean",
) -> dict[str, Any]:
    """Pooled out-of-fold metrics at one temperature and threshold fitted on all OOF predictions (not
    on one small fold, as each run's were), plus per-fold rows: what ``cv_metrics.json`` holds. The
    temperature is fitted on the clean OOF logits, or on them pooled with their shifted copies
    (``temperature_on="shifts"``)."""
    if temperature_on not in TEMPERATURE_SOURCES:
        raise CVError(
            f"unknown temperature source {temperature_on!r}; expected one of {list(TEMPERATURE_SOURCES)}"
        )
    if threshold_rule not in CV_THRESHOLD_RULES:
        raise CVError(
            f"unknown threshold rule {threshold_rule!r}; expected one of {list(CV_THRESHOLD_RULES)}"
        )
    if threshold_rule == "sensitivity" and not 0.0 < target_sensitivity <= 1.0:
        raise CVError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    if n_bootstrap < 1:
        raise CVError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    runs = sorted(runs, key=lambda r: r.fold)
    check_runs(runs)
    n_folds = runs[0].n_folds
    present = [r.fold for r in runs]
    missing = [f for f in range(n_folds) if f not in present]
    warnings = []
    if missing:
        warnings.append(
            f"only {len(runs)} of {n_folds} folds found (missing fold(s) {missing}): the pooled set "
            "covers part of the training split only"
        )

    logits = torch.cat([r.predictions.logits for r in runs])
    labels = torch.cat([r.predictions.labels for r in runs])
    run_probs = torch.cat([r.predictions.probs for r in runs])
    shifted = _pooled_shifts(runs)
    if shifted is not None:
        shift_labels = next(iter(shifted.values()))[0]  # every shift scores the same images
        shift_logits = {k: z for k, (_, z) in shifted.items()}
    if temperature_on == "shifts":
        if shifted is None:
            raise CVError("temperature on shifts needs every run's val_shift_predictions.csv")
        temperature = shift_temperature(shift_logits, shift_labels)
    else:
        temperature = fit_temperature(logits, labels)
    probs = apply_temperature(logits, temperature)
    if threshold_rule == "shift_youden":
        if shifted is None:
            raise CVError("--threshold-rule shift_youden needs every run's val_shift_predictions.csv")
        threshold = shift_youden_threshold(shift_logits, shift_labels, temperature)
    else:
        threshold = choose_threshold(
            probs, labels, rule=threshold_rule, target_sensitivity=target_sensitivity
        )
    pooled = evaluate(probs, labels, threshold, n_boot=n_bootstrap, seed=seed)
    pooled["log_loss"] = log_loss(logits, labels, temperature)

    def cal(ll: float, m: Mapping[str, Any], **temp: float) -> dict[str, Any]:
        return {**temp, "log_loss": ll, "ece": m["ece"], "brier": m["brier"]}

    calibration = {
        "uncalibrated": cal(
            log_loss(logits, labels, 1.0),
            classification_metrics(torch.sigmoid(logits), labels, threshold),
            temperature=1.0,
        ),
        "per_run_temperature": cal(
            float(F.binary_cross_entropy(run_probs, labels.double())),
            classification_metrics(run_probs, labels, threshold),
        ),
        "pooled_temperature": cal(pooled["log_loss"], pooled["at_threshold"], temperature=temperature),
    }

    pooled_shift = pooled_counterfactual = None
    if shifted is not None:
        shift_logits = {k: z.float() for k, z in shift_logits.items()}
        pooled_shift = shift_metrics(shift_logits, shift_labels, threshold, temperature)
        pooled_counterfactual = counterfactual_changes(shift_logits, shift_labels, threshold, temperature)

    folds: list[dict[str, Any]] = []
    for run in runs:
        own, recomputed = _own_metrics(run)
        z, y = run.predictions.logits, run.predictions.labels
        at_pooled = classification_metrics(apply_temperature(z, temperature), y, threshold)
        at_pooled["log_loss"] = log_loss(z, y, temperature)
        folds.append(
            {
                "fold": run.fold,
                "run_dir": str(run.run_dir),
                "n": int(y.numel()),
                "n_pos": int(y.sum()),
                "threshold": _run_threshold(run),
                "temperature": _as_float(run.metrics.get("temperature")),
                "val": own,
                "recomputed_from_csv": recomputed,
                "val_shift_mean": _shift_metrics(run),
                "at_pooled_operating_point": {k: at_pooled[k] for k in FOLD_METRICS},
            }
        )

    return {
        "n_folds": n_folds,
        "folds_present": present,
        "folds_missing": missing,
        "warnings": warnings,
        "n_images": int(labels.numel()),
        "n_pos": int(labels.sum()),
        "threshold_rule": threshold_rule,
        "target_sensitivity": float(target_sensitivity) if threshold_rule == "sensitivity" else None,
        "threshold": float(threshold),
        "temperature": float(temperature),
        "temperature_on": temperature_on,
        "pooled": pooled,
        "pooled_shift": pooled_shift,
        "pooled_counterfactual": pooled_counterfactual or None,
        "calibration": calibration,
        "folds": folds,
        "fold_summary": {
            "val": _summary([f["val"] for f in folds], FOLD_METRICS),
            "val_shift_mean": _summary([f["val_shift_mean"] for f in folds], SHIFT_METRICS),
            "at_pooled_operating_point": _summary(
                [f["at_pooled_operating_point"] for f in folds], FOLD_METRICS
            ),
        },
    }


def _pooled_shifts(runs: Sequence[FoldRun]) -> dict[str, tuple[Tensor, Tensor]] | None:
    """Every run's shift-validation (labels, logits) concatenated per shift; None unless all runs have them."""
    if any(r.shifted is None for r in runs):
        return None
    names = list(runs[0].shifted or {})
    if any(list(r.shifted or {}) != names for r in runs):
        raise CVError("runs were shift-validated with different shift suites; retrain them with one")
    return {
        name: (torch.cat([r.shifted[name][0] for r in runs]), torch.cat([r.shifted[name][1] for r in runs]))  # type: ignore[index]
        for name in names
    }

"""Tests for xray.evaluation.folds: pooling k-fold out-of-fold predictions (synthetic run directories, no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from xray.cv import main
from xray.evaluation.calibration import apply_temperature, fit_temperature, log_loss
from xray.evaluation.folds import CVError, aggregate, find_fold_runs
from xray.evaluation.metrics import choose_threshold, classification_metrics, evaluate
from xray.evaluation.report import write_cv_report

N_BOOT = 50  # bootstrap resamples: enough to exercise the CIs, fast on two cores


def _fold_data(fold: int, n: int = 40, scale: float = 1.0, seed: int = 0) -> tuple[list[str], Any, Any]:
    """Paths unique to ``fold``, labels (about 60% PNEUMONIA) and logits = scale x well-calibrated logits."""
    g = torch.Generator().manual_seed(1000 * seed + fold)
    labels = (torch.rand(n, generator=g) < 0.6).long()
    logits = (torch.randn(n, generator=g) * 1.5 + (2 * labels - 1) * 1.2).double() * scale
    paths = [
        f"/data/train/{'PNEUMONIA' if y else 'NORMAL'}/f{fold}_img{i:03d}.jpeg" for i, y in enumerate(labels)
    ]
    return paths, labels, logits


def _write_run(
    run_dir: Path,
    fold: int | None,
    n_folds: int | None,
    paths: list[str],
    labels: torch.Tensor,
    logits: torch.Tensor,
    *,
    val_shift: dict[str, Any] | None = None,
    val: dict[str, Any] | None = None,
) -> Path:
    """A run directory as train.py writes it: val_predictions.csv and metrics.json (its own T and threshold)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    temperature = fit_temperature(logits, labels)
    probs = apply_temperature(logits, temperature)
    threshold = choose_threshold(probs, labels, "youden")
    lines = ["path,label,logit,prob"]
    lines += [
        f"{p},{int(y)},{float(z)!r},{float(q)!r}"
        for p, y, z, q in zip(paths, labels, logits, probs, strict=True)
    ]
    (run_dir / "val_predictions.csv").write_text("\n".join(lines) + "\n")
    metrics: dict[str, Any] = {
        "fold": fold,
        "n_folds": n_folds,
        "threshold": threshold,
        "threshold_rule": "youden",
        "temperature": temperature,
        "val": val if val is not None else evaluate(probs, labels, threshold, n_boot=N_BOOT),
        "calibration": {"temperature": temperature, "log_loss_after": log_loss(logits, labels, temperature)},
    }
    if val_shift is not None:
        metrics["val_shift"] = val_shift
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    return run_dir


def _shift_block(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    names = ("auroc", "log_loss", "brier", "sensitivity", "specificity", "accuracy", "balanced_accuracy")
    rows = {
        key: {m: float(rng.uniform(0.1, 0.9)) for m in names} for key in ("clean", "blur", "mean", "worst")
    }
    return rows


def _multirun(
    root: Path, n_folds: int = 5, folds: list[int] | None = None, scale: float = 1.0, shifts: bool = True
) -> Path:
    """A Hydra multirun folder: root/<job>/ per fold, plus multirun.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for job, fold in enumerate(range(n_folds) if folds is None else folds):
        paths, labels, logits = _fold_data(fold, scale=scale)
        _write_run(
            root / str(job),
            fold,
            n_folds,
            paths,
            labels,
            logits,
            val_shift=_shift_block(fold) if shifts else None,
        )
    return root


def _pooled(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated logits and labels, read back from the CSVs independently of xray.evaluation.folds."""
    logits, labels = [], []
    for csv_path in sorted(root.glob("*/val_predictions.csv")):
        for line in csv_path.read_text().splitlines()[1:]:
            _, y, z, _ = line.split(",")
            labels.append(int(y))
            logits.append(float(z))
    return torch.tensor(logits, dtype=torch.float64), torch.tensor(labels)


# ---------------------------------------------------------------------------------------------- pooling
def test_pooled_counts_auroc_and_fold_mean_std(tmp_path: Path) -> None:
    root = _multirun(tmp_path / "multirun")
    runs = find_fold_runs([root])
    assert [r.fold for r in runs] == [0, 1, 2, 3, 4]
    result = aggregate(runs, "youden", 0.95, n_bootstrap=N_BOOT)

    assert result["n_images"] == sum(r.predictions.labels.numel() for r in runs) == 200
    assert result["pooled"]["at_threshold"]["n"] == 200
    logits, labels = _pooled(root)
    direct = float(binary_auroc(torch.sigmoid(logits), labels))
    assert result["pooled"]["at_threshold"]["auroc"] == pytest.approx(direct, abs=1e-6)
    lo, hi = result["pooled"]["ci"]["auroc"]
    assert lo <= result["pooled"]["at_threshold"]["auroc"] <= hi

    # own validation metrics: the values each metrics.json holds; mean/std as numpy computes them
    own_auroc = [
        json.loads((root / str(j) / "metrics.json").read_text())["val"]["at_threshold"]["auroc"]
        for j in range(5)
    ]
    stat = result["fold_summary"]["val"]["auroc"]
    assert [f["val"]["auroc"] for f in result["folds"]] == pytest.approx(own_auroc)
    assert stat["mean"] == pytest.approx(np.mean(own_auroc))
    assert stat["std"] == pytest.approx(np.std(own_auroc, ddof=1))
    # log loss comes from metrics.json's calibration block, not recomputed
    own_ll = [
        json.loads((root / str(j) / "metrics.json").read_text())["calibration"]["log_loss_after"]
        for j in range(5)
    ]
    assert [f["val"]["log_loss"] for f in result["folds"]] == pytest.approx(own_ll)
    assert all(f["recomputed_from_csv"] == [] for f in result["folds"])
    # shift means: straight from val_shift.mean
    shift_brier = [_shift_block(f)["mean"]["brier"] for f in range(5)]
    stat = result["fold_summary"]["val_shift_mean"]["brier"]
    assert stat["mean"] == pytest.approx(np.mean(shift_brier))
    assert stat["std"] == pytest.approx(np.std(shift_brier, ddof=1))
    assert stat["n"] == 5


def test_per_fold_metrics_at_pooled_operating_point(tmp_path: Path) -> None:
    runs = find_fold_runs([_multirun(tmp_path / "mr")])
    result = aggregate(runs, "youden", 0.95, n_bootstrap=N_BOOT)
    t, temp = result["threshold"], result["temperature"]
    for run, row in zip(runs, result["folds"], strict=True):
        expected = classification_metrics(
            apply_temperature(run.predictions.logits, temp), run.predictions.labels, t
        )
        got = row["at_pooled_operating_point"]
        assert got["sensitivity"] == pytest.approx(expected["sensitivity"])
        assert got["accuracy"] == pytest.approx(expected["accuracy"])
        assert got["log_loss"] == pytest.approx(
            log_loss(run.predictions.logits, run.predictions.labels, temp)
        )
    values = [row["at_pooled_operating_point"]["specificity"] for row in result["folds"]]
    stat = result["fold_summary"]["at_pooled_operating_point"]["specificity"]
    assert stat["mean"] == pytest.approx(np.mean(values))
    assert stat["std"] == pytest.approx(np.std(values, ddof=1))


def test_overconfident_logits_fit_temperature_above_one(tmp_path: Path) -> None:
    runs = find_fold_runs([_multirun(tmp_path / "mr", scale=4.0)])
    result = aggregate(runs, "youden", 0.95, n_bootstrap=N_BOOT)
    cal = result["calibration"]
    assert result["temperature"] > 1.5
    assert cal["pooled_temperature"]["log_loss"] < cal["uncalibrated"]["log_loss"]
    assert cal["pooled_temperature"]["ece"] < cal["uncalibrated"]["ece"]
    logits, labels = _pooled(tmp_path / "mr")
    assert result["temperature"] == pytest.approx(fit_temperature(logits, labels))


@pytest.mark.parametrize("rule", ["youden", "sensitivity", "fixed"])
def test_threshold_is_chosen_on_pooled_calibrated_probs(tmp_path: Path, rule: str) -> None:
    root = _multirun(tmp_path / "mr", scale=2.0)
    result = aggregate(find_fold_runs([root]), rule, 0.9, n_bootstrap=N_BOOT)
    logits, labels = _pooled(root)
    probs = apply_temperature(logits, fit_temperature(logits, labels))
    assert result["threshold"] == choose_threshold(probs, labels, rule=rule, target_sensitivity=0.9)
    assert result["threshold_rule"] == rule
    if rule == "sensitivity":
        assert result["pooled"]["at_threshold"]["sensitivity"] >= 0.9


# ----------------------------------------------------------------------------------------------- errors
def test_overlapping_validation_images_are_an_error(tmp_path: Path) -> None:
    paths0, labels0, logits0 = _fold_data(0)
    paths1, labels1, logits1 = _fold_data(1)
    paths1[7] = paths0[3]
    a = _write_run(tmp_path / "a", 0, 2, paths0, labels0, logits0)
    b = _write_run(tmp_path / "b", 1, 2, paths1, labels1, logits1)
    with pytest.raises(CVError, match="disjoint") as err:
        find_fold_runs([a, b])
    assert str(a) in str(err.value) and str(b) in str(err.value) and paths0[3] in str(err.value)
    assert "\n" not in str(err.value)


def test_duplicated_fold_is_an_error(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "a", 1, 5, *_fold_data(1))
    b = _write_run(tmp_path / "b", 1, 5, *_fold_data(2))
    with pytest.raises(CVError, match="fold 1 is also held out") as err:
        find_fold_runs([a, b])
    assert str(a) in str(err.value) and str(b) in str(err.value)


def test_mismatched_n_folds_is_an_error(tmp_path: Path) -> None:
    root = _multirun(tmp_path / "mr", n_folds=5, folds=[0, 1])
    _write_run(root / "9", 2, 3, *_fold_data(2))
    with pytest.raises(CVError, match="n_folds=3") as err:
        find_fold_runs([root])
    assert str(root / "9") in str(err.value)


def test_no_runs_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "0").mkdir(parents=True)
    with pytest.raises(CVError, match="no run directory") as err:
        find_fold_runs([empty])
    assert str(empty) in str(err.value)
    with pytest.raises(CVError, match="no such directory"):
        find_fold_runs([tmp_path / "missing"])
    with pytest.raises(CVError, match="no fold runs"):
        aggregate([], "youden", 0.95, n_bootstrap=N_BOOT)


def test_run_without_fold_is_an_error(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "single", None, None, *_fold_data(0))
    with pytest.raises(CVError, match="not a cross-validation run") as err:
        find_fold_runs([run])
    assert str(run / "metrics.json") in str(err.value)


def test_malformed_csv_names_file_and_line(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "r", 0, 2, *_fold_data(0))
    csv_path = run / "val_predictions.csv"
    lines = csv_path.read_text().splitlines()
    lines[3] = "/x.jpeg,2,0.5,0.6"
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CVError, match=r"val_predictions\.csv:4: label must be 0"):
        find_fold_runs([run])


def test_missing_fold_is_a_warning_in_the_report(tmp_path: Path) -> None:
    root = _multirun(tmp_path / "mr", folds=[0, 1, 2])
    result = aggregate(find_fold_runs([root]), "youden", 0.95, n_bootstrap=N_BOOT)
    assert result["folds_missing"] == [3, 4]
    assert result["n_images"] == 120
    _, md = write_cv_report(result, tmp_path / "out")
    text = md.read_text()
    assert "**Warning:**" in text and "3 of 5 folds" in text and "[3, 4]" in text


# -------------------------------------------------------------------------------------------- formats
def test_runs_without_val_shift_aggregate_with_na(tmp_path: Path) -> None:
    root = _multirun(tmp_path / "mr", shifts=False)
    result = aggregate(find_fold_runs([root]), "youden", 0.95, n_bootstrap=N_BOOT)
    assert all(f["val_shift_mean"] is None for f in result["folds"])
    assert result["fold_summary"]["val_shift_mean"]["auroc"] == {"mean": None, "std": None, "n": 0}
    assert result["fold_summary"]["val"]["auroc"]["n"] == 5
    _, md = write_cv_report(result, root)
    per_fold = md.read_text().split("## Per-fold metrics (each run's own")[1].split("\n## ")[0]
    fold_rows = [line for line in per_fold.splitlines() if line.startswith("| 0 |")]
    assert len(fold_rows) == 1 and fold_rows[0].rstrip(" |").endswith("n/a | n/a | n/a | n/a | n/a")
    assert json.loads((root / "cv_metrics.json").read_text())["folds"][0]["val_shift_mean"] is None


def test_flat_value_dicts_and_missing_metrics_recomputed(tmp_path: Path) -> None:
    """metrics.json with {"value", "ci"} entries is read; what it lacks is recomputed from the CSV."""
    paths, labels, logits = _fold_data(0)
    val = {"auroc": {"value": 0.8125, "ci": [0.7, 0.9]}, "accuracy": 0.75}
    run = _write_run(tmp_path / "r", 0, 2, paths, labels, logits, val=val)
    meta = json.loads((run / "metrics.json").read_text())
    del meta["calibration"]
    (run / "metrics.json").write_text(json.dumps(meta))
    result = aggregate(find_fold_runs([run]), "youden", 0.95, n_bootstrap=N_BOOT)
    row = result["folds"][0]
    assert row["val"]["auroc"] == 0.8125 and row["val"]["accuracy"] == 0.75
    assert sorted(row["recomputed_from_csv"]) == ["brier", "log_loss", "sensitivity", "specificity"]
    probs = apply_temperature(logits, meta["temperature"])
    expected = classification_metrics(probs, labels, meta["threshold"])
    assert row["val"]["sensitivity"] == pytest.approx(expected["sensitivity"])
    assert row["val"]["log_loss"] == pytest.approx(log_loss(logits, labels, meta["temperature"]), abs=1e-5)
    assert any("missing fold(s) [1]" in w for w in result["warnings"])


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_writes_report_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _multirun(tmp_path / "multirun")
    assert main([str(root), "--n-bootstrap", str(N_BOOT)]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("5 of 5 folds, 200 out-of-fold images")
    assert "AUROC" in lines[1] and "temperature" in lines[1]
    assert "cv_report.md" in lines[2] and "cv_metrics.json" in lines[2]
    assert out.err == ""

    metrics = json.loads((root / "cv_metrics.json").read_text())
    for key in ("n_folds", "n_images", "threshold", "threshold_rule", "temperature", "pooled", "calibration"):
        assert key in metrics
    assert {"at_0.5", "at_threshold", "ci", "log_loss"} <= set(metrics["pooled"])
    assert len(metrics["folds"]) == 5 and metrics["warnings"] == []
    assert set(metrics["fold_summary"]) == {"val", "val_shift_mean", "at_pooled_operating_point"}

    text = (root / "cv_report.md").read_text()
    for header in (
        "# Cross-validation report: 5-fold, out-of-fold",
        "## Pooled out-of-fold metrics",
        "## Operating point and calibration",
        "## Per-fold metrics (each run's own threshold and temperature)",
        "## Per-fold metrics at the pooled operating point",
        "## What these numbers mean",
    ):
        assert header in text
    assert text.count("**mean ± std**") == 2
    assert f"{metrics['threshold']:.4f}" in text


def test_cli_explicit_out_and_run_dirs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _multirun(tmp_path / "mr")
    dirs = [str(root / str(j)) for j in range(5)]
    assert main([*dirs, "--n-bootstrap", str(N_BOOT)]) == 2  # several DIRs: --out required
    assert capsys.readouterr().err.startswith("error: --out is required")
    out = tmp_path / "report"
    assert main([*dirs, "--out", str(out), "--threshold-rule", "fixed", "--n-bootstrap", str(N_BOOT)]) == 0
    assert json.loads((out / "cv_metrics.json").read_text())["threshold"] == 0.5


def test_cli_bad_dir_exits_2_with_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "nothing here"
    bad.mkdir()
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and err.count("\n") == 1
    assert not (bad / "cv_report.md").exists()


def test_cli_missing_fold_warns_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _multirun(tmp_path / "mr", folds=[0, 2, 4])
    assert main([str(root), "--n-bootstrap", str(N_BOOT)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: only 3 of 5 folds") and "[1, 3]" in err
    assert not math.isnan(json.loads((root / "cv_metrics.json").read_text())["temperature"])

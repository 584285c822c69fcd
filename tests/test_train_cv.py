"""Cross-validation end to end: fold runs with shift validation and temperature, then the OOF report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import run_training
from xray.core.checkpoint_io import load_checkpoint_file
from xray.cv import main as cv_main
from xray.evaluation.shifts import SHIFTS


@pytest.fixture(scope="module")
def fold_runs(session_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("cv")
    runs = []
    for fold in range(2):
        run_dir = base / str(fold)
        run_training(
            session_dataset,
            run_dir,
            [
                "trainer.max_epochs=2",
                "data.n_folds=2",
                f"data.fold={fold}",
                "evaluation.shifts=true",
                "evaluation.threshold_rule=shift_youden",
                "evaluation.shift_max_images=24",
            ],
        )
        runs.append(run_dir)
    return runs


def test_fold_run_stores_temperature_threshold_and_predictions(fold_runs: list[Path]) -> None:
    for fold, run_dir in enumerate(fold_runs):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["fold"] == fold and metrics["n_folds"] == 2
        meta = load_checkpoint_file(run_dir / "checkpoints" / "best_xray_model.ckpt")["xray"]
        assert meta["temperature"] == pytest.approx(metrics["temperature"]) and meta["temperature"] > 0
        assert meta["threshold"] == pytest.approx(metrics["threshold"])
        assert meta["threshold_rule"] == "shift_youden"
        cal = metrics["calibration"]
        assert cal["log_loss_after"] <= cal["log_loss_before"] + 1e-9  # fitted on these very logits
        with open(run_dir / "val_predictions.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == metrics["val"]["at_threshold"]["tp"] + metrics["val"]["at_threshold"]["tn"] + (
            metrics["val"]["at_threshold"]["fp"] + metrics["val"]["at_threshold"]["fn"]
        )
        row = rows[0]
        assert float(row["prob"]) == pytest.approx(
            1 / (1 + math.exp(-float(row["logit"]) / metrics["temperature"])), rel=1e-4
        )


def test_fold_run_reports_and_logs_shift_validation(fold_runs: list[Path]) -> None:
    run_dir = fold_runs[0]
    shift = json.loads((run_dir / "metrics.json").read_text())["val_shift"]
    assert set(SHIFTS) <= set(shift) and {"clean", "mean", "worst"} <= set(shift)
    assert shift["worst"]["auroc"] <= shift["mean"]["auroc"]
    report = (run_dir / "report.md").read_text()
    assert "## Shift validation" in report and "jpeg" in report and "## Calibration" in report
    tags: set[str] = set()
    for event in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "val_shift/mean/auroc" in tags and "val_shift/jpeg/log_loss" in tags


def test_cv_command_pools_the_folds(fold_runs: list[Path], tmp_path: Path) -> None:
    assert cv_main([str(p) for p in fold_runs] + ["--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "cv_metrics.json").read_text())
    n = sum(
        len(list(csv.DictReader((run / "val_predictions.csv").read_text().splitlines()))) for run in fold_runs
    )
    assert n == 80 == summary["n_images"]  # every training image scored once, out of fold
    assert "## Pooled out-of-fold metrics" in (tmp_path / "cv_report.md").read_text()
    assert 0 < summary["threshold"] <= 1 and summary["temperature"] > 0
    assert summary["pooled_shift"] is None or "mean" in summary["pooled_shift"]


def test_cv_shift_youden_pools_the_shifted_predictions(fold_runs: list[Path], tmp_path: Path) -> None:
    import torch

    from xray.evaluation.calibration import apply_temperature
    from xray.evaluation.metrics import choose_threshold

    assert (
        cv_main([str(p) for p in fold_runs] + ["--out", str(tmp_path), "--threshold-rule", "shift_youden"])
        == 0
    )
    summary = json.loads((tmp_path / "cv_metrics.json").read_text())
    labels, logits = [], []
    for run in fold_runs:
        for row in csv.DictReader(open(run / "val_shift_predictions.csv")):  # noqa: SIM115
            labels.append(int(row["label"]))
            logits.append(float(row["logit"]))
    assert len(labels) == 2 * 24 * (len(SHIFTS) + 1)  # clean + every shift, for each fold's subset
    probs = apply_temperature(torch.tensor(logits, dtype=torch.float64), summary["temperature"])
    assert summary["threshold"] == pytest.approx(choose_threshold(probs, torch.tensor(labels), rule="youden"))
    assert set(SHIFTS) <= set(summary["pooled_shift"])
    assert "## Pooled shift validation" in (tmp_path / "cv_report.md").read_text()


def test_cv_writes_the_fold_models_as_one_ensemble(
    fold_runs: list[Path], session_dataset: Path, tmp_path: Path
) -> None:
    import torch

    from xray.inference.checkpoints import load_model
    from xray.inference.predict import predict_files
    from xray.inference.predictor import load_predictor

    out = tmp_path / "ensemble"
    assert cv_main([*map(str, fold_runs), "--out", str(tmp_path), "--ensemble-out", str(out)]) == 0
    manifest = json.loads((out / "ensemble.json").read_text())
    summary = json.loads((tmp_path / "cv_metrics.json").read_text())
    assert manifest["members"] == ["fold0.ckpt", "fold1.ckpt"]
    assert manifest["threshold"] == pytest.approx(summary["threshold"])
    assert manifest["temperature"] == pytest.approx(summary["temperature"])
    stats = load_model(out / "fold0.ckpt").ood  # train.py fitted OOD statistics: the manifest says so
    assert stats is not None and manifest["ood"]["threshold"] == 1.0
    assert manifest["ood"]["components"] == stats.components.shape[0]
    assert load_predictor(str(out)).ood_threshold == 1.0
    files = sorted((session_dataset / "test").rglob("*.jpeg"))[:6]
    rows = predict_files(load_predictor(str(out)), files, device="cpu")
    members = [load_model(out / m) for m in manifest["members"]]
    from xray.data.cache import load_resized
    from xray.data.transforms import rescale

    images = rescale(
        torch.stack([torch.from_numpy(load_resized(f, 48, "bilinear")).unsqueeze(0) for f in files])
    )
    with torch.no_grad():
        mean_logit = torch.stack([m.net(images) for m in members]).mean(0)
    expected = torch.sigmoid(mean_logit / manifest["temperature"])
    assert [r.prob_pneumonia for r in rows] == pytest.approx(expected.tolist(), abs=1e-5)
    assert (out / "fold0.ckpt").stat().st_size < (
        fold_runs[0] / "checkpoints" / "best_xray_model.ckpt"
    ).stat().st_size


def test_cv_temperature_on_shifts_is_fitted_on_the_pooled_shifted_copies(
    fold_runs: list[Path], tmp_path: Path
) -> None:
    import torch

    from xray.evaluation.calibration import fit_temperature

    argv = [str(p) for p in fold_runs] + ["--out", str(tmp_path), "--temperature-on", "shifts"]
    assert cv_main(argv) == 0
    summary = json.loads((tmp_path / "cv_metrics.json").read_text())
    labels, logits = [], []
    for run in fold_runs:
        for row in csv.DictReader(open(run / "val_shift_predictions.csv")):  # noqa: SIM115
            labels.append(int(row["label"]))
            logits.append(float(row["logit"]))
    expected = fit_temperature(torch.tensor(logits), torch.tensor(labels))
    assert summary["temperature_on"] == "shifts"
    assert summary["temperature"] == pytest.approx(expected, rel=1e-6)
    assert "and their shifted copies" in (tmp_path / "cv_report.md").read_text()

"""train.py's path end to end on synthetic data: the run directory holds everything users rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xray.core.checkpoint_io import CheckpointError, load_checkpoint_file
from xray.inference.checkpoints import load_model


def test_run_directory_contents(trained_run: Path) -> None:
    for name in (
        "checkpoints/best_xray_model.ckpt",
        "checkpoints/last.ckpt",
        "curves.png",
        "metrics.json",
        "report.md",
        "roc.png",
        "pr.png",
        "confusion_matrix.png",
        "calibration.png",
        "mistakes.png",
    ):
        path = trained_run / name
        assert path.is_file() and path.stat().st_size > 0, name


def test_tensorboard_has_the_curves(trained_run: Path) -> None:
    events = list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    tags: set[str] = set()
    for event in events:
        acc = EventAccumulator(str(event))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "val/auroc",
        "val/sensitivity",
        "val/specificity",
    ):
        assert tag in tags, tags


def test_metrics_json(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    for split in ("val", "test"):
        block = metrics[split]
        assert set(block) >= {"at_0.5", "at_threshold", "ci", "threshold"}
        assert 0.0 <= block["at_threshold"]["accuracy"] <= 1.0
        lo, hi = block["ci"]["auroc"]
        assert lo <= block["at_threshold"]["auroc"] <= hi
    # synthetic PNEUMONIA films carry an obvious blob: even two tiny epochs learn something
    assert metrics["val"]["at_threshold"]["auroc"] > 0.7


def test_checkpoint_carries_what_prediction_needs(trained_run: Path) -> None:
    ckpt = load_checkpoint_file(trained_run / "checkpoints" / "best_xray_model.ckpt")
    meta = ckpt["xray"]
    assert meta["classes"] == ["NORMAL", "PNEUMONIA"]
    assert meta["preprocessing"]["image_size"] == 48
    # the synthetic training files are all 64 px JPEG quality 95: prediction gives inputs the same
    assert meta["preprocessing"]["source_encoding"] == {"width": 64, "height": 64, "quality": 95}
    assert meta["threshold_rule"] == "youden"
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert meta["threshold"] == pytest.approx(metrics["threshold"])
    loaded = load_model(trained_run / "checkpoints" / "best_xray_model.ckpt")
    assert loaded.net(torch.rand(1, 1, 48, 48)).shape == (1,)


def test_report_mentions_anchors_and_numbers(trained_run: Path) -> None:
    report = (trained_run / "report.md").read_text()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert "92.8" in report and "0.968" in report and "62.5" in report
    assert f"{metrics['val']['at_threshold']['accuracy']:.3f}" in report
    assert "![" in report and "roc.png" in report


def test_evaluate_only_reproduces_the_runs_evaluation(
    trained_run: Path, session_dataset: Path, tmp_path: Path
) -> None:
    """evaluate_only=true re-runs the end-of-training evaluation on given weights (e.g. a GPU run whose
    evaluation was cut short): same figures, written into the new run's own copy, source untouched."""
    from tests.helpers import run_training

    source = trained_run / "checkpoints" / "best_xray_model.ckpt"
    before = source.read_bytes()
    run_dir = tmp_path / "evaluated"
    payload = run_training(
        session_dataset, run_dir, ["trainer.max_epochs=2", "evaluate_only=true", f"ckpt_path={source}"]
    )
    original = json.loads((trained_run / "metrics.json").read_text())
    assert payload["epochs_run"] == 0  # nothing trained
    for key in ("threshold", "temperature"):
        assert payload[key] == pytest.approx(original[key], abs=1e-6)
    assert payload["val"]["at_threshold"]["auroc"] == pytest.approx(original["val"]["at_threshold"]["auroc"])
    copy = run_dir / "checkpoints" / "best_xray_model.ckpt"
    assert load_checkpoint_file(copy)["xray"]["threshold"] == pytest.approx(original["threshold"])
    assert (run_dir / "val_predictions.csv").is_file()
    assert source.read_bytes() == before


def test_evaluate_only_needs_a_checkpoint(session_dataset: Path, tmp_path: Path) -> None:
    from tests.helpers import run_training

    with pytest.raises(ValueError, match="evaluate_only=true needs ckpt_path"):
        run_training(session_dataset, tmp_path / "a", ["evaluate_only=true"])
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        run_training(session_dataset, tmp_path / "b", ["evaluate_only=true", f"ckpt_path={tmp_path}/x.ckpt"])

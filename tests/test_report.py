"""Tests for xray.evaluation.report: metrics.json and report.md."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_metrics import _synthetic
from xray.evaluation.metrics import evaluate
from xray.evaluation.report import ANCHORS, render_report, write_metrics_json, write_report


def test_metrics_json_round_trip_nan_to_null(tmp_path) -> None:
    probs, labels = _synthetic(80, seed=2)
    payload = evaluate(probs, labels, threshold=0.6, n_boot=100)
    payload["extra"] = {"undefined": float("nan"), "count": torch.tensor(3)}
    path = write_metrics_json(tmp_path / "run" / "metrics.json", payload)
    text = path.read_text()
    back = json.loads(text)
    assert "NaN" not in text and back["extra"] == {"count": 3, "undefined": None}
    assert back["at_threshold"]["tp"] == payload["at_threshold"]["tp"]
    assert back["at_0.5"]["auroc"] == pytest.approx(payload["at_0.5"]["auroc"])
    assert back["ci"]["auroc"] == pytest.approx(list(payload["ci"]["auroc"]))
    assert list(back) == sorted(back)
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left behind


def _payload(acc: float, ci: tuple[float, float], threshold: float) -> dict:
    base = {k: 0.5 for k in ("auroc", "sensitivity", "specificity", "ppv", "npv", "f1")}
    base.update({"tn": 1, "fp": 2, "fn": 3, "tp": 4})
    return {
        "at_0.5": {**base, "accuracy": 0.777},
        "at_threshold": {**base, "accuracy": acc},
        "ci": {"accuracy": list(ci)},
        "threshold": threshold,
    }


def test_report_renders_anchors_numbers_and_existing_plots_only(tmp_path) -> None:
    (tmp_path / "roc.png").write_bytes(b"\x89PNG")
    (tmp_path / "curves.png").write_bytes(b"\x89PNG")
    text = render_report(
        results={"test": _payload(0.912, (0.89, 0.93), 0.42), "val": _payload(0.95, (0.9, 0.99), 0.42)},
        counts={"train": {"NORMAL": 1000, "PNEUMONIA": 3000}, "test": {"NORMAL": 234, "PNEUMONIA": 390}},
        config={"model": "resnet18", "image_size": 224},
        run_dir=tmp_path,
    )
    for anchor in ("92.8", "0.968", "87", "62.5", "Kermany"):
        assert anchor in text
    assert len(ANCHORS) == 4
    assert "0.912 (0.890-0.930)" in text and "0.777" in text and "resnet18" in text
    assert "| test | 234 | 390 | 624 |" in text
    assert text.index("val @ 0.5") < text.index("test @ 0.5")
    assert "never used for selection" in text
    assert "![ROC](roc.png)" in text and "(curves.png)" in text
    assert "pr.png" not in text and "mistakes.png" not in text


def test_report_states_missing_pieces(tmp_path) -> None:
    text = render_report(results={"val": _payload(0.9, (0.8, 0.95), 0.5)}, run_dir=tmp_path)
    assert "test split was not evaluated" in text
    assert "not recorded" in text and "No plots" in text
    path = write_report(tmp_path, results=None)
    assert path.name == "report.md" and "No evaluation results" in path.read_text()

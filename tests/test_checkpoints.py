"""Slim export for shipping, and the shipped pretrained model working out of the box."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xray.checkpoints import PRETRAINED_PATH, export_for_inference, load_checkpoint_file, load_model


@pytest.mark.parametrize("half", [False, True])
def test_export_for_inference_keeps_predictions(trained_run: Path, tmp_path: Path, half: bool) -> None:
    src = trained_run / "checkpoints" / "best_xray_model.ckpt"
    dst = export_for_inference(src, tmp_path / "slim.ckpt", half=half)
    assert dst.stat().st_size < src.stat().st_size
    assert "optimizer_states" not in load_checkpoint_file(dst)
    x = torch.rand(4, 1, 48, 48)
    full, slim = load_model(src), load_model(dst)
    assert slim.meta == full.meta
    with torch.inference_mode():
        torch.testing.assert_close(slim.net(x), full.net(x), atol=1e-2 if half else 0, rtol=0)


@pytest.mark.skipif(not PRETRAINED_PATH.exists(), reason="no shipped model yet")
def test_shipped_model_predicts_out_of_the_box(tmp_path: Path) -> None:
    from PIL import Image

    from tests.conftest import synthetic_xray
    from xray.inference import predict_files

    assert PRETRAINED_PATH.stat().st_size <= 15 * 1024 * 1024
    model = load_model(PRETRAINED_PATH)
    rng = __import__("numpy").random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"film{i}.png"
        Image.fromarray(synthetic_xray(i % 2, 300, rng)).save(path)
        paths.append(path)
    rows = predict_files(model, paths, batch_size=2)
    assert len(rows) == 3 and all(r.error in (None, "") and 0.0 <= r.prob_pneumonia <= 1.0 for r in rows)
    assert model.threshold != 0.5  # the validation-chosen threshold travels with the model

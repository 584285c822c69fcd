"""callbacks=ema: Lightning's EMAWeightAveraging in the real training path; what ships is the average."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import compose_config, run_training
from xray.core.checkpoint_io import load_checkpoint_file
from xray.inference.checkpoints import load_model


def test_ema_config_adds_the_callback_to_the_defaults(tmp_path: Path) -> None:
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    cfg = compose_config(tmp_path / "d", tmp_path / "run", ["callbacks=ema"])
    callbacks = {name: instantiate(c) for name, c in cfg.callbacks.items()}
    assert isinstance(callbacks["ema"], EMAWeightAveraging)
    assert isinstance(callbacks["model_checkpoint"], ModelCheckpoint)  # the defaults are kept
    assert cfg.callbacks.ema.decay == 0.99


def test_best_checkpoint_holds_the_averaged_weights(session_dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_training(
        session_dataset, run_dir, ["callbacks=ema", "trainer.max_epochs=2", "trainer.limit_train_batches=4"]
    )
    path = run_dir / "checkpoints" / "best_xray_model.ckpt"
    ckpt = load_checkpoint_file(path)  # weights_only=True
    averaged, current = ckpt["state_dict"], ckpt["current_model_state"]
    differs = [k for k, v in averaged.items() if v.is_floating_point() and not torch.equal(v, current[k])]
    assert differs, "EMA weights should differ from the raw weights after training steps"
    model = load_model(path)
    for name, value in model.net.state_dict().items():
        torch.testing.assert_close(value, averaged[f"net.{name}"].to(value.dtype))

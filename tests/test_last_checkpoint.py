"""``last.ckpt`` is the end of every epoch, whatever validation loss does (Lightning 2.6 changed save_last)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import compose_config
from xray.core.checkpoint_io import load_checkpoint_file


class _WorseEveryEpoch(L.LightningModule):
    """Validation loss is the epoch number: it improves once (epoch 0) and never again."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", float(self.current_epoch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _LastEpochProbe(L.Callback):
    """Once each epoch is over and checkpointed, records (finished epoch, epoch stored in last.ckpt)."""

    def __init__(self, path: Path) -> None:
        self.path, self.seen = path, []

    def _record(self, finished: int) -> None:
        self.seen.append((finished, load_checkpoint_file(self.path)["epoch"]))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self._record(trainer.current_epoch - 1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer.current_epoch - 1)


def test_last_ckpt_follows_every_epoch_even_when_validation_never_improves(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_config(tmp_path / "unused", run_dir)
    checkpoints = [hydra.utils.instantiate(cfg.callbacks[k]) for k in ("model_checkpoint", "last_checkpoint")]
    probe = _LastEpochProbe(run_dir / "checkpoints" / "last.ckpt")
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    trainer = L.Trainer(
        max_epochs=4,
        callbacks=[*checkpoints, probe],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(_WorseEveryEpoch(), train_dataloaders=data, val_dataloaders=data)
    assert probe.seen == [(0, 0), (1, 1), (2, 2), (3, 3)]
    best = load_checkpoint_file(run_dir / "checkpoints" / "best_xray_model.ckpt")
    assert best["epoch"] == 0  # the best checkpoint is still the best validation loss
    assert isinstance(trainer.checkpoint_callback, ModelCheckpoint)
    assert trainer.checkpoint_callback.monitor == "val/loss"  # Lightning's "best" is best_xray_model
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best_xray_model.ckpt",
        "last.ckpt",
    ]


def test_last_ckpt_written_when_training_is_interrupted(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_config(tmp_path / "unused", run_dir)
    last = hydra.utils.instantiate(cfg.callbacks.last_checkpoint)

    class _Interrupt(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.current_epoch == 1:
                raise RuntimeError("crash in the second epoch")

    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    trainer = L.Trainer(
        max_epochs=4,
        callbacks=[last, _Interrupt()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    with pytest.raises(RuntimeError, match="crash in the second epoch"):
        trainer.fit(_WorseEveryEpoch(), train_dataloaders=data, val_dataloaders=data)
    state = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert state["epoch"] == 1 and state["global_step"] == 3  # mid-epoch 1, not the end of epoch 0

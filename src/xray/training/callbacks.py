"""Callbacks of our own; everything else is Lightning's (checkpointing, early stopping, LR monitor)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer

from xray.evaluation.plots import make_curves_figure, save_figure

HISTORY_KEYS = ("train/loss", "train/acc", "train/auroc", "val/loss", "val/acc", "val/auroc")


class MetricsHistory(Callback):
    """Keeps per-epoch train/val metrics and redraws ``curves.png`` after every epoch.

    Its state is saved in checkpoints, so a resumed run's curves cover the whole run.
    """

    def __init__(self, curves_path: str | None = None) -> None:
        self.curves_path = Path(curves_path) if curves_path else None
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = {"epoch": float(trainer.current_epoch)}
        row.update({key: float(metrics[key]) for key in HISTORY_KEYS if metrics.get(key) is not None})
        if trainer.optimizers:
            row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.history = [r for r in self.history if r["epoch"] != row["epoch"]] + [row]
        if trainer.is_global_zero and self.curves_path is not None:
            save_figure(make_curves_figure(self.history), self.curves_path)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [{k: v for k, v in row.items() if not math.isnan(v)} for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

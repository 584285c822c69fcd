"""The LightningModule: one logit per image, BCE-with-logits, torchmetrics, Keras-like optimisation.

The network emits logits; sigmoid is applied only for metrics and prediction. What prediction needs
to reproduce training (network config, preprocessing, label mapping, decision threshold) is written
into every checkpoint under ``checkpoint["xray"]`` as plain data, loadable with ``weights_only=True``.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn
from torchmetrics import Metric, MetricCollection, SumMetric
from torchmetrics.aggregation import CatMetric
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC
from torchmetrics.functional.classification import binary_accuracy, binary_auroc
from torchmetrics.utilities import dim_zero_cat

from xray.core.checkpoint_io import CheckpointError, load_checkpoint_file
from xray.core.config_checks import is_num, require
from xray.core.constants import CHECKPOINT_KEY, CLASSES
from xray.core.errors import UserError
from xray.evaluation.metrics import BOOTSTRAP_METRICS, classification_metrics
from xray.models import flip_tta_logits
from xray.models.conv_grad import use_cpu_conv_paths, wants_cpu_conv_paths

CHECKPOINT_FORMAT = 1


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a NaN/inf loss; the message names the epoch and step."""


class EpochBinaryMetric(Metric):
    """``BinaryAccuracy``/``BinaryAUROC`` of a whole epoch whose ``update`` only appends: their input
    checks are host syncs that would stall an accelerator's queue on every training step."""

    full_state_update = False

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in ("acc", "auroc"):
            raise ValueError(f"kind must be 'acc' or 'auroc', got {kind!r}")
        self.kind = kind
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        self.probs.append(probs.detach().flatten().float())
        self.labels.append(labels.detach().flatten().long())

    def compute(self) -> torch.Tensor:
        probs, labels = dim_zero_cat(self.probs), dim_zero_cat(self.labels)
        if self.kind == "acc":
            return binary_accuracy(probs, labels, validate_args=False)
        return binary_auroc(probs, labels, validate_args=False)


class FiniteLossGuard:
    """Stops training on a non-finite loss without a host sync per step on a GPU: there each ``isfinite``
    flag is copied ``non_blocking`` behind an event, read once the event completed, and :meth:`flush`
    waits for the rest. After a non-finite loss every checkpoint save raises (the last good one is kept).
    """

    def __init__(self) -> None:
        self.pending: deque[tuple[torch.Tensor, Any, str]] = deque()
        self.error: NonFiniteLossError | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> FiniteLossGuard:
        return FiniteLossGuard()  # copies of the module (weight averaging) start with nothing pending

    def check(self, loss: torch.Tensor, where: str) -> None:
        finite = torch.isfinite(loss.detach())
        if finite.device.type != "cuda":
            self._verdict(finite, where)
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((host, event, where))
        self.poll()

    def poll(self, wait: bool = False) -> None:
        while self.pending and (wait or self.pending[0][1].query()):
            host, event, where = self.pending.popleft()
            event.synchronize()
            self._verdict(host, where)

    def flush(self) -> None:
        if self.error is not None:
            raise self.error
        self.poll(wait=True)

    def _verdict(self, finite: torch.Tensor, where: str) -> None:
        if not bool(finite):
            self.pending.clear()
            self.error = NonFiniteLossError(
                f"non-finite training loss at {where}; the last good checkpoint is kept. "
                "Lower the learning rate or check the input data."
            )
            raise self.error


def load_net_weights(net: nn.Module, path: str) -> None:
    """Start from the network weights of an xray checkpoint (fine-tuning a trained model under a new
    recipe); read through the safe loader, and only a network of the same architecture fits."""
    checkpoint = load_checkpoint_file(path)
    state = {k[len("net.") :]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("net.")}
    if not state:
        raise CheckpointError(f"{path}: model.init_from needs an xray checkpoint with network weights")
    try:
        net.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in state.items()})
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: model.init_from: its weights do not fit model.net ({str(err).splitlines()[0][:200]})"
        ) from None


class XRayClassifier(LightningModule):
    """NORMAL (0) vs PNEUMONIA (1) from one grayscale channel."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_monitor: str = "val/loss",
        scheduler_interval: str = "epoch",
        pos_weight: float | str | None = None,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        tta: bool = False,
        threshold: float = 0.5,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        require(
            scheduler_interval in ("epoch", "step"),
            "model.scheduler_interval",
            "epoch or step",
            scheduler_interval,
        )
        require(
            is_num(label_smoothing) and 0 <= label_smoothing < 1,
            "model.label_smoothing",
            "a number in [0, 1)",
            label_smoothing,
        )
        require(
            pos_weight is None or pos_weight == "auto" or is_num(pos_weight),
            "model.pos_weight",
            "a number, 'auto' or null",
            pos_weight,
        )
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        if init_from is not None:
            load_net_weights(self.net, init_from)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.threshold = float(threshold)
        self.threshold_rule = "fixed"
        self.temperature = 1.0  # fitted on validation logits after training (xray.evaluation.calibration)
        self.preprocessing: dict[str, Any] = {}
        self.register_buffer("pos_weight", torch.ones(()), persistent=False)
        self.train_metrics = MetricCollection(
            {"acc": EpochBinaryMetric("acc"), "auroc": EpochBinaryMetric("auroc")}, prefix="train/"
        )
        self.finite_guard = FiniteLossGuard()
        self.val_metrics = MetricCollection(
            {"acc": BinaryAccuracy(), "auroc": BinaryAUROC(), "n": SumMetric()}, prefix="val/"
        )
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        # every evaluated probability, gathered across processes: threshold choice, plots, reports
        self.eval_probs = CatMetric()
        self.eval_logits = CatMetric()
        self.eval_labels = CatMetric()
        self.eval_index = CatMetric()

    # ----- model --------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
            device = self.trainer.strategy.root_device if self._trainer is not None else self.device
            if wants_cpu_conv_paths(device, True) and not getattr(self, "_cpu_conv_paths", False):
                use_cpu_conv_paths(self.net)  # AVX2 CPUs: some oneDNN channels_last kernels are 3x+ slower
                self._cpu_conv_paths = True
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) float in [0, 1] -> (B,) logits."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.hparams.tta and not self.training:
            return flip_tta_logits(self.net, x)
        return self.net(x)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        self.preprocessing = dict(datamodule.preprocessing)
        if stage == "fit":
            self.pos_weight.fill_(self._resolve_pos_weight(datamodule.train_class_counts()))

    def _resolve_pos_weight(self, counts: dict[str, int]) -> float:
        pos_weight = self.hparams.pos_weight
        if pos_weight is None:
            return 1.0
        if pos_weight == "auto":
            return counts[CLASSES[0]] / max(counts[CLASSES[1]], 1)
        return float(pos_weight)

    # ----- steps --------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels.float()
        smoothing = self.hparams.label_smoothing
        if smoothing:
            targets = targets * (1.0 - smoothing) + 0.5 * smoothing
        return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=self.pos_weight)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels, _ = batch
        logits = self(images)
        loss = self._loss(logits, labels)
        self.finite_guard.check(
            loss, f"epoch {self.current_epoch}, step {self.global_step} (batch {batch_idx})"
        )
        self.train_metrics.update(torch.sigmoid(logits.detach().float()), labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, prog_bar=False)
        return loss

    def _eval_step(self, batch: Any, metrics: MetricCollection, prefix: str) -> None:
        images, labels, index = batch
        logits = self(images).float()
        loss = F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=self.pos_weight)
        probs = torch.sigmoid(logits / self.temperature)
        metrics["acc"].update(probs, labels)
        metrics["auroc"].update(probs, labels)
        metrics["n"].update(torch.ones_like(probs))
        self.eval_probs.update(probs)
        self.eval_logits.update(logits)
        self.eval_labels.update(labels.float())
        self.eval_index.update(torch.as_tensor(index, device=probs.device).float())
        self.log(
            f"{prefix}/loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(labels),
            sync_dist=True,
        )
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=prefix == "val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_train_epoch_end(self) -> None:
        self.finite_guard.flush()

    def on_validation_start(self) -> None:
        self.finite_guard.flush()

    def on_validation_epoch_start(self) -> None:
        for metric in (self.eval_probs, self.eval_logits, self.eval_labels, self.eval_index):
            metric.reset()

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._log_clinical("val")

    def on_test_epoch_end(self) -> None:
        self._log_clinical("test")

    def _log_clinical(self, prefix: str) -> None:
        """Sensitivity, specificity, PPV, NPV, F1, AP, Brier, ECE at the current threshold, per epoch."""
        probs, labels, _ = self.collected()
        if probs.numel() == 0 or self.trainer.sanity_checking:
            return
        metrics = classification_metrics(probs, labels, self.threshold)
        keys = [k for k in BOOTSTRAP_METRICS if k not in ("accuracy", "auroc")] + ["ece"]  # acc, AUROC: above
        values = {f"{prefix}/{k}": float(metrics[k]) for k in keys if metrics[k] == metrics[k]}  # skip nan
        self.log_dict(values, on_epoch=True, rank_zero_only=True)

    def collected(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs, labels, dataset indices) of the last validation or test epoch, all processes."""
        if not self.eval_probs.update_called:
            empty = torch.empty(0)
            return empty, empty, empty.long()
        probs = self.eval_probs.compute().flatten().cpu()
        labels = self.eval_labels.compute().flatten().long().cpu()
        index = self.eval_index.compute().flatten().long().cpu()
        return probs, labels, index

    def collected_logits(self) -> torch.Tensor:
        """Raw logits (before temperature) of the last validation or test epoch, in ``collected()`` order."""
        if not self.eval_logits.update_called:
            return torch.empty(0)
        return self.eval_logits.compute().flatten().cpu()

    # ----- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {}
        factory = self.scheduler_factory
        target = getattr(factory, "func", factory)
        if "total_steps" in inspect.signature(target).parameters and "total_steps" not in getattr(
            factory, "keywords", {}
        ):
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = factory(optimizer=optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "monitor": self.hparams.scheduler_monitor,
                "interval": self.hparams.scheduler_interval,
            },
        }

    # ----- checkpoint contents ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.finite_guard.flush()  # never write weights updated from a non-finite loss
        metrics = self._trainer.callback_metrics if self._trainer is not None else {}
        monitor = metrics.get(self.hparams.scheduler_monitor)
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "net": dict(self.net.config),
            "preprocessing": dict(self.preprocessing),
            "classes": list(CLASSES),
            "threshold": float(self.threshold),
            "threshold_rule": self.threshold_rule,
            "temperature": float(self.temperature),
            "tta": bool(self.hparams.tta),
            # Lightning saves before the epoch's scheduler step and skips that step on resume
            "monitor_value": None if monitor is None else float(monitor),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY, {})
        self.threshold = float(meta.get("threshold", self.threshold))
        self.threshold_rule = meta.get("threshold_rule", self.threshold_rule)
        self.temperature = float(meta.get("temperature", self.temperature))
        self.preprocessing = dict(meta.get("preprocessing", self.preprocessing))
        self._resumed_monitor_value = meta.get("monitor_value")

    def on_train_start(self) -> None:
        """Replay the epoch-level scheduler step that a resumed run would otherwise lose."""
        value = getattr(self, "_resumed_monitor_value", None)
        self._resumed_monitor_value = None
        if value is None:
            return
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if config.interval == "epoch" and scheduler.last_epoch < self.trainer.current_epoch:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(value)
                else:
                    scheduler.step()

"""What ``train.py`` does, callable from Python: instantiate, fit, choose the threshold, test, report."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from xray.core.atomic import atomic_write_csv
from xray.core.checkpoint_io import load_checkpoint_file
from xray.core.config_checks import ConfigError, instantiate, validate_config
from xray.core.runtime import keep_freed_memory, resolve_precision
from xray.evaluation.calibration import apply_temperature, fit_temperature, log_loss
from xray.evaluation.folds import PREDICTIONS_FILE, SHIFT_PREDICTIONS_FILE
from xray.evaluation.metrics import choose_threshold, classification_metrics, evaluate
from xray.evaluation.report import write_metrics_json, write_plots, write_report
from xray.evaluation.shifts import (
    SHIFTS,
    check_names,
    counterfactual_changes,
    log_shift_metrics,
    shift_logits,
    shift_metrics,
    shift_temperature,
    shift_youden_threshold,
)
from xray.inference.checkpoints import BEST_NAME, update_checkpoint_meta
from xray.inference.ood import DEFAULT_ACCEPTANCE, DEFAULT_COMPONENTS, fit_network, stratified_subsample

log = logging.getLogger(__name__)


def check_writable(directory: str | os.PathLike) -> None:
    """Fail before any data is read when the run directory cannot be written (or the disk is full)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-") as handle:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise PermissionError(
            f"{directory}: output directory is not writable ({err.strerror or err})"
        ) from None


def adopt_checkpoint(ckpt_path: str | None, output_dir: Path) -> Path:
    """``evaluate_only=true``: copy the weights into this run's checkpoints folder, so that the
    evaluation writes its threshold, temperature and OOD statistics into the copy, never the source."""
    if not ckpt_path:
        raise ConfigError("evaluate_only=true needs ckpt_path=CHECKPOINT (the weights to evaluate)")
    source = Path(ckpt_path).expanduser()
    load_checkpoint_file(source)  # the safe loader: a missing, unsafe or foreign file is a CheckpointError
    target = output_dir / "checkpoints" / "best_xray_model.ckpt"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def best_checkpoint_path(callbacks: list[Any]) -> Path | None:
    """The file of the checkpoint named ``best_xray_model`` (by its monitor, or the end of training when
    it has none, as a one-cycle fine-tune wants), else of the first monitored checkpoint."""
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    named = [c for c in checkpoints if c.filename == Path(BEST_NAME).stem]
    checkpoint = next(iter(named), next((c for c in checkpoints if c.monitor), None))
    return Path(checkpoint.best_model_path) if checkpoint and checkpoint.best_model_path else None


def instantiate_list(section: DictConfig | None) -> list[Any]:
    """Instantiate each ``_target_`` entry of a config group (callbacks, loggers)."""
    if not section:
        return []
    return [hydra.utils.instantiate(c) for c in section.values() if c is not None and "_target_" in c]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg``; returns the metrics written to metrics.json."""
    validate_config(cfg)
    if cfg.evaluation.get("shift_names"):
        try:
            check_names(cfg.evaluation.shift_names)
        except ValueError as err:
            raise ConfigError(f"evaluation.shift_names: {err}") from None
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    output_dir = Path(cfg.paths.output_dir)
    check_writable(output_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.check_dataset()  # stop at once when no dataset is at data.root
    model = instantiate(cfg.model)
    callbacks = instantiate_list(cfg.get("callbacks"))
    loggers = instantiate_list(cfg.get("logger"))
    requested = cfg.trainer.get("precision")
    with open_dict(cfg):
        cfg.trainer.precision = resolve_precision(requested, str(cfg.trainer.get("accelerator", "auto")))
    if str(requested) == "auto":
        log.info("trainer.precision=auto -> %s on this machine", cfg.trainer.precision)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    if cfg.get("evaluate_only"):
        best_path = adopt_checkpoint(cfg.get("ckpt_path"), output_dir)
    else:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        best_path = best_checkpoint_path(callbacks)
    results, extras = evaluate_splits(cfg, trainer, model, datamodule, best_path)
    if not trainer.is_global_zero:
        return results
    if best_path is not None and best_path.exists() and cfg.evaluation.get("ood", True):
        results["ood"] = fit_ood(cfg, model, datamodule, best_path)
    payload = {
        "best_checkpoint": str(best_path) if best_path else None,
        "epochs_run": int(trainer.current_epoch),
        "threshold": model.threshold,
        "threshold_rule": model.threshold_rule,
        "temperature": model.temperature,
        "precision": str(cfg.trainer.precision),
        "fold": datamodule.fold if datamodule.n_folds else None,
        "n_folds": datamodule.n_folds,
        **results,
    }
    write_metrics_json(output_dir / "metrics.json", payload)
    write_plots(output_dir, extras, model.threshold, trainer.loggers, datamodule, cfg.evaluation.mistakes)
    write_report(
        output_dir, results=results, counts=datamodule.counts(), config=report_config(cfg, trainer, model)
    )
    log.info("Run directory: %s", output_dir)
    return payload


def evaluate_splits(cfg: DictConfig, trainer: L.Trainer, model: Any, datamodule: Any, best_path: Path | None):
    """Validate the best weights; fit the temperature and choose the threshold on validation (and its
    shifted copies), store both in the checkpoint, write the validation predictions, then test."""
    ev = cfg.evaluation
    results: dict[str, Any] = {}
    extras: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    best = best_path if best_path is not None and best_path.exists() else None
    # Lightning loads the best weights (through the trainer's checkpoint IO, weights only) and validates
    trainer.validate(model, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)
    _, labels, index = model.collected()
    logits = model.collected_logits()
    shifted, shift_labels = (
        shift_validation_logits(model, datamodule, index, labels, ev) if ev.get("shifts") else (None, None)
    )
    model.temperature = fit_run_temperature(logits, labels, shifted, shift_labels, ev)
    probs = apply_temperature(logits, model.temperature)
    extras["val"] = (probs, labels, index)
    rule = str(ev.threshold_rule)
    if rule == "shift_youden" and shifted is None:
        raise ValueError("evaluation.threshold_rule=shift_youden needs evaluation.shifts=true")
    if rule == "shift_youden":
        model.threshold = shift_youden_threshold(shifted, shift_labels, model.temperature)
    else:
        model.threshold = choose_threshold(probs, labels, rule=rule, target_sensitivity=ev.target_sensitivity)
    model.threshold_rule = rule
    if best is not None and trainer.is_global_zero:
        update_checkpoint_meta(
            best_path, threshold=model.threshold, threshold_rule=rule, temperature=model.temperature
        )
    results["val"] = evaluate(probs, labels, model.threshold, n_boot=ev.n_bootstrap, seed=ev.bootstrap_seed)
    raw = torch.sigmoid(logits)
    results["calibration"] = {
        "temperature": model.temperature,
        "log_loss_before": log_loss(logits, labels),
        "log_loss_after": log_loss(logits, labels, model.temperature),
        "ece_before": classification_metrics(raw, labels, model.threshold)["ece"],
        "ece_after": results["val"]["at_threshold"]["ece"],
    }
    if shifted is not None:
        results["val_shift"] = shift_metrics(shifted, shift_labels, model.threshold, model.temperature)
        results["val_counterfactual"] = counterfactual_changes(
            shifted, shift_labels, model.threshold, model.temperature
        )
        log_shift_metrics(results["val_shift"], trainer.loggers, step=trainer.global_step)
    if trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        write_predictions(output_dir / PREDICTIONS_FILE, datamodule, index, labels, logits, probs)
        if shifted is not None:
            write_shift_predictions(output_dir / SHIFT_PREDICTIONS_FILE, shifted, shift_labels)
    if cfg.get("test") and "test" in datamodule.datasets:
        trainer.test(model, datamodule=datamodule, verbose=False)
        probs, labels, _ = extras["test"] = model.collected()
        results["test"] = evaluate(
            probs, labels, model.threshold, n_boot=ev.n_bootstrap, seed=ev.bootstrap_seed
        )
    return results, extras


def fit_run_temperature(
    logits: torch.Tensor,
    labels: torch.Tensor,
    shifted: dict[str, torch.Tensor] | None,
    shift_labels: torch.Tensor | None,
    ev: DictConfig,
) -> float:
    """The run's temperature: 1.0 when ``evaluation.temperature`` is off; fitted on the clean validation
    logits, or on them pooled with their shifted copies (``evaluation.temperature_on=shifts``)."""
    if not ev.get("temperature", True):
        return 1.0
    if ev.get("temperature_on", "clean") == "shifts" and shifted is not None and shift_labels is not None:
        return shift_temperature(shifted, shift_labels)  # validate_config made sure shifts ran
    return fit_temperature(logits, labels)


def split_meta(datamodule: Any) -> dict[str, Any]:
    """Which films trained and validated the network: lets ``python -m xray.ood`` refit it later."""
    return {
        "val_source": datamodule.val_source,
        "n_folds": datamodule.n_folds,
        "fold": datamodule.fold if datamodule.n_folds else None,
        "split_seed": datamodule.split_seed,
        "val_fraction": float(datamodule.val_fraction),
    }


def fit_ood(cfg: DictConfig, model: Any, datamodule: Any, best_path: Path) -> dict[str, Any]:
    """OOD statistics of the best weights (``xray.inference.ood``), stored in the best checkpoint: the Gaussian fitted
    on a seeded, class-stratified subsample of ``evaluation.ood_n_fit`` training films (a minute on a
    CPU), the threshold on every validation film."""
    ev = cfg.evaluation
    n_fit = ev.get("ood_n_fit", 1000)
    train, val = datamodule.datasets["train"], datamodule.datasets["val"]
    picks = stratified_subsample(train.labels.tolist(), n_fit, int(cfg.seed))
    stats = fit_network(
        model.net,
        torch.stack([train.image(i) for i in picks]),
        torch.stack([val.image(i) for i in range(len(val))]),
        int(ev.get("ood_components", DEFAULT_COMPONENTS)),
        float(ev.get("ood_acceptance", DEFAULT_ACCEPTANCE)),
        fitted_on=f"end of training: {len(picks)} training films (stratified subsample, seed {cfg.seed}), "
        f"threshold on {len(val)} validation films",
        batch_size=int(datamodule.batch_size),
        device=model.device,
    )
    update_checkpoint_meta(best_path, ood=stats.to_meta(), split=split_meta(datamodule))
    log.info(
        "OOD statistics: threshold %.4f at %.0f%% of validation films",
        stats.threshold,
        100 * stats.acceptance,
    )
    return {key: getattr(stats, key) for key in ("threshold", "acceptance", "n_fit", "n_val")}


def shift_validation_logits(
    model: Any, datamodule: Any, index: torch.Tensor, labels: torch.Tensor, ev: DictConfig
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Logits of the validation images clean and under each acquisition shift, and their labels: at most
    ``evaluation.shift_max_images``, evenly spaced in dataset order (sorted by class, so both kept)."""
    dataset = datamodule.datasets["val"]
    order = index.argsort()  # dataset order
    limit = ev.get("shift_max_images")
    if limit and len(order) > int(limit):
        order = order[torch.linspace(0, len(order) - 1, int(limit)).round().long()]
    images = torch.stack([dataset.image(i) for i in index[order].tolist()])
    was_training = model.training
    model.eval()
    try:
        shifted = shift_logits(
            lambda x: model(x.to(model.device)).float(),
            images,
            seed=int(ev.get("shift_seed", 0)),
            batch_size=int(datamodule.batch_size),
            shifts=list(ev.get("shift_names") or SHIFTS),
        )
        return shifted, labels[order]
    finally:
        model.train(was_training)


def write_predictions(
    path: Path,
    datamodule: Any,
    index: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    probs: torch.Tensor,
) -> Path:
    """``val_predictions.csv``: path, label, raw logit, calibrated probability; what ``xray.evaluation.folds`` pools."""
    records = datamodule.datasets["val"].records
    rows = zip(index.tolist(), labels.tolist(), logits.tolist(), probs.tolist(), strict=True)
    body = ([str(records[i].path), int(y), f"{z:.6g}", f"{p:.6g}"] for i, y, z, p in rows)
    return atomic_write_csv(path, [["path", "label", "logit", "prob"], *body])


def write_shift_predictions(path: Path, shifted: dict[str, torch.Tensor], labels: torch.Tensor) -> Path:
    """``val_shift_predictions.csv``: shift, label, raw logit per (shift, image); ``xray.evaluation.folds`` pools them."""
    label_list = labels.tolist()
    body = (
        [name, int(y), f"{z:.6g}"]
        for name, values in shifted.items()
        for y, z in zip(label_list, values.tolist(), strict=True)
    )
    return atomic_write_csv(path, [["shift", "label", "logit"], *body])


def report_config(cfg: DictConfig, trainer: L.Trainer, model: Any) -> dict[str, Any]:
    """The settings a reader of report.md needs, flat."""
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    augment = cfg.data.get("augment")
    return {
        "model": net.get("_target_", "?").rsplit(".", 1)[-1] + (f" ({net['arch']})" if "arch" in net else ""),
        "image size": cfg.data.image_size,
        "batch size": cfg.data.batch_size,
        "augmentation": "none" if not augment else ", ".join(f"{k}={v}" for k, v in augment.items()),
        "optimizer": cfg.model.optimizer._target_.rsplit(".", 1)[-1] + f" lr={cfg.model.optimizer.lr}",
        "scheduler": (cfg.model.scheduler or {}).get("_target_", "none").rsplit(".", 1)[-1],
        "precision": cfg.trainer.precision,
        "epochs run": trainer.current_epoch,
        "validation": f"{cfg.data.val_source} (fraction {cfg.data.val_fraction}, grouped by patient)",
        "threshold rule": cfg.evaluation.threshold_rule,
        "threshold": round(model.threshold, 4),
        "seed": cfg.seed,
    }

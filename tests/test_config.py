"""Configs: composition of every experiment, and bad keys rejected before any data is read."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from tests.helpers import compose_config, run_script
from xray.core.config_checks import ConfigError, instantiate, validate_config


@pytest.mark.parametrize(
    "experiment",
    [
        "seed",
        "smoke",
        "cpu_fast",
        "cpu_transfer",
        "cpu_transfer_cv",
        "gpu_transfer",
        "gpu_transfer_cv",
        "best",
    ],
)
def test_experiments_compose_and_validate(tmp_path: Path, experiment: str) -> None:
    cfg = compose_config(tmp_path / "data", tmp_path / "run", [f"experiment={experiment}"], tiny=False)
    validate_config(cfg)
    if experiment == "seed":
        assert cfg.data.image_size == 500 and cfg.data.batch_size == 40
        assert cfg.callbacks.early_stopping.patience == 4 and cfg.model.scheduler.patience == 3
        assert cfg.model.optimizer.eps == 1e-7
    if experiment.startswith("cpu_transfer"):
        assert cfg.model.net._target_ == "xray.models.EfficientNetLite" and cfg.model.net.pretrained
        assert cfg.evaluation.shifts and cfg.evaluation.threshold_rule == "shift_youden"
    if experiment.startswith(("cpu_transfer", "gpu_transfer")):
        assert cfg.model.label_smoothing == 0.1
    if experiment.startswith("gpu_transfer"):  # the shipped recipe: 224 px, whole network, on a GPU
        assert cfg.model.net._target_ == "xray.models.EfficientNetLite" and cfg.model.net.pretrained
        assert cfg.data.image_size == 224 and cfg.model.net.freeze_blocks == 0
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "auto"
        assert cfg.evaluation.threshold_rule == "shift_youden"
    if experiment.endswith("_cv"):
        assert cfg.data.n_folds == 5


def test_cv_experiment_sweeps_the_folds(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["experiment=cpu_transfer_cv"], return_hydra_config=True
        )
    assert str(cfg.hydra.sweeper.params["data.fold"]) == "0,1,2,3,4"


def test_pneumoniamnist_data_config(tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path / "d", tmp_path / "run", ["data=pneumoniamnist", "data.size=128"], tiny=False
    )
    validate_config(cfg)
    assert cfg.data.image_size == 128
    from omegaconf import OmegaConf

    raw = OmegaConf.load(PROJECT_ROOT / "conf/data/pneumoniamnist.yaml")
    assert OmegaConf.to_container(raw)["root"].endswith("pneumoniamnist_${data.size}")
    assert cfg.data.source == "pneumoniamnist" and cfg.data.val_source == "official"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.image_size=-5", "data.image_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.image_size=big", "data.image_size"),
        ("data.augment.zoom_range=1.5", "data.augment: zoom_range"),
        ("data.num_workers=-1", "data.num_workers"),
        ("data.interpolation=lanczos", "data.interpolation"),
        ("model.label_smoothing=1.0", "model.label_smoothing"),
        ("data.val_fraction=0", "data.val_fraction"),
        ("model.optimizer.lr=-1", "model.optimizer.lr"),
        ("evaluation.threshold_rule=magic", "evaluation.threshold_rule"),
        ("evaluation.temperature_on=everything", "evaluation.temperature_on"),
        ("evaluation.temperature_on=shifts", "evaluation.temperature_on=shifts needs evaluation.shifts"),
        ("evaluation.threshold_rule=shift_youden", "evaluation.threshold_rule=shift_youden needs"),
        ("+data.appearance.hue=0.1", "data.appearance"),
        ("+data.appearance.blur_p=1.5", "data.appearance"),
        ("+data.appearance.sharpen_p=1.5", "data.appearance"),
        ("+data.colour=red", "data.colour"),
        ("+model.net.depth=3", "model.net.depth"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, override: str, key: str) -> None:
    """Each bad value fails before any data is read: in validate_config or in its own constructor."""
    cfg = compose_config(tmp_path / "data", tmp_path / "run", [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)
        instantiate(cfg.data)
        instantiate(cfg.model)


def run_train(*args: str, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess:
    return run_script("train.py", list(args), cwd=cwd, timeout=180)


def test_cli_rejects_bad_value_without_traceback(tmp_path: Path) -> None:
    proc = run_train("data.batch_size=0", f"paths.log_dir={tmp_path}", f"data.root={tmp_path / 'nowhere'}")
    assert proc.returncode == 2
    assert "data.batch_size: must be an integer >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unknown_key_is_named(tmp_path: Path) -> None:
    proc = run_train("data.colour=red", f"paths.log_dir={tmp_path}")
    assert proc.returncode != 0 and "colour" in proc.stderr


def test_cli_missing_dataset_says_where_and_how(tmp_path: Path) -> None:
    proc = run_train(f"paths.log_dir={tmp_path}", f"data.root={tmp_path / 'nowhere'}")
    assert proc.returncode == 2
    assert str(tmp_path / "nowhere") in proc.stderr and "python -m xray.download" in proc.stderr
    assert "Traceback" not in proc.stderr

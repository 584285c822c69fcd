"""Hyperparameter search: train.py returns ``optimized_metric`` and conf/hparams_search/optuna.yaml drives
Hydra's Optuna sweeper over keys that exist, end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from tests.conftest import PROJECT_ROOT
from tests.helpers import TINY, compose_config, run_script
from xray.cli import TrialFailed, check_optimized_metric, metric_value, sweep_trial
from xray.core.config_checks import ConfigError, instantiate, validate_config
from xray.training.module import NonFiniteLossError

# CI installs the sweep extra, so there a missing plugin fails; elsewhere these tests need it installed
requires_sweeper = pytest.mark.skipif(
    not os.environ.get("CI") and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason='needs the sweep extra: pip install -c constraints.txt -e ".[sweep]"',
)

PAYLOAD = {
    "epochs_run": 3,
    "val": {
        "at_threshold": {"auroc": 0.97, "log_loss": 0.2},
        "at_0.5": {"auroc": 0.96, "sensitivity": 0.9},
        "ci": {"auroc": [0.95, 0.99]},
    },
    "val_shift": {"mean": {"log_loss": 0.31}, "worst": {"log_loss": 0.52}},
    "best_checkpoint": "/runs/0/checkpoints/best.ckpt",
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("val.at_threshold.auroc", 0.97),
        ("val.at_0.5.sensitivity", 0.9),  # a key with a dot in it
        ("val_shift.mean.log_loss", 0.31),
        ("val.ci.auroc.1", 0.99),  # a list item by index
        ("epochs_run", 3.0),
    ],
)
def test_metric_value_follows_dotted_paths(path: str, expected: float) -> None:
    value = metric_value(PAYLOAD, path)
    assert isinstance(value, float) and value == expected


def test_metric_value_is_none_without_an_optimized_metric() -> None:
    assert metric_value(PAYLOAD, None) is None


def test_metric_value_takes_numpy_scalars() -> None:
    value = metric_value({"val": {"brier": np.float32(0.25)}}, "val.brier")
    assert isinstance(value, float) and value == 0.25


@pytest.mark.parametrize(
    ("path", "listed"),
    [
        ("val.at_threshold.aurocc", "available under 'val.at_threshold': auroc, log_loss"),
        ("val_shift.median.log_loss", "available under 'val_shift': mean, worst"),
        ("test.auroc", "available at the top level: epochs_run, val, val_shift, best_checkpoint"),
        ("val.at_0.5.f1", "available under 'val.at_0.5': auroc, sensitivity"),
    ],
)
def test_missing_metric_names_the_key_and_lists_what_is_there(path: str, listed: str) -> None:
    with pytest.raises(ConfigError) as err:
        metric_value(PAYLOAD, path)
    assert f"optimized_metric={path}: not in this run's metrics" in str(err.value)
    assert listed in str(err.value)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("val.at_threshold", "a group, not a number; keys in it: auroc, log_loss"),
        ("best_checkpoint", "a str, not a number"),
    ],
)
def test_metric_that_is_not_a_number_is_rejected(path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"optimized_metric={path}: {message}"):
        metric_value(PAYLOAD, path)


def test_val_shift_metric_without_shift_validation_fails_before_training(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path / "data", tmp_path / "run", ["optimized_metric=val_shift.mean.log_loss"])
    with pytest.raises(ConfigError, match=r"val_shift metrics need evaluation\.shifts=true"):
        check_optimized_metric(cfg)
    cfg = compose_config(
        tmp_path / "data",
        tmp_path / "run",
        ["optimized_metric=val_shift.mean.log_loss", "evaluation.shifts=true"],
    )
    check_optimized_metric(cfg)  # accepted


@requires_sweeper
def test_a_bad_optimized_metric_stops_the_sweep_with_one_error_line(tmp_path: Path) -> None:
    proc = run_script(
        "train.py",
        [
            "-m",
            "hparams_search=optuna",
            "evaluation.shifts=false",  # the objective (val_shift...) would never be written
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            f"paths.log_dir={tmp_path}",
            f"data.root={tmp_path / 'nowhere'}",
        ],
        cwd=tmp_path,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stderr
    message = "error: optimized_metric=val_shift.mean.log_loss: val_shift metrics need evaluation.shifts=true"
    assert message in proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "sweep" / "1").exists()  # not recorded as a failed trial: the search ended


def _optuna_config(tmp_path: Path, overrides: list[str]) -> tuple[object, object]:
    """The train config with hparams_search=optuna, and its hydra node (the sweeper's settings)."""
    cfg = compose_config(
        tmp_path / "data", tmp_path / "run", ["hparams_search=optuna", *overrides], tiny=False
    )
    return cfg, HydraConfig.get()


def _ends(param: str) -> tuple[float, float]:
    """The smallest and largest value one sweeper param can take: an interval's ends or a choice's extremes."""
    sweep = OverridesParser.create().parse_override(f"x={param}").value()
    if hasattr(sweep, "start"):
        return sweep.start, sweep.end
    return min(sweep.list), max(sweep.list)


@requires_sweeper
@pytest.mark.parametrize("experiment", [None, "cpu_transfer", "gpu_transfer", "seed"])
def test_optuna_config_composes_and_every_param_is_a_real_key(tmp_path: Path, experiment: str | None) -> None:
    cfg, hydra_cfg = _optuna_config(tmp_path, [f"experiment={experiment}"] if experiment else [])
    sweeper = hydra_cfg.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert hydra_cfg.mode == RunMode.MULTIRUN
    assert sweeper.direction == "minimize" and sweeper.sampler.seed is not None
    assert cfg.optimized_metric == "val_shift.mean.log_loss"
    assert cfg.evaluation.shifts is True  # what the objective needs
    check_optimized_metric(cfg)
    params = sweeper.params
    assert len(params) >= 3
    for key in params:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key)
        assert parent is not None and leaf in parent, f"{key}: not a key of the composed train config"


@requires_sweeper
@pytest.mark.parametrize("model", ["seed_cnn", "efficientnet_lite0", "mobilenet_v3_small", "resnet18"])
def test_search_space_ends_pass_config_validation(tmp_path: Path, model: str) -> None:
    _, hydra_cfg = _optuna_config(tmp_path, [f"model={model}"])
    ends = {key: _ends(spec) for key, spec in hydra_cfg.sweeper.params.items()}
    for side in (0, 1):
        values = {key: pair[side] for key, pair in ends.items()}
        cfg, _ = _optuna_config(tmp_path, [f"model={model}", *(f"{k}={v}" for k, v in values.items())])
        assert {key: OmegaConf.select(cfg, key) for key in values} == values
        validate_config(cfg)  # raises ConfigError naming the key when a value is out of range
        instantiate(cfg.data)  # the data and model constructors check their own arguments
        instantiate(cfg.model)


@requires_sweeper
def test_a_diverged_trial_fails_only_itself_in_a_sweep(tmp_path: Path) -> None:
    cfg, _ = _optuna_config(tmp_path, [])
    with pytest.raises(TrialFailed, match="trial failed: loss is nan") as err, sweep_trial(cfg):
        raise NonFiniteLossError("loss is nan")
    assert not isinstance(err.value, ConfigError)  # not a user error: it reaches the sweeper
    single = compose_config(tmp_path / "data", tmp_path / "single", ["optimized_metric=val.at_0.5.auroc"])
    assert HydraConfig.get().mode != RunMode.MULTIRUN
    with pytest.raises(NonFiniteLossError), sweep_trial(single):  # a single run: a user error as before
        raise NonFiniteLossError("loss is nan")


@requires_sweeper
@pytest.mark.slow
def test_optuna_sweep_end_to_end(session_dataset: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_script(
        "train.py",
        [
            "-m",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep_dir}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"data.root={session_dataset}",
            *TINY,
            "trainer.max_epochs=1",
            "test=false",
            "+evaluation.ood=false",
            "evaluation.shift_max_images=8",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert math.isfinite(results["best_value"])
    searched = yaml.safe_load((PROJECT_ROOT / "conf" / "hparams_search" / "optuna.yaml").read_text())
    assert set(results["best_params"]) == set(searched["hydra"]["sweeper"]["params"])
    trial_values = []
    for trial in ("0", "1"):
        metrics = json.loads((sweep_dir / trial / "metrics.json").read_text())
        trial_values.append(metrics["val_shift"]["mean"]["log_loss"])
        overrides = yaml.safe_load((sweep_dir / trial / ".hydra" / "overrides.yaml").read_text())
        assert any(o.startswith("model.optimizer.lr=") for o in overrides)  # the sampled settings
    assert not (sweep_dir / "2").exists()
    # what main returned is what the sweeper optimised: the best trial's metrics.json value
    assert results["best_value"] == pytest.approx(min(trial_values), rel=1e-12)
    assert "setup plugin alembic" not in proc.stdout + proc.stderr

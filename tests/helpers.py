"""Running train.py's code path in-process through Hydra's compose API (no subprocess start-up cost)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tests.conftest import PROJECT_ROOT

TINY = [
    "data.image_size=48",
    "data.batch_size=8",
    "data.num_workers=0",
    "model.net.channels=[8,16,16]",
    "model.net.dense_units=16",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "evaluation.n_bootstrap=50",
    "evaluation.mistakes=4",
]


def compose_hydra(config_name: str, run_dir: Path, overrides: list[str]) -> Any:
    """A config of conf/ composed as its entry point sees it, with Hydra's runtime output dir set."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name=config_name,
            overrides=[f"hydra.run.dir={run_dir}", *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def compose_config(
    data_root: Path, run_dir: Path, overrides: list[str] | None = None, tiny: bool = True
) -> Any:
    """The train config with tiny settings, writing into ``run_dir``."""
    return compose_hydra(
        "config",
        run_dir,
        [
            f"data.root={data_root}",
            f"paths.cache_dir={run_dir.parent / 'cache'}",
            *(TINY if tiny else []),
            *(overrides or []),
        ],
    )


def run_training(data_root: Path, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    from xray.training.run import train

    cfg = compose_config(data_root, run_dir, overrides)
    return train(cfg)


class SlowDown:
    """Test-only Lightning callback: sleeps after each training batch so a test can kill mid-epoch."""

    def __new__(cls, seconds: float = 0.2):
        import time

        from lightning import Callback

        class _Slow(Callback):
            def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
                time.sleep(seconds)

        return _Slow()


class PoisonWeightsAt:
    """Test-only callback: fills the output bias with NaN at the start of a given epoch."""

    def __new__(cls, epoch: int = 1):
        from lightning import Callback

        class _Poison(Callback):
            def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
                if trainer.current_epoch == epoch:
                    pl_module.net.classifier[-1].bias.data.fill_(float("nan"))

        return _Poison()


def run_script(script: str, args: list[str], cwd: Path = PROJECT_ROOT, timeout: int = 300):
    """Run train.py / predict.py as a user would (a fresh process); returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(PROJECT_ROOT / "src")}
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )

"""Train the chest X-ray classifier: ``python train.py [overrides]`` (Hydra; see conf/config.yaml).

Resume a killed run: ``python train.py resume=RUN_DIR`` (reloads that run's config and continues from
its last.ckpt), or Lightning's own form ``ckpt_path=RUN_DIR/checkpoints/last.ckpt hydra.run.dir=RUN_DIR``.

Hyperparameter search: ``python train.py -m hparams_search=optuna experiment=cpu_transfer``; ``main``
returns the run's ``optimized_metric`` for the sweeper (conf/hparams_search/optuna.yaml).
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from xray.cli import check_optimized_metric, expand_resume, fail_cleanly, metric_value, sweep_trial
from xray.training.run import train

log = logging.getLogger("xray")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One training run; returns its ``optimized_metric`` (None when that is null) for a Hydra sweeper."""
    with fail_cleanly(log):
        check_optimized_metric(cfg)
        with sweep_trial(cfg):
            metrics = train(cfg)
        value = metric_value(metrics, cfg.get("optimized_metric"))
        if value is not None:
            log.info("optimized_metric %s = %.6g", cfg.optimized_metric, value)
        return value


if __name__ == "__main__":
    sys.argv = expand_resume(sys.argv)
    main()

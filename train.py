"""Train the chest X-ray classifier: ``python train.py [overrides]`` (Hydra; see conf/config.yaml).

Resume a killed run: ``python train.py resume=RUN_DIR`` (reloads that run's config and continues from
its last.ckpt), or Lightning's own form ``ckpt_path=RUN_DIR/checkpoints/last.ckpt hydra.run.dir=RUN_DIR``.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from xray.cli import expand_resume, fail_cleanly
from xray.training import train

log = logging.getLogger("xray")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    with fail_cleanly(log):
        train(cfg)


if __name__ == "__main__":
    sys.argv = expand_resume(sys.argv)
    main()

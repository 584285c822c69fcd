"""Predict with a trained classifier: ``python predict.py ckpt=best input=PATH`` (Hydra; conf/predict.yaml).

``input=`` a file, a folder (recursive), a quoted glob or a ``.txt`` list; without it, ``data.root``'s
test folder with metrics. Writes ``preds.csv`` (path, prob_pneumonia, label, threshold, ood_score,
warning, error) into ``logs/predict/runs/<timestamp>/`` unless ``output=`` says otherwise.

Exit codes: 0 every file predicted; 3 (``EXIT_SOME_FAILED``) some files could not be read (their rows
say why; all others were predicted); 2 (``EXIT_USER_ERROR``) bad checkpoint, input or setting.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from xray.cli import fail_cleanly
from xray.inference.predict import run_predict

log = logging.getLogger("xray")


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with fail_cleanly(log):
        code = run_predict(cfg)
    sys.exit(code)


if __name__ == "__main__":
    main()

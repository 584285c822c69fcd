"""Serve a trained classifier over HTTP: ``python serve.py ckpt=pretrained`` (Hydra; conf/serve.yaml).

``POST /predict`` takes a film (multipart field ``file`` or the raw body; ``?gradcam=true`` adds the
overlay) and answers with predict.py's CSV row as JSON; ``GET /`` is a page to drop a film on. Runs on
LitServe (the ``serve`` extra): dynamic batching across clients, workers per device, a request
timeout, an optional API key. Exit code 2 (``EXIT_USER_ERROR``): a bad checkpoint or setting, or the
extra is missing.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from xray.cli import EXIT_USER_ERROR, fail_cleanly

SERVE_PACKAGES = {"litserve", "fastapi", "starlette", "uvicorn", "python_multipart"}

try:
    from xray.serving.server import run_serve
except ModuleNotFoundError as err:  # the serve extra is not installed
    if err.name not in SERVE_PACKAGES:
        raise
    run_serve = None
    MISSING = err.name

log = logging.getLogger("xray")


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    if run_serve is None:
        print(
            f"error: serving needs the serve extra ({MISSING} is missing): "
            "pip install -c constraints.txt -e '.[serve]'",
            file=sys.stderr,
        )
        sys.exit(EXIT_USER_ERROR)
    with fail_cleanly(log):
        code = run_serve(cfg)
    sys.exit(code)


if __name__ == "__main__":
    main()

"""Shared behaviour of the command-line entry points: clean errors and the ``resume=RUN_DIR`` form."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2
"""Exit code for bad configuration, data or checkpoints: a message, no traceback."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, reported as one message instead of a traceback."""
    from xray.errors import UserError

    return (UserError, PermissionError)


CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def hydra_entry(config_name: str, run: Callable[[Any], int]) -> None:
    """``python -m xray.<tool> key=value ...``: Hydra on conf/<config_name>.yaml, user errors exit 2."""
    import hydra

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    def _run(cfg: Any) -> None:
        with fail_cleanly(logging.getLogger("xray")):
            code = run(cfg)
        sys.exit(code)

    _run()


@contextlib.contextmanager
def fail_cleanly(log: logging.Logger) -> Iterator[None]:
    """Turn a user error into ``error: <message>`` on stderr and exit code 2 (and into the log file)."""
    errors = user_errors()
    try:
        yield
    except errors as err:
        _log_to_files(log, err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _log_to_files(log: logging.Logger, err: BaseException) -> None:
    """The error into the run's log file only: on the console it would repeat the ``error:`` line."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (err,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def expand_resume(argv: list[str]) -> list[str]:
    """``resume=RUN_DIR`` -> that run's saved config, its directory and its last.ckpt."""
    resume = [a for a in argv[1:] if a.startswith("resume=")]
    if not resume:
        return argv
    run_dir = Path(resume[-1].split("=", 1)[1]).expanduser()
    config_dir = run_dir / ".hydra"
    last = run_dir / "checkpoints" / "last.ckpt"
    if not (config_dir / "config.yaml").is_file():
        print(f"error: {run_dir}: not a run directory (no .hydra/config.yaml)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if not last.is_file():
        print(f"error: {last}: no last.ckpt to resume from", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    rest = [a for a in argv[1:] if not a.startswith("resume=")]
    return [
        argv[0],
        "--config-path",
        str(config_dir.resolve()),
        "--config-name",
        "config",
        f"hydra.run.dir={run_dir}",
        f"ckpt_path={last}",
        *rest,
    ]

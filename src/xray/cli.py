"""Shared behaviour of the command-line entry points: clean errors, the ``resume=RUN_DIR`` form and the
``optimized_metric`` a Hydra sweeper optimises."""

from __future__ import annotations

import contextlib
import logging
import numbers
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

from xray.core.config_checks import ConfigError
from xray.core.errors import UserError
from xray.core.locations import locate
from xray.training.module import NonFiniteLossError

EXIT_USER_ERROR = 2
"""Exit code for bad configuration, data or checkpoints: a message, no traceback."""


CONFIG_DIR = str(locate("conf"))


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
    """Turn a user error (bad input, not a bug) into ``error: <message>`` on stderr and exit code 2; the
    run's log file gets it too (not the console, where it would repeat the ``error:`` line)."""
    try:
        yield
    except (UserError, PermissionError) as err:
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (err,), None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        _exit(str(err))


def _exit(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def expand_resume(argv: list[str]) -> list[str]:
    """``resume=RUN_DIR`` -> that run's saved config, its directory and its last.ckpt."""
    resume = [a for a in argv[1:] if a.startswith("resume=")]
    if not resume:
        return argv
    run_dir = Path(resume[-1].split("=", 1)[1]).expanduser()
    config_dir = run_dir / ".hydra"
    last = run_dir / "checkpoints" / "last.ckpt"
    if not (config_dir / "config.yaml").is_file():
        _exit(f"{run_dir}: not a run directory (no .hydra/config.yaml)")
    if not last.is_file():
        _exit(f"{last}: no last.ckpt to resume from")
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


class TrialFailed(RuntimeError):
    """A sweep trial whose sampled settings diverged (non-finite loss): not a user error, so it reaches
    the sweeper, which records the trial as failed and goes on (conf/hparams_search/optuna.yaml)."""


@contextlib.contextmanager
def sweep_trial(cfg: Any) -> Iterator[None]:
    """Inside ``fail_cleanly``: in a sweep that optimises a metric, a non-finite loss fails only its trial
    (as a user error, exit code 2, it would end the whole search at the first diverging learning rate)."""
    try:
        yield
    except NonFiniteLossError as err:
        if cfg.get("optimized_metric") is None or not _multirun():
            raise
        raise TrialFailed(f"trial failed: {err}") from err


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_optimized_metric(cfg: Any) -> None:
    """Reject a bad ``optimized_metric`` before training rather than after it: a string path or null, and a
    ``val_shift`` metric only when shift validation runs (otherwise metrics.json has no ``val_shift``)."""
    path = cfg.get("optimized_metric")
    if path is None:
        return
    if not isinstance(path, str) or not path:
        raise ConfigError(f"optimized_metric: must be null or a dotted metrics.json key, got {path!r}")
    evaluation = cfg.get("evaluation") or {}
    if path.split(".", 1)[0] == "val_shift" and not evaluation.get("shifts"):
        raise ConfigError(f"optimized_metric={path}: val_shift metrics need evaluation.shifts=true")


def metric_value(metrics: Mapping[str, Any], path: str | None) -> float | None:
    """The number at dotted ``path`` in train()'s metrics.json payload, for a Hydra sweeper to optimise.

    Keys with dots of their own (``val.at_0.5.auroc``) match whole, longest first; list items by index
    (``val.ci.auroc.0``). A missing path, a group or a string is a ConfigError listing the keys there.
    """
    if path is None:
        return None
    node, rest, where = metrics, str(path), []
    while rest:
        if isinstance(node, Mapping):
            keys = [str(k) for k in node]
        else:
            keys = [str(i) for i in range(len(node))] if isinstance(node, (list, tuple)) else []
        key = max((k for k in keys if rest == k or rest.startswith(k + ".")), key=len, default=None)
        if key is None:
            place = f"under {'.'.join(where)!r}" if where else "at the top level"
            raise ConfigError(
                f"optimized_metric={path}: not in this run's metrics (metrics.json); "
                f"available {place}: {', '.join(keys) or '(none: a value, not a group)'}"
            )
        node = node[key] if isinstance(node, Mapping) else node[int(key)]
        rest, where = rest[len(key) + 1 :], [*where, key]
    if isinstance(node, (Mapping, list, tuple)):
        inside = ", ".join(map(str, node)) if isinstance(node, Mapping) else f"indices 0-{len(node) - 1}"
        raise ConfigError(f"optimized_metric={path}: a group, not a number; keys in it: {inside}")
    if isinstance(node, bool) or not isinstance(node, numbers.Real):  # numpy scalars are Real too
        raise ConfigError(f"optimized_metric={path}: a {type(node).__name__}, not a number")
    return float(node)

"""Reject a bad configuration before any data is read, naming the offending key: constructors check
their own arguments with :func:`require`; ``RULES`` covers the keys nothing instantiates."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xray.core.errors import UserError

if TYPE_CHECKING:
    from omegaconf import DictConfig


class ConfigError(UserError, ValueError):
    """A config key with an unknown name, a wrong type or an impossible value."""


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_positive_finite(value: Any) -> bool:
    """A finite real number > 0 (``True`` is no number here)."""
    return is_num(value) and math.isfinite(value) and value > 0


def require(ok: bool, key: str, expected: str, value: Any) -> None:
    """Constructors' own checks, in one wording: ``data.batch_size: must be an integer >= 1, got 0``."""
    if not ok:
        raise ConfigError(f"{key}: must be {expected}, got {value!r}")


def instantiate(node: DictConfig) -> Any:
    """``hydra.utils.instantiate``, with a constructor's user error raised as itself (one ``error:`` line,
    no traceback) instead of inside Hydra's InstantiationException."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


# Keys no constructor sees (the optimizer is a partial called only once training starts; the evaluation
# group is plain settings; the Trainer is Lightning's): key -> (check, what it must be)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "trainer.max_epochs": (lambda v: is_int(v) and (v >= 1 or v == -1), "an integer >= 1 (or -1)"),
    "model.optimizer.lr": (lambda v: is_num(v) and v > 0, "a number > 0"),
    "evaluation.threshold_rule": (
        lambda v: v in ("youden", "shift_youden", "sensitivity", "fixed"),
        "youden, shift_youden, sensitivity or fixed",
    ),
    "evaluation.target_sensitivity": (lambda v: is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "evaluation.n_bootstrap": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "evaluation.temperature_on": (lambda v: v in ("clean", "shifts"), "clean or shifts"),
}
# evaluation settings that read the shifted validation copies: key -> the value that needs them
NEEDS_SHIFTS = {"evaluation.threshold_rule": "shift_youden", "evaluation.temperature_on": "shifts"}


def _check_targets(node: Any, path: str) -> None:
    """Every key under a ``_target_`` must be a parameter of that target (unless it takes **kwargs)."""
    from hydra.utils import get_method  # here, not at import: the constructors' checks need no Hydra
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        target = node._get_node("_target_")._value() if "_target_" in node else None
        children = [(f"{path}.{key}", node._get_node(key)) for key in node]  # no interpolation resolved
        if isinstance(target, str):
            try:
                signature = inspect.signature(get_method(target))
            except Exception:  # a target that cannot be located is reported by instantiate itself
                signature = None
            if signature is not None and not any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
            ):
                known = set(signature.parameters)
                for key in node:
                    if not str(key).startswith("_") and key not in known:
                        raise ConfigError(
                            f"{path}.{key}: unknown key for {target} (known: {', '.join(sorted(known))})"
                        )
    elif isinstance(node, ListConfig):
        children = [(f"{path}[{i}]", node._get_node(i)) for i in range(len(node))]
    else:
        return
    for child_path, child in children:
        if isinstance(child, (DictConfig, ListConfig)):
            _check_targets(child, child_path)


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first bad key: type and range rules, then unknown constructor keys."""
    from omegaconf import ListConfig, OmegaConf

    for key, (check, expected) in RULES.items():
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None)
        if parent is None or leaf not in parent:
            continue
        value = OmegaConf.select(cfg, key)
        if isinstance(value, ListConfig):
            value = list(value)
        require(check(value), key, expected, value)
    for key, value in NEEDS_SHIFTS.items():
        if OmegaConf.select(cfg, key, default=None) == value and not OmegaConf.select(
            cfg, "evaluation.shifts", default=False
        ):
            raise ConfigError(f"{key}={value} needs evaluation.shifts=true (shift validation)")
    for group in ("data", "model", "callbacks", "logger", "trainer"):
        if group in cfg and cfg[group] is not None:
            _check_targets(cfg[group], group)

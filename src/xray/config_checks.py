"""Reject a bad configuration before any data is read, naming the offending key."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf

from xray.errors import UserError


class ConfigError(UserError, ValueError):
    """A config key with an unknown name, a wrong type or an impossible value."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _zoom_ok(v: Any) -> bool:
    if _is_num(v):
        return 0 <= v < 1
    if isinstance(v, (list, tuple, ListConfig)) and len(v) == 2 and all(_is_num(x) for x in v):
        return 0 < v[0] <= v[1]
    return False


def _appearance_keys() -> frozenset[str]:
    from xray.transforms import appearance_augment_batch

    return frozenset(inspect.signature(appearance_augment_batch).parameters) - {"images", "generator"}


APPEARANCE_KEYS = _appearance_keys()
APPEARANCE_PROBABILITIES = frozenset(k for k in APPEARANCE_KEYS if k.endswith("_p"))  # blur_p, sharpen_p


def _appearance_ok(v: Any) -> bool:
    if v is None:
        return True
    if not isinstance(v, DictConfig):
        return False
    return (
        set(v) <= APPEARANCE_KEYS
        and all(_is_num(v[k]) and v[k] >= 0 for k in v)
        and all(v[k] <= 1 for k in APPEARANCE_PROBABILITIES & set(v))
    )


# key -> (check, what it must be)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.image_size": (lambda v: _is_int(v) and v >= 8, "an integer >= 8"),
    "data.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "data.num_workers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "data.val_fraction": (lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    "data.interpolation": (lambda v: v in ("nearest", "bilinear", "bicubic"), "nearest, bilinear or bicubic"),
    "data.val_source": (lambda v: v in ("split", "official"), "split or official"),
    "data.train_limit_per_class": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
    "data.augment.rotation_range": (
        lambda v: _is_num(v) and 0 <= v <= 180,
        "a number of degrees in [0, 180]",
    ),
    "data.augment.width_shift_range": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "data.augment.height_shift_range": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "data.augment.shear_range": (lambda v: _is_num(v) and v >= 0, "a number of degrees >= 0"),
    "data.augment.zoom_range": (_zoom_ok, "a number in [0, 1) or a pair [lo, hi] with 0 < lo <= hi"),
    "data.augment.fill_mode": (lambda v: v == "nearest", "'nearest' (edge replication; the only mode built)"),
    "data.appearance": (
        _appearance_ok,
        f"null or a mapping of {', '.join(sorted(APPEARANCE_KEYS))} to numbers >= 0 "
        f"({', '.join(sorted(APPEARANCE_PROBABILITIES))} <= 1)",
    ),
    "trainer.max_epochs": (lambda v: _is_int(v) and (v >= 1 or v == -1), "an integer >= 1 (or -1)"),
    "model.optimizer.lr": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "model.label_smoothing": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "evaluation.threshold_rule": (
        lambda v: v in ("youden", "shift_youden", "sensitivity", "fixed"),
        "youden, shift_youden, sensitivity or fixed",
    ),
    "evaluation.target_sensitivity": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "evaluation.n_bootstrap": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
}


def _check_targets(node: Any, path: str) -> None:
    """Every key under a ``_target_`` must be a parameter of that target (unless it takes **kwargs)."""
    if isinstance(node, DictConfig):
        target = node._get_node("_target_")._value() if "_target_" in node else None
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
        for key in node:
            child = node._get_node(key)  # not node[key]: no interpolation is resolved here
            if isinstance(child, (DictConfig, ListConfig)):
                _check_targets(child, f"{path}.{key}")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, (DictConfig, ListConfig)):
                _check_targets(child, f"{path}[{i}]")


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first bad key: type and range rules, then unknown constructor keys."""
    for key, (check, expected) in RULES.items():
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None)
        if parent is None or leaf not in parent:
            continue
        value = OmegaConf.select(cfg, key)
        if isinstance(value, ListConfig):
            value = list(value)
        if not check(value):
            raise ConfigError(f"{key}: must be {expected}, got {value!r}")
    for group in ("data", "model", "callbacks", "logger", "trainer"):
        if group in cfg and cfg[group] is not None:
            _check_targets(cfg[group], group)

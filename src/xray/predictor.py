"""``ckpt=`` to a :class:`Predictor`: resolving best/last/pretrained/run dir/file/folder/list, and ensembles.

Prediction loads a :class:`Predictor`: one model, or an ensemble of models whose raw logits are
averaged (``ckpt=[a.ckpt,b.ckpt]``, or a folder with an ``ensemble.json`` manifest or with two or
more ``*.ckpt`` files), so the prediction code has a single path for both. Every file is read by
:mod:`xray.checkpoints`' safe loader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xray.atomic import atomic_write_text
from xray.checkpoints import (
    BEST_NAME,
    LAST_NAME,
    CheckpointError,
    LoadedModel,
    check_positive,
    check_temperature,
    check_threshold,
    load_model,
)
from xray.data.encoding import SourceEncoding
from xray.locations import candidates, locate
from xray.ood import FeatureGaussian

PRETRAINED_NAME = "xray_gpu_transfer"


def shipped_model_candidates() -> list[Path]:
    """Where ``ckpt=pretrained`` looks, in order (:func:`xray.locations.candidates`)."""
    return candidates(f"models/{PRETRAINED_NAME}")


PRETRAINED_PATH = locate(f"models/{PRETRAINED_NAME}")


MANIFEST_NAME = "ensemble.json"


MANIFEST_FORMAT = 1


def latest_run_with(log_dir: str | os.PathLike, filename: str) -> Path | None:
    """The newest ``checkpoints/<filename>`` under ``log_dir`` (train runs and multiruns), by mtime."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        return None
    candidates = [p for p in log_dir.rglob(f"checkpoints/{filename}") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resolve_checkpoint(spec: str | os.PathLike, log_dir: str | os.PathLike = "logs") -> Path:
    """``best``/``last``: the most recent training run under ``log_dir``; ``pretrained``: the shipped
    model (a file, or an ensemble folder); a run directory: its best checkpoint (else last); an
    ensemble folder (see :func:`is_ensemble_folder`): the folder itself; anything else: a file path.

    The result is a checkpoint file or an ensemble folder; :func:`load_predictor` loads either."""
    spec_str = str(spec)
    if spec_str in ("best", "last"):
        name = BEST_NAME if spec_str == "best" else LAST_NAME
        found = latest_run_with(Path(log_dir) / "train", name) or latest_run_with(log_dir, name)
        if found is None:
            raise CheckpointError(
                f"ckpt={spec_str}: no {name} found under {Path(log_dir) / 'train'}; train first "
                "(python train.py) or pass ckpt=PATH or ckpt=pretrained"
            )
        return found
    if spec_str == "pretrained":
        if not PRETRAINED_PATH.exists():
            raise CheckpointError(
                f"ckpt=pretrained: shipped model {PRETRAINED_PATH} is missing (looked in: "
                f"{', '.join(str(p) for p in shipped_model_candidates())}); give a checkpoint with ckpt=PATH"
            )
        if PRETRAINED_PATH.is_dir() and not is_ensemble_folder(PRETRAINED_PATH):
            raise CheckpointError(
                f"ckpt=pretrained: shipped model folder {PRETRAINED_PATH} holds no {MANIFEST_NAME} "
                "(nor two or more *.ckpt files)"
            )
        return PRETRAINED_PATH
    path = Path(spec_str).expanduser()
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return path
        for candidate in (
            path / "checkpoints" / BEST_NAME,
            path / BEST_NAME,
            path / "checkpoints" / LAST_NAME,
        ):
            if candidate.is_file():
                return candidate
        if is_ensemble_folder(path):
            return path
        raise CheckpointError(
            f"{path}: run directory holds no checkpoints/{BEST_NAME} or {LAST_NAME} (and it is no "
            f"ensemble folder: no {MANIFEST_NAME}, fewer than two *.ckpt files)"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


@dataclass
class Predictor:
    """One model or an ensemble: P(PNEUMONIA) = sigmoid(mean of the members' raw logits / temperature).

    Each member keeps its own preprocessing and TTA flag; ``threshold`` applies to the calibrated
    probability. ``source`` is what ``predict.py`` prints as the checkpoint (the path for one model).
    """

    members: list[LoadedModel]
    threshold: float
    temperature: float
    source: str
    threshold_source: str = "checkpoint"
    ood_threshold: float = 1.0
    """Flag an image whose OOD score (mean of the members' scores) exceeds this (``xray.ood``)."""

    @classmethod
    def from_model(cls, model: LoadedModel) -> Predictor:
        """A single model: its own threshold and temperature, read now (the meta may have changed)."""
        return cls([model], model.threshold, model.temperature, str(model.path))

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @property
    def ood_stats(self) -> list[FeatureGaussian] | None:
        """Every member's OOD statistics, or None when any member lacks them (no score then)."""
        stats = [m.ood for m in self.members]
        return None if any(s is None for s in stats) else stats  # type: ignore[return-value]

    @property
    def preprocessing(self) -> list[tuple[int, str, SourceEncoding | None]]:
        """The distinct (image size, interpolation, source encoding), in member order: one decode each."""
        return list(dict.fromkeys((m.image_size, m.interpolation, m.source_encoding) for m in self.members))


def is_ensemble_folder(folder: str | os.PathLike) -> bool:
    """A folder with an ``ensemble.json``, or with two or more ``*.ckpt`` files directly in it."""
    folder = Path(folder)
    return folder.is_dir() and ((folder / MANIFEST_NAME).is_file() or len(_folder_checkpoints(folder)) >= 2)


def _folder_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.ckpt") if p.is_file() and not p.name.startswith("."))


def ensemble_from_models(models: Sequence[LoadedModel], source: str) -> Predictor:
    """An ensemble without a manifest: threshold = mean of the members' thresholds; temperature = 1.0
    when every member has T = 1, else the mean of their temperatures (each T was fitted on one
    member's logits, so their mean is only a stand-in for a T fitted on the ensemble's)."""
    if not models:
        raise CheckpointError(f"{source}: an ensemble needs at least one checkpoint")
    temperatures = [m.temperature for m in models]
    temperature = 1.0 if all(t == 1.0 for t in temperatures) else sum(temperatures) / len(temperatures)
    threshold = sum(m.threshold for m in models) / len(models)
    return Predictor(list(models), threshold, temperature, source, threshold_source="the members' mean")


def read_ensemble_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """``ensemble.json``, checked: format 1, a non-empty member list, threshold and temperature."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read the ensemble manifest ({str(err)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: not an ensemble manifest of format {MANIFEST_FORMAT}")
    members = manifest.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) and m for m in members):
        raise CheckpointError(f"{path}: 'members' must be a non-empty list of checkpoint paths")
    check_threshold(manifest.get("threshold"), str(path))
    check_temperature(manifest.get("temperature"), str(path))
    _manifest_ood_threshold(manifest, str(path))
    return manifest


def load_manifest_ensemble(manifest_path: str | os.PathLike) -> Predictor:
    """The ensemble an ``ensemble.json`` describes: its members (relative to its folder), threshold, T."""
    manifest_path = Path(manifest_path)
    manifest = read_ensemble_manifest(manifest_path)
    paths = [manifest_path.parent / member for member in manifest["members"]]
    for member in paths:
        if not member.is_file():
            raise CheckpointError(f"{manifest_path}: member checkpoint {member} not found")
    models = [load_model(member) for member in paths]
    return Predictor(
        models,
        float(manifest["threshold"]),
        float(manifest["temperature"]),
        f"{manifest_path.parent} (ensemble of {len(models)} from {MANIFEST_NAME})",
        threshold_source=MANIFEST_NAME,
        ood_threshold=_manifest_ood_threshold(manifest, str(manifest_path)),
    )


def _manifest_ood_threshold(manifest: dict[str, Any], where: str) -> float:
    """``ood.threshold`` of a manifest (1.0 when absent): a finite number > 0."""
    ood = manifest.get("ood", {})
    value = ood.get("threshold", 1.0) if isinstance(ood, dict) else None
    return check_positive(value, where, "ood.threshold")


def load_folder_ensemble(folder: str | os.PathLike) -> Predictor:
    """``ensemble.json`` when the folder has one, else every ``*.ckpt`` directly in it (two or more)."""
    folder = Path(folder)
    if (folder / MANIFEST_NAME).is_file():
        return load_manifest_ensemble(folder / MANIFEST_NAME)
    paths = _folder_checkpoints(folder)
    if len(paths) < 2:
        raise CheckpointError(
            f"{folder}: an ensemble folder needs {MANIFEST_NAME} or two or more *.ckpt files"
        )
    return ensemble_from_models([load_model(p) for p in paths], f"{folder} (ensemble of {len(paths)} *.ckpt)")


def load_predictor(
    spec: str | os.PathLike | Sequence[str | os.PathLike], log_dir: str | os.PathLike = "logs"
) -> Predictor:
    """``ckpt=`` to a Predictor: a spec of :func:`resolve_checkpoint` (a file gives one model, a folder
    an ensemble), or a list of them (an ensemble of those checkpoints, without a manifest)."""
    if isinstance(spec, (str, os.PathLike)):
        target = resolve_checkpoint(spec, log_dir)
        return load_folder_ensemble(target) if target.is_dir() else Predictor.from_model(load_model(target))
    specs = [str(s) for s in spec]
    if not specs:
        raise CheckpointError("ckpt=[]: the list names no checkpoints")
    paths = [resolve_checkpoint(s, log_dir) for s in specs]
    for path in paths:
        if path.is_dir():
            raise CheckpointError(
                f"{path}: an ensemble folder cannot be a member of ckpt=[...]; list checkpoint files"
            )
    return ensemble_from_models(
        [load_model(p) for p in paths], f"ensemble of {len(paths)}: {', '.join(map(str, paths))}"
    )


def _manifest_member(folder: Path, member: str | os.PathLike) -> str:
    """Member path as stored: relative to the manifest's folder (a relative one already is)."""
    path = Path(member).expanduser()
    if not path.is_absolute():
        return path.as_posix()
    return Path(os.path.relpath(path.resolve(), folder.resolve())).as_posix()


def write_ensemble_manifest(
    folder: str | os.PathLike,
    members: Sequence[str | os.PathLike],
    threshold: float,
    temperature: float,
    threshold_rule: str,
    **extra: Any,
) -> Path:
    """Write ``folder/ensemble.json`` atomically; returns its path. Relative members are relative to
    ``folder``; absolute ones are stored relative to it, so a folder holding its members can move.
    ``extra`` keys (e.g. ``description``, fold metrics) are stored and ignored by the loader."""
    folder = Path(folder)
    stored = [_manifest_member(folder, m) for m in members]
    if not stored:
        raise CheckpointError(f"{folder}: an ensemble manifest needs at least one member")
    for member in stored:
        if not (folder / member).is_file():
            raise CheckpointError(f"{folder}: member checkpoint {folder / member} not found")
    reserved = {"format", "members", "threshold", "temperature", "threshold_rule"} & set(extra)
    if reserved:
        raise ValueError(f"write_ensemble_manifest: {sorted(reserved)} are set by their own arguments")
    manifest = {
        "format": MANIFEST_FORMAT,
        "members": stored,
        "threshold": check_threshold(threshold, str(folder / MANIFEST_NAME)),
        "temperature": check_temperature(temperature, str(folder / MANIFEST_NAME)),
        "threshold_rule": str(threshold_rule),
        **extra,
    }
    text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    path = folder / MANIFEST_NAME
    atomic_write_text(path, text)
    return path


def update_ensemble_manifest(folder: str | os.PathLike, **values: Any) -> Path:
    """Set top-level keys (e.g. ``ood``) of an existing ``ensemble.json``, atomically; checked on the way."""
    path = Path(folder) / MANIFEST_NAME
    manifest = read_ensemble_manifest(path)
    manifest.update(values)
    text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    read_ensemble_manifest(path)
    return path

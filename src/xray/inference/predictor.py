"""``ckpt=`` to a :class:`Predictor`: one model or an ensemble (``ckpt=[a,b]``, or a folder with an
``ensemble.json`` or two or more ``*.ckpt``), so prediction has one code path for both."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xray.core.atomic import atomic_write_text
from xray.core.checkpoint_io import CheckpointError
from xray.core.locations import candidates, locate
from xray.data.encoding import SourceEncoding
from xray.evaluation.site import ReferenceScores
from xray.inference.checkpoints import (
    BEST_NAME,
    LAST_NAME,
    LoadedModel,
    check_positive,
    check_temperature,
    check_threshold,
    load_model,
)
from xray.inference.ood import FeatureGaussian

PRETRAINED_NAME = "xray_gpu_transfer"
PRETRAINED_PATH = locate(f"models/{PRETRAINED_NAME}")
MANIFEST_NAME = "ensemble.json"
MANIFEST_FORMAT = 1
REFERENCE_KEY = "reference_scores"
"""``ensemble.json``'s optional per-class histogram of the calibrated out-of-fold logits (see
:class:`xray.evaluation.site.ReferenceScores`): what a site profile checks unlabelled films against."""


def latest_run_with(log_dir: str | os.PathLike, filename: str) -> Path | None:
    """The newest ``checkpoints/<filename>`` under ``log_dir`` (train runs and multiruns), by mtime."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        return None
    found = [p for p in log_dir.rglob(f"checkpoints/{filename}") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_checkpoint(spec: str | os.PathLike, log_dir: str | os.PathLike = "logs") -> Path:
    """A checkpoint file or an ensemble folder: ``best``/``last`` of the newest run under ``log_dir``,
    ``pretrained`` (the shipped model), a run directory's best (else last), or the path itself."""
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
                f"{', '.join(map(str, candidates(f'models/{PRETRAINED_NAME}')))}); give a checkpoint with ckpt=PATH"
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
    """P(PNEUMONIA) = sigmoid(mean of the members' raw logits / temperature); each member keeps its
    own preprocessing and TTA. ``source`` is what ``predict.py`` prints as the checkpoint."""

    members: list[LoadedModel]
    threshold: float
    temperature: float
    source: str
    threshold_source: str = "checkpoint"
    ood_threshold: float = 1.0  # flag an image whose mean member OOD score exceeds this
    reference_scores: ReferenceScores | None = None  # ensemble.json's, when it stores one

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
    """An ensemble without a manifest: the mean of the members' thresholds and temperatures (a
    stand-in for a T fitted on the ensemble's logits; exactly 1.0 when every T is 1)."""
    if not models:
        raise CheckpointError(f"{source}: an ensemble needs at least one checkpoint")
    temperature = sum(m.temperature for m in models) / len(models)
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
    manifest_reference_scores(manifest, path)
    return manifest


def manifest_reference_scores(manifest: dict[str, Any], path: str | os.PathLike) -> ReferenceScores | None:
    """A manifest's ``reference_scores``, checked (None when it stores none: written before it existed)."""
    if REFERENCE_KEY not in manifest:
        return None
    try:
        return ReferenceScores.from_json(manifest[REFERENCE_KEY], REFERENCE_KEY)
    except ValueError as err:
        raise CheckpointError(
            f"{path}: {err}; rewrite it from the fold runs with python -m xray.cv RUNS --reference-into "
            f"{Path(path).parent}, or delete the key"
        ) from None


def _manifest_ood_threshold(manifest: dict[str, Any], where: str) -> float:
    """``ood.threshold`` of a manifest (1.0 when absent): a finite number > 0."""
    ood = manifest.get("ood", {})
    value = ood.get("threshold", 1.0) if isinstance(ood, dict) else None
    return check_positive(value, where, "ood.threshold")


def load_folder_ensemble(folder: str | os.PathLike) -> Predictor:
    """``ensemble.json`` (members relative to the folder) when there is one, else every ``*.ckpt``
    directly in the folder (two or more)."""
    folder, manifest_path = Path(folder), Path(folder) / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = read_ensemble_manifest(manifest_path)
        paths = [folder / member for member in manifest["members"]]
        _check_members_exist(manifest_path, paths)
        return Predictor(
            [load_model(member) for member in paths],
            float(manifest["threshold"]),
            float(manifest["temperature"]),
            f"{folder} (ensemble of {len(paths)} from {MANIFEST_NAME})",
            threshold_source=MANIFEST_NAME,
            ood_threshold=_manifest_ood_threshold(manifest, str(manifest_path)),
            reference_scores=manifest_reference_scores(manifest, manifest_path),
        )
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


def _check_members_exist(where: Path, paths: list[Path]) -> None:
    for member in paths:
        if not member.is_file():
            raise CheckpointError(f"{where}: member checkpoint {member} not found")


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=2, allow_nan=False) + "\n")


def _manifest_member(folder: Path, member: str | os.PathLike) -> str:
    """Member path as stored: relative to the manifest's folder (a relative one already is)."""
    path = Path(member).expanduser()
    if path.is_absolute():
        path = Path(os.path.relpath(path.resolve(), folder.resolve()))
    return path.as_posix()


def write_ensemble_manifest(
    folder: str | os.PathLike,
    members: Sequence[str | os.PathLike],
    threshold: float,
    temperature: float,
    threshold_rule: str,
    **extra: Any,
) -> Path:
    """Write ``folder/ensemble.json`` atomically; members are stored relative to ``folder`` (so it can
    move). ``extra`` keys (e.g. fold metrics) are stored and ignored by the loader."""
    folder = Path(folder)
    stored = [_manifest_member(folder, m) for m in members]
    if not stored:
        raise CheckpointError(f"{folder}: an ensemble manifest needs at least one member")
    _check_members_exist(folder, [folder / member for member in stored])
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
    manifest_reference_scores(manifest, folder / MANIFEST_NAME)
    _write_manifest(folder / MANIFEST_NAME, manifest)
    return folder / MANIFEST_NAME


def update_ensemble_manifest(folder: str | os.PathLike, **values: Any) -> Path:
    """Set top-level keys (e.g. ``ood``) of an existing ``ensemble.json``, atomically; checked on the way."""
    path = Path(folder) / MANIFEST_NAME
    manifest = read_ensemble_manifest(path)
    manifest.update(values)
    manifest_reference_scores(manifest, path)  # checked before anything is written
    _write_manifest(path, manifest)
    read_ensemble_manifest(path)
    return path

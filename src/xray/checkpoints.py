"""Checkpoints: atomic writes, the one safe loader, and resolving ``ckpt=best/last/pretrained/PATH``.

Checkpoints from elsewhere are untrusted: every load in the code base goes through
``load_checkpoint_file``, which uses ``torch.load(weights_only=True)`` (plain tensors and containers
only, no arbitrary unpickling) and turns each failure into a ``CheckpointError`` naming the file.

Prediction loads a :class:`Predictor`: one model, or an ensemble of models whose raw logits are
averaged (``ckpt=[a.ckpt,b.ckpt]``, or a folder with an ``ensemble.json`` manifest or with two or
more ``*.ckpt`` files), so the prediction code has a single path for both.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pickle
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from xray.atomic import atomic_write, atomic_write_text
from xray.constants import CHECKPOINT_KEY
from xray.data.encoding import SourceEncoding
from xray.errors import UserError
from xray.models import build_net
from xray.ood import OOD_KEY, FeatureGaussian, OodError

BEST_NAME = "best_xray_model.ckpt"
LAST_NAME = "last.ckpt"
PRETRAINED_NAME = "xray_gpu_transfer"


def shipped_model_candidates() -> list[Path]:
    """Where ``ckpt=pretrained`` looks, in order: ``models/`` of a source checkout (editable installs),
    then the copy that ``pip install .`` puts under ``PREFIX/share/xray/models`` (pyproject's
    data-files), for the prefix this package is installed in and for the running interpreter's."""
    here = Path(__file__).resolve()
    share = Path("share") / "xray" / "models" / PRETRAINED_NAME
    candidates = [here.parents[2] / "models" / PRETRAINED_NAME]
    if len(here.parents) > 4:  # PREFIX/lib/pythonX.Y/site-packages/xray/checkpoints.py
        candidates.append(here.parents[4] / share)
    candidates.append(Path(sys.prefix) / share)
    return list(dict.fromkeys(candidates))


_CANDIDATES = shipped_model_candidates()
PRETRAINED_PATH = next((p for p in _CANDIDATES if p.exists()), _CANDIDATES[0])
MANIFEST_NAME = "ensemble.json"
MANIFEST_FORMAT = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, truncated, unsafe or not an xray checkpoint."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The safe loader: ``weights_only=True``, with a clear error for every way a file can be bad."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint is empty (0 bytes)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain data "
            f"(weights_only=True). It may be unsafe. Detail: {first_line}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: checkpoint is truncated or corrupt ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path}: not a Lightning checkpoint (top level is {type(checkpoint).__name__})"
        )
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic saves; loads (resume included) through the safe loader."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> Any:
        return load_checkpoint_file(path, map_location=map_location or "cpu")


@dataclass
class LoadedModel:
    """A network rebuilt from a checkpoint with what prediction needs to reproduce training."""

    net: nn.Module
    meta: dict[str, Any]
    path: Path

    @property
    def threshold(self) -> float:
        return float(self.meta.get("threshold", 0.5))

    @property
    def image_size(self) -> int:
        return int(self.meta["preprocessing"]["image_size"])

    @property
    def interpolation(self) -> str:
        return str(self.meta["preprocessing"].get("interpolation", "bilinear"))

    @property
    def source_encoding(self) -> SourceEncoding | None:
        """The training files' shared size and JPEG quality (``xray.data.encoding``), given to inputs."""
        try:
            return SourceEncoding.from_meta(self.meta["preprocessing"].get("source_encoding"), str(self.path))
        except ValueError as err:
            raise CheckpointError(str(err)) from None

    @property
    def tta(self) -> bool:
        """Whether the model was evaluated with flip TTA (its threshold was chosen that way)."""
        return bool(self.meta.get("tta", False))

    @property
    def temperature(self) -> float:
        """T of ``sigmoid(logit / T)``, fitted on validation logits; 1.0 for checkpoints without one."""
        return _check_temperature(self.meta.get("temperature", 1.0), str(self.path))

    @property
    def ood(self) -> FeatureGaussian | None:
        """The out-of-distribution statistics of this network (``xray.ood``); None for older checkpoints."""
        stored = self.meta.get(OOD_KEY)
        if stored is None:
            return None
        try:
            return FeatureGaussian.from_meta(stored, str(self.path))
        except OodError as err:
            raise CheckpointError(str(err)) from None


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> LoadedModel:
    """Rebuild the network of an xray checkpoint (allow-listed classes only) in eval mode."""
    path = Path(path)
    checkpoint = load_checkpoint_file(path, map_location)
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or "net" not in meta or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not an xray checkpoint (no '{CHECKPOINT_KEY}' section or no weights)")
    if not meta.get("preprocessing", {}).get("image_size"):
        raise CheckpointError(f"{path}: checkpoint has no preprocessing settings (image size)")
    try:
        net = build_net({**meta["net"], "pretrained": False} if "pretrained" in meta["net"] else meta["net"])
        state = {k[len("net.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
        net.load_state_dict(state)
    except (ValueError, TypeError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: weights do not fit the stored network ({str(err)[:300]})") from None
    net.eval()
    model = LoadedModel(net=net, meta=meta, path=path)
    _ = model.temperature  # a bad stored temperature fails here, before any image is read
    _ = model.ood  # and so do malformed OOD statistics
    return model


def update_checkpoint_meta(path: str | os.PathLike, **values: Any) -> None:
    """Write values (e.g. the chosen threshold) into a checkpoint's xray section, atomically."""
    checkpoint = load_checkpoint_file(path)
    checkpoint.setdefault(CHECKPOINT_KEY, {}).update(values)
    atomic_torch_save(checkpoint, path)


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


def export_for_inference(src: str | os.PathLike, dst: str | os.PathLike, half: bool = False) -> Path:
    """A slim copy of a checkpoint for shipping: weights and the xray section, no optimizer state.

    ``half=True`` stores floating weights in float16 (the loader casts them back to float32).
    """
    checkpoint = load_checkpoint_file(src)
    if CHECKPOINT_KEY not in checkpoint:
        raise CheckpointError(f"{src}: not an xray checkpoint (no '{CHECKPOINT_KEY}' section)")
    state = checkpoint["state_dict"]
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    slim = {
        "state_dict": state,
        CHECKPOINT_KEY: checkpoint[CHECKPOINT_KEY],
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "pytorch-lightning_version": checkpoint.get("pytorch-lightning_version"),
    }
    atomic_torch_save(slim, dst)
    return Path(dst)


# -------------------------------------------------------------------------------------------- ensembles
def _check_positive(value: Any, where: str, what: str) -> float:
    """A finite float > 0, else a CheckpointError saying where the bad value was stored."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise CheckpointError(f"{where}: {what} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_temperature(value: Any, where: str) -> float:
    return _check_positive(value, where, "stored temperature")


def _check_threshold(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise CheckpointError(f"{where}: threshold must be a number in [0, 1], got {value!r}")
    return float(value)


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
    _check_threshold(manifest.get("threshold"), str(path))
    _check_temperature(manifest.get("temperature"), str(path))
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
    return _check_positive(value, where, "ood.threshold")


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
        "threshold": _check_threshold(threshold, str(folder / MANIFEST_NAME)),
        "temperature": _check_temperature(temperature, str(folder / MANIFEST_NAME)),
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

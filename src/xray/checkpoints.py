"""Checkpoints: atomic writes, the one safe loader, and resolving ``ckpt=best/last/pretrained/PATH``.

Checkpoints from elsewhere are untrusted: every load in the code base goes through
``load_checkpoint_file``, which uses ``torch.load(weights_only=True)`` (plain tensors and containers
only, no arbitrary unpickling) and turns each failure into a ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from xray.models import build_net

BEST_NAME = "best_xray_model.ckpt"
LAST_NAME = "last.ckpt"
PRETRAINED_PATH = Path(__file__).resolve().parents[2] / "models" / "xray_cpu_fast.ckpt"
CHECKPOINT_KEY = "xray"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, unsafe or not an xray checkpoint."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    return LoadedModel(net=net, meta=meta, path=path)


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
    model; a run directory: its best checkpoint (else last); anything else: a file path."""
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
            raise CheckpointError(f"ckpt=pretrained: shipped model {PRETRAINED_PATH} is missing")
        return PRETRAINED_PATH
    path = Path(spec_str).expanduser()
    if path.is_dir():
        for candidate in (
            path / "checkpoints" / BEST_NAME,
            path / BEST_NAME,
            path / "checkpoints" / LAST_NAME,
        ):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: run directory holds no checkpoints/{BEST_NAME} or {LAST_NAME}")
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

"""Torch files on disk: the one safe loader and atomic saves.

Checkpoints are untrusted: every load goes through :func:`load_checkpoint_file`
(``torch.load(weights_only=True)``), which turns each failure into a ``CheckpointError`` naming the file.
Writes go to a temporary file that is renamed over the target, so a kill never leaves half a file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from xray.core.atomic import atomic_write
from xray.core.errors import UserError


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

"""xray checkpoints: the network rebuilt from one (allow-listed classes), its stored settings checked,
values written back, slim copies for shipping. Files are read through the one safe loader
(:mod:`xray.core.checkpoint_io`)."""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from xray.core.checkpoint_io import CheckpointError, atomic_torch_save, load_checkpoint_file
from xray.core.config_checks import is_positive_finite
from xray.core.constants import CHECKPOINT_KEY
from xray.data.encoding import SourceEncoding
from xray.inference.ood import OOD_KEY, FeatureGaussian, OodError
from xray.models import build_net

BEST_NAME = "best_xray_model.ckpt"
LAST_NAME = "last.ckpt"


def check_positive(value: Any, where: str, what: str) -> float:
    """A finite float > 0, else a CheckpointError saying where the bad value was stored."""
    if not is_positive_finite(value):
        raise CheckpointError(f"{where}: {what} must be a finite number > 0, got {value!r}")
    return float(value)


def check_temperature(value: Any, where: str) -> float:
    return check_positive(value, where, "stored temperature")


def check_threshold(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise CheckpointError(f"{where}: threshold must be a number in [0, 1], got {value!r}")
    return float(value)


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
        return check_temperature(self.meta.get("temperature", 1.0), str(self.path))

    @property
    def ood(self) -> FeatureGaussian | None:
        """The out-of-distribution statistics of this network (``xray.inference.ood``); None for older checkpoints."""
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


def export_for_inference(src: str | os.PathLike, dst: str | os.PathLike, half: bool = False) -> Path:
    """A slim copy for shipping: weights and the xray section, no optimizer state; ``half=True``
    stores floating weights in float16 (the loader casts them back to float32)."""
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

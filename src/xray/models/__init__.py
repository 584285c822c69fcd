"""Networks and the allow-listed way to rebuild one from a checkpoint's stored config."""

from __future__ import annotations

from typing import Any

from torch import nn

from xray.models.backbones import TorchvisionNet
from xray.models.seed_cnn import SeedCNN

NETS: dict[str, type[nn.Module]] = {"SeedCNN": SeedCNN, "TorchvisionNet": TorchvisionNet}


def build_net(config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from ``net.config``; only classes named in NETS (never an import path)."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in NETS:
        raise ValueError(f"unknown network {name!r} in checkpoint; known: {sorted(NETS)}")
    return NETS[name](**config)


__all__ = ["NETS", "SeedCNN", "TorchvisionNet", "build_net"]

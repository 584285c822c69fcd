"""Networks and the allow-listed way to rebuild one from a checkpoint's stored config."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from xray.models.backbones import TorchvisionNet
from xray.models.efficientnet_lite import EfficientNetLite
from xray.models.seed_cnn import SeedCNN

MAX_INT, MAX_LIST = 4096, 16

NETS: dict[str, type[nn.Module]] = {net.__name__: net for net in (SeedCNN, TorchvisionNet, EfficientNetLite)}


def flip_tta_logits(net: nn.Module, x: Tensor) -> Tensor:
    """Mean logit over the image and its left-right mirror (a plausible film; upside-down ones are not)."""
    return (net(x) + net(x.flip(-1))) / 2


def build_net(config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from ``net.config``; only classes named in NETS (never an import path)."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in NETS:
        raise ValueError(f"unknown network {name!r} in checkpoint; known: {sorted(NETS)}")
    for key, value in config.items():  # a crafted config must not make us allocate gigabytes
        values = value if isinstance(value, (list, tuple)) else [value]
        if len(values) > MAX_LIST or any(isinstance(v, int) and not 0 <= v <= MAX_INT for v in values):
            raise ValueError(f"network setting {key}={value!r} is out of range")
    return NETS[name](**config)

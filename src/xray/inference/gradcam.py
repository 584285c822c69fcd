"""Grad-CAM overlays for ``predict.py gradcam=true``: captum's LayerGradCam on a network's last Conv2d."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from xray.core.config_checks import ConfigError
from xray.core.constants import CLASSES
from xray.data.transforms import rescale
from xray.evaluation.plots import save_figure


def last_conv2d(net: nn.Module) -> nn.Conv2d:
    """The last Conv2d of ``net`` in module order: the usual Grad-CAM layer."""
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"gradcam=true: the network {type(net).__name__} has no Conv2d layer")
    return convs[-1]


class GradCam:
    """captum LayerGradCam on the last Conv2d, upsampled to the input size, drawn over the image."""

    def __init__(self, net: nn.Module, out_dir: str | os.PathLike[str] | None = None) -> None:
        from captum.attr import LayerGradCam

        self.gradcam = LayerGradCam(net, last_conv2d(net))
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def maps(self, images: Tensor) -> Tensor:
        """uint8 (B,1,S,S) -> heatmaps (B,S,S) in [0, 1] (ReLU of the map, per-image max scaled)."""
        from captum.attr import LayerAttribution

        x = rescale(images).clone().requires_grad_(True)  # a normal tensor: autograd outside inference mode
        with torch.enable_grad():
            attribution = self.gradcam.attribute(x, relu_attributions=True)
        heat = LayerAttribution.interpolate(attribution.detach(), tuple(images.shape[-2:]), "bilinear")
        heat = heat[:, 0].clamp(min=0)
        peak = heat.flatten(1).amax(1).clamp(min=1e-12)
        return (heat / peak[:, None, None]).cpu()

    def write(
        self, images: Tensor, index: list[int], probs: dict[int, float], paths: list[str], threshold: float
    ) -> dict[int, str]:
        """Overlay PNGs of the batch images that have a probability (every member scored them)."""
        keep = [k for k, i in enumerate(index) if i in probs]
        if not keep:
            return {}
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure


        if self.out_dir is None:
            raise ValueError("GradCam.write needs an output folder")
        heat = self.maps(images[keep])
        gray = images[keep, 0].cpu().numpy()
        written: dict[int, str] = {}
        for k, i in enumerate([index[k] for k in keep]):
            prob = probs[i]
            fig = Figure(figsize=(3.2, 3.5), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.subplots()
            ax.imshow(gray[k], cmap="gray", vmin=0, vmax=255)
            ax.imshow(heat[k].numpy(), cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)
            name = Path(paths[i]).name
            name = name if len(name) <= 30 else "…" + name[-29:]
            ax.set_title(f"{name}\np(PNEUMONIA)={prob:.3f} -> {CLASSES[int(prob >= threshold)]}", fontsize=8)
            ax.set_axis_off()
            fig.tight_layout()
            out = self.out_dir / f"{i:05d}_{Path(paths[i]).stem}.png"
            written[i] = str(save_figure(fig, out, dpi=100))
        return written

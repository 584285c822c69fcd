"""Conv2d whose weight gradient is computed in NCHW while everything else stays channels_last.

On CPUs without AVX-512 (an AVX2-only AMD EPYC here), oneDNN's channels_last backward-weights kernel
runs at 6 GFLOP/s per core against 19-26 for the NCHW one, while channels_last is the faster layout
for the forward pass and the input gradient (1.2-1.6x). :func:`use_nchw_weight_grad` swaps the
``forward`` of a network's ``nn.Conv2d`` modules (parameters, state dict and results unchanged) for
:class:`Conv2dNCHWWeightGrad`, which converts the saved input and the output gradient to NCHW in
batch chunks (bounded extra memory) only to compute the weight and bias gradients.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 8  # images per NCHW conversion in the weight gradient: ~250 MB at 500 px for the first conv


class Conv2dNCHWWeightGrad(torch.autograd.Function):
    """``F.conv2d`` forward; input gradient as usual; weight/bias gradients from NCHW copies, chunked."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: Any) -> Any:
        stride, padding, dilation, groups = conv
        ctx.conv = conv
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        grad_x = grad_w = grad_b = None
        args = (stride, padding, dilation, False, [0, 0], groups)
        if need_x:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, bias_sizes, *args, [True, False, False]
            )[0]
        if need_w or need_b:
            w = weight.contiguous()
            for start in range(0, x.shape[0], CHUNK):
                go = grad_out[start : start + CHUNK].contiguous()
                xi = x[start : start + CHUNK].contiguous()
                _, gw, gb = torch.ops.aten.convolution_backward(
                    go, xi, w, bias_sizes, *args, [False, bool(need_w), bool(need_b and ctx.has_bias)]
                )
                if need_w:
                    grad_w = gw if grad_w is None else grad_w.add_(gw)
                if need_b and ctx.has_bias:
                    grad_b = gb if grad_b is None else grad_b.add_(gb)
        return grad_x, grad_w, grad_b, None


def _forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    plain = self.padding_mode != "zeros" or isinstance(self.padding, str)
    if plain or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return nn.Conv2d.forward(self, x)
    conv = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
    return Conv2dNCHWWeightGrad.apply(x, self.weight, self.bias, conv)


def use_nchw_weight_grad(net: nn.Module) -> int:
    """Route ``net``'s dense ``nn.Conv2d`` with 8+ input channels through :class:`Conv2dNCHWWeightGrad`.

    Returns how many. A first convolution (one input channel) stays as it is: its weight gradient is
    cheap in either layout and converting its wide output gradient to NCHW costs more than it saves;
    grouped (depthwise) convolutions stay too.
    """
    count = 0
    for module in net.modules():
        if type(module) is nn.Conv2d and module.groups == 1 and module.in_channels >= 8:
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count


def wants_nchw_weight_grad(device: torch.device, channels_last: bool, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """On a CPU without AVX-512, with channels_last: the case where oneDNN's NHWC weight gradient is slow."""
    if device.type != "cpu" or not channels_last:
        return False
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                if line.startswith("flags"):
                    return "avx512f" not in line.split(":", 1)[1].split()
    except OSError:
        return False
    return False

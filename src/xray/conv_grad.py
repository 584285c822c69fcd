"""Conv2d whose weight gradient is computed in NCHW while everything else stays channels_last.

On CPUs without AVX-512, oneDNN's channels_last backward-weights kernel runs at 6 GFLOP/s per core
against 19-26 for NCHW, while channels_last is 1.2-1.6x faster for the forward pass and input gradient.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xray.runtime import cpu_flags

CHUNK = 8  # images per NCHW conversion in the weight gradient: ~250 MB at 500 px for the first conv


class Conv2dNCHWWeightGrad(torch.autograd.Function):
    """``F.conv2d`` forward; input gradient as usual; weight/bias gradients from NCHW copies made in
    batch chunks (bounded extra memory)."""

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
        need_b = need_b and ctx.has_bias
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
                    go, xi, w, bias_sizes, *args, [False, bool(need_w), bool(need_b)]
                )
                if need_w:
                    grad_w = gw if grad_w is None else grad_w.add_(gw)
                if need_b:
                    grad_b = gb if grad_b is None else grad_b.add_(gb)
        return grad_x, grad_w, grad_b, None


def _forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    plain = self.padding_mode != "zeros" or isinstance(self.padding, str)
    if plain or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return nn.Conv2d.forward(self, x)
    conv = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
    return Conv2dNCHWWeightGrad.apply(x, self.weight, self.bias, conv)


def use_nchw_weight_grad(net: nn.Module) -> int:
    """Route ``net``'s dense ``nn.Conv2d`` with 8+ input channels through :class:`Conv2dNCHWWeightGrad`
    (parameters and results unchanged); returns how many. A first convolution stays: converting its wide
    output gradient costs more than it saves."""
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
    flags = cpu_flags(cpuinfo)
    return flags is not None and "avx512f" not in flags

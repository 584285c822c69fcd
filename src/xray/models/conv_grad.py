"""Convolution training paths for CPUs without AVX-512, where oneDNN's channels_last kernels are uneven.

Measured on an AVX2-only AMD EPYC (benchmarks/README.md): the NHWC backward-weights kernel is about 3x
slower than NCHW's, and a first convolution with one input channel runs its forward and weight gradient
at a few GFLOP/s. So convolutions with 8+ input channels take their weight gradient in NCHW, and a first
convolution followed by a 2x2 max-pool becomes one fused block computed as small GEMMs, image by image.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xray.core.runtime import cpu_flags
from xray.models.seed_cnn import unpool_backward_allowed

CHUNK = 8  # images per NCHW conversion in the weight gradient: ~190 MB at 500 px for the seed CNN's 2nd conv


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


def _patches(x: torch.Tensor, start: int, stop: int, kh: int, kw: int, ho: int, wo: int) -> torch.Tensor:
    """(images x ho x wo, kh*kw*C) input patches of images start:stop, rows in (n, h, w) order."""
    xv = x[start:stop].permute(0, 2, 3, 1)
    taps = [xv[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)]
    return torch.stack(taps, dim=3).view(-1, kh * kw * x.shape[1])


class ConvMaxPool2x2(torch.autograd.Function):
    """Valid stride-1 convolution, then 2x2 max-pool, for an input that needs no gradient (a first
    block). Image by image: patches times weights (one GEMM), the stock max-pool into the output; the
    backward unpools one image's gradient into a reused buffer for its weight-gradient GEMM. Neither the
    full-size conv output nor its gradient (1.27 GB each at 500 px, batch 40) is ever held."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        out_ch, in_ch, kh, kw = weight.shape
        n, ho, wo = x.shape[0], x.shape[2] - kh + 1, x.shape[3] - kw + 1
        w = weight.permute(2, 3, 1, 0).reshape(kh * kw * in_ch, out_ch)
        pooled = (n, out_ch, ho // 2, wo // 2)
        out = torch.empty(pooled, dtype=x.dtype, memory_format=torch.channels_last)
        indices = torch.empty(pooled, dtype=torch.int64, memory_format=torch.channels_last)
        conv = x.new_empty(ho * wo, out_ch)
        for i in range(n):
            torch.mm(_patches(x, i, i + 1, kh, kw, ho, wo), w, out=conv)
            image = conv.view(1, ho, wo, out_ch).permute(0, 3, 1, 2)
            torch.ops.aten.max_pool2d_with_indices.out(
                image, [2, 2], [2, 2], [0, 0], [1, 1], False, out=out[i : i + 1], indices=indices[i : i + 1]
            )
        if bias is not None:
            out += bias.view(1, -1, 1, 1)  # max(y) + b = max(y + b): the bias once, on 4x fewer values
        ctx.save_for_backward(x, indices)
        ctx.kernel = (kh, kw)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, indices = ctx.saved_tensors
        kh, kw = ctx.kernel
        n, out_ch = indices.shape[:2]
        ho, wo = x.shape[2] - kh + 1, x.shape[3] - kw + 1
        grad_w = grad.new_zeros(kh * kw * x.shape[1], out_ch)
        unpooled = torch.empty(1, out_ch, ho, wo, dtype=grad.dtype, memory_format=torch.channels_last)
        for i in range(n):
            torch.ops.aten.max_unpool2d.out(grad[i : i + 1], indices[i : i + 1], [ho, wo], out=unpooled)
            rows = unpooled.permute(0, 2, 3, 1).reshape(-1, out_ch)
            grad_w.addmm_(_patches(x, i, i + 1, kh, kw, ho, wo).t(), rows)
        grad_w = grad_w.view(kh, kw, x.shape[1], out_ch).permute(3, 2, 0, 1)
        grad_b = grad.sum((0, 2, 3)) if ctx.has_bias else None
        return None, grad_w, grad_b


def _fusable(conv: nn.Module, pool: nn.Module) -> bool:
    """A dense, valid, stride-1 Conv2d with few input channels, then a plain 2x2/2 max-pool."""
    return (
        type(conv) is nn.Conv2d
        and conv.in_channels < 8
        and conv.groups == 1
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and isinstance(pool, nn.MaxPool2d)
        and pool.kernel_size in (2, (2, 2))
        and pool.stride in (2, (2, 2))
        and pool.padding in (0, (0, 0))
        and pool.dilation in (1, (1, 1))
        and not pool.ceil_mode
        and not pool.return_indices
    )


def _hooked(*modules: nn.Module) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in modules
    )


def _sequential_forward(self: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    modules = list(self)
    conv, pool = modules[self._fused_at], modules[self._fused_at + 1]
    fused = (
        unpool_backward_allowed()
        and x.dim() == 4
        and not x.requires_grad
        and conv.weight.requires_grad
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and not _hooked(conv, pool)
    )
    if not fused:
        return nn.Sequential.forward(self, x)
    for module in modules[: self._fused_at]:
        x = module(x)
    x = ConvMaxPool2x2.apply(x, conv.weight, conv.bias)
    for module in modules[self._fused_at + 2 :]:
        x = module(x)
    return x


def use_cpu_conv_paths(net: nn.Module) -> int:
    """Route ``net``'s dense ``nn.Conv2d`` with 8+ input channels through :class:`Conv2dNCHWWeightGrad`,
    and fuse a few-channel conv followed by a 2x2 max-pool inside an ``nn.Sequential`` into
    :class:`ConvMaxPool2x2` while training (parameters, state_dict and results unchanged; inference and
    tracing keep the stock modules); returns how many modules changed path."""
    count = 0
    for module in net.modules():
        if type(module) is nn.Conv2d and module.groups == 1 and module.in_channels >= 8:
            module.forward = types.MethodType(_forward, module)
            count += 1
        if isinstance(module, nn.Sequential) and not hasattr(module, "_fused_at"):
            children = list(module)
            at = next((i for i in range(len(children) - 1) if _fusable(children[i], children[i + 1])), None)
            if at is not None:
                module._fused_at = at
                module.forward = types.MethodType(_sequential_forward, module)
                count += 1
    return count


def wants_cpu_conv_paths(device: torch.device, channels_last: bool, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """On a CPU without AVX-512, with channels_last: where oneDNN's NHWC weight gradient is slow."""
    if device.type != "cpu" or not channels_last:
        return False
    flags = cpu_flags(cpuinfo)
    return flags is not None and "avx512f" not in flags

"""The CPU convolution paths (NCHW weight gradient, fused first conv + max-pool): the same results,
used only where they pay."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from xray.models import SeedCNN
from xray.models.conv_grad import ConvMaxPool2x2, use_cpu_conv_paths, wants_cpu_conv_paths
from xray.models.seed_cnn import MaxPool2x2


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_same_gradients_as_nn_conv2d(bias: bool, input_grad: bool) -> None:
    torch.manual_seed(0)
    ref = nn.Conv2d(8, 5, 3, bias=bias).to(memory_format=torch.channels_last)
    ours = copy.deepcopy(ref)
    assert use_cpu_conv_paths(ours) == 1
    x = torch.randn(11, 8, 17, 17).contiguous(memory_format=torch.channels_last)  # 8 + 3: two chunks
    outs, grads = [], []
    for conv in (ref, ours):
        xi = x.clone().requires_grad_(input_grad)
        out = conv(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        grads.append([conv.weight.grad, conv.bias.grad if bias else None, xi.grad])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for a, b in zip(grads[0], grads[1], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-3)  # summation order only (sums of ~2k terms)


def test_seed_cnn_step_matches_and_eval_is_untouched() -> None:
    torch.manual_seed(0)
    ref = SeedCNN(image_size=40, channels=(8, 16), dense_units=8).to(memory_format=torch.channels_last)
    ours = copy.deepcopy(ref)
    assert use_cpu_conv_paths(ours) == 2  # the second conv; the first (one input channel) fused with its pool
    x = torch.rand(10, 1, 40, 40).contiguous(memory_format=torch.channels_last)
    for net in (ref, ours):
        torch.manual_seed(1)  # the same dropout mask
        net(x).sum().backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        assert (a.grad - b.grad).norm() <= 1e-5 * a.grad.norm() + 1e-7, (
            name,
            (a.grad - b.grad).norm(),
            a.grad.norm(),
        )
    assert ours.state_dict().keys() == ref.state_dict().keys()
    with torch.inference_mode():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x))


def test_only_on_cpus_without_avx512_and_channels_last(tmp_path: Path) -> None:
    avx2, avx512 = tmp_path / "avx2", tmp_path / "avx512"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n")
    avx512.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    cpu = torch.device("cpu")
    assert wants_cpu_conv_paths(cpu, True, str(avx2))
    assert not wants_cpu_conv_paths(cpu, True, str(avx512))
    assert not wants_cpu_conv_paths(cpu, False, str(avx2))
    assert not wants_cpu_conv_paths(torch.device("cuda"), True, str(avx2))
    assert not wants_cpu_conv_paths(cpu, True, str(tmp_path / "missing"))


def _first_block(in_ch: int, bias: bool) -> nn.Sequential:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(in_ch, 6, 3, bias=bias), MaxPool2x2(), nn.ReLU(inplace=True))
    return block.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("size", [23, 24])  # odd conv output: the pool drops its last row and column
@pytest.mark.parametrize(("in_ch", "bias"), [(1, True), (3, False)])
def test_fused_first_block_matches_conv_then_pool(size: int, in_ch: int, bias: bool) -> None:
    ref = _first_block(in_ch, bias)
    ours = copy.deepcopy(ref)
    assert use_cpu_conv_paths(ours) == 1
    x = torch.rand(3, in_ch, size, size).contiguous(memory_format=torch.channels_last)
    x[:, :, : size // 3] = 0  # a flat band: tied maxima, where the gradient must go to the same element
    weight = torch.randn(3, 6, (size - 2) // 2, (size - 2) // 2)
    outs, grads = [], []
    for net in (ref, ours):
        out = net(x)
        (out * weight).sum().backward()
        outs.append(out)
        grads.append([p.grad for p in net.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    assert outs[1].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_fused_first_block_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = ConvMaxPool2x2.apply
    monkeypatch.setattr(ConvMaxPool2x2, "apply", lambda *args: calls.append(1) or real(*args))
    block = _first_block(1, True)
    use_cpu_conv_paths(block)
    x = torch.rand(2, 1, 12, 12)
    block(x).sum().backward()
    assert len(calls) == 1  # training, input without gradient: fused
    with torch.no_grad():
        block(x)
    block(x[0]).sum().backward()  # an unbatched (C, H, W) input: stock modules
    block(x.clone().requires_grad_()).sum().backward()  # an input gradient is wanted: stock modules
    handle = block[0].register_forward_hook(lambda *_: None)  # Grad-CAM style hooks must fire
    block(x).sum().backward()
    handle.remove()
    torch.use_deterministic_algorithms(True)
    try:
        block(x).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(calls) == 1


def test_fused_first_block_needs_a_plain_pool_after_a_few_channel_conv() -> None:
    assert use_cpu_conv_paths(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), MaxPool2x2())) == 0
    assert use_cpu_conv_paths(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), MaxPool2x2())) == 0
    assert use_cpu_conv_paths(nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(3))) == 0
    assert use_cpu_conv_paths(nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.MaxPool2d(2))) == 0
    assert use_cpu_conv_paths(nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2))) == 1

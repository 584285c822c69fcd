"""Conv2d with its weight gradient computed in NCHW: the same gradients, used only where it pays."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from xray.conv_grad import use_nchw_weight_grad, wants_nchw_weight_grad
from xray.models import SeedCNN


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_same_gradients_as_nn_conv2d(bias: bool, input_grad: bool) -> None:
    torch.manual_seed(0)
    ref = nn.Conv2d(8, 5, 3, bias=bias).to(memory_format=torch.channels_last)
    ours = copy.deepcopy(ref)
    assert use_nchw_weight_grad(ours) == 1
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
    assert use_nchw_weight_grad(ours) == 1  # not the first conv (one input channel)
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
    assert wants_nchw_weight_grad(cpu, True, str(avx2))
    assert not wants_nchw_weight_grad(cpu, True, str(avx512))
    assert not wants_nchw_weight_grad(cpu, False, str(avx2))
    assert not wants_nchw_weight_grad(torch.device("cuda"), True, str(avx2))
    assert not wants_nchw_weight_grad(cpu, True, str(tmp_path / "missing"))

"""Networks and the LightningModule: shapes, gradients, Keras init, loss options, checkpoint contents."""

from __future__ import annotations

import functools

import pytest
import torch

from xray.models import SeedCNN, TorchvisionNet, build_net, flip_tta_logits
from xray.models.seed_cnn import MaxPool2x2
from xray.training.module import XRayClassifier


def test_seed_cnn_forward_backward() -> None:
    net = SeedCNN(image_size=64)
    x = torch.rand(3, 1, 64, 64, requires_grad=True)
    logits = net(x)
    assert logits.shape == (3,)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_seed_cnn_matches_keras_architecture_at_500px() -> None:
    net = SeedCNN(image_size=500)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128]
    dense = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    # 500 -> 249 -> 123 -> 60 -> 29 after (valid 3x3 conv, 2x2 pool) x4, as Keras computes it
    assert dense[0].in_features == 128 * 29 * 29 and dense[0].out_features == 128
    assert dense[1].out_features == 1
    assert all((m.bias == 0).all() for m in convs + dense)  # Keras: zero bias
    fan = convs[0].in_channels * 9 + convs[0].out_channels * 9
    limit = (6 / fan) ** 0.5  # glorot uniform
    assert convs[0].weight.abs().max() <= limit


@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_keeping_indices_matches_stock_pool_and_frees_its_input(channels_last: bool) -> None:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for side in (10, 9):  # odd sides drop the last row and column, as the stock pool does
        x = torch.randn(2, 3, side, side).contiguous(memory_format=fmt).requires_grad_()
        grad = torch.randn(2, 3, side // 2, side // 2).contiguous(memory_format=fmt)
        ours = MaxPool2x2()(x)
        (ours_grad,) = torch.autograd.grad(ours, x, grad)
        stock = torch.nn.functional.max_pool2d(x, 2)
        (stock_grad,) = torch.autograd.grad(stock, x, grad)
        assert torch.equal(ours, stock) and torch.equal(ours_grad, stock_grad)
    # what the backward pass holds: only the int64 indices (the output's size), not the 4x larger input
    x = torch.randn(1, 1, 64, 64, requires_grad=True)
    y = (x * 1.0).relu()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        MaxPool2x2()(y)
    assert [tuple(t.shape) for t in saved] == [(1, 1, 32, 32)] and saved[0].dtype == torch.int64
    with torch.no_grad():  # inference takes the stock operator
        assert torch.equal(MaxPool2x2()(x), torch.nn.functional.max_pool2d(x, 2))
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # trainer.deterministic=true: the stock operator, which is
    try:
        out = MaxPool2x2()(y)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert out.grad_fn.name().startswith("MaxPool2DWithIndices") and grad.shape == x.shape
    finally:
        torch.use_deterministic_algorithms(deterministic)


def test_seed_cnn_rejects_too_small_images() -> None:
    with pytest.raises(ValueError, match="too small"):
        SeedCNN(image_size=20)


def test_channels_last_gives_same_logits() -> None:
    torch.manual_seed(0)
    net = SeedCNN(image_size=64).eval()
    x = torch.rand(2, 1, 64, 64)
    expected = net(x)
    net = net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last)), expected)


def test_torchvision_backbone_one_channel_any_size() -> None:
    net = TorchvisionNet("resnet18")
    for size in (64, 96):
        assert net(torch.rand(2, 1, size, size)).shape == (2,)
    assert net.net.conv1.in_channels == 1


def test_build_net_roundtrip_and_allow_list() -> None:
    net = SeedCNN(image_size=64, channels=(8, 16))
    rebuilt = build_net(net.config)
    rebuilt.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match="unknown network"):
        build_net({"name": "os.system", "command": "true"})


def make_module(**kwargs) -> XRayClassifier:
    return XRayClassifier(
        net=SeedCNN(image_size=48, channels=(4, 8), dense_units=8),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3, eps=1e-7),
        **kwargs,
    )


def test_pos_weight_auto_from_training_counts() -> None:
    module = make_module(pos_weight="auto")
    assert module._resolve_pos_weight({"NORMAL": 1341, "PNEUMONIA": 3875}) == pytest.approx(1341 / 3875)
    assert make_module(pos_weight=2.0)._resolve_pos_weight({"NORMAL": 1, "PNEUMONIA": 1}) == 2.0
    assert make_module()._resolve_pos_weight({"NORMAL": 1, "PNEUMONIA": 9}) == 1.0


def test_pos_weight_changes_the_loss() -> None:
    module = make_module()
    logits = torch.tensor([0.3, -0.2, 1.0])
    labels = torch.tensor([1, 0, 1])
    plain = module._loss(logits, labels)
    module.pos_weight.fill_(0.25)
    assert module._loss(logits, labels) < plain


def test_label_smoothing_targets() -> None:
    module = make_module(label_smoothing=0.2)
    logits = torch.tensor([20.0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([0.9]))
    torch.testing.assert_close(module._loss(logits, torch.tensor([1])), expected)


def test_tta_averages_the_horizontal_flip() -> None:
    net = SeedCNN(image_size=48, channels=(4, 8), dense_units=8).eval()
    x = torch.rand(2, 1, 48, 48)
    expected = (net(x) + net(x.flip(-1))) / 2
    torch.testing.assert_close(flip_tta_logits(net, x), expected)


def test_non_finite_loss_names_epoch_and_step() -> None:
    from xray.training.module import NonFiniteLossError

    module = make_module()
    module.net.classifier[-1].bias.data.fill_(float("nan"))
    batch = (torch.rand(2, 1, 48, 48), torch.tensor([0, 1]), [0, 1])
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step 0"):
        module.training_step(batch, 0)


def test_invalid_module_options() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        make_module(label_smoothing=1.5)
    with pytest.raises(ValueError, match="pos_weight"):
        make_module(pos_weight="sometimes")


def test_build_net_refuses_absurd_sizes() -> None:
    with pytest.raises(ValueError, match="out of range"):
        build_net({"name": "SeedCNN", "image_size": 10**6})
    with pytest.raises(ValueError, match="out of range"):
        build_net({"name": "SeedCNN", "image_size": 64, "channels": [8] * 100})

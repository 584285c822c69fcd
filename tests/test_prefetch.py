"""The GPU input path, tested on the CPU: uint8 on the wire, pinned memory, side-stream prefetch, no syncs."""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning
import pytest
import torch
from torch.overrides import TorchFunctionMode

import xray.data.prefetch as prefetch_module
from xray.data.datamodule import XRayDataModule
from xray.data.prefetch import DevicePrefetcher, wants_pinned_memory
from xray.data.transforms import Rescale
from xray.models import SeedCNN
from xray.training.module import EpochBinaryMetric, FiniteLossGuard, NonFiniteLossError, XRayClassifier


def _fake_trainer(device: str, training: bool = True) -> Any:
    return SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device(device)), world_size=1, training=training
    )


def make_dm(root: Path, tmp_path: Path, **kwargs: Any) -> XRayDataModule:
    options = dict(root=str(root), image_size=32, batch_size=8, num_workers=0, cache_dir=str(tmp_path / "c"))
    dm = XRayDataModule(**{**options, **kwargs})
    dm.setup("fit")
    return dm


# ----- prefetcher ----------------------------------------------------------------------------------
def test_prefetcher_yields_the_same_batches_in_the_same_order() -> None:
    batches = [(torch.full((2, 1, 4, 4), i, dtype=torch.uint8), torch.tensor([i, 1]), [i]) for i in range(5)]
    batches.append({"images": torch.ones(1), "name": "x"})
    out = list(DevicePrefetcher(batches, "cpu"))
    assert len(DevicePrefetcher(batches, "cpu")) == len(batches) == len(out)
    for got, want in zip(out[:-1], batches[:-1], strict=True):
        assert isinstance(got, tuple) and got[2] == want[2]
        assert all(torch.equal(g, w) and g.dtype == w.dtype for g, w in zip(got[:2], want[:2], strict=True))
    assert out[-1]["name"] == "x" and torch.equal(out[-1]["images"], torch.ones(1))
    assert list(DevicePrefetcher([], "cpu")) == []


def test_prefetcher_cuda_path_copies_ahead_on_a_side_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch with the stream API replaced by recorders: the order of events is what matters."""
    events: list[tuple[str, Any]] = []

    class FakeStream:
        def __init__(self, name: str) -> None:
            self.name = name

        def wait_stream(self, other: FakeStream) -> None:
            events.append(("wait", (self.name, other.name)))

    side, compute = FakeStream("side"), FakeStream("compute")
    state = {"stream": "compute"}

    @contextlib.contextmanager
    def use_stream(stream: FakeStream):
        state["stream"] = stream.name
        yield
        state["stream"] = "compute"

    def fake_move(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
        events.append(("copy", (int(batch[0][0]), state["stream"], non_blocking)))
        return tuple(t.clone() for t in batch)

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: side)
    monkeypatch.setattr(torch.cuda, "stream", use_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(prefetch_module, "move_to_device", fake_move)
    monkeypatch.setattr(
        torch.Tensor, "record_stream", lambda self, s: events.append(("record", s.name)), raising=False
    )
    batches = [(torch.tensor([i]), torch.tensor([10 + i])) for i in range(3)]
    for batch in DevicePrefetcher(batches, "cuda:0"):
        events.append(("use", int(batch[0][0])))
    copies = [e[1] for e in events if e[0] == "copy"]
    assert copies == [(i, "side", True) for i in range(3)]  # non_blocking, on the side stream
    uses = [i for kind, i in events if kind == "use"]
    assert uses == [0, 1, 2]
    for i in range(3):  # batch i+1 is copied before batch i is used; batch i waited for before its use
        pos_use = events.index(("use", i))
        assert events.index(("copy", (i, "side", True))) < pos_use
        if i + 1 < 3:
            assert events.index(("copy", (i + 1, "side", True))) < pos_use
        waits = [k for k, e in enumerate(events[:pos_use]) if e == ("wait", ("compute", "side"))]
        assert len(waits) == i + 1
    assert sum(1 for e in events if e == ("record", "compute")) == 6  # every tensor of every batch


def test_pin_memory_and_prefetch_follow_the_accelerator(dataset_root: Path, tmp_path: Path) -> None:
    assert wants_pinned_memory("auto", torch.device("cuda", 0))
    assert not wants_pinned_memory("auto", torch.device("cpu")) and not wants_pinned_memory("auto", None)
    assert wants_pinned_memory(True, None) and not wants_pinned_memory(False, torch.device("cuda"))
    with pytest.raises(ValueError, match="pin_memory"):
        XRayDataModule(root=str(dataset_root), pin_memory="sometimes")
    with pytest.raises(ValueError, match="prefetch"):
        XRayDataModule(root=str(dataset_root), prefetch="maybe")
    dm = make_dm(dataset_root, tmp_path)
    assert not dm.train_dataloader().pin_memory  # no trainer: plain host loader
    dm.trainer = _fake_trainer("cpu")
    loader = dm.train_dataloader()
    assert isinstance(loader, torch.utils.data.DataLoader) and not loader.pin_memory
    dm.trainer = _fake_trainer("cuda:0")
    loader = dm.train_dataloader()
    assert isinstance(loader, DevicePrefetcher) and loader.device == torch.device("cuda", 0)
    assert loader.pin_memory and len(loader) == len(loader.loader)  # DataLoader attributes pass through
    assert dm.val_dataloader().pin_memory and not isinstance(dm.val_dataloader(), DevicePrefetcher)
    off = make_dm(dataset_root, tmp_path, pin_memory=False, prefetch=False)
    off.trainer = _fake_trainer("cuda:0")
    assert isinstance(off.train_dataloader(), torch.utils.data.DataLoader)
    assert not off.train_dataloader().pin_memory


def test_uint8_on_the_wire_gives_exactly_the_same_tensors(dataset_root: Path, tmp_path: Path) -> None:
    """What the device receives is uint8; converting there equals the per-sample float path exactly."""
    dm = make_dm(dataset_root, tmp_path)
    host = next(iter(dm.train_dataloader()))
    assert host[0].dtype == torch.uint8
    moved = next(iter(DevicePrefetcher([host], "cpu")))
    dm.trainer = _fake_trainer("cpu", training=False)  # evaluation: rescale only
    evaluated = dm.on_after_batch_transfer(moved, 0)[0]
    per_sample = torch.stack([Rescale()(img) for img in host[0]])
    assert evaluated.dtype == torch.float32 and torch.equal(evaluated, per_sample)
    dm.trainer = _fake_trainer("cpu", training=True)
    torch.manual_seed(3)
    augmented = dm.on_after_batch_transfer(moved, 0)[0]
    torch.manual_seed(3)
    assert torch.equal(augmented, dm.on_after_batch_transfer(host, 0)[0])


# ----- no host syncs per step ----------------------------------------------------------------------
VALUE_READS = {
    "item",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "tolist",
    "numpy",
    "nonzero",
    "unique",
}


def _in_torch(frame: traceback.FrameSummary) -> bool:
    return f"{Path(torch.__file__).parent}/" in frame.filename


def _benign(name: str, stack: list[traceback.FrameSummary], full: list[traceback.FrameSummary]) -> bool:
    """Calls that look like syncs on the CPU but are not on CUDA (all tensors are host tensors here).

    ``stack``: the frames outside torch itself (innermost last); ``full``: every frame."""
    files = [Path(f.filename) for f in stack]
    if name == "item" and any(_in_torch(f) and "/optim/" in f.filename for f in full):
        return True  # Adam's step counter: a host tensor for non-capturable optimizers
    if name == "to" and files[-1].name in ("apply_func.py", "metric.py"):
        # Lightning's batch_to_device passes non_blocking=True for CUDA; torchmetrics' Metric._apply
        # moves states that are already on that device (a no-op)
        return True
    # the loss guard reads a CPU flag on the CPU; on CUDA a pinned host copy behind an event
    return name == "__bool__" and any(f.name == "_verdict" for f in stack)


class SyncSpy(TorchFunctionMode):
    """Records what would make the host wait for an accelerator: reading a tensor's value, a blocking
    host-to-device copy (``.to(device)`` without ``non_blocking``, ``torch.tensor(..., device=...)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        to_device = name == "to" and (
            "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])
        )
        if (
            name in VALUE_READS
            or (to_device and not kwargs.get("non_blocking", False))
            or (name in ("tensor", "as_tensor") and kwargs.get("device") is not None)
        ):
            full = traceback.extract_stack()[:-1]
            stack = [f for f in full if not _in_torch(f)]
            if stack and not _benign(name, stack, full):
                self.calls.append(f"{name} at {Path(stack[-1].filename).name}:{stack[-1].lineno}")
        return func(*args, **kwargs)


def test_augmentation_on_the_device_never_waits_for_it(dataset_root: Path, tmp_path: Path) -> None:
    dm = make_dm(
        dataset_root, tmp_path, appearance={"gamma": 0.3, "contrast": 0.2, "blur_p": 0.5, "noise": 0.03}
    )
    dm.trainer = _fake_trainer("cpu", training=True)
    batch = next(iter(dm.train_dataloader()))
    with SyncSpy() as spy:
        dm.on_after_batch_transfer(batch, 0)
    assert spy.calls == [], spy.calls


def _fit(root: Path, tmp_path: Path, batches: int) -> list[str]:
    torch.manual_seed(0)
    dm = XRayDataModule(
        root=str(root), image_size=32, batch_size=4, num_workers=0, cache_dir=str(tmp_path / "cache")
    )
    model = XRayClassifier(
        SeedCNN(image_size=32, channels=(4, 4), dense_units=8),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        channels_last=True,
    )
    spy = SyncSpy()

    class Spy(lightning.Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            spy.__enter__()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            spy.__exit__(None, None, None)

    trainer = lightning.Trainer(
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=lightning.pytorch.loggers.CSVLogger(tmp_path / f"logs{batches}"),
        enable_checkpointing=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        callbacks=[Spy()],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    return spy.calls


def test_training_steps_make_no_per_step_host_sync(dataset_root: Path, tmp_path: Path) -> None:
    """The whole loop (transfer, augmentation, step, metrics, logging, progress bar): 2 steps and 6 steps
    read device values equally often, i.e. never per step (a CUDA queue is never drained mid-epoch)."""
    two, six = _fit(dataset_root, tmp_path, 2), _fit(dataset_root, tmp_path, 6)
    per_step = [c for c in six if six.count(c) > two.count(c)]
    assert per_step == [], sorted(set(per_step))


def test_epoch_metric_equals_torchmetrics() -> None:
    from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

    torch.manual_seed(0)
    probs, labels = torch.rand(50), torch.randint(0, 2, (50,))
    for kind, reference in (("acc", BinaryAccuracy()), ("auroc", BinaryAUROC())):
        metric = EpochBinaryMetric(kind)
        for chunk in range(0, 50, 8):
            metric.update(probs[chunk : chunk + 8], labels[chunk : chunk + 8])
            reference.update(probs[chunk : chunk + 8], labels[chunk : chunk + 8])
        assert torch.allclose(metric.compute(), reference.compute())


def test_finite_loss_guard_names_the_step_and_blocks_checkpoints() -> None:
    guard = FiniteLossGuard()
    guard.check(torch.tensor(0.5), "epoch 0, step 1")
    guard.flush()
    with pytest.raises(NonFiniteLossError, match="epoch 2, step 7"):
        guard.check(torch.tensor(float("nan")), "epoch 2, step 7")
    with pytest.raises(NonFiniteLossError, match="epoch 2, step 7"):
        guard.flush()  # every later checkpoint save refuses

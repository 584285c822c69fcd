"""trainer.precision=auto follows the hardware: bf16 only where it is native; explicit settings win."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xray.core import runtime
from xray.core.runtime import cpu_has_native_bf16, resolve_precision


def _cpuinfo(tmp_path: Path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: X\nflags\t\t: fpu sse2 avx2 {flags}\nbogomips\t: 1\n")
    return str(path)


def test_cpu_bf16_probe_reads_the_kernel_flags(tmp_path: Path) -> None:
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512f avx512_bf16")) is True
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "amx_tile amx_bf16")) is True
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512f fma")) is False  # AVX-512 without BF16
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize(
    ("cuda", "cuda_bf16", "cpu_bf16", "accelerator", "expected"),
    [
        (False, False, False, "auto", "32-true"),  # AVX2-only CPU: emulated bf16 would be 7.8x slower
        (False, False, True, "auto", "bf16-mixed"),  # AVX-512 BF16 / AMX CPU
        (False, False, True, "cpu", "bf16-mixed"),
        (True, True, False, "auto", "bf16-mixed"),  # Ampere or newer GPU
        (True, False, False, "gpu", "16-mixed"),  # older GPU
        (True, True, False, "cpu", "32-true"),  # a GPU is present but the user asked for the CPU
    ],
)
def test_auto_precision_rule(
    monkeypatch: pytest.MonkeyPatch,
    cuda: bool,
    cuda_bf16: bool,
    cpu_bf16: bool,
    accelerator: str,
    expected: str,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda *a, **k: cpu_bf16)
    assert resolve_precision("auto", accelerator) == expected


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "16-mixed", 32])
def test_explicit_precision_wins(monkeypatch: pytest.MonkeyPatch, explicit: str | int) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda *a, **k: False)
    assert resolve_precision(explicit, "cpu") == explicit


def test_training_records_the_resolved_precision(
    monkeypatch: pytest.MonkeyPatch, dataset_root: Path, tmp_path: Path
) -> None:
    import json

    from tests.helpers import run_training

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda *a, **k: False)
    run_training(dataset_root, tmp_path / "run", ["trainer.max_epochs=1"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["precision"] == "32-true"


def test_bf16_mixed_training_learns(tmp_path: Path) -> None:
    """The bf16-mixed path learns (everywhere; the real-data bf16 run needs a CPU or GPU with native bf16)."""
    import json

    from tests.conftest import make_dataset
    from tests.helpers import run_training

    data = make_dataset(tmp_path / "data", {"train": 60}, size=48, patients_per_class=30)
    run_dir = tmp_path / "run"
    run_training(
        data, run_dir, ["trainer.precision=bf16-mixed", "trainer.max_epochs=8", "data.val_fraction=0.3"]
    )
    val = json.loads((run_dir / "metrics.json").read_text())["val"]["at_threshold"]
    assert val["n"] >= 30 and val["auroc"] > 0.97, val  # measured 1.0 (fp32 too); untrained (lr 1e-9): 0.74
    checkpoint = torch.load(run_dir / "checkpoints" / "best_xray_model.ckpt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in checkpoint["state_dict"].values() if v.is_floating_point())

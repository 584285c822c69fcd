"""Proof that the pipeline learns on real X-rays (runs when ../shared/data/chest_xray exists, as in CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REAL_DATA
from tests.helpers import run_training
from xray.core.runtime import cpu_has_native_bf16

SMALL_REAL = [
    "data.image_size=64",
    "data.batch_size=32",
    "data.num_workers=2",
    "data.train_limit_per_class=400",
    "model.net.channels=[32,64,128,128]",
    "model.net.dense_units=128",
    "trainer.max_epochs=6",
    "evaluation.n_bootstrap=200",
]


NATIVE_BF16 = pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason="bf16 is emulated on this CPU (7.8x slower than fp32, not its default); "
    "test_precision.py::test_bf16_mixed_training_learns covers the bf16 path",
)


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["auto", pytest.param("bf16-mixed", marks=NATIVE_BF16)])
def test_learns_on_real_xrays(tmp_path: Path, precision: str) -> None:
    """Default settings (channels_last, precision resolved for this machine) learn; so does bf16 where native."""
    run_dir = tmp_path / "real"
    run_training(REAL_DATA, run_dir, [*SMALL_REAL, f"trainer.precision={precision}"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    val = metrics["val"]["at_threshold"]
    print(
        f"real-data val ({precision}): n={val['n']} auroc={val['auroc']:.4f} acc={val['accuracy']:.4f} "
        f"sens={val['sensitivity']:.4f} spec={val['specificity']:.4f}"
    )
    assert val["n"] == 526  # the whole patient-grouped validation split, never the test split
    assert "test" not in metrics
    assert val["auroc"] > 0.85


@pytest.mark.realdata
def test_shipped_model_on_the_official_val_folder(tmp_path: Path) -> None:
    """``predict.py ckpt=pretrained`` on the 16 official val/ films (never used for training or selection)."""
    from tests.helpers import run_script

    proc = run_script(
        "predict.py", ["ckpt=pretrained", f"input={REAL_DATA / 'val'}", f"output={tmp_path / 'p.csv'}"]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == 16
    assert metrics["accuracy"] >= 14 / 16 and metrics["auroc"] >= 0.95  # measured: 16/16, AUROC 1.0

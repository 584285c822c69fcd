"""trainer=ddp on this CPU with 2 processes (gloo): every validation image is scored exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import PROJECT_ROOT, make_dataset
from tests.helpers import TINY
from xray.data.records import scan_split


@pytest.mark.slow
def test_ddp_two_processes_cover_validation_once(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "chest_xray", {"train": 12, "val": 4}, size=48)
    next((root / "val" / "NORMAL").iterdir()).unlink()  # 7 images: a padding sampler would score 8
    run_dir = tmp_path / "ddp_run"
    cmd = [
        sys.executable,
        "train.py",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"data.root={root}",
        "data.val_source=official",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
        *TINY,
        "trainer.max_epochs=1",
        "data.batch_size=3",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-12000:]
    val = scan_split(root, "val")
    assert len(val) == 7
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val"]["at_0.5"]["n"] == len(val)
    seen = []
    for event in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event))
        acc.Reload()
        if "val/n" in acc.Tags()["scalars"]:
            seen += [s.value for s in acc.Scalars("val/n")]
    assert seen and all(v == len(val) for v in seen), (seen, len(val))

"""benchmarks/shortcut_probe.py still runs: the whole report on a tiny synthetic split, and a clear error
for a folder without train/."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import PROJECT_ROOT, make_dataset

SCRIPT = PROJECT_ROOT / "benchmarks" / "shortcut_probe.py"


def run_probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )


def test_shortcut_probe_reports_cues_and_every_variant(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "chest_xray", per_class={"train": 16}, size=40)
    out = tmp_path / "probe.json"
    variants = ["border", "edge", "silhouette", "centre"]
    proc = run_probe(
        "--root", str(root), "--limit-per-class", "12", "--epochs", "1", "--folds", "2", "--size", "16",
        "--variants", ",".join(variants), "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = proc.stdout
    assert "12 NORMAL + 12 PNEUMONIA films" in report
    assert "| cue | class | mean | q1 | median | q3 | > 0 | AUROC |" in report
    for cue in ("body_fraction", "top_corner_background", "marker_area", "text_score"):
        assert re.search(rf"^\| {cue} \| NORMAL \|", report, re.MULTILINE), cue
        assert re.search(
            rf"^\| {cue} \| [^|]+ \| \d\.\d{{3}} \| \d\.\d{{3}} \| \d+ \|", report, re.MULTILINE
        ), cue
    lr = re.search(
        r"^\| logistic regression \|.*\| (\d\.\d{3}) \| \d\.\d{3}-\d\.\d{3} \|", report, re.MULTILINE
    )
    assert lr and 0.0 <= float(lr.group(1)) <= 1.0
    for variant in variants:
        row = re.search(
            rf"^\| small CNN, 16 px \| {variant}: .*\| (\d\.\d{{3}}) \| [^|]+ \| [^|]+ \|$", report, re.M
        )
        assert row, f"no row for {variant}:\n{report}"
        assert 0.0 <= float(row.group(1)) <= 1.0

    numbers = json.loads(out.read_text())
    assert numbers["n"] == {"NORMAL": 12, "PNEUMONIA": 12} and sum(numbers["fold_sizes"]) == 24
    assert set(numbers["cnn"]) == set(variants)
    for r in [numbers["lr"], *numbers["cnn"].values()]:
        assert 0.0 <= r["pooled"] <= 1.0 and len(r["folds"]) == 2
    assert all(
        math.isfinite(numbers["cue_table"][c]["NORMAL"]["mean"]) for c in numbers["cue_table"] if c != "n"
    )


def test_shortcut_probe_without_train_folder_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "chest_xray" / "test").mkdir(parents=True)
    proc = run_probe("--root", str(tmp_path / "chest_xray"))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train" in lines[0], proc.stderr

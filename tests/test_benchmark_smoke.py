"""The benchmark script still runs: every section with minuscule settings on synthetic images."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import PROJECT_ROOT, make_dataset


def _load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "xray_benchmark", PROJECT_ROOT / "benchmarks" / "benchmark.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny(tmp_path: Path, root: Path) -> list[str]:
    return [
        "--batch-size", "4", "--num-workers", "0", "--budget", "0.05", "--data-images", "8",
        "--loop-batches", "3", "--fullres-dir", str(root), "--data-root", str(root),
        "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
    ]  # fmt: skip


def test_benchmark_every_section_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_benchmark()
    root = make_dataset(tmp_path / "chest_xray", per_class={"train": 8}, size=72)
    out = tmp_path / "bench.json"
    args = [*_tiny(tmp_path, root), "--in-process", "--sizes", "48", "--loop-sizes", "48", "--json", str(out)]
    rows = bench.main([*args, "--profile", "--profile-size", "48", "--profile-steps", "1"])

    by_name = {r["name"]: r for r in rows}
    measured = {"data/naive", "data/product", "train/fp32_nchw", "train/default", "loop/ceiling", "loop/real"}
    assert measured | {"predict/48", "data/keras", "train/keras"} <= set(by_name)
    for name in measured | {"predict/48"}:
        assert by_name[name]["images_per_s"] > 0 and by_name[name]["peak_rss_mb"] > 0, by_name[name]
    assert by_name["data/product"]["read_image_calls"] == 0  # steady-state epochs never decode a JPEG
    assert by_name["train/default"]["gflops"] > 0 and by_name["train/default"]["vs_baseline"] > 0
    loop = by_name["loop/real"]
    assert loop["vs_ceiling"] > 0 and 0.0 <= loop["input_share"] < 1.0
    if not bench.has_tensorflow():  # the Keras column is measured or says so, never a constant
        assert by_name["train/keras"].get("images_per_s") is None
        assert by_name["train/default"]["vs_keras"] == "not measured"
        assert "not measured (TensorFlow not installed)" in by_name["data/keras"]["note"]
    assert {r["name"] for r in json.loads(out.read_text())} == set(by_name)
    printed = capsys.readouterr().out
    assert "| loop/real | 48 |" in printed and "Machine:" in printed and "convolution" in printed
    assert re.search(
        r"fp32 GEMM \(2048\^2\) [1-9][0-9]* GFLOP/s", printed
    )  # the ceiling, measured in this run


def test_benchmark_rows_run_in_their_own_processes(tmp_path: Path) -> None:
    bench = _load_benchmark()
    root = make_dataset(tmp_path / "chest_xray", per_class={"train": 4}, size=40)
    rows = bench.main([*_tiny(tmp_path, root), "--sections", "train", "--sizes", "48"])
    measured = [r for r in rows if r.get("images_per_s")]
    assert {r["name"] for r in measured} >= {"train/fp32_nchw", "train/default"}
    assert all("failed" not in r.get("note", "") for r in rows), rows


def test_benchmark_plans_the_gpu_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device cuda`` (not runnable here): ceiling vs real loop, bf16 as the default, no Keras on the GPU."""
    bench = _load_benchmark()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    a = bench.parse_args(["--device", "cuda", "--sizes", "500"])
    assert (a.loop_batches, a.loop_warmup, a.loop_epochs) == (150, 20, 3)
    jobs = {j["name"]: j for j in bench.plan(a)}
    assert not jobs["loop"]["skip"] and "train/bf16" not in jobs  # bf16-mixed is the default there
    assert "runs on the CPU" in jobs["train/keras"]["skip"] and "train/fp32_channels_last" in jobs

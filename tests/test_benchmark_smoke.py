"""The benchmark script still runs: every section with minuscule settings on synthetic images."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.conftest import PROJECT_ROOT, make_dataset


def _load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "xray_benchmark", PROJECT_ROOT / "benchmarks" / "benchmark.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_quick_all_sections(tmp_path: Path, capsys) -> None:
    bench = _load_benchmark()
    root = make_dataset(tmp_path / "chest_xray", per_class={"train": 8}, size=72)
    out = tmp_path / "bench.json"
    tiny = [
        "--quick",
        "--in-process",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    rows = bench.main(
        [
            *tiny,
            "--sizes",
            "64",
            "--fullres-dir",
            str(root),
            "--train-variants",
            "fp32,channels_last_bf16",
            "--gemm-size",
            "256",
            "--json",
            str(out),
        ]
    )
    rows += bench.main(
        [*tiny, "--only", "epoch", "--epoch-root", str(root), "--epoch-size", "64", "--naive-fraction", "0.5"]
    )

    names = {r["name"] for r in rows}
    assert {
        "data/naive",
        "data/cache_build",
        "data/cached",
        "train/fp32",
        "train/channels_last_bf16",
        "epoch/cache_build",
        "epoch/cached",
        "epoch/naive",
    } <= names
    for r in rows:
        assert r["images_per_s"] and r["images_per_s"] > 0, r
        assert r["peak_rss_mb"] > 0 and r["image_size"] == 64
    cached = next(r for r in rows if r["name"] == "data/cached")
    assert cached["read_image_calls"] == 0  # steady-state epochs never decode a JPEG
    assert all(r["gflops"] > 0 for r in rows if r["name"].startswith("train/"))
    assert {r["name"] for r in json.loads(out.read_text())} >= {"data/naive", "train/fp32"}
    printed = capsys.readouterr().out
    assert "| data/cached | 64 |" in printed and "Machine:" in printed

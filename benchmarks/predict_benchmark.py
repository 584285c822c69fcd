"""Prediction throughput (images/s, JPEG decode included) and cold start, at 500 px and 224 px.

    python benchmarks/predict_benchmark.py [FOLDER] [--ckpt PATH] [--json PATH]

FOLDER defaults to ``../shared/data/chest_xray_fullres_sample`` (80 real full-resolution JPEGs).
Without ``--ckpt`` a randomly initialised seed CNN checkpoint is written on the fly for each size (the
weights do not change the cost), so no trained model is needed; with ``--ckpt`` its own image size is
measured. Each size runs in a fresh child process through ``xray.inference.predict_files``, which is
what ``predict.py`` calls, so that:

* cold start = child process start -> first prediction done (imports, model load, one image), and
* peak RSS is that size's own (main process; DataLoader workers reported apart).

Prints a markdown table; ``--json PATH`` writes a list of objects with ``name`` ("predict/<size>px"),
``image_size``, ``images_per_s``, ``peak_rss_mb`` (and the other measured fields).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDER = PROJECT_ROOT.parent / "shared" / "data" / "chest_xray_fullres_sample"
DEFAULT_SIZES = (500, 224)


def make_seed_checkpoint(path: Path, image_size: int, interpolation: str = "bilinear") -> Path:
    """A randomly initialised SeedCNN saved as an xray checkpoint (loadable by the safe loader)."""
    import torch

    from xray.constants import CLASSES
    from xray.models import SeedCNN
    from xray.module import CHECKPOINT_FORMAT

    torch.manual_seed(0)
    net = SeedCNN(image_size=image_size)
    preprocessing = {
        "image_size": image_size,
        "interpolation": interpolation,
        "grayscale": True,
        "rescale": 1.0 / 255.0,
        "classes": list(CLASSES),
    }
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "xray": {
                "format": CHECKPOINT_FORMAT,
                "net": dict(net.config),
                "preprocessing": preprocessing,
                "classes": list(CLASSES),
                "threshold": 0.5,
                "threshold_rule": "fixed",
                "tta": False,
            },
        },
        path,
    )
    return path


def _rss_mb(who: int) -> float:
    """Peak resident set size in MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(who).ru_maxrss
    return peak / (1024 * 1024) if platform.system() == "Darwin" else peak / 1024


def child(args: argparse.Namespace) -> None:
    """One measurement in a fresh process: the first prediction, then timed passes over the folder."""
    from xray.checkpoints import load_model
    from xray.inference import collect_inputs, predict_files

    model = load_model(args.ckpt)
    paths = collect_inputs(args.folder)
    predict_files(model, paths[:1], batch_size=1, num_workers=args.num_workers, device=args.device)
    print("FIRST_PREDICTION", flush=True)

    seconds = []
    rows: list[Any] = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        rows = predict_files(
            model, paths, batch_size=args.batch_size, num_workers=args.num_workers, device=args.device
        )
        seconds.append(time.perf_counter() - start)
    import torch

    from xray.inference import resolve_device

    device = resolve_device(args.device)
    result = {
        "image_size": model.image_size,
        "n_images": len(paths),
        "n_failed": sum(1 for r in rows if not r.ok),
        "seconds": seconds,
        "images_per_s": len(paths) / statistics.median(seconds),
        "peak_rss_mb": _rss_mb(resource.RUSAGE_SELF),
        "worker_peak_rss_mb": _rss_mb(resource.RUSAGE_CHILDREN),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}",
        "torch_threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def measure(ckpt: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one child; cold start is timed here, from the child's start to its first prediction."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        str(args.folder),
        "--child",
        "--ckpt",
        str(ckpt),
        "--batch-size",
        str(args.batch_size),
        "--num-workers",
        str(args.num_workers),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=PROJECT_ROOT
    )
    assert proc.stdout is not None
    cold_start = None
    result: dict[str, Any] | None = None
    for line in proc.stdout:
        if line.startswith("FIRST_PREDICTION") and cold_start is None:
            cold_start = time.perf_counter() - start
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0 or result is None or cold_start is None:
        raise SystemExit(f"benchmark child failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    return {"name": f"predict/{result['image_size']}px", "cold_start_s": cold_start, **result}


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Prediction benchmark: {results[0]['n_images']} files from {args.folder}, batch {args.batch_size}, "
        f"{args.num_workers} workers, median of {args.repeats} passes (decode included), "
        f"device {results[0]['device']}, {os.cpu_count()} CPUs",
        "",
        "| name | image size | images/s | cold start (s) | peak RSS main (MB) | peak RSS worker (MB) | failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['image_size']} | {r['images_per_s']:.1f} | {r['cold_start_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['worker_peak_rss_mb']:.0f} | {r['n_failed']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER, help="images to predict")
    parser.add_argument(
        "--ckpt", type=Path, default=None, help="checkpoint (default: random seed CNN per size)"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="sizes without --ckpt"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per size (median reported)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="write the results as a JSON list")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    if not args.folder.is_dir():
        raise SystemExit(f"error: {args.folder}: image folder not found")
    results = []
    with tempfile.TemporaryDirectory(prefix="xray-bench-") as tmp:
        if args.ckpt is not None:
            checkpoints = [args.ckpt]
        else:
            sys.path.insert(0, str(PROJECT_ROOT / "src"))
            checkpoints = [make_seed_checkpoint(Path(tmp) / f"seed_{s}.ckpt", s) for s in args.sizes]
        for ckpt in checkpoints:
            results.append(measure(ckpt, args))
            print(f"{results[-1]['name']}: {results[-1]['images_per_s']:.1f} images/s", file=sys.stderr)
    print(markdown(results, args))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

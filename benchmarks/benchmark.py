"""xray benchmark: the data path, the training step, the real training loop and prediction, in one run.

    python benchmarks/benchmark.py                       # CPU: every section at 500 and 224 px
    python benchmarks/benchmark.py --device cuda         # GPU: the same rows on the device
    python benchmarks/benchmark.py --sections train,loop --sizes 500 --json out.json
    python benchmarks/benchmark.py --profile             # + torch.profiler table of the default 500 px step

Sections (rows; ``benchmarks/README.md`` says what each measures):
  data     data/naive (decode + resize + per-sample Keras affine in 2 workers), data/product (decoded cache +
           batched affine after transfer; JPEG decodes counted), data/keras (ImageDataGenerator)
  train    train/fp32_nchw (stock PyTorch), train/default (trainer.precision=auto, channels_last,
           keep_freed_memory), train/bf16 where the hardware has bf16, train/keras (tf_keras seed CNN)
  loop     loop/ceiling (bare default step on device-resident input) and loop/real (lightning.Trainer over
           the real data, timed whole with one sync at each end; input share = time between steps)
  predict  predict/<px> through xray.inference.predict.predict_files (decode included; cold start)
Keras rows need TensorFlow (``pip install -e .[keras]``) and run only on the CPU; without it they read
"not measured". Every row runs in its own process (peak RSS is its own) within --budget seconds of timing.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
NOT_MEASURED = "not measured"


def keras_augment() -> dict[str, Any]:
    """The seed's ImageDataGenerator settings, read from conf/data/kermany.yaml (no torch import)."""
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "kermany.yaml"))["augment"])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def has_tensorflow() -> bool:
    return (
        importlib.util.find_spec("tensorflow") is not None
        and importlib.util.find_spec("tf_keras") is not None
    )


def timed(fn: Any, budget: float, max_iters: int = 1000, warmup: int = 1) -> list[float]:
    """Seconds per call: ``warmup`` untimed calls, then calls until ``budget`` is spent (at least 3).

    Rows report the fastest call (:func:`best`): other work on a shared machine only ever adds time."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < max_iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def best(times: list[float]) -> float:
    return min(times)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- data --------------------------------------------------------------------------------------
def job_data(a: argparse.Namespace, size: int, kind: str) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    import xray.data.cache as cache_module
    from xray.data.datamodule import XRayDataModule
    from xray.data.dataset import XRayDataset
    from xray.data.prefetch import move_to_device
    from xray.data.records import scan_split
    from xray.data.transforms import train_transform

    n_images = a.data_images
    if kind == "naive":  # what a straight port does: every sample decoded, resized, augmented in workers
        records = scan_split(a.fullres_dir, "train")
        records = (records * (n_images // len(records) + 1))[:n_images]
        dataset = XRayDataset(records, size, sample_transform=train_transform(keras_augment()))

        def one_pass() -> None:
            loader = DataLoader(dataset, batch_size=a.batch_size, num_workers=a.num_workers)
            for _ in loader:
                pass

        times = timed(one_pass, a.budget, warmup=0)
        return {"images_per_s": len(records) / best(times), "note": f"{a.num_workers} workers"}

    decodes = {"n": 0}
    real_load = cache_module.load_resized

    def counting_load(*args: Any, **kwargs: Any) -> Any:
        decodes["n"] += 1
        return real_load(*args, **kwargs)

    cache_module.load_resized = counting_load
    import xray.data.dataset as dataset_module

    dataset_module.load_resized = counting_load
    dm = XRayDataModule(
        root=str(a.fullres_dir), image_size=size, batch_size=a.batch_size, num_workers=a.num_workers,
        cache_dir=str(a.cache_dir),
    )  # fmt: skip
    t0 = time.perf_counter()
    dm.setup("fit")
    build_s = time.perf_counter() - t0
    device = torch.device(a.device)  # a stand-in trainer: augmentation on, no DDP, pinned + prefetch on CUDA
    dm.trainer = SimpleNamespace(training=True, world_size=1, strategy=SimpleNamespace(root_device=device))
    decodes["n"] = 0

    def one_pass() -> int:
        seen = 0
        for batch in dm.train_dataloader():
            images = dm.on_after_batch_transfer(move_to_device(batch, device, non_blocking=True), 0)[0]
            seen += images.shape[0]
        sync(device)
        return seen

    per_pass = one_pass()
    times = timed(one_pass, a.budget, warmup=0)
    return {
        "images_per_s": per_pass / best(times),
        "read_image_calls": decodes["n"],
        "note": f"cache build {build_s:.1f} s (one-off); JPEG decodes in steady state: {decodes['n']}",
    }


def job_data_keras(a: argparse.Namespace, size: int) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tf_keras as keras

    generator = keras.preprocessing.image.ImageDataGenerator(rescale=1.0 / 255, **keras_augment())
    flow = generator.flow_from_directory(
        str(a.fullres_dir / "train"), target_size=(size, size), color_mode="grayscale",
        batch_size=a.batch_size, class_mode="binary", seed=0,
    )  # fmt: skip
    batches = -(-a.data_images // a.batch_size)
    times = timed(lambda: [next(flow) for _ in range(batches)], a.budget)
    return {
        "images_per_s": batches * a.batch_size / best(times),
        "note": "ImageDataGenerator, 1 process",
    }


# ----- training step -----------------------------------------------------------------------------
def default_settings(device: Any) -> tuple[str, bool]:
    """(precision, channels_last) as the default config resolves them on this machine."""
    from xray.core.runtime import resolve_precision

    return resolve_precision("auto", device.type), True


def make_step(
    size: int, batch: int, device: Any, precision: str, channels_last: bool, default: bool = False
) -> Any:
    """One optimisation step of the seed CNN as XRayClassifier does it, on fixed device-resident input
    (``default``: with what ``XRayClassifier.configure_model`` adds on this machine)."""
    import torch
    import torch.nn.functional as F

    from xray.models import SeedCNN
    from xray.models.conv_grad import use_cpu_conv_paths, wants_cpu_conv_paths

    torch.manual_seed(0)
    net = SeedCNN(image_size=size).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    if default and wants_cpu_conv_paths(device, channels_last):
        use_cpu_conv_paths(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)
    x = torch.rand(batch, 1, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch,), device=device).float()
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.binary_cross_entropy_with_logits(net(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    return step, net


def layout(device: Any, channels_last: bool, default: bool) -> str:
    from xray.models.conv_grad import wants_cpu_conv_paths

    if not channels_last:
        return "NCHW"
    return (
        "channels_last, NCHW weight grads, fused first conv+pool"
        if default and wants_cpu_conv_paths(device, True)
        else "channels_last"
    )


def gflop_per_image(size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from xray.models import SeedCNN

    net = SeedCNN(image_size=size)
    with FlopCounterMode(display=False) as counter:
        net(torch.rand(1, 1, size, size)).sum().backward()
    return counter.get_total_flops() / 1e9


def job_train(a: argparse.Namespace, size: int, variant: str) -> dict[str, Any]:
    import torch
    from torch.utils import benchmark as tbench

    device = torch.device(a.device)
    precision, channels_last = {
        "fp32_nchw": ("32-true", False),
        "fp32_channels_last": ("32-true", True),
        "default": default_settings(device),
        "default_stock_malloc": default_settings(device),
        "bf16": ("bf16-mixed", True),
    }[variant]
    step, _ = make_step(size, a.batch_size, device, precision, channels_last, variant.startswith("default"))
    step()  # oneDNN / cuDNN primitive creation
    t0 = time.perf_counter()
    step()
    sync(device)
    number = max(1, min(200, round(a.budget / 3 / (time.perf_counter() - t0))))
    timer = tbench.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    # three blocks of `number` steps (CUDA synced at each block's ends only); the fastest block counts
    seconds = best([timer.timeit(number).median for _ in range(3)])
    return {
        "images_per_s": a.batch_size / seconds,
        "gflops": gflop_per_image(size) * a.batch_size / seconds,
        "note": f"{precision}, {layout(device, channels_last, variant.startswith('default'))}; "
        f"fastest of 3 blocks of {number} steps",
    }


def keras_seed_cnn(size: int) -> Any:
    import tf_keras as keras
    from tf_keras import layers

    model = keras.Sequential([keras.Input((size, size, 1))])
    for width in (32, 64, 128, 128):
        model.add(layers.Conv2D(width, 3, activation="relu"))
        model.add(layers.MaxPooling2D(2))
    for layer in (layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dropout(0.5)):
        model.add(layer)
    model.add(layers.Dense(1, activation="sigmoid"))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    return model


def job_train_keras(a: argparse.Namespace, size: int) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    model = keras_seed_cnn(size)
    rng = np.random.default_rng(0)
    x = rng.random((a.batch_size, size, size, 1), dtype=np.float32)
    y = rng.integers(0, 2, (a.batch_size, 1)).astype(np.float32)
    times = timed(lambda: model.train_on_batch(x, y), a.budget, warmup=1)
    return {  # no torch in this process: TensorFlow and torch in one process can crash
        "images_per_s": a.batch_size / best(times),
        "note": f"tf_keras train_on_batch, TensorFlow {tf.__version__}; {len(times)} steps",
    }


# ----- the real loop against its ceiling ---------------------------------------------------------
def loop_timer(warmup: int, device: Any) -> Any:
    """Callback: whole-loop time after ``warmup`` steps with one sync at each end; the gaps between a
    step's end and the next step's start (fetch, copy, augmentation: the device waiting on input)
    as CUDA events on the GPU, host clocks on the CPU. Nothing is read until training ends."""
    import torch
    from lightning import Callback

    def stamp() -> Any:
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000 if device.type == "cuda" else b - a

    class LoopTimer(Callback):
        def __init__(self) -> None:
            self.done, self.starts, self.ends, self.wall = 0, [], [], 0.0

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if self.done >= warmup:
                self.starts.append(stamp())

        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            self.done += 1
            if self.done == warmup:
                sync(device)
                self.t0 = time.perf_counter()
            if self.done >= warmup:
                self.ends.append(stamp())

        def on_train_end(self, trainer: Any, module: Any) -> None:
            sync(device)
            self.wall = time.perf_counter() - self.t0
            steps = len(self.starts)
            total = seconds(self.ends[0], self.ends[-1]) if steps else 0.0
            gaps = sum(seconds(e, s) for e, s in zip(self.ends[:-1], self.starts, strict=False))
            self.steps, self.input_share = steps, gaps / total if total > 0 else 0.0

    return LoopTimer()


def job_loop(a: argparse.Namespace, size: int) -> list[dict[str, Any]]:
    import lightning
    import torch

    from xray.data.datamodule import XRayDataModule
    from xray.models import SeedCNN
    from xray.training.module import XRayClassifier

    device = torch.device(a.device)
    precision, channels_last = default_settings(device)
    step, _ = make_step(size, a.batch_size, device, precision, channels_last, default=True)
    for _ in range(a.loop_warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(a.loop_batches):
        step()
    sync(device)
    ceiling = a.batch_size * a.loop_batches / (time.perf_counter() - t0)

    dm = XRayDataModule(
        root=str(a.data_root), image_size=size, batch_size=a.batch_size, num_workers=a.num_workers,
        cache_dir=str(a.cache_dir),
    )  # fmt: skip
    model = XRayClassifier(
        SeedCNN(image_size=size),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3, eps=1e-7),
        channels_last=channels_last,
    )
    timer = loop_timer(a.loop_warmup, device)
    epochs = a.loop_epochs
    trainer = lightning.Trainer(
        accelerator=device.type, devices=1, precision=precision, max_epochs=epochs,
        limit_train_batches=-(-(a.loop_batches + a.loop_warmup) // epochs), limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], benchmark=device.type == "cuda",
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    real = a.batch_size * timer.steps / timer.wall
    setting = f"{precision}, {layout(device, channels_last, True)}"
    return [
        {
            "name": "loop/ceiling",
            "images_per_s": ceiling,
            "note": f"bare step, {setting}, device-resident input",
        },
        {
            "name": "loop/real",
            "images_per_s": real,
            "vs_ceiling": real / ceiling,
            "input_share": timer.input_share,
            "note": f"{real / ceiling:.2f}x ceiling; input {timer.input_share:.0%} of the loop; "
            f"{timer.steps} steps over {epochs} epoch(s) after {a.loop_warmup} warm-up, one sync per end",
        },
    ]


def profile_step(a: argparse.Namespace, size: int) -> str:
    """torch.profiler table of the default training step (after a warm-up step)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(a.device)
    step, _ = make_step(size, a.batch_size, device, *default_settings(device), default=True)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(a.profile_steps):
            step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=15)


# ----- prediction --------------------------------------------------------------------------------
def job_predict(a: argparse.Namespace, size: int) -> dict[str, Any]:
    import torch

    from xray.core.constants import CLASSES
    from xray.inference.checkpoints import load_model
    from xray.inference.predict import collect_inputs, predict_files
    from xray.models import SeedCNN
    from xray.training.module import CHECKPOINT_FORMAT

    net = SeedCNN(image_size=size)  # random weights: the cost does not depend on them
    pre = {"image_size": size, "interpolation": "bilinear", "grayscale": True, "rescale": 1 / 255,
           "classes": list(CLASSES)}  # fmt: skip
    meta = {"format": CHECKPOINT_FORMAT, "net": dict(net.config), "preprocessing": pre,
            "classes": list(CLASSES), "threshold": 0.5, "threshold_rule": "fixed", "tta": False}  # fmt: skip
    ckpt = Path(a.cache_dir) / f"bench_seed_{size}.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "xray": meta}, ckpt)
    model = load_model(ckpt)
    paths = collect_inputs(a.fullres_dir)
    predict_files(model, paths[:1], batch_size=1, num_workers=0, device=a.device)
    first = time.time()
    run = functools.partial(
        predict_files, model, paths, batch_size=32, num_workers=a.num_workers, device=a.device
    )
    times = timed(run, a.budget, warmup=0)
    return {"images_per_s": len(paths) / best(times), "first_prediction_at": first,
            "note": f"{len(paths)} files, decode included"}  # fmt: skip


# ----- orchestration -----------------------------------------------------------------------------
def plan(a: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows to measure, in order; rows that cannot be measured here carry a ``skip`` note."""
    import torch

    from xray.core.runtime import cpu_has_native_bf16

    cuda = a.device.startswith("cuda")
    native_bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16()
    default_precision = default_settings(torch.device(a.device))[0]
    keras_missing = "TensorFlow not installed" if not has_tensorflow() else None
    if cuda:
        keras_missing = "the Keras reference (tensorflow-cpu) runs on the CPU"
    jobs: list[dict[str, Any]] = []
    for size in a.sizes:

        def add(name: str, job: str, skip: str | None = None, size: int = size, **extra: Any) -> None:
            jobs.append({"name": name, "job": job, "size": size, "skip": skip, **extra})

        if "data" in a.sections:
            add("data/naive", "data", kind="naive")
            add("data/product", "data", kind="product")
            add("data/keras", "data_keras", skip=keras_missing and f"{NOT_MEASURED} ({keras_missing})")
        if "train" in a.sections:
            add("train/fp32_nchw", "train", variant="fp32_nchw")
            add("train/default", "train", variant="default")
            if not cuda:  # keep_freed_memory's share of the default (a host allocator setting)
                add("train/default_stock_malloc", "train", variant="default_stock_malloc")
            if default_precision != "32-true":  # is fp32 faster here after all?
                add("train/fp32_channels_last", "train", variant="fp32_channels_last")
            if default_precision != "bf16-mixed":
                add(
                    "train/bf16",
                    "train",
                    variant="bf16",
                    skip=None if native_bf16 else "skipped: emulated bf16",
                )
            add("train/keras", "train_keras", skip=keras_missing and f"{NOT_MEASURED} ({keras_missing})")
        if "loop" in a.sections and size in a.loop_sizes:
            add("loop", "loop")
        if "predict" in a.sections:
            add(f"predict/{size}", "predict")
    return jobs


def run_job(a: argparse.Namespace, job: dict[str, Any]) -> list[dict[str, Any]]:
    """The measurement itself: in a child process (or in-process for the smoke test)."""
    size = job["size"]
    product = job["job"] in ("loop", "data") and job.get("kind") != "naive"
    if (
        a.keep_freed_memory
        and not a.in_process
        and (product or job.get("variant") not in (None, "fp32_nchw", "default_stock_malloc"))
    ):
        from xray.core.runtime import keep_freed_memory

        keep_freed_memory()  # the product's default (keep_freed_memory=true); baselines and Keras stock
    fn = {
        "data": lambda: job_data(a, size, job["kind"]),
        "data_keras": lambda: job_data_keras(a, size),
        "train": lambda: job_train(a, size, job["variant"]),
        "train_keras": lambda: job_train_keras(a, size),
        "loop": lambda: job_loop(a, size),
        "predict": lambda: job_predict(a, size),
    }[job["job"]]
    out = fn()
    rows = out if isinstance(out, list) else [{"name": job["name"], **out}]
    return [{"image_size": size, "peak_rss_mb": peak_rss_mb(), **r} for r in rows]


def run_child(a: argparse.Namespace, argv: list[str], job: dict[str, Any]) -> list[dict[str, Any]]:
    start = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child-job", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=a.child_timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        return [{"name": job["name"], "image_size": job["size"], "note": f"failed: {' / '.join(tail)}"}]
    rows = json.loads(lines[-1][len("RESULT ") :])
    for r in rows:
        if "first_prediction_at" in r:
            r["cold_start_s"] = r.pop("first_prediction_at") - start
            r["note"] += f"; cold start {r['cold_start_s']:.1f} s"
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    by = {(r["name"], r["image_size"]): r.get("images_per_s") for r in rows}
    flops = {r["image_size"]: r["gflops"] / r["images_per_s"] for r in rows if r.get("gflops")}
    for r in rows:
        if r["name"] == "train/keras" and r.get("images_per_s") and r["image_size"] in flops:
            r["gflops"] = r["images_per_s"] * flops[r["image_size"]]  # the same network, the same FLOPs
        ips, size = r.get("images_per_s"), r["image_size"]
        group = r["name"].split("/")[0]
        base = {"data": "data/naive", "train": "train/fp32_nchw", "loop": "train/fp32_nchw"}.get(group)
        keras = {"data": "data/keras", "train": "train/keras", "loop": "train/keras"}.get(group)
        if ips and base and by.get((base, size)):
            r["vs_baseline"] = ips / by[(base, size)]
        if ips and keras and not r["name"].endswith("keras"):
            r["vs_keras"] = ips / by[(keras, size)] if by.get((keras, size)) else NOT_MEASURED


def gemm_gflops(a: argparse.Namespace) -> float:
    """fp32 2048x2048 matmul throughput in this run: the ceiling the GFLOP/s column is read against."""
    import torch
    from torch.utils import benchmark as tbench

    n = 2048
    x, y = (torch.randn(n, n, device=a.device) for _ in range(2))
    measured = tbench.Timer("x @ y", globals={"x": x, "y": y}).blocked_autorange(
        min_run_time=min(2.0, a.budget)
    )
    return 2 * n**3 / min(measured.times) / 1e9


def machine_line(a: argparse.Namespace, load: tuple[float, float], seconds: float, gemm: float) -> str:
    import torch

    from xray.core.runtime import cpu_flags

    model, flags = platform.processor() or "unknown CPU", cpu_flags() or set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next(
            (
                row.split(":", 1)[1].strip()
                for row in cpuinfo.read_text().splitlines()
                if row.startswith("model name")
            ),
            model,
        )
    isa = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "-"
    gpu = f"; GPU {torch.cuda.get_device_name()}" if a.device.startswith("cuda") else ""
    tf = "TensorFlow installed" if has_tensorflow() else "no TensorFlow (Keras not measured)"
    return (
        f"Machine: {model}, {os.cpu_count()} CPUs ({isa}){gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}; {tf}; batch {a.batch_size}; "
        f"fp32 GEMM (2048^2) {gemm:.0f} GFLOP/s; load avg {load[0]:.2f} -> {load[1]:.2f}; total {seconds:.0f} s"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, suffix: str = "") -> str:
        if v is None:
            return "–"
        if isinstance(v, str):
            return v
        return (f"{v:,.0f}" if v >= 100 else f"{v:.3g}") + suffix

    head = "| name | px | images/s | vs baseline | vs Keras | GFLOP/s | peak RSS MB | notes |\n|---|---:|---:|---:|---:|---:|---:|---|"
    body = [
        f"| {r['name']} | {r['image_size']} | {f(r.get('images_per_s'))} | {f(r.get('vs_baseline'), 'x')} | "
        f"{f(r.get('vs_keras'), 'x')} | {f(r.get('gflops'))} | {f(r.get('peak_rss_mb'))} | {r.get('note', '')} |"
        for r in rows
    ]
    return "\n".join([head, *body])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (any device Lightning supports)")
    p.add_argument("--sections", default="data,train,loop,predict", type=lambda s: s.split(","))
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 224])
    p.add_argument("--loop-sizes", type=int, nargs="+", default=[500])
    p.add_argument("--batch-size", type=int, default=40)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--budget", type=float, default=15.0, help="seconds of timing per row (after warm-up)")
    p.add_argument("--data-images", type=int, default=240, help="images per data pass")
    p.add_argument("--loop-batches", type=int, default=None, help="timed steps (default: 4 CPU, 150 GPU)")
    p.add_argument(
        "--loop-warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 20 GPU)"
    )
    p.add_argument(
        "--loop-epochs", type=int, default=None, help="epochs the steps span (default: 1 CPU, 3 GPU)"
    )
    p.add_argument("--fullres-dir", type=Path, default=SHARED / "chest_xray_fullres_sample")
    p.add_argument("--data-root", type=Path, default=SHARED / "chest_xray", help="real data for the loop")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "xray-bench-cache")
    p.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of the default step")
    p.add_argument("--profile-size", type=int, default=500)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--in-process", action="store_true", help="no child processes (tests)")
    p.add_argument("--child-timeout", type=float, default=900)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child-job", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.loop_batches = a.loop_batches or (150 if gpu else 4)
    a.loop_warmup = max(1, a.loop_warmup if a.loop_warmup is not None else (20 if gpu else 1))
    a.loop_epochs = a.loop_epochs or (3 if gpu else 1)
    return a


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.child_job is not None:
        print("RESULT " + json.dumps(run_job(a, json.loads(a.child_job))), flush=True)
        return []
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    for job in plan(a):
        if job["skip"]:
            rows.append({"name": job["name"], "image_size": job["size"], "note": job["skip"]})
            continue
        new = run_job(a, job) if a.in_process else run_child(a, argv, job)
        for r in new:
            if "first_prediction_at" in r:  # in-process: no cold start to speak of
                r.pop("first_prediction_at")
        rows += new
        for r in new:
            print(
                f"{r['name']} {r['image_size']} px: {r.get('images_per_s') or r.get('note')}", file=sys.stderr
            )
    add_ratios(rows)
    print(markdown(rows))
    print()
    gemm = gemm_gflops(a)
    print(machine_line(a, (load0, os.getloadavg()[0]), time.perf_counter() - started, gemm))
    if a.profile:
        print(f"\ntorch.profiler, default training step at {a.profile_size} px, {a.profile_steps} steps:\n")
        print(profile_step(a, a.profile_size))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

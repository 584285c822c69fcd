"""Throughput benchmark of the xray data path, the seed-CNN training step and a whole training epoch.

Usage (see ``benchmarks/README.md``)::

    python benchmarks/benchmark.py                       # data + train, 500 and 224 px (~6 min)
    python benchmarks/benchmark.py --sizes 224 --only train --json results.json
    python benchmarks/benchmark.py --quick               # tiny step counts, no compile / extra rows
    python benchmarks/benchmark.py --only epoch --epoch-fraction 0.1 --epoch-mallopt
    python benchmarks/benchmark.py --wait-quiet 600      # first wait for other users to leave the CPUs

Sections
    ``data``   augmented batches from real full-resolution JPEGs: ``data/naive`` (per-sample decode +
               resize + Keras affine + rescale in 2 DataLoader workers), ``data/cache_build`` (the one-off
               decoded cache), ``data/cached`` (the product: memory-mapped batch reads + batched Keras
               affine in ``XRayDataModule.on_after_batch_transfer``) and ``data/cached_read`` (reads only),
               naive and cached passes interleaved in one process.
    ``train``  one optimisation step of ``SeedCNN`` (BCE-with-logits, Adam) on random input, in fp32,
               channels_last, bf16 autocast and both, interleaved step by step in one process; then
               ``torch.compile`` of the fastest, interleaved with its eager twin; at 224 px the fastest
               with one thread. GFLOP/s from ``FlopCounterMode``, next to a GEMM ceiling of the same run.
    ``epoch``  (``--only epoch``) one 500 px epoch over the training split through ``lightning.Trainer``
               (product path), and the naive path on a fraction of the epoch, extrapolated.

``+mallopt`` rows repeat the product's data path / the fastest training variant in a process that called
:func:`keep_freed_memory` (glibc keeps freed large blocks instead of unmapping them).

Each section (and size) runs in its own subprocess (``--in-process`` turns this off). ``peak_rss_mb`` is
the peak RSS sampled while that variant ran (``RssSampler``); for epoch rows the process peak
(``ru_maxrss``; ``rss_scope`` says which). ``workers_peak_rss_mb``: the largest worker process.
``others_cpu_pct`` is the share of the CPUs that other processes used during the measurement: the
machines are shared, so compare ratios within a run and distrust rows where it is high.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from xray.runtime import keep_freed_memory  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FULLRES = PROJECT_ROOT.parent / "shared" / "data" / "chest_xray_fullres_sample"
DEFAULT_EPOCH_ROOT = PROJECT_ROOT.parent / "shared" / "data" / "chest_xray"

# The Keras original on the same machines (CEO's measurements, batch 40): images/s.
KERAS_DATA = {500: 56.0, 224: 323.0}
KERAS_TRAIN = {500: 8.0, 224: 34.5}

TRAIN_VARIANTS: dict[str, dict[str, bool]] = {
    "fp32": {"channels_last": False, "bf16": False},
    "channels_last": {"channels_last": True, "bf16": False},
    "bf16": {"channels_last": False, "bf16": True},
    "channels_last_bf16": {"channels_last": True, "bf16": True},
}

RESULT_MARK = "@@BENCHMARK-RESULT@@"
SAMPLED = "sampled while this variant ran"

Row = dict[str, Any]


# ------------------------------------------------------------------------------------------------ utils


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)


def children_peak_rss_mb() -> float:
    """Largest peak RSS of any terminated, waited-for child process (DataLoader / pool workers), MiB."""
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale, 1)


def cycle_to(items: Sequence[Any], n: int) -> list[Any]:
    """The first ``n`` items of ``items`` repeated as often as needed."""
    if not items:
        raise ValueError("cannot cycle an empty sequence")
    return list(itertools.islice(itertools.cycle(items), n))


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (>= 1)."""
    multiple = max(1, multiple)
    return max(multiple, -(-n // multiple) * multiple)


def warm_file_cache(paths: Iterable[str | Path]) -> None:
    """Read every file once so that no variant pays (or is spared) the cold page-cache read."""
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 20):
                pass


class OthersCpu:
    """Share of all CPUs that OTHER processes used between ``start()`` and ``stop()`` (``/proc/stat``).

    This process's own CPU time and that of its finished children (measurement subprocesses and their
    DataLoader workers) are subtracted, so the figure is the load left by other users of the machine.
    """

    def _sample(self) -> tuple[float, float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        mine = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        return float(sum(fields[:8])), float(idle), mine * float(os.sysconf("SC_CLK_TCK"))

    def start(self) -> OthersCpu:
        try:
            self._start: tuple[float, float, float] | None = self._sample()
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def stop(self) -> float | None:
        """Percent of all CPUs busy with other processes since ``start()``; None where unknown."""
        if self._start is None:
            return None
        try:
            total1, idle1, mine1 = self._sample()
        except (OSError, ValueError, IndexError):
            return None
        total0, idle0, mine0 = self._start
        total = total1 - total0
        if total <= 0:
            return None
        busy = total - (idle1 - idle0) - (mine1 - mine0)
        return float(round(max(0.0, min(100.0, 100.0 * busy / total))))


def others_cpu_pct(interval: float = 0.5) -> float | None:
    """Percent of all CPUs that other processes keep busy during ``interval`` s from now."""
    probe = OthersCpu().start()
    time.sleep(interval)
    return probe.stop()


def wait_quiet(max_wait: float, threshold: float = 15.0, needed: int = 3) -> float | None:
    """Wait up to ``max_wait`` s until other processes use < ``threshold`` % CPU in ``needed`` 2 s samples
    in a row; returns the last sample (the machine is shared: a busy one halves every figure)."""
    deadline = time.monotonic() + max_wait
    quiet, busy = 0, None
    while quiet < needed and time.monotonic() < deadline:
        busy = others_cpu_pct(2.0)
        quiet = quiet + 1 if busy is not None and busy < threshold else 0
    return busy


def machine_info() -> dict[str, Any]:
    """CPU model, core count, ISA flags of interest, torch version and thread count."""
    import torch

    model, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and model in ("unknown", "", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return {
        "cpu": model,
        "cores": cores,
        "isa": isa,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def matmul_gflops(dtype_name: str, n: int = 2048, reps: int = 8) -> float:
    """Best-of-``reps`` GEMM rate of an ``n x n`` matmul in ``dtype_name`` (float32 / bfloat16), GFLOP/s."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up (oneDNN / MKL kernel selection, page faults)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return round(2.0 * n**3 / best / 1e9, 1)


def count_step_flops(image_size: int, batch: int = 2) -> float:
    """FLOPs of forward + backward per image of the seed CNN, counted by ``FlopCounterMode`` on one step.

    Counted on a batch of ``batch`` (FLOPs are linear in the batch size) so that this costs little
    even at 500 px; the optimizer update is elementwise and not counted.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from xray.models import SeedCNN

    net = SeedCNN(image_size)
    x = torch.rand(batch, 1, image_size, image_size)
    y = torch.zeros(batch)
    with FlopCounterMode(display=False) as counter:
        F.binary_cross_entropy_with_logits(net(x).float(), y).backward()
    return counter.get_total_flops() / batch


# ------------------------------------------------------------------------------------------------ data


def _augment() -> dict[str, Any]:
    from xray.data.datamodule import DEFAULT_AUGMENT

    return dict(DEFAULT_AUGMENT)


class RssSampler:
    """Peak resident set size per label, sampled from ``/proc/self/statm`` by a background thread.

    Several variants share one process (so that they can be interleaved); ``track(label)`` attributes
    the RSS seen while it is active to ``label``. Falls back to ``ru_maxrss`` where ``/proc`` is missing.
    """

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.peaks: dict[str, float] = {}
        self._label: str | None = None
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss_mb(self) -> float:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self._page / 2**20
        except (OSError, ValueError, IndexError):
            return peak_rss_mb()

    def _note(self) -> None:
        label = self._label
        if label is not None:
            self.peaks[label] = max(self.peaks.get(label, 0.0), self.rss_mb())

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._note()

    @contextmanager
    def track(self, label: str) -> Iterator[None]:
        self._label = label
        self._note()
        try:
            yield
        finally:
            self._note()
            self._label = None

    def peak(self, label: str) -> float:
        return round(self.peaks.get(label, 0.0), 1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class CallCounter:
    """Wraps a function and counts its calls (used to prove that cached epochs never decode)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls = 0
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


def _patch_read_image() -> tuple[CallCounter, Callable[[], None]]:
    """Count every ``read_image`` call made in this process (``io`` and the ``cache`` module's import)."""
    import xray.data.cache as cache_mod
    import xray.data.io as io_mod

    original = io_mod.read_image
    counter = CallCounter(original)
    io_mod.read_image = counter
    cache_mod.read_image = counter

    def restore() -> None:
        io_mod.read_image = original
        cache_mod.read_image = original

    return counter, restore


def bench_data(
    fullres_dir: str,
    image_size: int,
    n_images: int,
    cache_dir: str,
    rounds: int = 2,
    batch_size: int = 40,
    num_workers: int = 2,
    interpolation: str = "bilinear",
    mallopt: bool = False,
) -> list[Row]:
    """The naive and the cached data paths over the same files, interleaved for ``rounds`` rounds.

    ``mallopt=True`` applies :func:`keep_freed_memory` first and measures only ``data/cached+mallopt``.

    ``data/naive``: ``XRayDataset`` without cache, its eval preset (``read_image`` + ``resize_image``)
    then ``train_transform`` (``KerasRandomAffine`` + ``Rescale``) on each sample in ``num_workers``
    DataLoader workers (fresh each pass, start-up included); the image count is rounded up to whole
    batches per worker so that no worker idles at the end.

    ``data/cache_build`` (once): ``XRayDataModule.setup()`` building the decoded cache of the folder.
    ``data/cached``: the DataModule's ``train_dataloader()`` over that cache (file list cycled to
    ``n_images``; ``num_workers=0`` and ``__getitems__`` batched memmap reads, as the product does)
    and its ``on_after_batch_transfer`` (rescale + ``sample_keras_params`` + ``keras_augment_batch``)
    with a stand-in trainer in training mode; one untimed warm-up batch per pass. ``read_image`` calls
    are counted during these passes. ``data/cached_read``: the same batches without augmentation.
    Each row reports the median rate over the rounds.
    """
    import torch
    from torch.utils.data import DataLoader

    from xray.data.datamodule import XRayDataModule, XRayDataset
    from xray.data.records import scan_split
    from xray.transforms import train_transform

    if mallopt and not keep_freed_memory():
        raise RuntimeError("mallopt is not available (not glibc)")
    records = scan_split(fullres_dir, "train")
    warm_file_cache(r.path for r in records)
    counter, restore = _patch_read_image()
    sampler = RssSampler()
    rows: list[Row] = []
    try:
        dm = XRayDataModule(
            root=fullres_dir,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            interpolation=interpolation,
            augment=_augment(),
            cache=True,
            cache_dir=cache_dir,
        )
        with sampler.track("data/cache_build"):
            t0 = time.perf_counter()
            dm.setup("fit")
            build_s = time.perf_counter() - t0
        cache = dm.datasets["train"].cache
        assert cache is not None
        rows.append(
            {
                "name": "data/cache_build",
                "image_size": image_size,
                "images_per_s": round(len(cache.paths) / build_s, 2),
                "seconds": round(build_s, 3),
                "images": len(cache.paths),
                "peak_rss_mb": sampler.peak("data/cache_build"),
                "rss_scope": SAMPLED,
                "workers_peak_rss_mb": children_peak_rss_mb(),
                "note": f"one-off, {num_workers} procs, {len(cache.paths)} files",
            }
        )

        n_naive = round_up(n_images, batch_size * max(1, num_workers))
        naive_set = XRayDataset(
            cycle_to(records, n_naive),
            image_size,
            interpolation,
            sample_transform=train_transform(_augment()),
        )
        naive_set[0]  # imports and lazy initialisation happen once, before the workers fork
        row_of = {p: i for i, p in enumerate(cache.paths)}
        cycled = cycle_to(records, round_up(n_images, batch_size))
        dm.datasets["train"] = XRayDataset(
            cycled, image_size, interpolation, cache, [row_of[str(r.path)] for r in cycled]
        )
        dm.trainer = SimpleNamespace(training=True, world_size=1)  # what on_after_batch_transfer asks

        def naive_pass() -> tuple[int, float]:
            loader = DataLoader(naive_set, batch_size=batch_size, shuffle=True, num_workers=num_workers)
            seen, t_start = 0, time.perf_counter()
            for images, _labels, _index in loader:
                seen += images.shape[0]
            seconds = time.perf_counter() - t_start
            assert images.dtype == torch.float32 and float(images.max()) <= 1.0 + 1e-6
            return seen, seconds

        decodes = 0

        def cached_pass(augment: bool) -> tuple[int, float]:
            nonlocal decodes
            before = counter.calls
            loader = dm.train_dataloader()
            assert loader.num_workers == 0
            batch = next(iter(loader))  # warm-up: page-in, allocator, grid_sample kernels
            if augment:
                dm.on_after_batch_transfer(batch, 0)
            seen, t_start = 0, time.perf_counter()
            for batch in loader:
                if augment:
                    images, _labels, _index = dm.on_after_batch_transfer(batch, 0)
                    assert images.dtype == torch.float32 and float(images.max()) <= 1.0 + 1e-6
                else:
                    assert batch[0].dtype == torch.uint8
                seen += batch[0].shape[0]
            seconds = time.perf_counter() - t_start
            decodes += counter.calls - before
            return seen, seconds

        passes: dict[str, Callable[[], tuple[int, float]]] = {
            "data/naive": naive_pass,
            "data/cached": functools.partial(cached_pass, True),
            "data/cached_read": functools.partial(cached_pass, False),
        }
        if mallopt:
            passes = {"data/cached": passes["data/cached"]}
            rows.clear()
        rates: dict[str, list[float]] = {name: [] for name in passes}
        for r in range(max(1, rounds)):
            order = list(passes)
            if r % 2:
                order.reverse()
            for name in order:
                with sampler.track(name):
                    seen, seconds = passes[name]()
                rates[name].append(seen / seconds)
        notes = {
            "data/naive": f"{num_workers} workers, per-sample decode+resize+affine+rescale, {n_naive} img/pass",
            "data/cached": f"memmap batches + batched Keras affine in-process; read_image calls: {decodes}",
            "data/cached_read": "uint8 memmap batches only (no augmentation)",
        }
        for name, values in rates.items():
            rows.append(
                {
                    "name": name + ("+mallopt" if mallopt else ""),
                    "image_size": image_size,
                    "images_per_s": round(statistics.median(values), 2),
                    "rounds": [round(v, 1) for v in values],
                    "peak_rss_mb": sampler.peak(name),
                    "rss_scope": SAMPLED,
                    **({"workers_peak_rss_mb": children_peak_rss_mb()} if name == "data/naive" else {}),
                    **({"read_image_calls": decodes} if name != "data/naive" else {}),
                    "note": notes[name] + f"; {len(values)} rounds",
                }
            )
    finally:
        restore()
        sampler.close()
    return rows


# ----------------------------------------------------------------------------------------------- train


def _variant_config(variant: str) -> dict[str, Any]:
    """``fp32`` / ``channels_last`` / ``bf16`` / ``channels_last_bf16``, optionally ``_1thread``."""
    base, _, suffix = variant.partition("_1thread")
    if base not in TRAIN_VARIANTS or suffix:
        raise ValueError(f"unknown training variant {variant!r}")
    return {**TRAIN_VARIANTS[base], "threads": 1 if variant.endswith("_1thread") else None}


class TrainStep:
    """One ``SeedCNN`` training setup (net, Adam, fixed random batch); calling it runs and times one step.

    Mirrors ``XRayClassifier``: ``net.to(channels_last)`` and the input made channels_last in forward,
    ``torch.autocast('cpu', bfloat16)`` as Lightning's ``bf16-mixed``, the loss on float32 logits,
    ``net.compile()`` as ``configure_model`` does.
    """

    def __init__(
        self,
        image_size: int,
        batch_size: int,
        channels_last: bool,
        bf16: bool,
        threads: int | None = None,
        compile: bool = False,
    ) -> None:
        import torch

        from xray.models import SeedCNN

        torch.manual_seed(0)
        self.channels_last, self.bf16, self.threads = channels_last, bf16, threads
        self.net = SeedCNN(image_size).train()
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-7)
        self.x = torch.rand(batch_size, 1, image_size, image_size)
        self.y = torch.randint(0, 2, (batch_size,)).float()
        if compile:
            self.net.compile()

    def __call__(self) -> float:
        import torch
        import torch.nn.functional as F

        default_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            t0 = time.perf_counter()
            inputs = self.x.contiguous(memory_format=torch.channels_last) if self.channels_last else self.x
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.net(inputs)
            loss = F.binary_cross_entropy_with_logits(logits.float(), self.y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()}")
            return time.perf_counter() - t0
        finally:
            torch.set_num_threads(default_threads)


def _interleave(
    steps: dict[str, Callable[[], float]], sampler: RssSampler, warmup: int, rounds: int, max_seconds: float
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``warmup`` then up to ``rounds`` timed steps per variant, one variant after the other per round.

    The order is reversed every other round, so slow drifts in the machine's load hit all variants
    alike. Stops after ``max_seconds`` of timed rounds once every variant has two timed steps.
    """
    warm: dict[str, list[float]] = {name: [] for name in steps}
    timed: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():
        for _ in range(warmup):
            with sampler.track(name):
                warm[name].append(step())
    t_start = time.perf_counter()
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            with sampler.track(name):
                timed[name].append(steps[name]())
        if r + 1 >= min(2, rounds) and time.perf_counter() - t_start > max_seconds:
            break
    return warm, timed


def _train_row(
    name: str,
    image_size: int,
    batch_size: int,
    warm: list[float],
    timed: list[float],
    sampler: RssSampler,
    **extra: Any,
) -> Row:
    median = statistics.median(timed)
    return {
        "name": name,
        "image_size": image_size,
        "images_per_s": round(batch_size / median, 2),
        "images_per_s_mean": round(batch_size * len(timed) / sum(timed), 2),
        "step_s": [round(t, 3) for t in timed],
        "warmup_s": [round(t, 3) for t in warm],
        "peak_rss_mb": sampler.peak(name),
        "rss_scope": SAMPLED,
        **extra,
    }


def bench_train(
    image_size: int,
    variants: Sequence[str],
    batch_size: int = 40,
    warmup: int = 2,
    rounds: int = 4,
    max_seconds: float = 60.0,
    threads_sweep: bool = False,
    mallopt: bool = False,
) -> list[Row]:
    """All ``variants`` of the training step in one process, interleaved step by step.

    ``mallopt=True`` applies :func:`keep_freed_memory` first and suffixes the names with ``+mallopt``.

    images/s is the batch size over the median step time. ``threads_sweep``: afterwards, the fastest
    variant with 1 thread against itself with the default thread count, interleaved again
    (``train/<best>_1thread``; ``vs_default_threads`` is that ratio).
    """
    import torch

    if mallopt and not keep_freed_memory():
        raise RuntimeError("mallopt is not available (not glibc)")
    suffix = "+mallopt" if mallopt else ""
    sampler = RssSampler()
    try:
        steps = {
            f"train/{v}{suffix}": TrainStep(image_size, batch_size, **_variant_config(v)) for v in variants
        }
        warm, timed = _interleave(steps, sampler, warmup, rounds, max_seconds)
        rows = [
            _train_row(
                name,
                image_size,
                batch_size,
                warm[name],
                timed[name],
                sampler,
                threads=torch.get_num_threads(),
                note=f"{len(warm[name])}+{len(timed[name])} steps, interleaved",
            )
            for name in steps
        ]
        if threads_sweep and rows:
            best = max(rows, key=lambda r: r["images_per_s"])["name"]
            base = best.split("/", 1)[1].removesuffix(suffix)
            one = f"train/{base}_1thread{suffix}"
            pair = {
                best: steps[best],
                one: TrainStep(image_size, batch_size, **_variant_config(base + "_1thread")),
            }
            warm2, timed2 = _interleave(pair, sampler, 1, rounds, max_seconds)
            ratio = statistics.median(timed2[best]) / statistics.median(timed2[one])
            rows.append(
                _train_row(
                    one,
                    image_size,
                    batch_size,
                    warm2[one],
                    timed2[one],
                    sampler,
                    threads=1,
                    vs_default_threads=round(ratio, 2),
                    note=f"{ratio:.2f}x vs {torch.get_num_threads()} threads "
                    f"({len(timed2[one])} interleaved steps each)",
                )
            )
        del steps
    finally:
        sampler.close()
    return rows


def bench_compiled(
    image_size: int,
    base: str,
    batch_size: int = 40,
    warmup: int = 1,
    rounds: int = 4,
    max_seconds: float = 60.0,
    compile_timeout: float = 180.0,
) -> list[Row]:
    """``torch.compile`` of variant ``base``, interleaved with the same variant in eager mode.

    The first compiled step (tracing + Inductor code generation, forward and backward) is reported as
    ``compile_s``; if it exceeds ``compile_timeout`` the row is a failure (the caller's subprocess
    timeout also kills a compile that never returns).
    """
    sampler = RssSampler()
    name = "train/compiled"
    try:
        eager = TrainStep(image_size, batch_size, **_variant_config(base))
        compiled = TrainStep(image_size, batch_size, compile=True, **_variant_config(base))
        with sampler.track(name):
            compile_s = compiled()
        if compile_s > compile_timeout:
            return [
                {
                    "name": name,
                    "image_size": image_size,
                    "images_per_s": None,
                    "compile_s": round(compile_s, 1),
                    "peak_rss_mb": sampler.peak(name),
                    "note": f"{base}; failed: compile took {compile_s:.0f} s > {compile_timeout:.0f} s",
                }
            ]
        warm, timed = _interleave({name: compiled, "eager": eager}, sampler, warmup, rounds, max_seconds)
        ratio = statistics.median(timed["eager"]) / statistics.median(timed[name])
        return [
            _train_row(
                name,
                image_size,
                batch_size,
                [compile_s, *warm[name]],
                timed[name],
                sampler,
                compile_s=round(compile_s, 1),
                base=base,
                vs_eager=round(ratio, 2),
                note=f"{base}; compile {compile_s:.0f} s; {ratio:.2f}x vs eager {base} "
                f"({len(timed[name])} interleaved steps each)",
            )
        ]
    finally:
        sampler.close()


# ----------------------------------------------------------------------------------------------- epoch


def bench_epoch(
    name: str,
    root: str,
    image_size: int,
    fraction: float,
    cache_dir: str,
    cached: bool,
    precision: str,
    channels_last: bool,
    batch_size: int = 40,
    num_workers: int = 2,
    interpolation: str = "bilinear",
    mallopt: bool = False,
) -> list[Row]:
    """One training epoch (or ``fraction`` of it) through ``lightning.Trainer`` and ``XRayDataModule``.

    ``cached=True`` is the product (decoded cache, batched augmentation after transfer); its setup
    time (the cache build) is reported as ``epoch/cache_build``. ``cached=False`` is the naive path:
    no cache, per-sample ``train_transform`` (Keras affine + ``Rescale``) in ``num_workers`` workers.
    No validation. The epoch time is measured between the epoch-start and epoch-end hooks and
    extrapolated to the whole epoch by the fraction of batches run. ``mallopt=True`` applies
    :func:`keep_freed_memory` first (and skips the ``epoch/cache_build`` row).
    """
    if mallopt and not keep_freed_memory():
        raise RuntimeError("mallopt is not available (not glibc)")
    import lightning as L
    import torch

    from xray.data.datamodule import XRayDataModule
    from xray.models import SeedCNN
    from xray.module import XRayClassifier
    from xray.transforms import train_transform

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.start = self.end = 0.0
            self.images = 0
            self.batches = 0

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(
            self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            self.images += int(batch[0].shape[0])
            self.batches += 1

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.end = time.perf_counter()

    L.seed_everything(0, verbose=False)
    dm = XRayDataModule(
        root=root,
        image_size=image_size,
        batch_size=batch_size,
        num_workers=num_workers,
        interpolation=interpolation,
        augment=_augment(),
        augment_on="batch" if cached else "sample",
        cache=cached,
        cache_dir=cache_dir,
    )
    warm_file_cache(p for p in Path(root, "train").rglob("*") if p.is_file())
    t0 = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    rows: list[Row] = []
    if cached and not mallopt:
        n_files = len(dm.datasets["train"].cache.paths)  # type: ignore[union-attr]
        rows.append(
            {
                "name": "epoch/cache_build",
                "image_size": image_size,
                "images_per_s": round(n_files / setup_s, 2),
                "seconds": round(setup_s, 2),
                "images": n_files,
                "peak_rss_mb": peak_rss_mb(),
                "workers_peak_rss_mb": children_peak_rss_mb(),
                "note": f"one-off setup incl. cache build, {num_workers} procs",
            }
        )
    else:
        # train_transform = Keras affine + Rescale: the augment_on="sample" preset alone leaves 0..255
        dm.datasets["train"].sample_transform = train_transform(_augment())
    total_batches = -(-len(dm.datasets["train"]) // batch_size)
    model = XRayClassifier(
        SeedCNN(image_size),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.999), eps=1e-7),
        channels_last=channels_last,
    )
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        precision=precision,
        limit_train_batches=fraction,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=dm)
    seconds = timer.end - timer.start
    done = timer.batches / total_batches
    rows.append(
        {
            "name": name,
            "image_size": image_size,
            "images_per_s": round(timer.images / seconds, 2),
            "seconds": round(seconds, 2),
            "epoch_s_full": round(seconds / done, 1),
            "fraction": round(done, 4),
            "images": timer.images,
            "train_images": len(dm.datasets["train"]),
            "setup_s": round(setup_s, 2),
            "precision": precision,
            "channels_last": channels_last,
            "peak_rss_mb": peak_rss_mb(),
            "workers_peak_rss_mb": children_peak_rss_mb(),
            "note": (
                f"{'product: cache + batch aug' if cached else f'naive: {num_workers} workers'}, "
                f"{precision}{', channels_last' if channels_last else ''}; "
                f"{timer.batches}/{total_batches} batches in {seconds:.0f} s -> epoch "
                f"{seconds / done:.0f} s{' (extrapolated)' if done < 1 else ''}"
            ),
        }
    )
    return rows


TASKS: dict[str, Callable[..., list[Row]]] = {
    "data": bench_data,
    "train": bench_train,
    "compiled": bench_compiled,
    "epoch": bench_epoch,
}


# ------------------------------------------------------------------------------------------- execution


def run_task(
    task: str, kwargs: dict[str, Any], isolate: bool, timeout: float | None, fallback: Row | None = None
) -> list[Row]:
    """Run ``TASKS[task](**kwargs)`` in a fresh subprocess (``isolate``) or here; never raises.

    A failure (exception, crash, timeout) becomes a single row with ``images_per_s=None`` and the
    reason in ``note``, built from ``fallback`` (which gives at least name and image_size).
    """
    fallback = dict(fallback or {"name": task, "image_size": kwargs.get("image_size")})
    probe = OthersCpu().start()
    if not isolate:
        try:
            rows = TASKS[task](**kwargs)
        except Exception as err:  # report, don't crash the whole benchmark
            rows = [
                {
                    **fallback,
                    "images_per_s": None,
                    "peak_rss_mb": peak_rss_mb(),
                    "note": f"failed: {type(err).__name__}: {err}"[:300],
                }
            ]
        busy = probe.stop()
        for r in rows:
            r.setdefault("rss_scope", "process peak so far")
            r.setdefault("others_cpu_pct", busy)
        return rows
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps({"task": task, "kwargs": kwargs}),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=PROJECT_ROOT)
    except subprocess.TimeoutExpired:
        return [
            {
                **fallback,
                "images_per_s": None,
                "peak_rss_mb": None,
                "others_cpu_pct": probe.stop(),
                "note": f"failed: timed out after {timeout:.0f} s",
            }
        ]
    busy = probe.stop()
    fallback["others_cpu_pct"] = busy
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            rows = json.loads(line[len(RESULT_MARK) :])
            for r in rows:
                r.setdefault("rss_scope", "process peak (own subprocess)")
                r.setdefault("others_cpu_pct", busy)
            return rows
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return [
        {
            **fallback,
            "images_per_s": None,
            "peak_rss_mb": None,
            "note": f"failed (exit {proc.returncode}): {tail}"[:400],
        }
    ]


def worker_main(spec_json: str) -> int:
    """Subprocess entry: run one task, print its rows as one JSON line after ``RESULT_MARK``."""
    spec = json.loads(spec_json)
    rows = TASKS[spec["task"]](**spec["kwargs"])
    print(RESULT_MARK + json.dumps(rows), flush=True)
    return 0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- sections


def run_data(args: argparse.Namespace, cache_root: Path) -> list[Row]:
    rows: list[Row] = []
    for size in args.sizes:
        log(f"data {size}px (naive / cached interleaved, {args.data_rounds} rounds)")
        kwargs = {
            "fullres_dir": str(args.fullres_dir),
            "image_size": size,
            "n_images": args.data_images,
            "cache_dir": str(cache_root / f"data-{size}"),
            "rounds": args.data_rounds,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "interpolation": args.interpolation,
        }
        size_rows = run_task(
            "data", kwargs, args.isolate, args.timeout, {"name": "data/cached", "image_size": size}
        )
        if args.mallopt_rows and args.isolate:
            log(f"data/cached+mallopt {size}px")
            extra = run_task(
                "data",
                {**kwargs, "mallopt": True},
                args.isolate,
                args.timeout,
                {"name": "data/cached+mallopt", "image_size": size},
            )
            _vs_default_malloc(extra, size_rows)
            size_rows += extra
        rows += size_rows
    return rows


def _vs_default_malloc(extra: list[Row], reference: list[Row]) -> None:
    """Add ``vs_default_malloc`` (and a note) to ``+mallopt`` rows from the same-named default rows."""
    by_name = {r["name"]: r for r in reference}
    for r in extra:
        ref = by_name.get(r["name"].removesuffix("+mallopt"))
        if ref and ref.get("images_per_s") and r.get("images_per_s"):
            r["vs_default_malloc"] = round(r["images_per_s"] / ref["images_per_s"], 2)
            r["note"] = f"{r['vs_default_malloc']:.2f}x vs default malloc (separate process); " + str(
                r.get("note", "")
            )


def run_train(args: argparse.Namespace) -> tuple[list[Row], dict[str, float]]:
    log("GEMM ceiling")
    gemm = functools.partial(matmul_gflops, n=args.gemm_size)
    ceiling = {"fp32": gemm("float32"), "bf16": gemm("bfloat16")}
    flops = {size: count_step_flops(size) for size in args.sizes}
    rows: list[Row] = []
    for size in args.sizes:
        big = size >= 400
        warmup = 1 if args.quick else (args.warmup_large if big else args.warmup_small)
        rounds = 1 if args.quick else (args.rounds_large if big else args.rounds_small)
        common = {
            "image_size": size,
            "batch_size": args.batch_size,
            "warmup": warmup,
            "rounds": rounds,
            "max_seconds": args.max_seconds,
        }
        log(f"train {size}px: {', '.join(args.train_variants)} interleaved")
        size_rows = run_task(
            "train",
            {
                **common,
                "variants": args.train_variants,
                "threads_sweep": bool(args.threads_sweep and not big),
            },
            args.isolate,
            args.timeout,
            {"name": "train/all", "image_size": size},
        )
        ok = [r for r in size_rows if r.get("images_per_s") and not r["name"].endswith("_1thread")]
        best = max(ok, key=lambda r: r["images_per_s"]) if ok else None
        if best is not None and args.compile:
            base = best["name"].split("/", 1)[1]
            log(f"train/compiled ({base}) {size}px, interleaved with eager")
            size_rows += run_task(
                "compiled",
                {**common, "base": base, "compile_timeout": args.compile_timeout},
                args.isolate,
                args.compile_timeout + args.timeout,
                {"name": "train/compiled", "image_size": size, "base": base},
            )
        if best is not None and args.mallopt_rows and args.isolate:
            base = best["name"].split("/", 1)[1]
            log(f"train/{base}+mallopt {size}px")
            extra = run_task(
                "train",
                {**common, "variants": [base], "mallopt": True},
                args.isolate,
                args.timeout,
                {"name": f"train/{base}+mallopt", "image_size": size},
            )
            _vs_default_malloc(extra, size_rows)
            size_rows += extra
        for r in size_rows:
            r["flops_per_image"] = round(flops[size])
            if r.get("images_per_s"):
                uses_bf16 = "bf16" in r["name"] or "bf16" in str(r.get("base", ""))
                r["gflops"] = round(flops[size] * r["images_per_s"] / 1e9, 1)
                r["ceiling_gflops"] = ceiling["bf16" if uses_bf16 else "fp32"]
                r["pct_of_ceiling"] = round(100 * r["gflops"] / r["ceiling_gflops"], 1)
        rows += size_rows
    log("GEMM ceiling (again, to see contention)")
    ceiling_after = {"fp32": gemm("float32"), "bf16": gemm("bfloat16")}
    return rows, {
        "fp32_before": ceiling["fp32"],
        "bf16_before": ceiling["bf16"],
        "fp32_after": ceiling_after["fp32"],
        "bf16_after": ceiling_after["bf16"],
    }


def run_epoch(args: argparse.Namespace, cache_root: Path) -> list[Row]:
    size = args.epoch_size
    common = {
        "root": str(args.epoch_root),
        "image_size": size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "interpolation": args.interpolation,
        "cache_dir": str(cache_root / "epoch"),
    }
    naive_fraction = args.naive_fraction if args.naive_fraction is not None else min(0.1, args.epoch_fraction)
    timeout = None if not args.isolate else max(args.timeout, 3600.0)
    log(f"epoch/cached {size}px fraction {args.epoch_fraction}")
    rows = run_task(
        "epoch",
        {
            **common,
            "name": "epoch/cached",
            "fraction": args.epoch_fraction,
            "cached": True,
            "precision": args.epoch_precision,
            "channels_last": args.epoch_channels_last,
        },
        args.isolate,
        timeout,
        {"name": "epoch/cached", "image_size": size},
    )
    if args.epoch_mallopt:
        log(f"epoch/cached+mallopt {size}px fraction {args.epoch_fraction}")
        rows += run_task(
            "epoch",
            {
                **common,
                "name": "epoch/cached+mallopt",
                "fraction": args.epoch_fraction,
                "cached": True,
                "precision": args.epoch_precision,
                "channels_last": args.epoch_channels_last,
                "mallopt": True,
            },
            args.isolate,
            timeout,
            {"name": "epoch/cached+mallopt", "image_size": size},
        )
    log(f"epoch/naive {size}px fraction {naive_fraction}")
    rows += run_task(
        "epoch",
        {
            **common,
            "name": "epoch/naive",
            "fraction": naive_fraction,
            "cached": False,
            "precision": "32-true",
            "channels_last": False,
        },
        args.isolate,
        timeout,
        {"name": "epoch/naive", "image_size": size},
    )
    return rows


# ------------------------------------------------------------------------------------------- reporting


def add_ratios(rows: list[Row]) -> None:
    """``vs_baseline`` (data/naive, train/fp32, epoch/naive at the same size) and ``vs_keras``."""
    base = {}
    for r in rows:
        if r["name"] in ("data/naive", "train/fp32", "epoch/naive") and r.get("images_per_s"):
            base[(r["name"].split("/")[0], r["image_size"])] = r["images_per_s"]
    for r in rows:
        ips = r.get("images_per_s")
        section = r["name"].split("/")[0]
        if not ips or r["name"].endswith("cache_build") or r["name"] == "data/cached_read":
            continue
        ref = base.get((section, r["image_size"]))
        if ref:
            r["vs_baseline"] = round(ips / ref, 2)
        keras = (KERAS_DATA if section == "data" else KERAS_TRAIN).get(r["image_size"])
        if keras and section in ("data", "train", "epoch"):
            r["vs_keras"] = round(ips / keras, 2)


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        text = f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
        return text + suffix
    return f"{value}{suffix}"


def markdown_table(rows: list[Row]) -> str:
    header = (
        "| name | px | images/s | vs baseline | vs Keras | GFLOP/s | % of GEMM peak "
        "| peak RSS MB (workers) | others' CPU | notes |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        rss = _fmt(r.get("peak_rss_mb"))
        if r.get("workers_peak_rss_mb"):
            rss += f" ({_fmt(r['workers_peak_rss_mb'])})"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    str(r["image_size"]),
                    _fmt(r.get("images_per_s")),
                    _fmt(r.get("vs_baseline"), "x"),
                    _fmt(r.get("vs_keras"), "x"),
                    _fmt(r.get("gflops")),
                    _fmt(r.get("pct_of_ceiling"), "%"),
                    rss,
                    _fmt(None if r.get("others_cpu_pct") is None else int(r["others_cpu_pct"]), "%"),
                    str(r.get("note", "")).replace("|", "/"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def machine_line(info: dict[str, Any], ceilings: dict[str, float] | None, load_after: Sequence[float]) -> str:
    text = (
        f"Machine: {info['cpu']}, {info['cores']} cores ({' '.join(info['isa'])}), torch {info['torch']}, "
        f"{info['threads']} threads, Python {info['python']}; load avg {info['load_avg'][0]} -> "
        f"{round(load_after[0], 2)}"
    )
    if ceilings:
        text += (
            f"; GEMM peak fp32 {ceilings['fp32_before']} / {ceilings['fp32_after']}, "
            f"bf16 {ceilings['bf16_before']} / {ceilings['bf16_after']} GFLOP/s (before / after)"
        )
    return text


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 224], help="image sizes (data, train)")
    p.add_argument(
        "--only", choices=["data", "train", "epoch"], help="one section (epoch is never in the default)"
    )
    p.add_argument("--json", type=Path, help="write the rows as a JSON list here")
    p.add_argument(
        "--quick",
        action="store_true",
        help="minimal settings: one batch per worker, 1+1 steps, no compile, no thread sweep",
    )
    p.add_argument("--batch-size", type=int, default=40)
    p.add_argument(
        "--num-workers", type=int, default=2, help="naive DataLoader workers and cache-build procs"
    )
    p.add_argument("--interpolation", default="bilinear", choices=["nearest", "bilinear", "bicubic"])
    p.add_argument(
        "--fullres-dir", type=Path, default=DEFAULT_FULLRES, help="folder with train/{NORMAL,PNEUMONIA}"
    )
    p.add_argument("--data-images", type=int, default=200, help="images per data pass (cycled files)")
    p.add_argument("--data-rounds", type=int, default=2, help="interleaved passes per data variant")
    p.add_argument(
        "--train-variants",
        default=",".join(TRAIN_VARIANTS),
        help=f"comma-separated subset of {','.join(TRAIN_VARIANTS)}",
    )
    p.add_argument("--warmup-large", type=int, default=1, help="warm-up steps per variant at >= 400 px")
    p.add_argument("--rounds-large", type=int, default=3, help="timed steps per variant at >= 400 px")
    p.add_argument("--warmup-small", type=int, default=2, help="warm-up steps per variant below 400 px")
    p.add_argument("--rounds-small", type=int, default=6, help="timed steps per variant below 400 px")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="stop the interleaved rounds of one size after this long (keeping >= 2 rounds)",
    )
    p.add_argument("--gemm-size", type=int, default=2048, help="n of the n x n GEMM that gives the ceiling")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile of the fastest variant (default: on unless --quick)",
    )
    p.add_argument("--compile-timeout", type=float, default=180.0)
    p.add_argument(
        "--threads-sweep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the fastest small-size variant with 1 thread (default: on unless --quick)",
    )
    p.add_argument(
        "--mallopt-rows",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure data/cached and the fastest training variant with keep_freed_memory() "
        "in their own processes (default: on unless --quick or --in-process)",
    )
    p.add_argument(
        "--epoch-root", type=Path, default=DEFAULT_EPOCH_ROOT, help="dataset root for --only epoch"
    )
    p.add_argument("--epoch-size", type=int, default=500)
    p.add_argument(
        "--epoch-fraction", type=float, default=1.0, help="fraction of the epoch for the product path"
    )
    p.add_argument(
        "--naive-fraction",
        type=float,
        default=None,
        help="fraction for the naive epoch, extrapolated (default: min(0.1, --epoch-fraction))",
    )
    p.add_argument("--epoch-precision", default="bf16-mixed", help="trainer.precision of the product epoch")
    p.add_argument("--epoch-channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--epoch-mallopt",
        action="store_true",
        help="also run the product epoch with keep_freed_memory() (epoch/cached+mallopt)",
    )
    p.add_argument("--cache-dir", type=Path, help="keep decoded caches here (default: a temporary folder)")
    p.add_argument(
        "--in-process",
        dest="isolate",
        action="store_false",
        help="run every measurement in this process (peak RSS is then the process's so far)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement subprocess")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to leave the CPUs idle",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.train_variants = [v.strip() for v in args.train_variants.split(",") if v.strip()]
    unknown = sorted(set(args.train_variants) - set(TRAIN_VARIANTS))
    if unknown:
        p.error(f"unknown --train-variants {unknown}; choose from {sorted(TRAIN_VARIANTS)}")
    if args.compile is None:
        args.compile = not args.quick
    if args.threads_sweep is None:
        args.threads_sweep = not args.quick
    if args.mallopt_rows is None:
        args.mallopt_rows = not args.quick
    if args.quick:
        args.data_images = args.batch_size * max(1, args.num_workers)
        args.data_rounds = 1
    if not 0.0 < args.epoch_fraction <= 1.0:
        p.error("--epoch-fraction must be in (0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the selected sections, print the markdown table and machine line; return the rows."""
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return []
    if args.wait_quiet > 0:
        log(f"waiting up to {args.wait_quiet:.0f} s for a quiet machine")
        log(f"others' CPU now {wait_quiet(args.wait_quiet)} %")
    info = machine_info()
    sections = [args.only] if args.only else ["data", "train"]
    tmp = None
    if args.cache_dir is None:
        tmp = tempfile.mkdtemp(prefix="xray-bench-cache-")
        cache_root = Path(tmp)
    else:
        cache_root = args.cache_dir
    rows: list[Row] = []
    ceilings = None
    t0 = time.perf_counter()
    try:
        if "data" in sections:
            rows += run_data(args, cache_root)
        if "train" in sections:
            train_rows, ceilings = run_train(args)
            rows += train_rows
        if "epoch" in sections:
            rows += run_epoch(args, cache_root)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    add_ratios(rows)
    for r in rows:
        r.setdefault("peak_rss_mb", None)
        r.setdefault("images_per_s", None)
    print(markdown_table(rows))
    print()
    print(machine_line(info, ceilings, os.getloadavg()) + f"; total {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = [{**r, "machine": info, **({"gemm_gflops": ceilings} if ceilings else {})} for r in rows]
        args.json.write_text(json.dumps(payload, indent=1))
    return rows


if __name__ == "__main__":
    main()

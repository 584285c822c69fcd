"""Process-level settings that make CPU training and prediction faster."""

from __future__ import annotations

import ctypes
import sys


def keep_freed_memory() -> bool:
    """glibc: serve large blocks from the heap instead of a fresh ``mmap`` each, and never trim it, so
    large tensors reuse pages instead of the kernel faulting in and zeroing new ones: 1.2-2x faster steps
    (benchmarks/, ``+mallopt`` rows) for holding the peak working set. False (no change) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))
    except (OSError, AttributeError):
        return False


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags as the kernel reports them; None when unknown (off Linux)."""
    try:
        with open(cpuinfo) as handle:
            line = next((row for row in handle if row.startswith("flags")), None)
    except OSError:
        return None
    return None if line is None else set(line.split(":", 1)[1].split())


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """AVX-512 BF16 or AMX-BF16: without them bf16 is emulated, and bf16-mixed training several times
    slower than fp32 (7.8x at 224 px on an AVX2-only AMD EPYC)."""
    return bool((cpu_flags(cpuinfo) or set()) & {"avx512_bf16", "amx_bf16"})


def resolve_precision(requested: str | int | None, accelerator: str = "auto") -> str:
    """``trainer.precision=auto`` -> the fastest safe setting for this machine; anything else unchanged.

    CUDA GPU: ``bf16-mixed`` where the GPU supports bf16, else ``16-mixed``. CPU: ``bf16-mixed`` only
    with native bf16 (AVX-512 BF16 / AMX), else ``32-true``. Apple MPS: ``32-true``.
    """
    if str(requested) != "auto":
        return requested  # an explicit setting wins
    import torch

    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    mps = getattr(torch.backends, "mps", None)
    if accelerator in ("auto", "gpu", "mps") and mps is not None and mps.is_available():
        return "32-true"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"

"""Process-level settings that make CPU training and prediction faster."""

from __future__ import annotations

import ctypes
import sys


def keep_freed_memory() -> bool:
    """glibc: serve large blocks from the heap instead of a fresh ``mmap`` each, and never trim it.

    By default glibc ``mmap``s every block above a threshold and unmaps it on free, so every large
    tensor (activations at 500 px, the augmentation's float batch and sampling grid) is backed by new
    pages that the kernel must fault in and zero on first touch. ``mallopt(M_MMAP_MAX, 0)`` and
    ``mallopt(M_TRIM_THRESHOLD, -1)`` keep freed blocks in the process for reuse: 1.2-2x faster
    training steps and augmentation here (benchmarks/, ``+mallopt`` rows), at the cost of holding the
    peak working set. Returns whether both calls succeeded (False off glibc; then nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))
    except (OSError, AttributeError):
        return False


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX-BF16), read from the kernel's flags.

    Without them PyTorch emulates bf16 and bf16-mixed training is several times slower than fp32
    (7.8x at 224 px on an AVX2-only AMD EPYC, measured); off Linux the answer is False.
    """
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return False
    return False


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

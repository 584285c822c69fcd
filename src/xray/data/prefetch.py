"""Feeding an accelerator: the next batch copied to the device on a side stream while this one trains.

Like timm's ``PrefetchLoader``: batches stay uint8 on the wire (4x fewer bytes than float32) and are
rescaled and augmented on the device (``XRayDataModule.on_after_batch_transfer``). On other devices it
just moves each batch there. Lightning's own transfer then finds the tensors in place and does nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor on ``device`` (tuples, lists and dicts rebuilt, the rest unchanged)."""
    return apply_to_collection(batch, torch.Tensor, torch.Tensor.to, device, non_blocking=non_blocking)


class DevicePrefetcher:
    """Iterate ``loader`` with each batch already on ``device``; on CUDA the next one is copied meanwhile."""

    def __init__(self, loader: Iterable[Any], device: torch.device | str) -> None:
        self.loader = loader
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # dataset, sampler, batch_size, ... of the wrapped DataLoader (Lightning and callers look)
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        if self.device.type != "cuda":
            for batch in self.loader:
                yield move_to_device(batch, self.device)
            return
        stream = torch.cuda.Stream(device=self.device)
        ready: list[Any] = []  # the batch copied ahead, if any
        for host_batch in self.loader:
            with torch.cuda.stream(stream):
                upcoming = move_to_device(host_batch, self.device, non_blocking=True)
            yield from ready
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(stream)  # the compute stream uses `upcoming` only after its copy
            # freed memory is not reused while the compute stream still reads it
            apply_to_collection(upcoming, torch.Tensor, torch.Tensor.record_stream, compute)
            ready = [upcoming]
        yield from ready


def wants_pinned_memory(setting: bool | str, device: torch.device | None) -> bool:
    """``data.pin_memory``: ``auto`` pins host batches exactly when they go to a CUDA device."""
    if isinstance(setting, str):
        if setting != "auto":
            raise ValueError(f"data.pin_memory must be true, false or 'auto', got {setting!r}")
        return device is not None and device.type == "cuda"
    return bool(setting)

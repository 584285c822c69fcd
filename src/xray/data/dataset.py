"""The training, validation and test Dataset: records read through the eval preset (or the decoded
cache) as ``(uint8 image (1, S, S), label, index)``, whole batches at once when nothing runs per sample."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from xray.data.cache import DecodedCache
from xray.data.records import Record
from xray.data.transforms import load_resized


class PreCollated(tuple):
    """A batch that a dataset's ``__getitems__`` already collated: (images, labels, indices)."""


def collate_batches(items: Any) -> Any:
    """DataLoader collate: pre-collated batches pass through, lists of samples are stacked."""
    if isinstance(items, PreCollated):
        return tuple(items)
    return default_collate(items)


class XRayDataset(Dataset):
    """Records read through the eval preset (read_image + resize), optionally from the decoded cache."""

    def __init__(
        self,
        records: Sequence[Record],
        image_size: int,
        interpolation: str = "bilinear",
        cache: DecodedCache | None = None,
        cache_rows: Sequence[int] | None = None,
        sample_transform: Any | None = None,
    ) -> None:
        self.records = list(records)
        self.image_size = image_size
        self.interpolation = interpolation
        self.cache = cache
        self.cache_rows = np.asarray(cache_rows if cache_rows is not None else [], dtype=np.int64)
        self.sample_transform = sample_transform
        self.labels = torch.tensor([r.label for r in self.records], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> torch.Tensor:
        """uint8 (1, S, S) for one record."""
        if self.cache is None:
            array = load_resized(self.records[index].path, self.image_size, self.interpolation)
            return torch.from_numpy(array).unsqueeze(0)
        array = np.empty((1, self.image_size, self.image_size), dtype=np.uint8)
        self.cache.read_rows(self.cache_rows[index : index + 1], array)
        return torch.from_numpy(array)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = self.image(index)
        if self.sample_transform is not None:
            image = self.sample_transform(image)
        return image, self.labels[index], index

    def __getitems__(self, indices: list[int]) -> Any:
        """From the cache, one ``preadv`` per image straight into the batch buffer, returned collated."""
        if self.cache is None or self.sample_transform is not None:
            return [self[i] for i in indices]
        block = np.empty((len(indices), 1, self.image_size, self.image_size), dtype=np.uint8)
        self.cache.read_rows(self.cache_rows[indices], block[:, 0])
        index = torch.as_tensor(indices, dtype=torch.long)
        return PreCollated((torch.from_numpy(block), self.labels[index], index))

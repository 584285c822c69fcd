"""The LightningDataModule: records -> uint8 ``(image (1,S,S), label, index)`` batches.

Rescale and training augmentation run per batch on the device in ``on_after_batch_transfer``, so a GPU
is never starved by CPU workers (``augment_on="sample"`` runs them per sample in the workers instead).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, WeightedRandomSampler

from xray.core.config_checks import ConfigError, is_int, is_num, require
from xray.core.constants import CLASSES
from xray.core.errors import UserError
from xray.data.acquisition import AcquisitionAugment
from xray.data.cache import DecodedCache, build_cache
from xray.data.dataset import XRayDataset, collate_batches
from xray.data.download import ensure_dataset
from xray.data.encoding import SourceEncoding, detect_source_encoding
from xray.data.io import probe_image
from xray.data.prefetch import DevicePrefetcher, wants_pinned_memory
from xray.data.records import Record, class_counts, patient_folds, scan_split, split_by_patient
from xray.data.transforms import (
    KERAS_SEED_AUGMENT,
    KerasRandomAffine,
    appearance_augment_batch,
    check_appearance,
    keras_augment_batch,
    rescale,
    sample_keras_params,
    train_transform,
)

log = logging.getLogger(__name__)


class BadImagesError(UserError, ValueError):
    """Unreadable files found at setup; the message lists every one with its reason."""


class XRayDataModule(LightningDataModule):
    """Kaggle/Kermany layout -> train / patient-grouped val / test loaders."""

    def __init__(
        self,
        root: str = "data/chest_xray",
        image_size: int = 500,
        batch_size: int = 40,
        num_workers: int = 2,
        interpolation: str = "bilinear",
        val_source: str = "split",
        val_fraction: float = 0.1,
        split_seed: int = 42,
        n_folds: int | None = None,
        fold: int = 0,
        train_limit_per_class: int | None = None,
        augment: dict[str, Any] | None = KERAS_SEED_AUGMENT,
        augment_on: str = "batch",
        appearance: dict[str, float] | None = None,
        acquisition: dict[str, Any] | None = None,
        balanced_sampler: bool = False,
        skip_bad_images: bool = False,
        cache: bool = True,
        cache_dir: str | None = None,
        download: bool = False,
        source: str = "kermany",
        size: int = 224,
        pin_memory: bool | str = "auto",
        prefetch: bool | str = "auto",
        record_encoding: bool = True,
    ) -> None:
        super().__init__()
        require(is_int(image_size) and image_size >= 8, "data.image_size", "an integer >= 8", image_size)
        require(is_int(batch_size) and batch_size >= 1, "data.batch_size", "an integer >= 1", batch_size)
        require(is_int(num_workers) and num_workers >= 0, "data.num_workers", "an integer >= 0", num_workers)
        require(
            is_num(val_fraction) and 0 < val_fraction < 1,
            "data.val_fraction",
            "a number in (0, 1)",
            val_fraction,
        )
        require(
            interpolation in ("nearest", "bilinear", "bicubic"),
            "data.interpolation",
            "nearest, bilinear or bicubic",
            interpolation,
        )
        require(val_source in ("split", "official"), "data.val_source", "split or official", val_source)
        require(
            train_limit_per_class is None or (is_int(train_limit_per_class) and train_limit_per_class >= 1),
            "data.train_limit_per_class",
            "null or an integer >= 1",
            train_limit_per_class,
        )
        if n_folds is not None and (n_folds < 2 or not 0 <= fold < n_folds):
            raise ConfigError(
                f"data.fold must be in [0, data.n_folds) with n_folds >= 2, got {fold} of {n_folds}"
            )
        if n_folds is not None and val_source != "split":
            raise ConfigError("data.n_folds needs data.val_source=split (folds are carved from train/)")
        require(augment_on in ("batch", "sample"), "data.augment_on", "batch or sample", augment_on)
        self.root = Path(root).expanduser()
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.interpolation = interpolation
        self.val_source = val_source
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.n_folds = None if n_folds is None else int(n_folds)
        self.fold = int(fold)
        self.train_limit_per_class = train_limit_per_class
        self.augment = dict(augment) if augment else None
        if self.augment:
            try:  # validate the Keras parameters now, before any data is read
                KerasRandomAffine(**self.augment)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"data.augment: {err}") from None
        self.augment_on = augment_on
        self.appearance = dict(appearance) if appearance else None
        if self.appearance:
            check_appearance(self.appearance)
        self.acquisition = None
        if acquisition:
            try:  # synthetic text, markers, collimation and padding on films of both classes
                self.acquisition = AcquisitionAugment(**acquisition)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"data.acquisition: {err}") from None
        self.balanced_sampler = balanced_sampler
        self.skip_bad_images = skip_bad_images
        self.cache = cache
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.root.parent / ".xray_cache"
        self.download = download
        self.source = source
        self.size = int(size)
        wants_pinned_memory(pin_memory, None)  # a bad value fails now
        require(prefetch in (True, False, "auto"), "data.prefetch", "true, false or 'auto'", prefetch)
        self.pin_memory = pin_memory
        self.prefetch = prefetch
        self.record_encoding = bool(record_encoding)
        self.source_encoding: SourceEncoding | None = None
        self.records: dict[str, list[Record]] = {}
        self.datasets: dict[str, XRayDataset] = {}
        self.bad_files: dict[str, str] = {}

    # ----- what the model and the reports need to know -------------------------------------------
    @property
    def preprocessing(self) -> dict[str, Any]:
        """Stored in every checkpoint so prediction uses exactly this preprocessing."""
        preprocessing = {
            "image_size": self.image_size,
            "interpolation": self.interpolation,
            "grayscale": True,
            "rescale": 1.0 / 255.0,
            "classes": list(CLASSES),
        }
        if self.source_encoding is not None:
            preprocessing["source_encoding"] = self.source_encoding.to_meta()
        return preprocessing

    def counts(self) -> dict[str, dict[str, int]]:
        return {split: class_counts(records) for split, records in self.records.items()}

    def train_class_counts(self) -> dict[str, int]:
        return class_counts(self.records["train"])

    # ----- setup ------------------------------------------------------------------------------------
    def check_dataset(self) -> None:
        """Fail at once, saying where we looked, when no dataset is at ``root`` (download if asked)."""
        ensure_dataset(self.root, source=self.source, size=self.size, download=self.download)

    def prepare_data(self) -> None:
        self.check_dataset()

    def setup(self, stage: str | None = None) -> None:
        if self.records:
            return
        folders = {"train": scan_split(self.root, "train")}
        if self.val_source == "official":
            folders["val"] = scan_split(self.root, "val")
        if (self.root / "test").is_dir():
            folders["test"] = scan_split(self.root, "test")
        # decode (or probe) each folder once; splits carved from it share its cache
        checked = {name: self._check_folder(name, records) for name, records in folders.items()}
        if self.val_source == "official":
            train, val = folders["train"], folders["val"]
        elif self.n_folds is not None:
            folds = patient_folds(folders["train"], self.n_folds, self.split_seed)
            train = [r for r, f in zip(folders["train"], folds, strict=True) if f != self.fold]
            val = [r for r, f in zip(folders["train"], folds, strict=True) if f == self.fold]
        else:
            train, val = split_by_patient(folders["train"], self.val_fraction, self.split_seed)
        if self.train_limit_per_class:
            train = self._limit(train, int(self.train_limit_per_class))
        self.records = {"train": train, "val": val}
        if self.record_encoding:  # the training files' own size and JPEG quality, when they share one
            self.source_encoding = detect_source_encoding(r.path for r in train)
        if "test" in folders:
            self.records["test"] = folders["test"]
        for split, records in self.records.items():
            self.records[split] = records = [r for r in records if str(r.path) not in self.bad_files]
            if not records:
                raise BadImagesError(f"No readable images left in the '{split}' split under {self.root}")
            cache, rows = checked[split if split in checked else "train"]  # val carved from train/
            sample_transform = None
            if split == "train" and self.augment and self.augment_on == "sample":
                sample_transform = train_transform(self.augment)  # affine, flips, then rescale
            self.datasets[split] = XRayDataset(
                records,
                self.image_size,
                self.interpolation,
                cache,
                [rows[str(r.path)] for r in records] if cache is not None else None,
                sample_transform,
            )

    def _limit(self, records: list[Record], per_class: int) -> list[Record]:
        rng = np.random.default_rng(self.split_seed)
        kept: list[Record] = []
        for label in range(len(CLASSES)):
            members = [r for r in records if r.label == label]
            if len(members) > per_class:
                picks = sorted(rng.choice(len(members), per_class, replace=False))
                members = [members[i] for i in picks]
            kept.extend(members)
        return kept

    def _check_folder(self, split: str, records: list[Record]) -> tuple[DecodedCache | None, dict[str, int]]:
        """Build (or reuse) the decoded cache of one folder, or probe its files; collect bad files."""
        cache = None
        if self.cache:
            cache = build_cache(
                [r.path for r in records],
                self.image_size,
                self.interpolation,
                self.cache_dir,
                self.num_workers,
            )
            bad = dict(cache.errors)
        else:
            bad = {str(r.path): reason for r in records if (reason := probe_image(r.path)) is not None}
        if bad:
            listing = "\n".join(f"  {path}: {reason}" for path, reason in sorted(bad.items()))
            if not self.skip_bad_images:
                raise BadImagesError(
                    f"{len(bad)} unreadable image file(s) in {self.root / split}:\n{listing}\n"
                    "Fix or remove them, or set data.skip_bad_images=true to leave them out."
                )
            warnings.warn(
                f"Skipping {len(bad)} unreadable image file(s) in {self.root / split}:\n{listing}",
                stacklevel=2,
            )
            self.bad_files.update(bad)
        return cache, {str(r.path): i for i, r in enumerate(records)}

    # ----- loaders ---------------------------------------------------------------------------------
    def _distributed(self) -> bool:
        return self.trainer is not None and self.trainer.world_size > 1

    def device(self) -> torch.device | None:
        """The training device of the attached trainer (None without one)."""
        strategy = getattr(self.trainer, "strategy", None) if self.trainer is not None else None
        return getattr(strategy, "root_device", None)

    def _loader(self, dataset: XRayDataset, sampler: Any) -> DataLoader:
        workers = self.num_workers
        if dataset.cache is not None and dataset.sample_transform is None:
            workers = 0  # a cached batch is one memory-mapped read: worker processes only add copies
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_batches,
            pin_memory=wants_pinned_memory(self.pin_memory, self.device()),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        generator = torch.Generator().manual_seed(self.split_seed)
        if self.balanced_sampler:
            counts = torch.bincount(dataset.labels, minlength=len(CLASSES)).clamp(min=1).double()
            weights = (1.0 / counts)[dataset.labels]
            sampler: Any = WeightedRandomSampler(weights, len(dataset), replacement=True, generator=generator)
        else:
            sampler = RandomSampler(dataset, generator=generator)
        if self._distributed():
            from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

            sampler = DistributedSamplerWrapper(sampler, shuffle=False)
        loader = self._loader(dataset, sampler)
        device = self.device()
        if device is not None and (
            self.prefetch is True or (self.prefetch == "auto" and device.type == "cuda")
        ):
            # the next uint8 batch is copied to the GPU on a side stream while this one trains
            return DevicePrefetcher(loader, device)  # type: ignore[return-value]
        return loader

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.datasets[split]
        if self._distributed():
            # no padding: every validation image is scored exactly once across processes
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler: Any = UnrepeatedDistributedSampler(dataset, shuffle=False)
        else:
            sampler = SequentialSampler(dataset)
        return self._loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            raise FileNotFoundError(f"{self.root / 'test'}: no test split in this dataset")
        return self._eval_loader("test")

    # ----- augmentation and rescale on the device ----------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels, index = batch
        images = rescale(images)  # the affine is linear, so rescaling first gives the same result
        training = self.trainer is not None and self.trainer.training
        if training and self.acquisition is not None:  # part of the film: before the geometric augmentation
            images = self.acquisition(images)
        if training and self.augment and self.augment_on == "batch":
            params = sample_keras_params(
                images.shape[0],
                images.shape[-2],
                images.shape[-1],
                device=images.device,
                **{k: v for k, v in self.augment.items() if k != "fill_mode"},
            )
            images = keras_augment_batch(images, params)
        if training and self.appearance:
            images = appearance_augment_batch(images, **self.appearance)
        return images, labels, index

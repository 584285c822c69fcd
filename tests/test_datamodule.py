"""The DataModule: batch shapes and dtypes, cache equivalence, augmentation placement, bad data."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from xray.core.config_checks import ConfigError
from xray.data.datamodule import BadImagesError, XRayDataModule
from xray.data.records import DatasetLayoutError


def make_dm(root: Path, tmp_path: Path, **kwargs) -> XRayDataModule:
    defaults = dict(
        root=str(root), image_size=32, batch_size=8, num_workers=0, cache_dir=str(tmp_path / "cache")
    )
    defaults.update(kwargs)
    dm = XRayDataModule(**defaults)
    dm.setup("fit")
    return dm


def test_batches_are_uint8_then_float_after_transfer(dataset_root: Path, tmp_path: Path) -> None:
    dm = make_dm(dataset_root, tmp_path)
    images, labels, index = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 1, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.long and set(labels.tolist()) <= {0, 1}
    assert index.shape == (8,)
    out, out_labels, _ = dm.on_after_batch_transfer((images, labels, index), 0)
    assert out.dtype == torch.float32 and out.min() >= 0.0 and out.max() <= 1.0
    torch.testing.assert_close(out, images.float() / 255)  # no trainer: evaluation path, rescale only


def test_splits_and_counts(dataset_root: Path, tmp_path: Path) -> None:
    dm = make_dm(dataset_root, tmp_path)
    assert set(dm.datasets) == {"train", "val", "test"}
    counts = dm.counts()
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 48
    assert counts["test"] == {"NORMAL": 6, "PNEUMONIA": 6}
    train_patients = {r.patient for r in dm.records["train"]}
    assert not train_patients & {r.patient for r in dm.records["val"]}
    official = make_dm(dataset_root, tmp_path, val_source="official")
    assert official.counts()["val"] == {"NORMAL": 4, "PNEUMONIA": 4}


def test_cached_equals_uncached(dataset_root: Path, tmp_path: Path) -> None:
    cached = make_dm(dataset_root, tmp_path, cache=True)
    plain = make_dm(dataset_root, tmp_path, cache=False)
    for split in ("train", "val", "test"):
        a, b = cached.datasets[split], plain.datasets[split]
        assert [r.path for r in a.records] == [r.path for r in b.records]
        batch_a, labels_a, index_a = a.__getitems__(list(range(len(a)))[::-1])
        batch_a, labels_a = (
            batch_a.flip(0),
            labels_a.flip(0),
        )  # asked in reverse order: rows come back in that order
        assert torch.equal(labels_a, a.labels) and torch.equal(index_a, torch.arange(len(a)).flip(0))
        batch_b = torch.stack([b[i][0] for i in range(len(b))])
        assert torch.equal(batch_a, batch_b)


def test_cache_is_reused_and_never_redecodes(dataset_root: Path, tmp_path: Path) -> None:
    make_dm(dataset_root, tmp_path)
    with mock.patch("xray.data.transforms.read_image", side_effect=AssertionError("decoded again")):
        dm = make_dm(dataset_root, tmp_path)
        for _ in dm.train_dataloader():
            pass


def test_cache_rebuilds_when_a_file_changes(dataset_root: Path, tmp_path: Path) -> None:
    dm = make_dm(dataset_root, tmp_path)
    victim = dm.datasets["test"].records[0].path
    from PIL import Image

    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(victim)
    dm2 = make_dm(dataset_root, tmp_path)
    index = [r.path for r in dm2.datasets["test"].records].index(victim)
    assert int(dm2.datasets["test"].image(index).min()) == 255


def test_training_batches_are_augmented_on_device(dataset_root: Path, tmp_path: Path) -> None:
    dm = make_dm(dataset_root, tmp_path)
    dm.trainer = mock.Mock(training=True, world_size=1)
    images, labels, index = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    out, _, _ = dm.on_after_batch_transfer((images, labels, index), 0)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert not torch.allclose(out, images.float() / 255)
    dm.trainer = mock.Mock(training=False, world_size=1)
    out, _, _ = dm.on_after_batch_transfer((images, labels, index), 0)
    torch.testing.assert_close(out, images.float() / 255)


def test_acquisition_cues_are_drawn_on_training_batches_only(dataset_root: Path, tmp_path: Path) -> None:
    """``data.acquisition``: synthetic cues on training batches (before the affine), never at evaluation."""
    cues = {"p_text": 1.0, "p_marker": 1.0, "p_crop": 0.0, "p_blades": 0.0, "p_pad": 0.0}
    dm = make_dm(dataset_root, tmp_path, augment=None, acquisition=cues, image_size=64)
    images, labels, index = next(iter(dm.train_dataloader()))
    dm.trainer = mock.Mock(training=True, world_size=1)
    out, _, _ = dm.on_after_batch_transfer((images, labels, index), 0)
    changed = (out - images.float() / 255).abs() > 0.05
    assert changed.flatten(1).any(1).all()  # every film got text and a marker
    assert changed.float().mean() < 0.3  # and only where they were drawn
    dm.trainer = mock.Mock(training=False, world_size=1)
    out, _, _ = dm.on_after_batch_transfer((images, labels, index), 0)
    torch.testing.assert_close(out, images.float() / 255)


def test_sample_mode_augments_in_the_dataset(dataset_root: Path, tmp_path: Path) -> None:
    dm = make_dm(dataset_root, tmp_path, augment_on="sample", augment={"rotation_range": 30.0})
    image, _, _ = dm.datasets["train"][0]
    assert image.dtype == torch.float32 and image.shape == (1, 32, 32)
    assert image.min() >= 0.0 and image.max() <= 1.0  # rescaled like the batched path


def test_balanced_sampler_balances(dataset_root: Path, tmp_path: Path) -> None:
    from tests.conftest import make_dataset

    root = make_dataset(tmp_path / "imb", {"train": 0}, size=16)
    make_dataset(tmp_path / "n", {"train": 10}, size=16)
    make_dataset(tmp_path / "p", {"train": 50}, size=16)
    for f in (tmp_path / "n" / "train" / "NORMAL").iterdir():
        f.rename(root / "train" / "NORMAL" / f.name)
    for f in (tmp_path / "p" / "train" / "PNEUMONIA").iterdir():
        f.rename(root / "train" / "PNEUMONIA" / f.name)
    dm = make_dm(root, tmp_path, val_source="split", val_fraction=0.2, balanced_sampler=True, batch_size=16)
    loader = dm.train_dataloader()
    labels = torch.cat([y for _ in range(20) for _, y, _ in loader])
    share = labels.float().mean().item()
    assert 0.4 < share < 0.6, share
    plain = make_dm(root, tmp_path, val_source="split", val_fraction=0.2)
    labels = torch.cat([y for _, y, _ in plain.train_dataloader()])
    assert labels.float().mean().item() > 0.75


def test_unreadable_files_fail_at_setup_naming_each(dataset_root: Path, tmp_path: Path) -> None:
    bad1 = dataset_root / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    bad1.write_bytes(b"")
    bad2 = dataset_root / "train" / "PNEUMONIA" / "person999_virus_1.png"
    bad2.write_text("not a png")
    for cache in (True, False):
        with pytest.raises(BadImagesError) as err:
            make_dm(dataset_root, tmp_path, cache=cache)
        assert str(bad1) in str(err.value) and str(bad2) in str(err.value)
        assert "empty" in str(err.value) and "skip_bad_images" in str(err.value)


def test_skip_bad_images_excludes_with_warning(dataset_root: Path, tmp_path: Path) -> None:
    bad = dataset_root / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    bad.write_bytes(b"\xff\xd8\xff")
    with pytest.warns(UserWarning, match="IM-9999-0001"):
        dm = make_dm(dataset_root, tmp_path, skip_bad_images=True)
    all_paths = [r.path for split in dm.records.values() for r in split]
    assert bad not in all_paths and len(all_paths) == 48 + 12


def test_missing_dataset_stops_at_once(tmp_path: Path) -> None:
    from xray.data.download import DatasetNotFoundError

    dm = XRayDataModule(root=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        dm.check_dataset()
    with pytest.raises(DatasetLayoutError):
        dm.setup("fit")


def test_bad_acquisition_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.acquisition: .*p_text"):
        XRayDataModule(root=str(tmp_path), acquisition={"p_text": 2.0})
    with pytest.raises(ConfigError, match=r"data\.acquisition: .*colour"):
        XRayDataModule(root=str(tmp_path), acquisition={"colour": 1.0})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": -5}, "image_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"augment": {"zoom_range": 1.5}}, "zoom_range"),
        ({"augment": {"fill_mode": "constant"}}, "fill_mode"),
        ({"val_source": "test"}, "val_source"),
    ],
)
def test_bad_arguments_rejected_before_reading(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        XRayDataModule(root=str(tmp_path / "nowhere"), **kwargs)


def test_download_settings_reach_the_one_download_path(tmp_path: Path) -> None:
    dm = XRayDataModule(root=str(tmp_path / "pm"), source="pneumoniamnist", size=64, download=True)
    with mock.patch("xray.data.datamodule.ensure_dataset") as ensure:
        dm.prepare_data()
    ensure.assert_called_once_with(tmp_path / "pm", source="pneumoniamnist", size=64, download=True)

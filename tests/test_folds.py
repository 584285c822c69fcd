"""Patient-grouped, stratified k-fold cross-validation: every training image validated exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REAL_DATA
from xray.data.datamodule import XRayDataModule
from xray.data.records import Record, patient_folds, scan_split


def _records() -> list[Record]:
    """300 NORMAL films of 100 patients and 700 PNEUMONIA films of patients with 1-6 films each."""
    records = [Record(Path(f"IM-{p:04d}-{i}.jpeg"), 0, f"im-{p:04d}") for p in range(100) for i in range(3)]
    sizes = [1 + (p % 6) for p in range(200)]
    records += [
        Record(Path(f"person{p}_bacteria_{i}.jpeg"), 1, f"person{p}")
        for p in range(200)
        for i in range(sizes[p])
    ]
    return records


def test_folds_are_grouped_stratified_and_cover_every_image_once() -> None:
    records = _records()
    folds = patient_folds(records, 5, seed=3)
    assert len(folds) == len(records) and set(folds) == set(range(5))
    by_patient: dict[str, set[int]] = {}
    for record, fold in zip(records, folds, strict=True):
        by_patient.setdefault(record.patient, set()).add(fold)
    assert all(len(f) == 1 for f in by_patient.values())  # a patient is in one fold only
    n_pos = sum(r.label for r in records)
    for k in range(5):
        members = [r for r, f in zip(records, folds, strict=True) if f == k]
        share = sum(r.label for r in members) / len(members)
        assert abs(share - n_pos / len(records)) < 0.02  # stratified
        assert abs(len(members) - len(records) / 5) <= 6  # balanced sizes


def test_folds_are_seeded() -> None:
    records = _records()
    assert patient_folds(records, 5, seed=1) == patient_folds(records, 5, seed=1)
    assert patient_folds(records, 5, seed=1) != patient_folds(records, 5, seed=2)


def test_bad_fold_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_folds must be at least 2"):
        patient_folds(_records(), 1)
    with pytest.raises(ValueError, match="more than the 2 patients"):
        patient_folds(_records()[:6], 5)
    with pytest.raises(ValueError, match="data.fold must be in"):
        XRayDataModule(root=str(tmp_path), n_folds=5, fold=5)
    with pytest.raises(ValueError, match="val_source=split"):
        XRayDataModule(root=str(tmp_path), n_folds=5, fold=0, val_source="official")


def test_datamodule_folds_partition_the_training_split(dataset_root: Path, tmp_path: Path) -> None:
    seen: Counter[str] = Counter()
    n_train = len(scan_split(dataset_root, "train"))
    for fold in range(3):
        dm = XRayDataModule(
            root=str(dataset_root),
            image_size=32,
            num_workers=0,
            n_folds=3,
            fold=fold,
            cache_dir=str(tmp_path),
        )
        dm.setup("fit")
        train = {str(r.path) for r in dm.records["train"]}
        val = {str(r.path) for r in dm.records["val"]}
        assert not train & val and len(train) + len(val) == n_train
        assert not {r.patient for r in dm.records["train"]} & {r.patient for r in dm.records["val"]}
        seen.update(val)
    assert len(seen) == n_train and set(seen.values()) == {1}  # every image validated exactly once


@pytest.mark.realdata
def test_real_training_split_folds() -> None:
    records = scan_split(REAL_DATA, "train")
    folds = patient_folds(records, 5, seed=42)
    sizes = Counter(folds)
    assert sum(sizes.values()) == 5216 and max(sizes.values()) - min(sizes.values()) <= 10
    patients: dict[str, set[int]] = {}
    for record, fold in zip(records, folds, strict=True):
        patients.setdefault(record.patient, set()).add(fold)
    assert all(len(f) == 1 for f in patients.values())

"""Scanning, class mapping, patient ids and the patient-grouped split."""

from __future__ import annotations

from pathlib import Path

import pytest

from xray.core.constants import CLASS_TO_INDEX, CLASSES
from xray.data.records import (
    DatasetLayoutError,
    Record,
    class_counts,
    patient_id,
    scan_split,
    split_by_patient,
)


def test_class_mapping_is_fixed() -> None:
    assert CLASSES == ("NORMAL", "PNEUMONIA")
    assert CLASS_TO_INDEX == {"NORMAL": 0, "PNEUMONIA": 1}


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "im-0115"),
        ("IM-0629-0001-0002.jpeg", "im-0629"),
        ("NORMAL2-IM-1234-0001.jpeg", "normal2-im-1234"),
        ("odd_name.png", "odd_name"),
    ],
)
def test_patient_id(name: str, patient: str) -> None:
    assert patient_id(name) == patient


def test_normal2_and_im_with_same_number_are_different_patients() -> None:
    assert patient_id("NORMAL2-IM-0115-0001.jpeg") != patient_id("IM-0115-0001.jpeg")


def test_scan_split_labels_and_counts(dataset_root: Path) -> None:
    records = scan_split(dataset_root, "train")
    assert class_counts(records) == {"NORMAL": 24, "PNEUMONIA": 24}
    for r in records:
        assert r.label == CLASS_TO_INDEX[r.path.parent.name]


def _patients(n_patients: int, per_patient: int, label: int, prefix: str) -> list[Record]:
    return [
        Record(Path(f"{prefix}{p}_{i}.jpeg"), label, f"{prefix}{p}")
        for p in range(n_patients)
        for i in range(per_patient)
    ]


def test_split_is_patient_grouped_stratified_and_seeded() -> None:
    records = _patients(40, 3, 0, "im") + _patients(100, 2, 1, "person")
    train, val = split_by_patient(records, fraction=0.1, seed=1)
    assert not {r.patient for r in train} & {r.patient for r in val}
    assert len(train) + len(val) == len(records)
    counts = class_counts(val)
    assert 12 <= counts["NORMAL"] <= 15  # ~10% of 120 images, in whole patients of 3
    assert 20 <= counts["PNEUMONIA"] <= 22
    again, _ = split_by_patient(records, fraction=0.1, seed=1)
    other, _ = split_by_patient(records, fraction=0.1, seed=2)
    assert [r.path for r in again] == [r.path for r in train]
    assert [r.path for r in other] != [r.path for r in train]


def test_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_patient([], fraction=1.5)


def test_missing_split_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="split folder 'train' not found"):
        scan_split(tmp_path, "train")


def test_missing_class_folder(dataset_root: Path) -> None:
    for f in (dataset_root / "train" / "PNEUMONIA").iterdir():
        f.unlink()
    (dataset_root / "train" / "PNEUMONIA").rmdir()
    with pytest.raises(DatasetLayoutError, match=r"PNEUMONIA: class folder 'PNEUMONIA' not found"):
        scan_split(dataset_root, "train")


def test_empty_class_folder(dataset_root: Path) -> None:
    for f in (dataset_root / "train" / "NORMAL").iterdir():
        f.unlink()
    (dataset_root / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetLayoutError, match="holds no image files"):
        scan_split(dataset_root, "train")


@pytest.mark.realdata
def test_real_split_has_no_shared_patients() -> None:
    from tests.conftest import REAL_DATA

    records = scan_split(REAL_DATA, "train")
    assert class_counts(records) == {"NORMAL": 1341, "PNEUMONIA": 3875}
    train, val = split_by_patient(records, 0.1, 42)
    assert not {r.patient for r in train} & {r.patient for r in val}
    share = len(val) / len(records)
    assert 0.09 < share < 0.11

"""Scanning the Kaggle/Kermany folder layout into records, and the patient-grouped split.

The layout is ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*``. Patient ids come from the published file
names, so that no patient's films end up on both sides of a train/validation split.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from xray.core.constants import CLASS_TO_INDEX, CLASSES, IMAGE_EXTENSIONS
from xray.core.errors import UserError


class DatasetLayoutError(UserError, FileNotFoundError):
    """The dataset folder does not have the expected layout; the message names the path."""


@dataclass(frozen=True)
class Record:
    """One image file with its label and the patient it belongs to."""

    path: Path
    label: int
    patient: str


_PATIENT_PATTERNS: tuple[re.Pattern[str], ...] = (
    # person1000_bacteria_2931.jpeg, person1000_virus_1681.jpeg -> person1000
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    # NORMAL2-IM-1234-0001.jpeg -> NORMAL2-IM-1234 ; IM-0115-0001.jpeg -> IM-0115
    re.compile(r"^((?:[A-Z0-9]+-)?IM-\d+)-", re.IGNORECASE),
)


def patient_id(path: str | Path) -> str:
    """Patient id parsed from a Kermany file name; unknown names are their own patient (their stem)."""
    name = Path(path).name
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1).lower()
    return Path(path).stem.lower()


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); other extensions and hidden files ignored."""
    return sorted(p for p in Path(folder).rglob("*") if is_image_file(p))


def scan_split(root: str | Path, split: str) -> list[Record]:
    """Records of ``root/split/{NORMAL,PNEUMONIA}``, sorted by path.

    Raises DatasetLayoutError naming the folder when the split or a class folder is missing or empty.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DatasetLayoutError(f"{split_dir}: split folder '{split}' not found")
    records: list[Record] = []
    for name in CLASSES:
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise DatasetLayoutError(f"{class_dir}: class folder '{name}' not found")
        files = find_images(class_dir)
        if not files:
            raise DatasetLayoutError(
                f"{class_dir}: class folder '{name}' holds no image files "
                f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        records.extend(Record(p, CLASS_TO_INDEX[name], patient_id(p)) for p in files)
    return records


def _patients_by_label(records: Sequence[Record]) -> tuple[dict[str, list[int]], dict[int, list[str]]]:
    """Record indices per patient, and patients (sorted) per majority label."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        groups[record.patient].append(i)
    by_label: dict[int, list[str]] = defaultdict(list)
    for patient, members in sorted(groups.items()):
        by_label[Counter(records[i].label for i in members).most_common(1)[0][0]].append(patient)
    return groups, by_label


def split_by_patient(
    records: Sequence[Record], fraction: float = 0.1, seed: int = 42
) -> tuple[list[Record], list[Record]]:
    """Stratified, patient-grouped split: (train, val). Each majority label's patients are shuffled
    (seeded) and taken into validation until that label reaches ``fraction`` of its images."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    groups, by_label = _patients_by_label(records)
    rng = random.Random(seed)
    val_patients: set[str] = set()
    for label in sorted(by_label):
        patients = by_label[label]
        rng.shuffle(patients)
        target = fraction * sum(len(groups[p]) for p in patients)
        taken = 0
        for patient in patients:
            if taken >= target:
                break
            val_patients.add(patient)
            taken += len(groups[patient])
    train = [r for r in records if r.patient not in val_patients]
    val = [r for r in records if r.patient in val_patients]
    return train, val


def patient_folds(records: Sequence[Record], n_folds: int, seed: int = 42) -> list[int]:
    """Fold number of each record: stratified by class, grouped by patient, seeded.

    Each majority label's patients are shuffled (seeded), then taken largest first and given to the
    fold holding the fewest images of that label so far.
    """
    if n_folds < 2:
        raise ValueError(f"data.n_folds must be at least 2, got {n_folds}")
    groups, by_label = _patients_by_label(records)
    if len(groups) < n_folds:
        raise ValueError(f"data.n_folds={n_folds} is more than the {len(groups)} patients in the split")
    rng = random.Random(seed)
    fold_of = [0] * len(records)
    for label in sorted(by_label):
        patients = by_label[label]
        rng.shuffle(patients)
        patients.sort(key=lambda p: -len(groups[p]))  # stable: equal sizes keep the shuffled order
        load = [0] * n_folds
        for patient in patients:
            fold = min(range(n_folds), key=lambda f: (load[f], f))
            load[fold] += len(groups[patient])
            for i in groups[patient]:
                fold_of[i] = fold
    return fold_of


def class_counts(records: Iterable[Record]) -> dict[str, int]:
    """Images per class name, every class present (zero if absent)."""
    counts = Counter(r.label for r in records)
    return {name: counts.get(i, 0) for i, name in enumerate(CLASSES)}

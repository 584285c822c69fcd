"""Names fixed across the product: the label mapping is part of the model, not of the data folder."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
"""Index = label. NORMAL=0, PNEUMONIA=1; stored in every checkpoint."""

CLASS_TO_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

SPLITS: tuple[str, ...] = ("train", "val", "test")

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
)
"""File types the scanners pick up; `read_image` decides whether a file really is readable."""

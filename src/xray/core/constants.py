"""Names fixed across the product: the label mapping is part of the model, not of the data folder."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
"""Index = label. NORMAL=0, PNEUMONIA=1; stored in every checkpoint."""

CLASS_TO_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

CHECKPOINT_KEY = "xray"
"""The section of a Lightning checkpoint that holds what prediction needs (network, preprocessing, ...)."""

DICOM_EXTENSIONS: frozenset[str] = frozenset({".dcm", ".dicom"})
RASTER_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)
IMAGE_EXTENSIONS: frozenset[str] = RASTER_EXTENSIONS | DICOM_EXTENSIONS
"""The one extension list of the project: what the folder scanners (training and prediction) pick up
and what `xray.data.io.read_image` accepts (it still decides whether a file really is readable)."""

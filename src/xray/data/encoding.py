"""The training files' own encoding, remembered by the model and given to every input it predicts on.

The shared Kermany training split is a public mirror's re-encode (224x224, JPEG quality 75), while the
test files and a user's are originals; a network trained on the re-encodes reads their missing
compression texture as evidence (a logit lower by 0.75 / 1.17, NORMAL / PNEUMONIA, on 80 films held in
both forms). Giving an input the same encoding first removes most of that (models/README.md).
Training stores :func:`detect_source_encoding` in the checkpoint; prediction applies
:func:`match_file_encoding`. ``python -m xray.encoding CKPT --from DIR`` stamps older checkpoints.
"""

from __future__ import annotations

import os
import runpy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

_IJG_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
"""The JPEG standard's (Annex K) luminance table, in natural order, which libjpeg scales by quality."""


@dataclass(frozen=True)
class SourceEncoding:
    """Pixel size and JPEG quality (IJG scale, 1-100) shared by every training file."""

    width: int
    height: int
    quality: int

    def to_meta(self) -> dict[str, int]:
        return {"width": self.width, "height": self.height, "quality": self.quality}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any] | None, where: str = "checkpoint") -> SourceEncoding | None:
        """None for checkpoints without one; a clear error for a malformed entry."""
        if meta is None:
            return None
        try:
            enc = cls(int(meta["width"]), int(meta["height"]), int(meta["quality"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{where}: source_encoding must hold integer width, height and quality, got {meta!r}"
            ) from None
        if min(enc.width, enc.height) < 1 or not 1 <= enc.quality <= 100:
            raise ValueError(
                f"{where}: source_encoding {meta!r} needs positive sizes and a quality in 1..100"
            )
        return enc


def _ijg_table(quality: int) -> list[int]:
    """libjpeg's ``jpeg_quality_scaling`` of the standard luminance table (baseline: 1..255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(max((q * scale + 50) // 100, 1), 255) for q in _IJG_LUMINANCE]


_QUALITY_BY_TABLE = {tuple(_ijg_table(q)): q for q in range(100, 0, -1)}  # ties: the lowest quality


def jpeg_quality(image: Image.Image) -> int | None:
    """The IJG quality that produced this JPEG's luminance table, None for other encoders or formats.

    Pillow versions differ in giving tables in zig-zag or natural order: both are tried.
    """
    tables = getattr(image, "quantization", None)
    if image.format != "JPEG" or not tables or 0 not in tables:
        return None
    table = list(tables[0])
    if len(table) != 64:
        return None
    natural = [0] * 64
    for k, i in enumerate(_ZIGZAG):
        natural[i] = table[k]
    return _QUALITY_BY_TABLE.get(tuple(table), _QUALITY_BY_TABLE.get(tuple(natural)))


_ZIGZAG = (
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6,
    7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31,
    39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
)  # fmt: skip
"""Position in natural (row-major) order of the k-th coefficient in zig-zag order."""


def file_encoding(path: str | os.PathLike[str]) -> SourceEncoding | None:
    try:
        with Image.open(path) as image:  # the header only: no pixel is decoded
            quality = jpeg_quality(image)
            return None if quality is None else SourceEncoding(image.width, image.height, quality)
    except Exception:  # a header probe: any file Pillow cannot open (DICOM, broken) has no such encoding
        return None


def detect_source_encoding(paths: Iterable[str | os.PathLike[str]]) -> SourceEncoding | None:
    """The encoding every one of ``paths`` shares, or None. Reads headers only (5,216 files: ~1 s)."""
    found: SourceEncoding | None = None
    for path in paths:
        enc = file_encoding(path)
        if enc is None or (found is not None and enc != found):
            return None
        found = enc
    return found


def match_encoding(image: torch.Tensor, encoding: SourceEncoding) -> torch.Tensor:
    """uint8 ``(1, H, W)`` -> the same film as the training files hold it: resized to their pixel size
    (bilinear, antialiased), JPEG-encoded at their quality and decoded, ``(1, height, width)`` uint8."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 1:
        raise ValueError(
            f"match_encoding needs a uint8 (1, H, W) image, got {image.dtype} {tuple(image.shape)}"
        )
    if (encoding.height, encoding.width) != tuple(image.shape[1:]):
        image = TF.resize(
            image, [encoding.height, encoding.width], interpolation=InterpolationMode.BILINEAR, antialias=True
        )
    data = encode_jpeg(image.contiguous(), quality=encoding.quality)
    return decode_jpeg(data, mode=ImageReadMode.GRAY)


def match_file_encoding(
    path: str | os.PathLike[str], image: torch.Tensor, encoding: SourceEncoding
) -> torch.Tensor:
    """:func:`match_encoding` of the decoded ``image`` of ``path``, unless the file already has the
    encoding (a training or validation file): then it is used as read, exactly as training saw it."""
    return image if file_encoding(path) == encoding else match_encoding(image, encoding)


if __name__ == "__main__":  # the former name of ``python -m xray.encoding``, kept working
    runpy.run_module("xray.encoding", run_name="__main__", alter_sys=True)

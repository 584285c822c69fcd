"""Writers of odd and broken image files for tests (plain functions, not fixtures).

Other test modules reuse them (``from tests.odd_files import make_odd_files``; tests/ is a package); everything is synthetic
and small. ``make_odd_files(dir)`` writes one file per failure case and ``ODD_REASONS`` gives, for
each, a substring that ``xray.data.io``'s error reason contains.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

_PYDICOM3 = int(pydicom.__version__.split(".")[0]) >= 3

# Substring of the ImageReadError reason (and of probe_image's answer, where probe catches it) for
# each file of make_odd_files.
ODD_REASONS: dict[str, str] = {
    "zero_byte": "empty file (0 bytes)",
    "truncated_jpeg": "truncated or corrupt JPEG",
    "text_as_png": "not an image (cannot identify image file)",
    "bomb_png": "possible decompression bomb",
    "dicom_no_pixels": "DICOM file has no pixel data",
    "unsupported_ext": "unsupported file type '.xyz'",
    "directory": "is a directory",
    "missing": "file not found",
}
# The ones probe_image cannot see without decoding (read_image still rejects them).
PROBE_MISSES: frozenset[str] = frozenset({"truncated_jpeg"})


def noise_image(height: int = 64, width: int = 64, channels: int = 0, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 array, (H, W) or (H, W, C)."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 0 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def gradient_image(height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth uint8 (H, W) array (compresses well and survives JPEG roughly)."""
    y, x = np.mgrid[0:height, 0:width]
    return ((x * 3 + y * 2) % 256).astype(np.uint8)


def write_zero_byte(path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_text_as_png(path: str | Path) -> Path:
    path = Path(path)
    path.write_text("this is not an image, just some text pretending to be one\n" * 4)
    return path


def jpeg_bytes(pixels: np.ndarray | None = None, quality: int = 90) -> bytes:
    arr = noise_image() if pixels is None else pixels
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_truncated_jpeg(path: str | Path) -> Path:
    """The first half of a valid 64x64 noise JPEG: its header opens, its pixels fail to decode."""
    path = Path(path)
    data = jpeg_bytes(noise_image(64, 64))
    path.write_bytes(data[: len(data) // 2])
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def write_png_header_only(path: str | Path, width: int = 20000, height: int = 20000) -> Path:
    """A tiny PNG whose header declares width x height 8-bit gray pixels (a decompression bomb
    above PIL's limit by default: 4e8 > 2 * 89478485) but holds almost no pixel data. Readers that
    check the size from the header reject it without allocating anything."""
    path = Path(path)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))  # one row only
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(data)
    return path


def write_png(path: str | Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    """A PNG file (whatever the name's extension)."""
    path = Path(path)
    img = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels, mode)
    img.save(path, "PNG")
    return path


def write_png16(path: str | Path, pixels8: np.ndarray) -> Path:
    """A 16-bit grayscale PNG holding ``pixels8 * 257`` (the full-range 16-bit version of 8-bit data)."""
    path = Path(path)
    Image.fromarray(pixels8.astype(np.uint16) * 257).save(path)
    return path


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    monochrome1: bool = False,
    with_pixels: bool = True,
    *,
    slope: float | None = None,
    intercept: float | None = None,
    rgb: bool = False,
    preamble: bool = True,
) -> Path:
    """An uncompressed (Explicit VR Little Endian) DICOM file.

    ``pixels``: (H, W) uint8/uint16, or (F, H, W) for a multi-frame file, or (H, W, 3) uint8 with
    ``rgb=True``. ``slope``/``intercept`` set RescaleSlope/RescaleIntercept. ``with_pixels=False``
    leaves PixelData out (the header still describes the image). ``preamble=False`` writes a bare
    dataset without the 128-byte preamble, 'DICM' marker and file meta (old-style files).
    """
    path = Path(path)
    pixels = np.asarray(pixels)
    if rgb:
        if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
            raise ValueError("rgb=True needs a (H, W, 3) uint8 array")
        frames, (rows, cols) = 1, pixels.shape[:2]
    elif pixels.ndim == 3:
        frames, rows, cols = pixels.shape
    else:
        frames, (rows, cols) = 1, pixels.shape
    bits = 8 if pixels.dtype == np.uint8 else 16
    data = pixels.astype(np.uint8 if bits == 8 else "<u2")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "TEST"
    ds.Rows, ds.Columns = int(rows), int(cols)
    if frames > 1:
        ds.NumberOfFrames = int(frames)
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if slope is not None or intercept is not None:
        ds.RescaleType = "US"
    if with_pixels:
        ds.PixelData = data.tobytes()
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"

    if preamble:
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128
        if _PYDICOM3:
            ds.save_as(path, enforce_file_format=True)
        else:  # pragma: no cover - pydicom 2.x
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(path, write_like_original=False)
    else:
        if _PYDICOM3:
            ds.save_as(path, implicit_vr=False, little_endian=True)
        else:  # pragma: no cover - pydicom 2.x
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(path, write_like_original=True)
    return path


def write_compressed_dicom(path: str | Path, transfer_syntax: str, rows: int = 8, cols: int = 8) -> Path:
    """A DICOM file declaring a compressed transfer syntax, with one junk encapsulated frame.

    Use a transfer syntax whose decoder is not installed (e.g. JPEG-LS) to test the "needs a
    decoder" error; the frame is not valid compressed data either way.
    """
    from pydicom.encaps import encapsulate

    path = Path(path)
    write_dicom(path, np.zeros((rows, cols), np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7junk-frame\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if _PYDICOM3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.save_as(path, write_like_original=False)
    return path


def make_odd_files(directory: str | Path) -> dict[str, Path]:
    """One broken file per failure case, keyed like ``ODD_REASONS``.

    ``"missing"`` is a path that does not exist and ``"directory"`` a directory named like an image.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "directory.png").mkdir(exist_ok=True)
    files = {
        "zero_byte": write_zero_byte(d / "zero_byte.png"),
        "truncated_jpeg": write_truncated_jpeg(d / "truncated.jpg"),
        "text_as_png": write_text_as_png(d / "text_as.png"),
        "bomb_png": write_png_header_only(d / "bomb.png"),
        "dicom_no_pixels": write_dicom(d / "no_pixels.dcm", np.zeros((8, 8), np.uint16), with_pixels=False),
        "unsupported_ext": write_png(d / "image.xyz", gradient_image()),
        "directory": d / "directory.png",
        "missing": d / "missing.png",
    }
    return files


def make_valid_files(directory: str | Path) -> dict[str, Path]:
    """A few small readable files (gray PNG/JPEG, RGB PNG, 16-bit PNG, WebP, GIF, DICOM) keyed by name."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    gray = gradient_image()
    Image.fromarray(gray).save(d / "gray.webp", "WEBP", lossless=True)
    Image.fromarray(gray).save(d / "gray.gif", "GIF")
    return {
        "webp": d / "gray.webp",
        "gif": d / "gray.gif",
        "gray_png": write_png(d / "gray.png", gray),
        "gray_jpeg": _write_bytes(d / "gray.jpg", jpeg_bytes(gray)),
        "rgb_png": write_png(d / "rgb.png", noise_image(48, 64, 3)),
        "png16": write_png16(d / "gray16.png", gray),
        "dicom": write_dicom(d / "gray.dcm", gray.astype(np.uint16) * 16),
    }


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path

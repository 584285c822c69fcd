"""The one image reader of the product: training, the decoded cache and prediction all read through
:func:`read_image`, so a file is never decoded one way for training and another for prediction.

The result is a contiguous ``torch.uint8`` tensor ``(1, H, W)``. Raster files are read with Pillow as
Keras's ``load_img(color_mode="grayscale")`` does: the content picks the decoder, among JPEG/MPO, PNG,
BMP/DIB, TIFF, WebP and GIF only; EXIF orientation is applied (a broken EXIF block is ignored); colour
and other 8-bit modes go through ``Image.convert("L")`` (ITU-R 601-2 luma, alpha DROPPED, not
composited); 16-bit data (and mode ``I`` within 0..65535) is scaled by the full range,
``round(v * 255 / 65535)``, so a 16-bit export of an 8-bit image reads back exactly; float and other
integer images are min/max scaled (a constant image gives 0; NaN/inf is an error). Multi-frame files
give their first frame. DICOM (.dcm/.dicom or ``DICM`` at offset 128, via pydicom): first frame, the
Modality LUT then the VOI LUT/window, min/max scaled, inverted for ``MONOCHROME1``; colour gives the
same luma as raster images; compressed syntaxes need pydicom's optional decoders.

Every failure is an :class:`ImageReadError` (a ``ValueError``) ``"<path>: <reason>"``, including
decompression bombs (over ``PIL.Image.MAX_IMAGE_PIXELS``, checked from the header); no raw Pillow or
pydicom exception escapes. Truncated files fail here: ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` must stay
False (a ``RuntimeError`` otherwise). :func:`probe_image` is a cheap header-level check;
:func:`read_image` is the authority. :func:`read_image_bytes` reads a file held in memory (a server's
upload) through the same steps.
"""

from __future__ import annotations

import importlib
import io
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from xray.core.constants import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, RASTER_EXTENSIONS

try:  # pydicom >= 3
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
    from pydicom.pixels import get_decoder as _get_decoder

    _PYDICOM3 = True
except ImportError:  # pragma: no cover - pydicom 2.x
    from pydicom.pixel_data_handlers.util import (  # type: ignore[no-redef]
        apply_color_lut,
        apply_modality_lut,
        apply_voi_lut,
    )

    _get_decoder = None
    _PYDICOM3 = False

for _plugin in ("Bmp", "Gif", "Jpeg", "Png", "Tiff", "WebP"):  # so that Image.open(formats=...) knows them
    importlib.import_module(f"PIL.{_plugin}ImagePlugin")

SUPPORTED_EXTENSIONS: frozenset[str] = IMAGE_EXTENSIONS  # files with a DICOM preamble are read too

# The only Pillow decoders ever tried: never EPS (Ghostscript) or other exotic plugins.
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "TIFF", "WEBP", "GIF")  # JPEG covers MPO (multi-picture JPEG)

_DICOM_DECODER_HINT = (
    "install a decoder, e.g. `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` "
    "or `pip install python-gdcm`"
)
_MAX_REASON_CHARS = 300


class ImageReadError(ValueError):
    """An image file that cannot be read; ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across worker processes despite the two-argument __init__
        return (type(self), (self.path, self.reason))


class _Reason(Exception):
    """Internal: a failure whose reason is known; turned into ImageReadError with the path."""


@dataclass(frozen=True)
class ImageInfo:
    """The decoded (EXIF-oriented) size, frame count and format (Pillow's name or ``DICOM``) of a file,
    so that prediction can warn about odd inputs."""

    width: int
    height: int
    frames: int = 1
    format: str = ""


def read_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """One image file as a contiguous ``torch.uint8`` ``(1, H, W)``; :class:`ImageReadError` if unreadable."""
    return read_image_info(path)[0]


def read_image_info(path: str | os.PathLike[str]) -> tuple[torch.Tensor, ImageInfo]:
    """:func:`read_image` plus the file's :class:`ImageInfo` (size, frame count), from the same decode."""
    p = Path(os.fspath(path))
    return _read(p, p)


def read_image_bytes(data: bytes, name: str) -> tuple[torch.Tensor, ImageInfo]:
    """:func:`read_image_info` of a file held in memory (an upload): the same checks, decoders and
    reasons, and nothing written to disk. ``name`` stands in for the path: its extension picks DICOM as
    a path's would, and an :class:`ImageReadError` reads ``"<name>: <reason>"``."""
    return _read(Path(name), bytes(data))


def _read(p: Path, source: Path | bytes) -> tuple[torch.Tensor, ImageInfo]:
    """Decode ``source`` (the file ``p`` or, as bytes, its content) into the uint8 film and its info."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated images would be read "
            "silently; xray.data.io.read_image refuses to run. Do not set it."
        )
    try:
        header = _check_file(p) if isinstance(source, Path) else _check_bytes(source)
        if _is_dicom(p, header):
            arr, frames, fmt = _read_dicom(source, has_preamble=header[128:132] == b"DICM")
        else:
            arr, frames, fmt = _read_raster(source)
    except _Reason as err:
        raise ImageReadError(p, str(err)) from err.__cause__
    except (ImageReadError, *_FATAL):
        raise
    except Exception as err:  # a decoder failure that the steps below did not anticipate
        raise ImageReadError(p, f"cannot read image: {_short(err)}") from err
    if arr.ndim != 2 or arr.dtype != np.uint8 or 0 in arr.shape:  # pragma: no cover - internal check
        raise ImageReadError(p, f"decoded to an unexpected array {arr.dtype}{arr.shape}")
    info = ImageInfo(
        width=int(arr.shape[1]), height=int(arr.shape[0]), frames=max(int(frames), 1), format=fmt
    )
    return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0).contiguous(), info


def probe_image(path: str | os.PathLike[str]) -> str | None:
    """Cheap header-level check of one file: ``None`` when it looks readable, else the reason.

    ``Image.verify()`` checks e.g. PNG chunk CRCs, DICOM its pixel data and decoder, but no pixel is
    decoded, so a truncated JPEG passes here and fails in :func:`read_image`.
    """
    p = Path(os.fspath(path))
    try:
        header = _check_file(p)
        if _is_dicom(p, header):
            ds = _dcmread(p, has_preamble=header[128:132] == b"DICM", lazy=True)
            _check_dicom_dataset(ds)
        else:
            with open(p, "rb") as fh, _open_pil(fh) as img:
                img.verify()
    except _Reason as err:
        return str(err)
    except _FATAL:
        raise
    except ImageReadError as err:
        return err.reason
    except Exception as err:
        return f"cannot read image: {_short(err)}"
    return None


# --------------------------------------------------------------------------------------------- files


def _check_file(p: Path) -> bytes:
    """Existence, type and size checks; returns the first 132 bytes (DICOM preamble + magic)."""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise _Reason("file not found") from None
    except OSError as err:
        raise _Reason(f"cannot access file: {err.strerror or err}") from None
    if p.is_dir():
        raise _Reason("is a directory, not an image file")
    if st.st_size == 0:
        raise _Reason("empty file (0 bytes)")
    try:
        with open(p, "rb") as fh:
            return fh.read(132)
    except OSError as err:
        raise _Reason(f"cannot read file: {err.strerror or err}") from None


def _check_bytes(data: bytes) -> bytes:
    """:func:`_check_file` for a file held in memory: the first 132 bytes, or why there are none."""
    if not data:
        raise _Reason("empty file (0 bytes)")
    return data[:132]


@contextmanager
def _binary(source: Path | bytes) -> Iterator[BinaryIO]:
    """The file opened for reading, or the bytes of one held in memory."""
    if isinstance(source, Path):
        with open(source, "rb") as fh:
            yield fh
    else:
        yield io.BytesIO(source)


def _is_dicom(p: Path, header: bytes) -> bool:
    ext = p.suffix.lower()
    if header[128:132] == b"DICM" or ext in DICOM_EXTENSIONS:
        return True
    if ext not in RASTER_EXTENSIONS:
        kind = f"'{p.suffix}'" if p.suffix else "(no extension)"
        raise _Reason(f"unsupported file type {kind}; supported: {', '.join(sorted(SUPPORTED_EXTENSIONS))}")
    return False


_FATAL = (MemoryError, RecursionError)
"""Never turned into "bad file": out of memory or a runaway recursion is the process's problem."""


@contextmanager
def _reason_for(message: str) -> Iterator[None]:
    """A decoder failure nothing below anticipated -> ``_Reason("<message>: <detail>")``; our own
    errors and :data:`_FATAL` pass through unchanged."""
    try:
        yield
    except (_Reason, ImageReadError, *_FATAL):
        raise
    except Exception as err:
        raise _Reason(f"{message}: {_short(err)}") from err


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text


def _check_pixel_count(width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    pixels = int(width) * int(height)
    if limit is not None and pixels > limit:
        raise _Reason(_too_large(pixels, limit))


def _too_large(pixels: int | str, limit: int | None) -> str:
    return f"image too large: {pixels} pixels exceeds the limit of {limit} (possible decompression bomb)"


# -------------------------------------------------------------------------------------------- raster


@contextmanager
def _open_pil(fh: BinaryIO) -> Iterator[Image.Image]:
    """``Image.open`` restricted to the supported formats, with the decompression-bomb check.

    Pillow warns (``DecompressionBombWarning``) between 1x and 2x ``MAX_IMAGE_PIXELS`` and raises
    above 2x; both become the same "image too large" reason, from the header, before decoding.
    """
    with _reason_for("cannot open image"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(fh, formats=_PIL_FORMATS)
        except UnidentifiedImageError:
            raise _Reason("not an image (cannot identify image file)") from None
        except Image.DecompressionBombError as err:
            found = re.search(r"\((\d+) pixels\)", str(err))
            raise _Reason(
                _too_large(found.group(1) if found else "too many", Image.MAX_IMAGE_PIXELS)
            ) from None
    try:
        _check_pixel_count(*img.size)
        if 0 in img.size:
            raise _Reason(f"image has no pixels (size {img.size[0]}x{img.size[1]})")
        yield img
    finally:
        img.close()


def _frame_count(img: Image.Image) -> int:
    """Frames or pages of a file; an MPO's extra pictures (previews, depth maps) are not frames."""
    if img.format == "MPO":
        return 1
    try:
        return int(getattr(img, "n_frames", 1) or 1)
    except _FATAL:
        raise
    except Exception:  # a broken frame index: at least the first frame decoded
        return 1


def _read_raster(source: Path | bytes) -> tuple[np.ndarray, int, str]:
    with _binary(source) as fh, _open_pil(fh) as img:
        fmt = img.format or "image"
        with _reason_for(f"truncated or corrupt {fmt}"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    img.load()
            except Image.DecompressionBombError:
                raise _Reason(_too_large(f"{img.size[0] * img.size[1]}", Image.MAX_IMAGE_PIXELS)) from None
        try:
            oriented = ImageOps.exif_transpose(img)
        except _FATAL:
            raise
        except Exception:  # a broken EXIF block: use the image as stored
            oriented = img
        with _reason_for(f"cannot convert {fmt} image (mode {img.mode}) to grayscale"):
            return _to_gray_uint8(oriented), _frame_count(img), fmt


def _to_gray_uint8(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "L":
        return np.array(img, dtype=np.uint8)
    if mode == "F":
        return _minmax_uint8(np.asarray(img, dtype=np.float64), what="float image")
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I;16S, I
        values = np.asarray(img).astype(np.int64)
        if values.size and values.min() >= 0 and values.max() <= 65535:  # full 16-bit range, not min/max:
            return ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535), never a tie
        return _minmax_uint8(values.astype(np.float64), what="integer image")
    # RGB, RGBA, LA, P, PA, CMYK, YCbCr, 1, ...: Pillow's ITU-R 601-2 luma (alpha ignored).
    try:
        gray = img.convert("L")
    except ValueError:  # no direct conversion to L for this mode
        gray = img.convert("RGB").convert("L")
    return np.array(gray, dtype=np.uint8)


def _minmax_uint8(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise _Reason(f"{what} contains NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) * 255.0 / (hi - lo)).clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- DICOM


def _dcmread(source: Path | bytes, has_preamble: bool, lazy: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    kwargs = {"defer_size": "64 KB"} if lazy else {}
    with _reason_for("corrupt DICOM file"):
        try:
            return pydicom.dcmread(_dicom_source(source), force=False, **kwargs)
        except InvalidDicomError:
            if has_preamble:
                raise
    # A .dcm/.dicom file without the 128-byte preamble and 'DICM' marker: old files are written
    # like that; read it forced, but anything without pixel data is reported as "not DICOM".
    with _reason_for("not a DICOM file"):
        ds = pydicom.dcmread(_dicom_source(source), force=True, **kwargs)
        if "PixelData" not in ds:
            raise ValueError("no 'DICM' marker and no pixel data")
    if "TransferSyntaxUID" not in ds.file_meta:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit = ds.original_encoding[0] if _PYDICOM3 else ds.is_implicit_VR
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _check_dicom_dataset(ds) -> None:
    """Pixel data present, size within the limit, a decoder available for the transfer syntax."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _Reason("DICOM file has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise _Reason("corrupt DICOM file: missing or invalid Rows/Columns") from None
    if rows <= 0 or cols <= 0:
        raise _Reason(f"DICOM image has no pixels (Rows={rows}, Columns={cols})")
    _check_pixel_count(cols, rows)
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is not None and ts.is_compressed and _get_decoder is not None:
        try:
            decoder = _get_decoder(ts)
            available = decoder.is_available
        except NotImplementedError:
            raise _Reason(f"unsupported DICOM transfer syntax '{ts.name}' ({ts})") from None
        if not available:
            raise _Reason(
                f"compressed DICOM transfer syntax '{ts.name}' ({ts}) needs a pixel-data decoder "
                f"that is not installed: {_DICOM_DECODER_HINT}"
            )


def _dicom_source(source: Path | bytes) -> Path | BinaryIO:
    """What pydicom reads: the path, or a fresh in-memory file for each attempt."""
    return source if isinstance(source, Path) else io.BytesIO(source)


def _read_dicom(source: Path | bytes, has_preamble: bool) -> tuple[np.ndarray, int, str]:
    ds = _dcmread(source, has_preamble, lazy=False)
    _check_dicom_dataset(ds)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    ts = ds.file_meta.get("TransferSyntaxUID")
    try:
        if _PYDICOM3:
            ds.pixel_array_options(index=0)  # decode the first frame only
            arr = ds.pixel_array
        else:  # pragma: no cover - pydicom 2.x
            arr = ds.pixel_array
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                arr = arr[0]
    except _FATAL:
        raise
    except Exception as err:
        if ts is not None and ts.is_compressed:
            hint = "" if _get_decoder is not None else f"; if no decoder is installed, {_DICOM_DECODER_HINT}"
            raise _Reason(
                f"cannot decode compressed DICOM transfer syntax '{ts.name}' ({ts}): {_short(err)}{hint}"
            ) from err
        raise _Reason(f"corrupt DICOM pixel data: {_short(err)}") from err

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    with _reason_for(f"cannot apply the DICOM LUTs ({photometric})"):
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        if arr.ndim == 3:  # colour: (rows, cols, 3)
            if not _PYDICOM3 and photometric.startswith("YBR"):  # pragma: no cover - pydicom 2.x
                from pydicom.pixel_data_handlers.util import convert_color_space

                arr = convert_color_space(arr, photometric, "RGB")
            rgb = arr if arr.dtype == np.uint8 else _minmax_uint8(arr, what="DICOM image")
            gray = Image.fromarray(np.ascontiguousarray(rgb[..., :3]), "RGB").convert("L")
            return np.array(gray), frames, "DICOM"
        values = apply_modality_lut(arr, ds)
        values = apply_voi_lut(values, ds, index=0)
    out = _minmax_uint8(values, what="DICOM image")
    if photometric == "MONOCHROME1":  # 0 is white: invert so that bright = dense, as MONOCHROME2
        out = 255 - out
    return out, frames, "DICOM"

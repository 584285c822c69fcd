"""xray.data.io: the one image reader (all files synthetic, written under tmp_path)."""

from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from tests.odd_files import (
    ODD_REASONS,
    PROBE_MISSES,
    gradient_image,
    jpeg_bytes,
    make_odd_files,
    make_valid_files,
    noise_image,
    write_compressed_dicom,
    write_dicom,
    write_png,
    write_png16,
    write_png_header_only,
    write_text_as_png,
    write_truncated_jpeg,
    write_zero_byte,
)
from xray.core.constants import IMAGE_EXTENSIONS
from xray.data import io as xio
from xray.data.io import SUPPORTED_EXTENSIONS, ImageReadError, probe_image, read_image, read_image_info


def _read(path) -> np.ndarray:
    """read_image plus the invariants every result must satisfy; returns the (H, W) array."""
    t = read_image(path)
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.uint8
    assert t.ndim == 3 and t.shape[0] == 1
    assert t.is_contiguous()
    return t[0].numpy()


def _mode(path) -> str:
    with Image.open(path) as img:
        return img.mode


def _pil_array(path, exif: bool = False) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(ImageOps.exif_transpose(img) if exif else img)


def _luma(arr: np.ndarray, mode: str | None = None) -> np.ndarray:
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode)
    return np.array(img.convert("L"))


def _expect_error(path, *fragments: str) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message
    assert info.value.path == str(path)
    return info.value


# ------------------------------------------------------------------------------------------ the API


def test_supported_extensions():
    expected = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm", ".dicom"}
    assert expected == SUPPORTED_EXTENSIONS
    assert SUPPORTED_EXTENSIONS is IMAGE_EXTENSIONS  # one list for the whole project
    assert isinstance(SUPPORTED_EXTENSIONS, frozenset)
    assert all(e == e.lower() for e in SUPPORTED_EXTENSIONS)


def test_image_read_error_fields_str_and_pickle(tmp_path):
    err = ImageReadError(tmp_path / "a.png", "empty file (0 bytes)")
    assert isinstance(err, ValueError)
    assert err.path == str(tmp_path / "a.png")
    assert err.reason == "empty file (0 bytes)"
    assert str(err) == f"{tmp_path / 'a.png'}: empty file (0 bytes)"
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.path, back.reason, str(back)) == (ImageReadError, err.path, err.reason, str(err))


def test_str_and_pathlike_paths(tmp_path):
    gray = gradient_image()
    p = write_png(tmp_path / "g.png", gray)
    np.testing.assert_array_equal(_read(p), gray)
    np.testing.assert_array_equal(_read(str(p)), gray)


# ---------------------------------------------------------------------------------- raster formats


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff"])
def test_grayscale_lossless_formats(tmp_path, ext):
    gray = gradient_image(37, 53)
    p = tmp_path / f"g{ext}"
    Image.fromarray(gray).save(p)
    np.testing.assert_array_equal(_read(p), gray)


@pytest.mark.parametrize("ext", [".jpg", ".jpeg"])
def test_grayscale_jpeg_matches_pil_decode(tmp_path, ext):
    gray = gradient_image()
    p = tmp_path / f"g{ext}"
    p.write_bytes(jpeg_bytes(gray))
    out = _read(p)
    np.testing.assert_array_equal(out, _pil_array(p))
    assert np.abs(out.astype(int) - gray).mean() < 3  # and it is the image we wrote


def test_content_decides_decoder_not_extension(tmp_path):
    gray = gradient_image()
    p = write_png(tmp_path / "actually_png.jpg", gray)
    np.testing.assert_array_equal(_read(p), gray)


def test_uppercase_extension(tmp_path):
    gray = gradient_image()
    p = write_png(tmp_path / "UPPER.PNG", gray)
    np.testing.assert_array_equal(_read(p), gray)


def test_rgb_png_is_pil_luma(tmp_path):
    rgb = noise_image(40, 30, 3)
    p = write_png(tmp_path / "rgb.png", rgb)
    out = _read(p)
    assert out.shape == (40, 30)
    np.testing.assert_array_equal(out, _luma(rgb))
    # ITU-R 601-2: L = R*299/1000 + G*587/1000 + B*114/1000 (Pillow rounds in fixed point)
    ref = rgb.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(out - ref).max() <= 1.0


def test_rgba_png_drops_alpha(tmp_path):
    rgba = noise_image(32, 32, 4, seed=1)
    rgba[..., 3] = np.where(np.arange(32) < 16, 0, 255)[None, :]  # half fully transparent
    p = write_png(tmp_path / "rgba.png", rgba)
    np.testing.assert_array_equal(_read(p), _luma(np.ascontiguousarray(rgba[..., :3])))


def test_la_png_drops_alpha(tmp_path):
    la = noise_image(16, 16, 2, seed=2)
    p = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(p)
    assert _mode(p) == "LA"
    np.testing.assert_array_equal(_read(p), la[..., 0])


def test_palette_png(tmp_path):
    rgb = noise_image(24, 24, 3, seed=3)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p = tmp_path / "pal.png"
    pal.save(p)
    assert _mode(p) == "P"
    out = _read(p)
    np.testing.assert_array_equal(out, np.array(pal.convert("L")))
    np.testing.assert_array_equal(out, np.array(pal.convert("RGB").convert("L")))


def test_palette_png_with_transparency(tmp_path):
    pal = Image.fromarray(noise_image(16, 16, 3, seed=4)).convert(
        "P", palette=Image.Palette.ADAPTIVE, colors=8
    )
    p = tmp_path / "pal_t.png"
    pal.save(p, transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _read(p)
    np.testing.assert_array_equal(out, np.array(pal.convert("RGB").convert("L")))


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.fromarray(noise_image(32, 32, 3, seed=5)).convert("CMYK")
    p = tmp_path / "cmyk.jpg"
    cmyk.save(p, "JPEG", quality=95)
    with Image.open(p) as img:
        assert img.mode == "CMYK"
        expected = np.array(img.convert("L"))  # Keras's load_img(color_mode="grayscale")
    out = _read(p)
    assert out.shape == (32, 32)
    np.testing.assert_array_equal(out, expected)


def test_one_bit_image(tmp_path):
    bits = (noise_image(20, 20, seed=6) > 127).astype(np.uint8) * 255
    p = tmp_path / "bits.png"
    Image.fromarray(bits).convert("1").save(p)
    assert _mode(p) == "1"
    np.testing.assert_array_equal(_read(p), bits)


def test_one_by_one_image(tmp_path):
    p = write_png(tmp_path / "dot.png", np.array([[77]], dtype=np.uint8))
    out = read_image(p)
    assert out.shape == (1, 1, 1)
    assert int(out) == 77


def test_exif_orientation_applied(tmp_path):
    stored = np.zeros((32, 64), dtype=np.uint8)
    stored[:, 32:] = 255  # left half dark, right half bright
    img = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rotated.jpg"
    img.save(p, "JPEG", exif=exif.tobytes(), quality=95)
    out = _read(p)
    assert out.shape == (64, 32)
    np.testing.assert_array_equal(out, _pil_array(p, exif=True))
    # 90 degrees clockwise: the stored left (dark) half is now the top half
    assert out[:28].mean() < 20 and out[36:].mean() > 235


def test_multipage_tiff_reads_first_page(tmp_path):
    first, second = gradient_image(16, 16), noise_image(16, 16, seed=7)
    p = tmp_path / "pages.tif"
    Image.fromarray(first).save(p, save_all=True, append_images=[Image.fromarray(second)])
    np.testing.assert_array_equal(_read(p), first)


# ------------------------------------------------------------------------------- deep / float data


@pytest.mark.parametrize(
    "fmt,dtype",
    [("PNG", "<u2"), ("TIFF", "<u2"), ("TIFF", ">u2")],
    ids=["png16", "tiff16-little", "tiff16-big"],
)
def test_16bit_export_of_8bit_reads_back_exactly(tmp_path, fmt, dtype):
    gray = noise_image(24, 40, seed=8)
    gray[0, :2] = [0, 255]
    p = tmp_path / f"g16.{fmt.lower()}"
    Image.fromarray((gray.astype(np.uint16) * 257).astype(dtype)).save(p, fmt)
    assert _mode(p).startswith("I;16")
    np.testing.assert_array_equal(_read(p), gray)


def test_16bit_uses_full_range_not_minmax(tmp_path):
    values = np.array([[0, 128, 129, 1000, 4095, 65535]], dtype=np.uint16)
    p = tmp_path / "v.png"
    Image.fromarray(values).save(p)
    np.testing.assert_array_equal(_read(p), [[0, 0, 1, 4, 16, 255]])  # round(v / 257)
    # a 12-bit image stored in 16 bits stays dark: no stretching
    twelve = np.array([[0, 4095]], dtype=np.uint16)
    Image.fromarray(twelve).save(p)
    np.testing.assert_array_equal(_read(p), [[0, 16]])


def test_write_png16_helper(tmp_path):
    gray = gradient_image()
    np.testing.assert_array_equal(_read(write_png16(tmp_path / "h.png", gray)), gray)


def test_int32_tiff(tmp_path):
    p = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, 257 * 10, 65535]], dtype=np.int32)).save(p)
    assert _mode(p) == "I"
    np.testing.assert_array_equal(_read(p), [[0, 10, 255]])  # within 0..65535: the 16-bit rule
    Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32)).save(p)
    np.testing.assert_array_equal(_read(p), [[0, 128, 255]])  # outside: min/max


def test_float_tiff_minmax(tmp_path):
    values = np.linspace(-3.5, 12.25, 60, dtype=np.float32).reshape(6, 10)
    p = tmp_path / "f.tif"
    Image.fromarray(values).save(p)
    assert _mode(p) == "F"
    v = values.astype(np.float64)
    expected = np.rint((v - v.min()) * 255.0 / (v.max() - v.min())).astype(np.uint8)
    out = _read(p)
    np.testing.assert_array_equal(out, expected)
    assert out.min() == 0 and out.max() == 255


def test_float_tiff_constant_and_nan(tmp_path):
    p = tmp_path / "c.tif"
    Image.fromarray(np.full((4, 4), 7.5, dtype=np.float32)).save(p)
    np.testing.assert_array_equal(_read(p), np.zeros((4, 4), np.uint8))
    bad = np.ones((4, 4), dtype=np.float32)
    bad[1, 1] = np.nan
    Image.fromarray(bad).save(p)
    _expect_error(p, "NaN or infinite")


# -------------------------------------------------------------------------------------------- DICOM


def _minmax(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    return np.rint((v - v.min()) * 255.0 / (v.max() - v.min())).astype(np.uint8)


def test_dicom_monochrome2_with_rescale(tmp_path):
    raw = (gradient_image(20, 30).astype(np.uint16) * 16) + 3  # 12-bit-ish values in 16-bit words
    p = write_dicom(tmp_path / "m2.dcm", raw, slope=2.0, intercept=-1024.0)
    out = _read(p)
    assert out.shape == (20, 30)
    np.testing.assert_array_equal(out, _minmax(raw * 2.0 - 1024.0))
    assert out.min() == 0 and out.max() == 255


def test_dicom_monochrome1_is_inverse_of_monochrome2(tmp_path):
    raw = noise_image(16, 24, seed=9).astype(np.uint16) * 40
    m2 = _read(write_dicom(tmp_path / "m2.dcm", raw, slope=1.5, intercept=-10.0))
    m1 = _read(write_dicom(tmp_path / "m1.dcm", raw, monochrome1=True, slope=1.5, intercept=-10.0))
    np.testing.assert_array_equal(m1, 255 - m2)


def test_dicom_8bit_full_range_is_identity(tmp_path):
    gray = noise_image(16, 16, seed=10)
    gray[0, :2] = [0, 255]
    np.testing.assert_array_equal(_read(write_dicom(tmp_path / "g8.dicom", gray)), gray)


def test_dicom_voi_window_applied(tmp_path):
    raw = np.arange(0, 4096, 4, dtype=np.uint16).reshape(32, 32)
    p = write_dicom(tmp_path / "w.dcm", raw)
    import pydicom

    ds = pydicom.dcmread(p)
    ds.WindowCenter, ds.WindowWidth = 1024, 512
    ds.save_as(p)
    out = _read(p)
    assert (out[raw <= 760] == 0).all()
    assert (out[raw >= 1290] == 255).all()
    assert 0 < out[raw == 1024].item() < 255


def test_dicom_multiframe_takes_first_frame(tmp_path):
    frames = np.stack([gradient_image(12, 12), noise_image(12, 12, seed=11)]).astype(np.uint16)
    out = _read(write_dicom(tmp_path / "mf.dcm", frames))
    np.testing.assert_array_equal(out, _minmax(frames[0]))


def test_dicom_rgb_is_luma(tmp_path):
    rgb = noise_image(10, 14, 3, seed=12)
    np.testing.assert_array_equal(_read(write_dicom(tmp_path / "rgb.dcm", rgb, rgb=True)), _luma(rgb))


@pytest.mark.parametrize("name", ["scan_no_extension", "scan.png"])
def test_dicom_detected_by_preamble(tmp_path, name):
    raw = gradient_image(8, 8).astype(np.uint16)
    p = write_dicom(tmp_path / name, raw)
    assert p.read_bytes()[128:132] == b"DICM"
    np.testing.assert_array_equal(_read(p), _minmax(raw))


def test_dicom_without_preamble_by_extension(tmp_path):
    raw = gradient_image(8, 8).astype(np.uint16)
    p = write_dicom(tmp_path / "old.dcm", raw, preamble=False)
    assert p.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(_read(p), _minmax(raw))


def test_dicom_without_pixel_data(tmp_path):
    p = write_dicom(tmp_path / "nopix.dcm", np.zeros((8, 8), np.uint16), with_pixels=False)
    _expect_error(p, "DICOM file has no pixel data")
    assert probe_image(p) == "DICOM file has no pixel data"


def test_dicom_compressed_without_decoder(tmp_path):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    p = write_compressed_dicom(tmp_path / "jls.dcm", JPEGLSLossless)
    _expect_error(p, "JPEG-LS Lossless", str(JPEGLSLossless), "pip install pylibjpeg")
    assert "pip install pylibjpeg" in probe_image(p)


def test_text_named_dcm(tmp_path):
    _expect_error(write_text_as_png(tmp_path / "text.dcm"), "not a DICOM file")


def test_dicom_too_large_is_rejected_before_decoding(tmp_path, monkeypatch):
    p = write_dicom(tmp_path / "big.dcm", np.zeros((64, 64), np.uint16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _expect_error(p, "image too large: 4096 pixels exceeds the limit of 1000")


# ------------------------------------------------------------------------------------------- errors


def test_zero_byte_file(tmp_path):
    _expect_error(write_zero_byte(tmp_path / "empty.png"), "empty file (0 bytes)")


def test_truncated_jpeg_fails_at_decode(tmp_path):
    p = write_truncated_jpeg(tmp_path / "half.jpg")
    with Image.open(p) as img:  # the header is intact: only a full decode notices
        assert img.size == (64, 64)
    err = _expect_error(p, "truncated or corrupt JPEG")
    assert "truncated" in err.reason
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png(tmp_path):
    data = io.BytesIO()
    Image.fromarray(noise_image(64, 64, seed=13)).save(data, "PNG")
    p = tmp_path / "half.png"
    p.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    _expect_error(p, "truncated or corrupt PNG")


def test_text_file_named_png(tmp_path):
    _expect_error(write_text_as_png(tmp_path / "notes.png"), "not an image (cannot identify image file)")


@pytest.mark.parametrize("limit", [1000, 3000], ids=["above-2x-error", "between-1x-2x-warning"])
def test_decompression_bomb_limit(tmp_path, monkeypatch, limit):
    p = write_png(tmp_path / "bomb.png", noise_image(64, 64, seed=14))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _expect_error(p, f"image too large: 4096 pixels exceeds the limit of {limit}", "decompression bomb")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_decompression_bomb_from_header_without_allocating(tmp_path):
    p = write_png_header_only(tmp_path / "huge.png", 20000, 20000)
    assert p.stat().st_size < 1000
    _expect_error(p, "image too large: 400000000 pixels exceeds the limit of 89478485")


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.png", "file not found")


# ---------------------------------------------------------------------- WebP, GIF, EXIF, frame counts


def _oriented_pair(tmp_path, fmt: str, suffix: str, orientation: int = 6):
    """A sideways-stored film (EXIF says rotate) and the same picture stored upright."""
    upright = np.zeros((64, 32), dtype=np.uint8)
    upright[:32] = 230  # top half bright: which way up it is read is visible
    stored = np.ascontiguousarray(np.rot90(upright, k=1 if orientation == 6 else -1))
    exif = Image.Exif()
    exif[0x0112] = orientation
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    sideways = tmp_path / f"sideways{suffix}"
    Image.fromarray(stored).save(sideways, fmt, exif=exif.tobytes(), **kwargs)
    straight = tmp_path / f"upright{suffix}"
    Image.fromarray(upright).save(straight, fmt, **kwargs)
    return sideways, straight, upright


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("WEBP", ".webp"), ("TIFF", ".tif")])
@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_applied_to_png_webp_tiff(tmp_path, fmt, suffix, orientation):
    sideways, straight, upright = _oriented_pair(tmp_path, fmt, suffix, orientation)
    out, info = read_image_info(sideways)
    np.testing.assert_array_equal(out[0].numpy(), upright)
    np.testing.assert_array_equal(out[0].numpy(), _read(straight))
    assert (info.width, info.height, info.frames) == (32, 64, 1)


def test_webp_reads_like_png(tmp_path):
    rgb = noise_image(24, 40, channels=3, seed=3)
    webp = tmp_path / "film.webp"
    Image.fromarray(rgb).save(webp, "WEBP", lossless=True)
    png = write_png(tmp_path / "film.png", rgb)
    np.testing.assert_array_equal(_read(webp), _read(png))
    assert read_image_info(webp)[1].format == "WEBP"


@pytest.mark.parametrize("fmt,suffix", [("GIF", ".gif"), ("WEBP", ".webp")])
def test_animated_file_gives_first_frame_and_frame_count(tmp_path, fmt, suffix):
    frames = [Image.fromarray(np.full((20, 30), v, np.uint8)) for v in (10, 200, 90)]
    p = tmp_path / f"anim{suffix}"
    frames[0].save(
        p, fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {})
    )
    out, info = read_image_info(p)
    assert out.shape == (1, 20, 30) and int(out.max()) == int(out.min()) == 10
    assert (info.frames, info.format) == (3, fmt)


def test_gif_palette_reads_as_luma(tmp_path):
    gray = gradient_image(16, 24)
    p = tmp_path / "g.gif"
    Image.fromarray(gray).convert("P").save(p, "GIF")
    np.testing.assert_array_equal(_read(p), np.array(Image.open(p).convert("L")))


def test_single_frame_png_frame_count_and_same_pixels(tmp_path):
    p = write_png(tmp_path / "one.png", gradient_image())
    assert read_image_info(p)[1].frames == 1
    out, info = read_image_info(p)
    assert torch.equal(out, read_image(p))


def test_directory(tmp_path):
    d = tmp_path / "folder.png"
    d.mkdir()
    _expect_error(d, "is a directory")


@pytest.mark.parametrize(
    "name,shown", [("image.xyz", "'.xyz'"), ("image.jp2", "'.jp2'"), ("noext", "(no extension)")]
)
def test_unsupported_extension(tmp_path, name, shown):
    p = tmp_path / name
    Image.fromarray(gradient_image()).save(p, "PNG")
    _expect_error(p, f"unsupported file type {shown}")


@pytest.mark.parametrize("name", sorted(ODD_REASONS))
def test_make_odd_files(tmp_path, name):
    files = make_odd_files(tmp_path)
    assert set(files) == set(ODD_REASONS)
    _expect_error(files[name], ODD_REASONS[name])


def test_unexpected_decoder_exception_is_wrapped(tmp_path, monkeypatch):
    p = write_png(tmp_path / "g.png", gradient_image())

    def boom(img):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(xio, "_to_gray_uint8", boom)
    err = _expect_error(p, "decoder exploded")
    assert isinstance(err.__cause__, RuntimeError)


def test_memory_error_is_not_swallowed(tmp_path, monkeypatch):
    p = write_png(tmp_path / "g.png", gradient_image())

    def oom(img):
        raise MemoryError

    monkeypatch.setattr(xio, "_to_gray_uint8", oom)
    with pytest.raises(MemoryError):
        read_image(p)


def test_load_truncated_images_stays_false(tmp_path, monkeypatch):
    for p in make_valid_files(tmp_path).values():
        read_image(p)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        read_image(write_truncated_jpeg(tmp_path / "t.jpg"))


# -------------------------------------------------------------------------------------------- probe


def test_probe_accepts_valid_files(tmp_path):
    for name, p in make_valid_files(tmp_path).items():
        assert probe_image(p) is None, name


def test_probe_catches_header_level_problems(tmp_path):
    files = make_odd_files(tmp_path)
    for name, p in files.items():
        if name in PROBE_MISSES:
            assert probe_image(p) is None  # needs a full decode: read_image is the authority
            continue
        reason = probe_image(p)
        assert reason is not None and ODD_REASONS[name] in reason, (name, reason)


def test_probe_zero_byte_text_and_bomb(tmp_path, monkeypatch):
    assert probe_image(write_zero_byte(tmp_path / "z.png")) == "empty file (0 bytes)"
    assert probe_image(write_text_as_png(tmp_path / "t.png")) == "not an image (cannot identify image file)"
    assert "possible decompression bomb" in probe_image(write_png_header_only(tmp_path / "h.png"))
    p = write_png(tmp_path / "b.png", noise_image(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert probe_image(p) == (
        "image too large: 4096 pixels exceeds the limit of 1000 (possible decompression bomb)"
    )


def test_probe_does_not_decode(tmp_path, monkeypatch):
    p = write_png(tmp_path / "g.png", gradient_image())

    def no_load(self, *a, **k):
        raise AssertionError("probe_image decoded the pixels")

    monkeypatch.setattr(Image.Image, "load", no_load)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    assert probe_image(p) is None


def test_multiframe_dicom_frame_count(tmp_path):
    frames = np.stack([gradient_image(16, 16).astype(np.uint16) * (k + 1) for k in range(3)])
    p = write_dicom(tmp_path / "multi.dcm", frames)
    out, info = read_image_info(p)
    assert (info.frames, info.format, out.shape) == (3, "DICOM", (1, 16, 16))

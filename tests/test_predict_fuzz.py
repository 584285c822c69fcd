"""Property-based robustness of the predict path: random and mutated image bytes never crash or hang
prediction, every file gets exactly one row, and the good files beside them are still predicted."""

from __future__ import annotations

import io
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.odd_files import gradient_image, jpeg_bytes, noise_image, write_dicom
from xray.inference.checkpoints import LoadedModel
from xray.inference.predict import collect_inputs, predict_files
from xray.models import SeedCNN

IMAGE_SIZE = 16
FUZZ_SETTINGS = settings(
    deadline=timedelta(seconds=10),  # a hang or a runaway decode fails the example
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _dicom_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_dicom(Path(tmp) / "seed.dcm", gradient_image(12, 10).astype(np.uint16) * 64)
        return path.read_bytes()


# small valid files, the seeds of the mutations (name suffix, bytes)
SEEDS: dict[str, tuple[str, bytes]] = {
    "jpeg": (".jpg", jpeg_bytes(gradient_image(20, 24))),
    "png": (".png", _png_bytes(noise_image(12, 14, seed=3))),
    "png_rgb": (".png", _png_bytes(noise_image(10, 9, channels=3, seed=4))),
    "dicom": (".dcm", _dicom_bytes()),
}
GOOD_FILES: dict[str, bytes] = {
    "good_a.png": _png_bytes(gradient_image(24, 20)),
    "good_b.jpg": jpeg_bytes(noise_image(20, 20, seed=1)),
}


def _tiny_model() -> LoadedModel:
    torch.manual_seed(0)
    net = SeedCNN(image_size=IMAGE_SIZE, channels=[4], dense_units=4).eval()
    meta = {"preprocessing": {"image_size": IMAGE_SIZE, "interpolation": "bilinear"}, "threshold": 0.5}
    return LoadedModel(net=net, meta=meta, path=Path("<in memory>"))


MODEL = _tiny_model()

# one mutation: ("flip", position fraction, xor mask) | ("truncate", keep fraction) | ("insert", position, bytes)
_position = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(1, 255)),
    st.tuples(st.just("truncate"), _position),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=16)),
)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    buf = bytearray(data)
    for mutation in mutations:
        kind, where = mutation[0], mutation[1]
        pos = min(int(where * len(buf)), max(len(buf) - 1, 0))
        if kind == "flip" and buf:
            buf[pos] ^= mutation[2]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = mutation[2]
    return bytes(buf)


FUZZED_FILE = st.one_of(
    # random bytes under an image name (sometimes with a real magic number in front)
    st.tuples(
        st.sampled_from([".png", ".jpg", ".dcm", ".bmp", ".tif"]),
        st.sampled_from(
            [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"\x00" * 128 + b"DICM"]
        ),
        st.binary(max_size=300),
    ).map(lambda t: (t[0], t[1] + t[2])),
    # a small valid file with flips, truncations and insertions
    st.tuples(st.sampled_from(sorted(SEEDS)), st.lists(MUTATION, min_size=1, max_size=4)).map(
        lambda t: (SEEDS[t[0]][0], mutate(SEEDS[t[0]][1], t[1]))
    ),
)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's warning; read_image ignores bad EXIF
@settings(FUZZ_SETTINGS, max_examples=60)
@given(fuzzed=st.lists(FUZZED_FILE, min_size=1, max_size=3), batch_size=st.integers(1, 4))
def test_fuzzed_files_never_break_prediction(fuzzed: list[tuple[str, bytes]], batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in GOOD_FILES.items():
            (folder / name).write_bytes(data)
        for i, (suffix, data) in enumerate(fuzzed):
            (folder / f"fuzz_{i}{suffix}").write_bytes(data)
        paths = collect_inputs(folder)
        assert len(paths) == len(GOOD_FILES) + len(fuzzed)

        rows = predict_files(MODEL, paths, batch_size=batch_size, num_workers=0, device="cpu")

        assert [r.path for r in rows] == [str(p) for p in paths]  # exactly one row per file, in order
        for row in rows:
            if row.error is None:
                assert row.prob_pneumonia is not None and 0.0 <= row.prob_pneumonia <= 1.0
                assert row.label in ("NORMAL", "PNEUMONIA")
            else:
                assert row.error.strip() and row.prob_pneumonia is None and row.label is None
        for row in rows:
            if Path(row.path).name in GOOD_FILES:
                assert row.error is None, row.error
        empty = [r for r in rows if Path(r.path).stat().st_size == 0]
        assert all(r.error == "empty file (0 bytes)" for r in empty)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_unmutated_seeds_are_readable(name: str, tmp_path: Path) -> None:
    """The mutation seeds are valid files, so mutated ones start from real structure."""
    suffix, data = SEEDS[name]
    path = tmp_path / f"seed{suffix}"
    path.write_bytes(data)
    (row,) = predict_files(MODEL, [path], device="cpu")
    assert row.error is None and row.prob_pneumonia is not None

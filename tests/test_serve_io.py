"""``read_image_bytes``, the server's reader: an upload held in memory is read exactly as ``read_image``
reads the same file from disk, with the same reasons for the files it refuses (no serve extra needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.odd_files import ODD_REASONS, gradient_image, make_odd_files, make_valid_files, write_dicom
from xray.data.io import ImageReadError, read_image_bytes, read_image_info


def test_bytes_read_as_the_file_reads(tmp_path: Path) -> None:
    for kind, path in make_valid_files(tmp_path).items():
        image, info = read_image_info(path)
        from_bytes, info_bytes = read_image_bytes(path.read_bytes(), path.name)
        assert torch.equal(image, from_bytes), kind
        assert info == info_bytes, kind


@pytest.mark.parametrize("kind", sorted(set(ODD_REASONS) - {"directory", "missing"}))
def test_refused_bytes_give_the_files_reason(tmp_path: Path, kind: str) -> None:
    path = make_odd_files(tmp_path)[kind]
    with pytest.raises(ImageReadError) as from_file:
        read_image_info(path)
    with pytest.raises(ImageReadError) as from_bytes:
        read_image_bytes(path.read_bytes(), path.name)
    assert from_bytes.value.reason == from_file.value.reason
    assert ODD_REASONS[kind] in from_bytes.value.reason
    assert str(from_bytes.value).startswith(f"{path.name}: ")


def test_a_dicom_without_its_preamble_needs_its_name(tmp_path: Path) -> None:
    data = write_dicom(tmp_path / "old.dcm", gradient_image().astype("uint16"), preamble=False).read_bytes()
    assert read_image_bytes(data, "old.dcm")[0].shape == (1, 48, 64)
    with pytest.raises(ImageReadError, match="not an image"):
        read_image_bytes(data, "old.png")

"""The training files' encoding: detected from headers, stored, given to prediction inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms.v2 import functional as TF

from tests.conftest import REAL_DATA, REAL_FULLRES, make_dataset, synthetic_xray
from tests.test_ensemble import make_net, save_ckpt
from xray.data.datamodule import XRayDataModule
from xray.data.encoding import SourceEncoding, detect_source_encoding, jpeg_quality, match_encoding
from xray.data.io import read_image
from xray.encoding import main
from xray.inference.checkpoints import load_model
from xray.inference.paired import find_pairs, paired_shift
from xray.inference.predict import predict_files
from xray.inference.predictor import load_predictor
from xray.paired import main as paired_main


def _logit(p: float | None) -> float:
    assert p is not None
    return math.log(p) - math.log1p(-p)


def _jpeg(path: Path, size: int, quality: int, seed: int = 0, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_xray(seed % 2, size, np.random.default_rng(seed))).save(
        path, quality=quality, **kw
    )
    return path


@pytest.mark.parametrize("quality", [10, 50, 75, 90, 95, 100])
def test_jpeg_quality_is_read_back_from_the_tables(tmp_path: Path, quality: int) -> None:
    with Image.open(_jpeg(tmp_path / "a.jpeg", 32, quality)) as image:
        assert jpeg_quality(image) == quality


def test_jpeg_quality_none_for_other_formats_and_foreign_tables(tmp_path: Path) -> None:
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
    custom = _jpeg(tmp_path / "c.jpeg", 32, 75, qtables=[[3] * 64])  # no IJG quality makes a flat table of 3
    for path in (png, custom):
        with Image.open(path) as image:
            assert jpeg_quality(image) is None


def test_detect_source_encoding_needs_one_shared_size_and_quality(tmp_path: Path) -> None:
    same = [_jpeg(tmp_path / f"s{i}.jpeg", 40, 75, i) for i in range(3)]
    assert detect_source_encoding(same) == SourceEncoding(40, 40, 75)
    assert detect_source_encoding(same + [_jpeg(tmp_path / "q.jpeg", 40, 90)]) is None  # another quality
    assert detect_source_encoding(same + [_jpeg(tmp_path / "z.jpeg", 48, 75)]) is None  # another size
    png = tmp_path / "p.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(png)
    assert detect_source_encoding(same + [png]) is None
    assert detect_source_encoding(same + [tmp_path / "missing.jpeg"]) is None
    assert detect_source_encoding([]) is None


def test_source_encoding_meta_round_trip_and_errors() -> None:
    enc = SourceEncoding(224, 200, 75)
    assert SourceEncoding.from_meta(enc.to_meta()) == enc
    assert SourceEncoding.from_meta(None) is None
    with pytest.raises(ValueError, match="x.ckpt: source_encoding must hold integer"):
        SourceEncoding.from_meta({"width": 224}, "x.ckpt")
    with pytest.raises(ValueError, match="quality in 1..100"):
        SourceEncoding.from_meta({"width": 224, "height": 224, "quality": 0})


def test_match_encoding_is_resize_then_jpeg_and_idempotent_on_encoded_files(tmp_path: Path) -> None:
    big = torch.from_numpy(synthetic_xray(1, 300, np.random.default_rng(1)))[None]
    enc = SourceEncoding(64, 48, 75)
    out = match_encoding(big, enc)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (1, 48, 64)
    expected = decode_jpeg(
        encode_jpeg(TF.resize(big, [48, 64], antialias=True), quality=75), mode=ImageReadMode.GRAY
    )
    assert torch.equal(out, expected)
    # a file that already has the encoding barely changes (JPEG at one quality is nearly idempotent)
    once = read_image(_jpeg(tmp_path / "e.jpeg", 64, 75))
    square = SourceEncoding(64, 64, 75)
    assert (match_encoding(once, square).float() - once.float()).abs().mean() < 0.5
    # while an original differs from its encoded copy by much more than that
    assert (match_encoding(big, SourceEncoding(300, 300, 20)).float() - big.float()).abs().mean() > 1.0
    with pytest.raises(ValueError, match="uint8 \\(1, H, W\\)"):
        match_encoding(big.float(), enc)


def test_datamodule_records_the_training_files_encoding(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "chest_xray", {"train": 8}, size=40)  # JPEG quality 95, 40 px
    dm = XRayDataModule(root=root, image_size=32, batch_size=4, num_workers=0, cache=False, n_folds=2)
    dm.setup()
    assert dm.preprocessing["source_encoding"] == {"width": 40, "height": 40, "quality": 95}
    off = XRayDataModule(
        root=root, image_size=32, num_workers=0, cache=False, n_folds=2, record_encoding=False
    )
    off.setup()
    assert "source_encoding" not in off.preprocessing
    _jpeg(root / "train" / "NORMAL" / "IM-0999-0001.jpeg", 56, 95)  # one film of another size
    mixed = XRayDataModule(root=root, image_size=32, num_workers=0, cache=False, n_folds=2, split_seed=1)
    mixed.setup()
    if any(r.path.name == "IM-0999-0001.jpeg" for r in mixed.records["train"]):
        assert "source_encoding" not in mixed.preprocessing


def test_prediction_gives_inputs_the_recorded_encoding(tmp_path: Path) -> None:
    """The original's probability equals that of its re-encoded copy fed as a lossless PNG."""
    enc = SourceEncoding(40, 40, 30)
    ckpt = save_ckpt(tmp_path / "m.ckpt", make_net(32, 0))
    meta = torch.load(ckpt, weights_only=True)
    meta["xray"]["preprocessing"]["source_encoding"] = enc.to_meta()
    torch.save(meta, ckpt)
    original = tmp_path / "orig.png"
    Image.fromarray(synthetic_xray(1, 200, np.random.default_rng(3))).save(original)
    copy = tmp_path / "copy.png"
    Image.fromarray(match_encoding(read_image(original), enc)[0].numpy()).save(copy)
    model = load_model(ckpt)
    assert model.source_encoding == enc
    matched = [_logit(r.prob_pneumonia) for r in predict_files(model, [original, copy], ood=False)]
    assert matched[0] == pytest.approx(matched[1], abs=1e-6)
    as_read = [
        _logit(r.prob_pneumonia)
        for r in predict_files(model, [original, copy], ood=False, match_encoding=False)
    ]
    assert abs(as_read[0] - matched[0]) > 0.05  # the step changed what the network saw
    assert as_read[1] == pytest.approx(
        matched[1], abs=0.05
    )  # and barely changes a file that has the encoding


def test_stamp_command_records_and_clears(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ens"
    for k in range(2):
        save_ckpt(folder / f"fold{k}.ckpt", make_net(32, k))
    train = tmp_path / "train"
    for i in range(3):
        _jpeg(train / "NORMAL" / f"{i}.jpeg", 44, 80, i)
    assert main([str(folder), "--from", str(train)]) == 0
    assert {m.source_encoding for m in load_predictor(str(folder)).members} == {SourceEncoding(44, 44, 80)}
    assert main([str(folder / "fold0.ckpt"), "--clear"]) == 0
    assert load_model(folder / "fold0.ckpt").source_encoding is None
    assert load_model(folder / "fold1.ckpt").source_encoding == SourceEncoding(44, 44, 80)
    _jpeg(train / "PNEUMONIA" / "x.jpeg", 44, 90)
    assert main([str(folder), "--from", str(train)]) == 2
    assert "share no one JPEG size and quality" in capsys.readouterr().err


def test_paired_shift_is_zero_for_identical_pairs_and_signed_otherwise(tmp_path: Path) -> None:
    ckpt = save_ckpt(tmp_path / "m.ckpt", make_net(32, 0))
    originals, copies = tmp_path / "orig", tmp_path / "copy"
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(3):
            _jpeg(copies / name / f"{i}.jpeg", 48, 90, 10 * label + i)
            (originals / name).mkdir(parents=True, exist_ok=True)
            (originals / name / f"{i}.jpeg").write_bytes((copies / name / f"{i}.jpeg").read_bytes())
    _jpeg(originals / "NORMAL" / "unpaired.jpeg", 48, 90)
    pairs = find_pairs(originals, copies)
    assert len(pairs) == 6 and {p[2] for p in pairs} == {0, 1}
    model = load_predictor(str(ckpt))
    same = paired_shift(model, pairs)
    assert [(s.label, s.n, s.flips) for s in same] == [("NORMAL", 3, 0), ("PNEUMONIA", 3, 0)]
    assert all(abs(s.mean) < 1e-9 for s in same)
    for path, _, _ in pairs:  # the "originals" made brighter: a shift of one sign for every film
        pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        Image.fromarray(np.clip(pixels + 60, 0, 255).astype(np.uint8)).save(path, quality=90)
    moved = paired_shift(model, pairs)
    assert all(abs(s.mean) > 1e-3 for s in moved)
    for form in (str(ckpt), f"ckpt={ckpt}"):  # the command, as predict.py spells its checkpoint too
        assert paired_main([form, "--originals", str(originals), "--copies", str(copies)]) == 0
    with pytest.raises(ValueError, match="has a twin"):
        find_pairs(tmp_path / "orig", tmp_path / "nothing")


@pytest.mark.skipif(not (REAL_DATA.is_dir() and REAL_FULLRES.is_dir()), reason="needs ../shared/data")
def test_real_training_files_share_one_encoding_and_originals_do_not() -> None:
    train = sorted((REAL_DATA / "train" / "NORMAL").glob("*.jpeg"))[:200]
    assert detect_source_encoding(train) == SourceEncoding(224, 224, 75)
    originals = sorted((REAL_FULLRES / "train" / "NORMAL").glob("*.jpeg"))
    assert detect_source_encoding(originals) is None
    for path in train[:20]:  # the step is idempotent on them, so training need not apply it
        image = read_image(path)
        assert (
            match_encoding(image, SourceEncoding(224, 224, 75)).float() - image.float()
        ).abs().mean() < 0.05

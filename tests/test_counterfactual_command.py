"""``python -m xray.counterfactual``: the user's own films with and without an acquisition cue."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import make_dataset
from tests.test_ensemble import make_net, save_ckpt
from xray.counterfactual import main
from xray.data.io import read_image
from xray.inference.checkpoints import load_model
from xray.inference.counterfactual import FAMILIES, _member_inputs, calibrated_logits, counterfactual_check
from xray.inference.predict import collect_inputs, predict_files
from xray.inference.predictor import Predictor


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_dataset(tmp_path_factory.mktemp("cf"), per_class={"val": 3}, size=96)
    return root / "val"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_ckpt(tmp_path_factory.mktemp("ckpt") / "m.ckpt", make_net(32, seed=2), threshold=0.5)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def test_rows_per_family_and_class_and_the_clean_score_is_predict_py_s(films: Path, ckpt: Path) -> None:
    predictor = Predictor.from_model(load_model(ckpt))
    paths = collect_inputs(films)
    rows, failed = counterfactual_check(predictor, paths, ["collimation_tight", "burned_text"], device="cpu")
    assert not failed
    assert [(r.family, r.label, r.n) for r in rows] == [
        (family, label, 3)
        for family in ("collimation_tight", "burned_text")
        for label in ("NORMAL", "PNEUMONIA")
    ]
    for r in rows:
        assert r.abs_change >= abs(r.mean_change)
        assert abs(r.positive_with_cue - r.positive_clean) <= r.flipped <= r.n
    # the cue is really there: a tight crop of these films moves this network's logit
    assert any(r.abs_change > 1e-3 for r in rows if r.family == "collimation_tight")
    # the films as they are: the calibrated logits predict.py gives the same files
    expected = {
        r.path: _logit(r.prob_pneumonia) for r in predict_files(predictor, paths, device="cpu", ood=False)
    }
    clean = calibrated_logits(
        predictor,
        [_member_inputs(predictor, str(p), read_image(p), False) for p in paths],
        torch.device("cpu"),
        4,
    )
    for p, z in zip(paths, clean.tolist(), strict=True):
        assert z == pytest.approx(expected[str(p)], abs=1e-4)


def test_the_command_prints_the_table_and_refuses_bad_input(
    films: Path, ckpt: Path, tmp_path: Path, capsys
) -> None:
    bad = tmp_path / "in" / "NORMAL"
    bad.mkdir(parents=True)
    (bad / "a.jpeg").write_bytes((next(films.rglob("*.jpeg"))).read_bytes())
    (bad / "broken.jpeg").write_bytes(b"<html>not a film</html>")
    assert (
        main([str(ckpt), "--input", str(tmp_path / "in"), "--families", "marker_large", "--device", "cpu"])
        == 0
    )
    out = capsys.readouterr()
    assert "| marker_large | NORMAL | 1 |" in out.out
    assert "skipped" in out.err and "broken.jpeg" in out.err
    assert main([str(ckpt), "--input", str(films), "--families", "solarize"]) == 2
    assert "unknown acquisition families ['solarize']" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.ckpt"), "--input", str(films)]) == 2
    assert "error:" in capsys.readouterr().err
    assert set(FAMILIES) >= {"collimation_tight", "text_marker_crop"}

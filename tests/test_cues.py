"""Acquisition-cue statistics on synthetic films drawn in the test (no data files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from xray.evaluation.cues import (
    CUES,
    auroc,
    body_fraction,
    cue_table,
    cue_values,
    marker_area,
    summarise_cues,
    text_present,
    text_score,
    top_corner_background,
)

SIZE = 224


def _film(full_frame: bool = False, seed: int = 0) -> Image.Image:
    """A film-like image: a bright body with two darker lungs, either an ellipse on dark air that
    touches no edge, or filling the whole frame (tight collimation)."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", (SIZE, SIZE), 150 if full_frame else 8)
    draw = ImageDraw.Draw(image)
    if not full_frame:
        draw.ellipse((50, 30, 174, 214), fill=150)
    draw.ellipse((75, 60, 108, 170), fill=90)
    draw.ellipse((116, 60, 149, 170), fill=90)
    noise = rng.normal(0, 3, (SIZE, SIZE))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def _draw_r(image: Image.Image, left: int, top: int, height: int = 20, fill: int = 250) -> None:
    """A burned-in side marker: an "R" with a straight stem, a bowl and a leg, strokes 2-3 px wide."""
    draw = ImageDraw.Draw(image)
    width = height // 2 + 1
    draw.rectangle((left, top, left + 2, top + height), fill=fill)  # stem
    draw.arc((left - width // 2, top, left + width, top + height // 2), 270, 90, fill=fill, width=2)  # bowl
    draw.line((left, top, left + width // 2, top), fill=fill, width=2)
    draw.line((left, top + height // 2, left + width // 2, top + height // 2), fill=fill, width=2)
    draw.line((left + 3, top + height // 2, left + width, top + height), fill=fill, width=2)  # leg


def _batch(*images: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))[:, None]


def test_outputs_have_one_float64_value_per_film() -> None:
    films = _batch(_film(), _film(True), _film(seed=1))
    for fn in (body_fraction, top_corner_background, marker_area, text_score):
        out = fn(films)
        assert out.shape == (3,) and out.dtype == torch.float64, fn.__name__
        assert bool(torch.isfinite(out).all())
    present = text_present(films)
    assert present.shape == (3,) and present.dtype == torch.bool
    values = cue_values(films)
    assert tuple(values) == CUES
    assert torch.equal(values["marker_area"], marker_area(films))


def test_tight_collimation_fills_the_frame() -> None:
    small, full = body_fraction(_batch(_film(), _film(True)))
    ellipse_area = np.pi * 62 * 92 / SIZE**2
    assert abs(float(small) - ellipse_area) < 0.03  # the dark lungs stay body: walled in by tissue
    assert float(full) > 0.99
    corners_small, corners_full = top_corner_background(_batch(_film(), _film(True)))
    assert float(corners_small) > 0.5 and float(corners_full) == 0.0


def test_burned_in_marker_raises_marker_area() -> None:
    plain, marked = _film(), _film()
    _draw_r(marked, left=14, top=12)
    area = marker_area(_batch(plain, marked))
    assert float(area[0]) == 0.0
    assert 0.001 < float(area[1]) < 0.01  # a 20 px letter: a few tenths of a percent of the frame


def test_marker_on_the_body_counts_only_when_burned_in_brighter_than_anatomy() -> None:
    bright, dull = _film(True), _film(True)
    _draw_r(bright, left=14, top=12, fill=255)
    _draw_r(dull, left=14, top=12, fill=160)  # tissue-bright, a 10-level step on 150: no marker
    area = marker_area(_batch(bright, dull))
    assert float(area[0]) > 0.001 and float(area[1]) == 0.0


def test_bright_curves_and_blobs_are_not_markers() -> None:
    """Bone outlines and electrodes: bright, isolated and compact, but with no straight left stem."""
    film = _film()
    draw = ImageDraw.Draw(film)
    draw.ellipse((12, 12, 36, 36), outline=250, width=3)  # a humeral-head-like ring
    draw.ellipse((190, 180, 204, 196), fill=250)  # an electrode
    draw.arc((150, 5, 210, 45), 200, 320, fill=250, width=3)  # a clavicle-like arc
    assert float(marker_area(_batch(film))[0]) == 0.0


def test_burned_in_text_raises_text_score() -> None:
    plain, texted = _film(), _film()
    ImageDraw.Draw(texted).text((165, 4), "12:34:56", fill=240)
    ImageDraw.Draw(texted).text((4, 208), "KV59", fill=240)
    score = text_score(_batch(plain, texted))
    assert float(score[0]) == 0.0
    assert float(score[1]) == 2.0
    assert text_present(_batch(plain, texted)).tolist() == [False, True]


def test_text_needs_air_around_it_and_separate_marks() -> None:
    film = _film(True)  # the same text over tissue, and a solid bright strip on air
    ImageDraw.Draw(film).text((165, 4), "12:34:56", fill=240)
    on_air = _film()
    ImageDraw.Draw(on_air).rectangle((170, 6, 200, 9), fill=240)
    assert text_score(_batch(film, on_air)).tolist() == [0.0, 0.0]


def test_a_marker_letter_is_not_text() -> None:
    film = _film()
    _draw_r(film, left=14, top=12)
    assert float(text_score(_batch(film))[0]) == 0.0


def test_auroc_is_rank_based() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert auroc(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.9]), labels) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3]), labels) == 0.0
    assert auroc(torch.zeros(6), labels) == 0.5  # ties count half
    # positives 2, 3, 4 beat negatives 1, 2, 3 in 1.5 + 2.5 + 3 of the 9 pairs
    assert auroc(torch.tensor([1.0, 2.0, 3.0, 2.0, 3.0, 4.0]), labels) == pytest.approx(7 / 9)
    assert np.isnan(auroc(torch.ones(3), torch.ones(3)))
    rng = np.random.default_rng(0)
    noise, coin = torch.from_numpy(rng.normal(size=4000)), torch.from_numpy(rng.integers(0, 2, 4000))
    assert abs(auroc(noise, coin) - 0.5) < 0.03


def test_summarise_cues_per_class_stats_and_single_cue_auroc() -> None:
    rng = np.random.default_rng(1)
    labels = torch.tensor([0] * 300 + [1] * 500)
    values = {
        "separating": torch.cat([torch.rand(300), 2 + torch.rand(500)]).double(),
        "noise": torch.from_numpy(rng.normal(size=800)),
    }
    table = summarise_cues(values, labels)
    assert table["n"] == {"NORMAL": 300, "PNEUMONIA": 500}
    assert table["separating"]["auroc"] == 1.0
    assert abs(table["noise"]["auroc"] - 0.5) < 0.06
    normal, pneumonia = table["separating"]["NORMAL"], table["separating"]["PNEUMONIA"]
    assert normal["q1"] <= normal["median"] <= normal["q3"] < 1.0 < 2.0 < pneumonia["q1"]
    assert pneumonia["nonzero"] == 1.0
    with pytest.raises(ValueError, match="0 \\(NORMAL\\) or 1"):
        summarise_cues(values, torch.full((800,), 2))
    with pytest.raises(ValueError, match="values for"):
        summarise_cues({"short": torch.zeros(3)}, labels)


def test_cue_table_on_films_in_batches() -> None:
    films = [_film(), _film(seed=2), _film(True), _film(True, seed=3)]
    _draw_r(films[2], left=14, top=12, fill=255)
    _draw_r(films[3], left=14, top=12, fill=255)
    table = cue_table(_batch(*films), torch.tensor([0, 0, 1, 1]), batch_size=3)
    assert set(table) == {"n", *CUES}
    assert table["body_fraction"]["auroc"] == 1.0
    assert table["top_corner_background"]["auroc"] == 0.0  # air in the top corners: the NORMAL look
    assert table["marker_area"]["auroc"] == 1.0
    assert table["marker_area"]["NORMAL"]["nonzero"] == 0.0
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        cue_table(_batch(*films), torch.tensor([0, 1, 1]))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(2, 1, 64, 64), "must be uint8"),
        (torch.zeros(2, 64, 64, dtype=torch.uint8), "shape \\(N, 1, H, W\\)"),
        (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), "shape \\(N, 1, H, W\\)"),
        (torch.zeros(2, 1, 16, 64, dtype=torch.uint8), "at least 32 x 32"),
        (np.zeros((2, 1, 64, 64), dtype=np.uint8), "must be a torch.Tensor"),
    ],
)
def test_bad_input_is_a_value_error(images: object, message: str) -> None:
    for fn in (body_fraction, top_corner_background, marker_area, text_score, cue_values):
        with pytest.raises(ValueError, match=message):
            fn(images)  # type: ignore[arg-type]


def test_empty_and_blank_batches() -> None:
    empty = cue_values(torch.zeros(0, 1, SIZE, SIZE, dtype=torch.uint8))
    assert all(v.shape == (0,) and v.dtype == torch.float64 for v in empty.values())
    black, white = (
        torch.zeros(1, 1, 64, 64, dtype=torch.uint8),
        torch.full((1, 1, 64, 64), 255, dtype=torch.uint8),
    )
    assert float(body_fraction(black)[0]) == 0.0 and float(body_fraction(white)[0]) == 1.0
    assert float(marker_area(white)[0]) == 0.0 and float(text_score(white)[0]) == 0.0

"""The counterfactual check: the same film with and without an acquisition cue, per class."""

from __future__ import annotations

import math

import pytest
import torch

from xray.evaluation.report import render_counterfactual_table
from xray.evaluation.shifts import ACQUISITION_SHIFTS, apply_shift, counterfactual_changes


def test_changes_are_per_class_in_calibrated_units_with_flips() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    clean = torch.tensor([-2.0, -1.0, 3.0, 4.0])
    logits = {
        "clean": clean,
        "collimation_tight": clean + torch.tensor([4.0, 2.0, 0.0, -2.0]),  # NORMAL films pushed up
        "blur": clean + 10.0,  # not an acquisition-cue family: not in the check
    }
    rows = counterfactual_changes(logits, labels, threshold=0.5, temperature=2.0)
    assert set(rows) == {"collimation_tight", "mean"}
    row = rows["collimation_tight"]
    assert row["NORMAL_abs_change"] == pytest.approx(1.5)  # (4 + 2) / 2 / T
    assert row["NORMAL_mean_change"] == pytest.approx(1.5)
    assert row["PNEUMONIA_abs_change"] == pytest.approx(0.5) and row[
        "PNEUMONIA_mean_change"
    ] == pytest.approx(-0.5)
    assert row["NORMAL_flipped"] == 1.0  # both NORMAL films cross the threshold (logit 0)
    assert row["PNEUMONIA_flipped"] == 0.0
    assert rows["mean"] == row


def test_flips_follow_the_threshold() -> None:
    labels = torch.tensor([0, 0])
    logits = {"clean": torch.tensor([-1.0, -1.0]), "burned_text": torch.tensor([0.5, 2.0])}
    low = counterfactual_changes(logits, labels, threshold=0.5)["burned_text"]["NORMAL_flipped"]
    high = counterfactual_changes(logits, labels, threshold=1 / (1 + math.exp(-1.0)))["burned_text"][
        "NORMAL_flipped"
    ]
    assert (low, high) == (1.0, 0.5)
    with pytest.raises(ValueError, match="clean"):
        counterfactual_changes({"burned_text": torch.zeros(2)}, labels, 0.5)


def test_the_table_shows_each_class_and_a_dash_for_a_missing_one() -> None:
    labels = torch.tensor([0, 0])
    logits = {"clean": torch.zeros(2), "marker_large": torch.ones(2)}
    table = render_counterfactual_table(counterfactual_changes(logits, labels, 0.5), threshold=0.5)
    assert "| marker_large | 1.00 | +1.00 | 0% | – | – | – |" in table
    assert "**mean**" in table


@pytest.mark.parametrize("name", ACQUISITION_SHIFTS)
def test_every_acquisition_family_runs_in_the_suite_seeded(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(3, 1, 64, 64, generator=g) * 120 + 60).to(torch.uint8)
    a, b = apply_shift(images, name, [0, 1, 2], seed=1), apply_shift(images, name, [0, 1, 2], seed=1)
    assert a.dtype == torch.uint8 and a.shape == images.shape
    assert torch.equal(a, b) and not torch.equal(a, images)
    assert not torch.equal(a, apply_shift(images, name, [0, 1, 2], seed=2))

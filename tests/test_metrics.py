"""Tests for xray.evaluation.metrics: metrics at one point, bootstrap intervals, threshold choice."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from xray.evaluation.metrics import (
    BOOTSTRAP_METRICS,
    _bootstrap_samples,
    bootstrap_ci,
    choose_threshold,
    classification_metrics,
    count_metrics,
    evaluate,
)


def _scores(pos: list[float], neg: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.tensor(pos + neg, dtype=torch.float32)
    labels = torch.tensor([1] * len(pos) + [0] * len(neg))
    return probs, labels


def _synthetic(n: int, seed: int, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.625).long()
    probs = torch.sigmoid(torch.randn(n, generator=g) * 1.5 + (2 * labels - 1) * 1.2)
    if ties:
        probs = (probs * 20).round() / 20  # many tied scores, including exact 0.0 and 1.0
    return probs, labels


# ------------------------------------------------------------------------------------------ threshold
def test_youden_separable_scores_give_j_of_one() -> None:
    probs, labels = _scores([0.7, 0.8, 0.9], [0.1, 0.2, 0.3])
    t = choose_threshold(probs, labels, "youden")
    assert 0.3 < t <= 0.7
    m = classification_metrics(probs, labels, t)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(1.0)


def test_youden_picks_known_best_score() -> None:
    # J per candidate: .9->.2 .8->.4 .6->.15 .55->.35 .4->.55 .35->.3 .3->.5 .2->.25 .1->0
    probs, labels = _scores([0.3, 0.4, 0.55, 0.8, 0.9], [0.1, 0.2, 0.35, 0.6])
    t = choose_threshold(probs, labels, "youden")
    assert t == pytest.approx(0.4, abs=1e-6)
    m = classification_metrics(probs, labels, t)
    assert (m["tp"], m["fp"]) == (4, 1)


def test_youden_tie_goes_to_threshold_closest_to_half() -> None:
    # J = 0.5 at both 0.9 and 0.35; 0.35 is closer to 0.5
    probs, labels = _scores([0.35, 0.9], [0.1, 0.45])
    assert choose_threshold(probs, labels, "youden") == pytest.approx(0.35, abs=1e-6)


def test_sensitivity_rule_returns_largest_threshold_meeting_target() -> None:
    probs, labels = _scores([0.2, 0.4, 0.6, 0.8], [0.1, 0.3, 0.5])
    t = choose_threshold(probs, labels, "sensitivity", target_sensitivity=0.75)
    assert t == pytest.approx(0.4, abs=1e-6)
    assert classification_metrics(probs, labels, t)["sensitivity"] == pytest.approx(0.75)


def test_sensitivity_rule_exact_target_despite_float32_tpr() -> None:
    # 19/20 = 0.95 exactly; torchmetrics' float32 tpr reads 0.94999999 < 0.95 and would overshoot.
    pos = [0.05 * (i + 1) - 0.01 for i in range(20)]  # 0.04 .. 0.99
    probs, labels = _scores(pos, [0.02, 0.5, 0.97])
    t = choose_threshold(probs, labels, "sensitivity", target_sensitivity=0.95)
    assert t == pytest.approx(pos[1], abs=1e-6)
    assert classification_metrics(probs, labels, t)["tp"] == 19


def test_threshold_reproduces_the_best_operating_point_with_ties_and_ones() -> None:
    probs, labels = _synthetic(300, seed=3, ties=True)
    assert float(probs.max()) == 1.0  # the sentinel 1.0 case is exercised
    t = choose_threshold(probs, labels, "youden")
    assert 0.0 < t <= 1.0
    got = classification_metrics(probs, labels, t)
    best = max(
        m["sensitivity"] + m["specificity"] - 1
        for m in (classification_metrics(probs, labels, float(u)) for u in probs.unique())
    )
    assert got["sensitivity"] + got["specificity"] - 1 == pytest.approx(best)


def test_fixed_rule_and_unknown_rule() -> None:
    probs, labels = _scores([0.7, 0.8], [0.1, 0.2])
    assert choose_threshold(probs, labels, "fixed") == 0.5
    with pytest.raises(ValueError, match="bogus"):
        choose_threshold(probs, labels, "bogus")


def test_choose_threshold_one_class_falls_back_to_half() -> None:
    assert choose_threshold(torch.tensor([0.2, 0.9]), torch.tensor([1, 1])) == 0.5


# -------------------------------------------------------------------------------------------- metrics
def test_metrics_hand_computed_example() -> None:
    probs, labels = _scores([0.9, 0.8, 0.6, 0.4], [0.3, 0.2, 0.7, 0.1])
    m = classification_metrics(probs, labels, threshold=0.35)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (3, 1, 0, 4)
    assert (m["n"], m["n_pos"], m["threshold"]) == (8, 4, 0.35)
    assert m["accuracy"] == pytest.approx(7 / 8)
    assert m["sensitivity"] == pytest.approx(1.0)
    assert m["specificity"] == pytest.approx(0.75)
    assert m["ppv"] == pytest.approx(0.8)
    assert m["npv"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(8 / 9)
    assert m["balanced_accuracy"] == pytest.approx(0.875)
    assert m["auroc"] == pytest.approx(14 / 16)
    brier = (0.1**2 + 0.2**2 + 0.4**2 + 0.6**2 + 0.3**2 + 0.2**2 + 0.7**2 + 0.1**2) / 8
    assert m["brier"] == pytest.approx(brier)
    assert 0.0 <= m["ece"] <= 1.0


def test_probability_equal_to_threshold_counts_as_positive() -> None:
    # torchmetrics' own threshold= is strict (>); ours is >= everywhere.
    m = classification_metrics(torch.tensor([0.4, 0.1]), torch.tensor([1, 0]), threshold=0.4)
    assert m["tp"] == 1


def test_logits_are_rejected_not_silently_sigmoided() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        classification_metrics(torch.tensor([-2.0, 3.0]), torch.tensor([0, 1]))


def test_one_class_input_gives_nan_without_warnings() -> None:
    probs = torch.tensor([0.2, 0.7, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(probs, torch.ones(3, dtype=torch.long))
        ci = bootstrap_ci(probs, torch.ones(3, dtype=torch.long), n_boot=50)
        payload = evaluate(probs, torch.zeros(3, dtype=torch.long), 0.5, n_boot=50)
    assert math.isnan(m["auroc"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert all(math.isnan(v) for v in ci["auroc"])
    assert ci["accuracy"][0] <= ci["accuracy"][1]
    assert math.isnan(payload["at_0.5"]["sensitivity"]) and math.isnan(payload["at_0.5"]["average_precision"])


# ------------------------------------------------------------------------------------------ bootstrap
def test_vectorised_bootstrap_matches_torchmetrics_per_resample() -> None:
    probs, labels = _synthetic(120, seed=1, ties=True)
    samples = _bootstrap_samples(probs, labels, 0.45, 8, 5, BOOTSTRAP_METRICS)
    idx = torch.randint(0, 120, (8, 120), generator=torch.Generator().manual_seed(5))
    for b in range(8):
        ref = classification_metrics(probs[idx[b]], labels[idx[b]], 0.45)
        for name in BOOTSTRAP_METRICS:
            assert float(samples[name][b]) == pytest.approx(ref[name], abs=1e-5), name


def test_bootstrap_contains_estimate_narrows_and_is_reproducible() -> None:
    metrics = ("accuracy", "auroc", "sensitivity", "specificity")
    small, large = _synthetic(100, seed=0), _synthetic(2000, seed=0)
    ci_small = bootstrap_ci(*small, n_boot=200, seed=7, metrics=metrics)
    ci_large = bootstrap_ci(*large, n_boot=200, seed=7, metrics=metrics)
    point = classification_metrics(*large)
    for name in metrics:
        low, high = ci_large[name]
        assert low <= point[name] <= high, name
        assert high - low < ci_small[name][1] - ci_small[name][0], name
    assert bootstrap_ci(*small, n_boot=200, seed=7, metrics=metrics) == ci_small
    assert bootstrap_ci(*small, n_boot=200, seed=8, metrics=metrics) != ci_small


def test_bootstrap_rejects_unknown_metric() -> None:
    with pytest.raises(ValueError, match="ece"):
        bootstrap_ci(torch.tensor([0.2, 0.8]), torch.tensor([0, 1]), metrics=("ece",))


def test_count_metrics_is_elementwise_with_nan_for_empty_denominators() -> None:
    tp, fp, fn, tn = (
        torch.tensor([4, 0, 3]),
        torch.tensor([1, 0, 0]),
        torch.tensor([0, 0, 1]),
        torch.tensor([3, 5, 0]),
    )
    batch = count_metrics(tp, fp, fn, tn)
    for i in range(3):
        one = count_metrics(tp[i], fp[i], fn[i], tn[i])
        for name, values in batch.items():
            assert torch.equal(values[i].isnan(), one[name].isnan()), name
            assert values[i].nan_to_num() == one[name].nan_to_num(), name
    assert batch["ppv"][0] == pytest.approx(0.8) and batch["npv"][0] == pytest.approx(1.0)
    assert torch.isnan(batch["sensitivity"][1]) and torch.isnan(batch["ppv"][1])  # no positives at all
    assert batch["specificity"][1] == 1.0 and torch.isnan(batch["specificity"][2])  # tn + fp == 0

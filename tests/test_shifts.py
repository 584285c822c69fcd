"""Shift validation suite: deterministic, batching-independent, mild acquisition shifts and their metrics."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from xray.evaluation.report import render_shift_table
from xray.evaluation.shifts import (
    ACQUISITION_SHIFTS,
    METRICS,
    SHIFTS,
    apply_shift,
    log_shift_metrics,
    shift_logits,
    shift_metrics,
)

GEOMETRIC = {"zoom_in", "zoom_out", "rotate"}


def film(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth synthetic film: lungs-like bright ellipse, vertical gradient and a blurred random field."""
    g = torch.Generator().manual_seed(seed)
    field = F.interpolate(
        torch.randn(n, 1, max(2, h // 8), max(2, w // 8), generator=g), size=(h, w), mode="bicubic"
    )
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    lungs = torch.exp(-((xx / 0.6) ** 2 + (yy / 0.7) ** 2))
    return (60 + 100 * lungs + 25 * field + 20 * yy).round().clamp(0, 255).to(torch.uint8)


def labelled_films(n: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Films where label 1 carries a bright blob ("opacity")."""
    g = torch.Generator().manual_seed(seed + 1000)
    images = film(n, h, w, seed).float()
    labels = torch.arange(n) % 2
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    for i in range(n):
        if labels[i]:
            cy, cx = (0.35 + 0.3 * torch.rand(2, generator=g)) * torch.tensor([h, w])
            images[i, 0] += 70 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.1 * min(h, w)) ** 2))
    return images.round().clamp(0, 255).to(torch.uint8), labels


def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per image."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def high_freq(x: torch.Tensor) -> float:
    x = x.float()
    return float(
        ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean() + ((x[..., :, 1:] - x[..., :, :-1]) ** 2).mean()
    )


def center(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return x[..., h // 4 : h - h // 4, w // 4 : w - w // 4]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny images: intra-op threads only add overhead (and contend on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return film(8, 64, 64)


def test_names_and_unknown_shift(images: torch.Tensor) -> None:
    assert SHIFTS[:4] == ("contrast_low", "contrast_high", "gamma_low", "gamma_high")
    assert len(SHIFTS) == len(set(SHIFTS)) == 21
    assert SHIFTS[13] == "rotate" and SHIFTS[14:] == ACQUISITION_SHIFTS  # new families last: old seeds kept
    with pytest.raises(ValueError, match="contrast_low.*rotate"):
        apply_shift(images, "solarize", range(8))
    with pytest.raises(ValueError, match="valid shifts"):
        shift_logits(lambda x: x.mean((1, 2, 3)), images, shifts=["blur", "nope"])


def test_input_validation(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="uint8"):
        apply_shift(images.float(), "blur", range(8))
    with pytest.raises(ValueError, match="indices"):
        apply_shift(images, "blur", range(7))
    with pytest.raises(ValueError, match="16x16"):
        apply_shift(images[..., :15, :], "blur", range(8))


@pytest.mark.parametrize("name", SHIFTS)
def test_deterministic_seeded_and_batching_independent(images: torch.Tensor, name: str) -> None:
    out = apply_shift(images, name, range(8), seed=0)
    assert torch.equal(out, apply_shift(images.clone(), name, list(range(8)), seed=0))
    assert not torch.equal(out, apply_shift(images, name, range(8), seed=1))
    halves = torch.cat(
        [
            apply_shift(images[:3], name, torch.arange(3), seed=0),
            apply_shift(images[3:], name, range(3, 8), seed=0),
        ]
    )
    assert torch.equal(out, halves)
    # the magnitude is drawn per image: the same film at different global indices is shifted differently
    same = images[:1].expand(6, -1, -1, -1).contiguous()
    copies = apply_shift(same, name, range(6), seed=0)
    assert any(not torch.equal(copies[0], copies[i]) for i in range(1, 6))


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (16, 16), (17, 33)])
@pytest.mark.parametrize("name", SHIFTS)
def test_shape_dtype_range(name: str, size: tuple[int, int]) -> None:
    x = film(3, *size, seed=1)
    x[0, 0, 0, 0], x[1, 0, -1, -1] = 0, 255  # extremes must stay in range
    out = apply_shift(x, name, [5, 9, 2], seed=3)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert int(out.min()) >= 0 and int(out.max()) <= 255


IMAGING_SHIFTS = tuple(name for name in SHIFTS if name not in ACQUISITION_SHIFTS)
"""Shifts of the whole image; the acquisition-cue families add or remove a cue (tests/test_acquisition.py)."""


@pytest.mark.parametrize("name", IMAGING_SHIFTS)
def test_each_shift_changes_the_image_mildly(images: torch.Tensor, name: str) -> None:
    out = apply_shift(images, name, range(8))
    mad = (out.float() - images.float()).abs().mean((1, 2, 3))
    assert bool((mad > 0.5).all()), mad
    if name in GEOMETRIC:
        # geometry moves pixels, so compare the central half, where the anatomy stays roughly in place
        assert float(corr(center(images), center(out)).min()) > 0.7
    else:
        assert float(corr(images, out).min()) > 0.9


def test_photometric_semantics(images: torch.Tensor) -> None:
    def shifted(name: str) -> torch.Tensor:
        return apply_shift(images, name, range(8)).float()

    x = images.float()
    assert bool((shifted("contrast_low").std((1, 2, 3)) < 0.85 * x.std((1, 2, 3))).all())
    assert bool((shifted("contrast_high").std((1, 2, 3)) > 1.15 * x.std((1, 2, 3))).all())
    assert bool((shifted("brightness_up").mean((1, 2, 3)) > x.mean((1, 2, 3)) + 15).all())
    assert bool((shifted("brightness_down").mean((1, 2, 3)) < x.mean((1, 2, 3)) - 15).all())
    assert bool((shifted("gamma_low").mean((1, 2, 3)) > x.mean((1, 2, 3)) + 10).all())
    assert bool((shifted("gamma_high").mean((1, 2, 3)) < x.mean((1, 2, 3)) - 10).all())
    assert high_freq(shifted("blur")) < 0.9 * high_freq(x)
    assert high_freq(shifted("resample")) < 0.95 * high_freq(x)
    assert high_freq(shifted("sharpen")) > 1.2 * high_freq(x)
    assert high_freq(shifted("noise")) > 2 * high_freq(x)


def test_jpeg_differs_but_close(images: torch.Tensor) -> None:
    out = apply_shift(images, "jpeg", range(8)).float()
    mad = (out - images.float()).abs().mean((1, 2, 3))
    assert bool((mad > 0.3).all()) and bool((mad < 6).all())
    assert float(corr(images, out).min()) > 0.97


def test_rotate_is_a_small_rotation(images: torch.Tensor) -> None:
    out = apply_shift(images[:4], "rotate", range(4)).float()
    for i in range(4):
        candidates = [sign * a / 4 for a in range(12, 49) for sign in (1, -1)]  # +-3 .. +-12 degrees
        scores = [
            float(corr(center(TF.rotate(images[i : i + 1].float(), a)), center(out[i : i + 1])))
            for a in candidates
        ]
        best = max(range(len(scores)), key=scores.__getitem__)
        assert scores[best] > 0.99
        assert 4.75 <= abs(candidates[best]) <= 10.25


def test_zoom_in_is_a_central_crop(images: torch.Tensor) -> None:
    out = apply_shift(images[:4], "zoom_in", range(4)).float()
    for i in range(4):
        scores = {}
        for percent in range(70, 96):
            c = round(64 * percent / 100)
            top = (64 - c) // 2
            crop = images[i : i + 1, :, top : top + c, top : top + c].float()
            scores[percent] = float(corr(TF.resize(crop, [64, 64], antialias=True), out[i : i + 1]))
        best = max(scores, key=scores.__getitem__)
        assert scores[best] > 0.99 and 79 <= best <= 89


def test_zoom_out_leaves_a_constant_dark_border(images: torch.Tensor) -> None:
    out = apply_shift(images, "zoom_out", range(8))
    for i in range(8):
        fill = round(float(torch.quantile(images[i].float().flatten(), 0.01)))
        border = torch.cat(
            [
                out[i, 0, :4].flatten(),
                out[i, 0, -4:].flatten(),
                out[i, 0, :, :4].flatten(),
                out[i, 0, :, -4:].flatten(),
            ]
        )
        assert bool((border == fill).all())
        assert fill <= int(images[i].float().quantile(0.05))
        assert float(out[i, 0, 16:48, 16:48].float().std()) > 5  # the image itself is inside


def test_shift_logits_keys_lengths_and_batching() -> None:
    x = film(10, 32, 40, seed=2)
    seen = []

    def logits_fn(batch: torch.Tensor) -> torch.Tensor:
        seen.append((batch.dtype, batch.shape, float(batch.min()), float(batch.max())))
        return batch.mean((2, 3))  # (b, 1) is accepted and flattened

    out = shift_logits(logits_fn, x, seed=4, batch_size=3)
    assert list(out) == ["clean", *SHIFTS]
    for value in out.values():
        assert value.shape == (10,) and value.dtype == torch.float32 and value.device.type == "cpu"
    assert torch.allclose(out["clean"], x.float().mean((1, 2, 3)) / 255, atol=1e-6)
    assert all(d == torch.float32 and s[1:] == (1, 32, 40) and lo >= 0 and hi <= 1 for d, s, lo, hi in seen)
    whole = shift_logits(logits_fn, x, seed=4, batch_size=64, shifts=["noise", "rotate"])
    assert list(whole) == ["clean", "noise", "rotate"]
    assert torch.equal(whole["noise"], out["noise"]) and torch.equal(whole["rotate"], out["rotate"])
    with pytest.raises(ValueError, match="logits"):
        shift_logits(lambda b: b.mean((1, 2, 3))[:1], x, shifts=["blur"])


def test_shifts_preserve_labels_for_a_simple_detector() -> None:
    x, labels = labelled_films(24, 48, 48, seed=5)

    def detector(batch: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(batch, 8, stride=4).amax((1, 2, 3))
        return 10 * (pooled - batch.flatten(1).median(1).values) - 2

    metrics = shift_metrics(shift_logits(detector, x, batch_size=10), labels, threshold=0.5)
    assert metrics["clean"]["auroc"] > 0.95
    for name in IMAGING_SHIFTS:  # burned-in text and markers fool a bright-blob detector: as intended
        assert metrics[name]["auroc"] > 0.9, name


def test_shift_metrics_known_values() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    logits = {
        "clean": torch.tensor([-3.0, -2.0, 2.0, 3.0]),
        "a": torch.tensor([-1.0, 0.5, 0.2, 2.0]),
        "b": torch.tensor([1.0, -1.0, -2.0, 0.0]),
    }
    m = shift_metrics(logits, labels, threshold=0.5)
    assert list(m) == ["clean", "a", "b", "mean", "worst"]
    assert m["clean"]["auroc"] == pytest.approx(1.0)
    assert m["clean"]["accuracy"] == 1.0 and m["clean"]["balanced_accuracy"] == 1.0
    a = m["a"]
    assert a["auroc"] == pytest.approx(0.75)
    assert (a["sensitivity"], a["specificity"], a["accuracy"], a["balanced_accuracy"]) == (
        1.0,
        0.5,
        0.75,
        0.75,
    )
    p = torch.sigmoid(logits["a"].double())
    y = labels.double()
    assert a["log_loss"] == pytest.approx(float(-(y * p.log() + (1 - y) * (1 - p).log()).mean()))
    assert a["brier"] == pytest.approx(float(((p - y) ** 2).mean()))
    assert a["log_loss"] > m["clean"]["log_loss"]
    b = m["b"]
    assert b["auroc"] == pytest.approx(0.25) and b["sensitivity"] == 0.5 and b["specificity"] == 0.5
    for metric in METRICS:
        assert m["mean"][metric] == pytest.approx((a[metric] + b[metric]) / 2)
        pick = max if metric in {"log_loss", "brier"} else min
        assert m["worst"][metric] == pick(a[metric], b[metric])
    assert m["worst"]["auroc"] == pytest.approx(0.25) and m["worst"]["log_loss"] == b["log_loss"]


def test_shift_metrics_noise_and_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    clean = (labels.float() * 2 - 1) * 3
    noisy = clean + 4 * torch.randn(200, generator=g)
    m = shift_metrics({"clean": clean, "noisy": noisy}, labels, threshold=0.5)
    assert m["clean"]["auroc"] == 1.0 and m["noisy"]["auroc"] < 0.95
    assert m["noisy"]["log_loss"] > m["clean"]["log_loss"] and m["noisy"]["brier"] > m["clean"]["brier"]
    hot = shift_metrics({"clean": clean, "noisy": noisy}, labels, threshold=0.5, temperature=2.5)
    assert hot["noisy"]["auroc"] == pytest.approx(m["noisy"]["auroc"], abs=1e-12)
    assert hot["noisy"]["log_loss"] < m["noisy"]["log_loss"] - 0.05  # overconfident logits: T > 1 helps
    assert hot["clean"]["log_loss"] > m["clean"]["log_loss"]
    with pytest.raises(ValueError, match="temperature"):
        shift_metrics({"clean": clean}, labels, 0.5, temperature=0.0)


def test_render_shift_table() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    logits = {"clean": torch.tensor([-3.0, -2.0, 2.0, 3.0]), "blur": torch.tensor([-1.0, 0.5, 0.2, 2.0])}
    logits["jpeg"] = logits["blur"] * 0.5
    table = render_shift_table(shift_metrics(logits, labels, 0.5), threshold=0.5)
    lines = table.strip().splitlines()
    assert "seeded acquisition shifts" in lines[0] and "threshold 0.500" in lines[0]
    assert lines[2].startswith(
        "| shift | AUROC | log loss | Brier | sensitivity | specificity | balanced accuracy |"
    )
    rows = [line.split("|")[1].strip() for line in lines[4:]]
    assert rows == ["clean", "blur", "jpeg", "**mean**", "**worst**"]
    assert "| 1.000 |" in lines[4] and "**0.750**" in lines[-1]
    assert all(line.count("|") == 8 for line in lines[2:])


def test_log_shift_metrics_to_each_logger() -> None:
    class FakeLogger:
        def __init__(self) -> None:
            self.calls: list[tuple[dict[str, float], int | None]] = []

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.calls.append((metrics, step))

    labels = torch.tensor([0, 1, 0, 1])
    m = shift_metrics(
        {"clean": torch.tensor([-1.0, 1, -1, 1]), "blur": torch.tensor([1.0, 1, -1, -1])}, labels, 0.5
    )
    loggers = [FakeLogger(), FakeLogger()]
    log_shift_metrics(m, loggers, step=7)
    for logger in loggers:
        ((logged, step),) = logger.calls
        assert step == 7
        assert set(logged) == {
            f"val_shift/{row}/{metric}" for row in ("clean", "blur", "mean", "worst") for metric in METRICS
        }
        assert logged["val_shift/blur/auroc"] == pytest.approx(0.5) and logged[
            "val_shift/worst/auroc"
        ] == pytest.approx(0.5)
        assert all(isinstance(v, float) and not math.isnan(v) for v in logged.values())
    single = FakeLogger()
    log_shift_metrics(m, single)
    assert len(single.calls) == 1 and single.calls[0][1] is None

"""Every plot function writes a real PNG; the make_*_figure half returns a Figure for loggers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

from xray.evaluation import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000


def _data(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.6).long()
    probs = torch.sigmoid(torch.randn(n, generator=g) + (2 * labels - 1) * 1.0)
    return probs, labels


def test_plot_curves_tolerates_missing_keys(tmp_path) -> None:
    history = [
        {"epoch": 0, "train/loss": 0.7, "val/loss": 0.6, "train/acc": 0.6, "val/acc": 0.65},
        {"epoch": 1, "train/loss": 0.5, "train/acc": 0.75},
        {"epoch": 2, "train/loss_epoch": 0.4, "val/loss": 0.45, "val/acc": 0.8},
    ]
    _assert_png(plots.save_figure(plots.make_curves_figure(history), tmp_path / "curves.png"))
    _assert_png(plots.save_figure(plots.make_curves_figure([]), tmp_path / "empty.png"))


def test_plot_roc_and_pr_two_splits_with_operating_points(tmp_path) -> None:
    curves = {"val": _data(seed=1), "test": _data(seed=2)}
    thresholds = {"val": 0.4, "test": 0.4}
    _assert_png(plots.save_figure(plots.make_roc_figure(curves, thresholds=thresholds), tmp_path / "roc.png"))
    _assert_png(plots.save_figure(plots.make_pr_figure(curves, thresholds=thresholds), tmp_path / "pr.png"))


def test_plot_roc_one_split_and_one_class_split(tmp_path) -> None:
    probs, labels = _data(seed=3)
    _assert_png(plots.save_figure(plots.make_roc_figure({"val": (probs, labels)}), tmp_path / "roc.png"))
    one_class = {"val": (probs, labels), "test": (probs[:5], torch.zeros(5, dtype=torch.long))}
    _assert_png(
        plots.save_figure(plots.make_roc_figure(one_class, thresholds={"val": 0.5}), tmp_path / "roc1.png")
    )
    _assert_png(plots.save_figure(plots.make_pr_figure(one_class), tmp_path / "pr1.png"))


def test_plot_confusion_matrix(tmp_path) -> None:
    _assert_png(
        plots.save_figure(
            plots.make_confusion_matrix_figure(200, 34, 12, 378, title="test @ 0.5"), tmp_path / "cm.png"
        )
    )
    _assert_png(
        plots.save_figure(plots.make_confusion_matrix_figure(0, 0, 3, 5), tmp_path / "cm_empty_row.png")
    )


def test_plot_calibration(tmp_path) -> None:
    probs, labels = _data(n=200, seed=4)
    _assert_png(
        plots.save_figure(
            plots.make_calibration_figure(probs, labels, n_bins=10), tmp_path / "calibration.png"
        )
    )


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_plot_mistakes(tmp_path, dtype) -> None:
    probs = torch.tensor([0.95, 0.1, 0.8, 0.3, 0.6, 0.02])
    labels = torch.tensor([0, 1, 1, 0, 0, 1])  # wrong at 0.5: indices 0, 1, 4, 5
    images = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    images = (images * 255).to(torch.uint8) if dtype == torch.uint8 else images
    names = [f"person{i}_virus_{i}.jpeg" for i in range(6)]
    fig = plots.make_mistakes_figure(images, probs, labels, names, k=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0].startswith("person5_virus_5.jpeg") and "p(PNEU)=0.020" in titles[0]
    assert len(titles) == 3
    _assert_png(
        plots.save_figure(
            plots.make_mistakes_figure(images, probs, labels, names, k=3), tmp_path / "mistakes.png"
        )
    )


def test_plot_mistakes_when_there_are_none(tmp_path) -> None:
    probs, labels = torch.tensor([0.9, 0.1]), torch.tensor([1, 0])
    images = torch.zeros(2, 1, 16, 16)
    _assert_png(
        plots.save_figure(
            plots.make_mistakes_figure(images, probs, labels, ["a.jpeg", "b.jpeg"]), tmp_path / "none.png"
        )
    )


def test_make_figure_functions_return_figures_for_loggers(tmp_path) -> None:
    probs, labels = _data(seed=5)
    figs = [
        plots.make_roc_figure({"val": (probs, labels)}),
        plots.make_pr_figure({"val": (probs, labels)}),
        plots.make_calibration_figure(probs, labels),
        plots.make_confusion_matrix_figure(1, 2, 3, 4),
        plots.make_curves_figure([{"epoch": 0, "train/loss": 1.0}]),
    ]
    assert all(isinstance(f, Figure) for f in figs)
    path = plots.save_figure(figs[0], tmp_path / "nested" / "roc.png")
    _assert_png(path)

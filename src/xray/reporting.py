"""Writes a run's evaluation figures into its directory and logs them to TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from xray import plots
from xray.evaluation import classification_metrics


def _log_figure(loggers: list[Any], tag: str, fig: Any) -> None:
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(tag, fig, close=False)


def write_plots(
    run_dir: Path,
    splits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    threshold: float,
    loggers: list[Any],
    datamodule: Any,
    mistakes: int = 16,
) -> list[Path]:
    """roc.png, pr.png, confusion_matrix.png, calibration.png, mistakes.png (validation)."""
    curves = {split: (p, y) for split, (p, y, _) in splits.items() if p.numel()}
    if not curves:
        return []
    thresholds = dict.fromkeys(curves, threshold)
    figures: dict[str, Any] = {
        "roc": plots.make_roc_figure(curves, thresholds=thresholds),
        "pr": plots.make_pr_figure(curves, thresholds=thresholds),
    }
    main_split = "test" if "test" in curves else "val"
    m = classification_metrics(*curves[main_split], threshold)
    figures["confusion_matrix"] = plots.make_confusion_matrix_figure(
        int(m["tn"]),
        int(m["fp"]),
        int(m["fn"]),
        int(m["tp"]),
        title=f"Confusion matrix ({main_split}, threshold {threshold:.3f})",
    )
    figures["calibration"] = plots.make_calibration_figure(
        *curves["val" if "val" in curves else main_split], title="Calibration (validation)"
    )
    if "val" in splits and mistakes > 0:
        probs, labels, index = splits["val"]
        wrong = torch.nonzero((probs >= threshold).long() != labels).reshape(-1)
        order = wrong  # all of them, so the figure can say how many there are; it shows the top k
        if order.numel() == 0:  # the figure then says there were no mistakes
            order = torch.arange(probs.numel())
            images = torch.zeros(probs.numel(), 1, 8, 8, dtype=torch.uint8)
        else:
            dataset = datamodule.datasets["val"]
            images = torch.stack([dataset.image(i) for i in index[order].tolist()])
        names = [datamodule.datasets["val"].records[i].path.name for i in index[order].tolist()]
        figures["mistakes"] = plots.make_mistakes_figure(
            images,
            probs[order],
            labels[order],
            names,
            k=mistakes,
            threshold=threshold,
            title="Most confident validation mistakes",
        )
    written = []
    for name, fig in figures.items():
        _log_figure(loggers, f"eval/{name}", fig)
        written.append(plots.save_figure(fig, run_dir / f"{name}.png"))
    return written

"""Paired check: the same films in two encodings, scored as ``predict.py`` scores them.

The training files are a mirror's 224 px JPEG re-encodes, the test files originals;
``chest_xray_fullres_sample`` holds 80 training films in original form. Per class, the mean change of
the calibrated logit from copy to original (negative: towards NORMAL) and the decisions that flip show
how far calls move on original files, with and without
:func:`xray.data.encoding.match_encoding` when the checkpoint records an encoding::

    python -m xray.paired ckpt=pretrained \\
        --originals ../shared/data/chest_xray_fullres_sample/train --copies ../shared/data/chest_xray/train
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xray.core.constants import CLASSES, IMAGE_EXTENSIONS
from xray.inference.predict import predict_files
from xray.inference.predictor import Predictor


@dataclass(frozen=True)
class PairedShift:
    """Per class: how the calibrated logit moves from the copy to the original."""

    label: str
    n: int
    mean: float
    sd: float
    flips: int


def find_pairs(originals: Path, copies: Path) -> list[tuple[Path, Path, int]]:
    """(original, copy, label) for every ``CLASS/name`` file present under both folders."""
    pairs = []
    for label, name in enumerate(CLASSES):
        folder = originals / name
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            twin = copies / name / path.name
            if path.suffix.lower() in IMAGE_EXTENSIONS and twin.is_file():
                pairs.append((path, twin, label))
    if not pairs:
        raise ValueError(
            f"no file of {originals}/{{NORMAL,PNEUMONIA}} has a twin of the same name under {copies}"
        )
    return pairs


def _logit(p: float) -> float:
    p = min(max(p, 1e-15), 1 - 1e-15)
    return math.log(p) - math.log1p(-p)


def paired_shift(
    predictor: Predictor, pairs: Sequence[tuple[Path, Path, int]], match_encoding: bool = True
) -> list[PairedShift]:
    """The shift of each class present in ``pairs`` (sd needs two films of the class)."""
    rows = predict_files(
        predictor,
        [p for pair in pairs for p in pair[:2]],
        ood=False,
        match_encoding=match_encoding,
    )
    failed = [r for r in rows if not r.ok]
    if failed:
        raise ValueError(f"{failed[0].path}: {failed[0].error}")
    out = []
    for label, name in enumerate(CLASSES):
        both = [(rows[2 * k], rows[2 * k + 1]) for k, pair in enumerate(pairs) if pair[2] == label]
        deltas = [_logit(o.prob_pneumonia) - _logit(c.prob_pneumonia) for o, c in both]  # type: ignore[arg-type]
        if deltas:
            sd = statistics.stdev(deltas) if len(deltas) > 1 else math.nan
            flips = sum(o.label != c.label for o, c in both)
            out.append(PairedShift(name, len(deltas), statistics.fmean(deltas), sd, flips))
    return out

"""The counterfactual check on a user's own films: each film scored as it is and with an acquisition cue
added (burned-in text, markers, tight collimation, shutters, padding), exactly as ``predict.py`` would
score such a file.

The cue is drawn on the decoded original, before the training files' encoding and the resize, so a
crop of a large original is as sharp as a film taken that way; then the variant gets the encoding a new
file would (resize + JPEG at the training files' quality). Per class, the mean change and mean |change|
of the calibrated logit and the calls that flip tell whether a model reads the lungs or the acquisition.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from xray.core.constants import CLASSES
from xray.data.acquisition import SHIFT_FAMILIES
from xray.data.encoding import match_encoding
from xray.data.io import ImageReadError, read_image
from xray.data.transforms import resize_image
from xray.evaluation.shifts import seeded_generator
from xray.inference.predict import (
    class_from_path,
    member_logits,
    prepare_image,
    preprocessing_groups,
    resolve_device,
)
from xray.inference.predictor import Predictor

FAMILIES: tuple[str, ...] = tuple(SHIFT_FAMILIES)


@dataclass(frozen=True)
class CounterfactualRow:
    """One family and one class: how the calibrated logit moves when the cue is added."""

    family: str
    label: str
    n: int
    mean_change: float
    abs_change: float
    flipped: int
    positive_clean: int  # films called PNEUMONIA as they are
    positive_with_cue: int  # and with the cue


def _variant(image: Tensor, family: str, seed: int, index: int) -> Tensor:
    """uint8 (1,H,W) -> the same film with ``family``'s cue, drawn at the film's own resolution."""
    g = seeded_generator(seed, FAMILIES.index(family), index)
    return SHIFT_FAMILIES[family](image.float(), g).round().clamp(0, 255).to(torch.uint8)


def _member_inputs(
    predictor: Predictor, path: str, image: Tensor, variant: bool
) -> list[tuple[list[int], Tensor]]:
    """(member indices, uint8 (1,S,S) input) per distinct preprocessing: the film as predict.py prepares
    it, or a variant as a new file would be (always given the training files' encoding)."""
    out = []
    for (size, interpolation, encoding), members in preprocessing_groups(predictor):
        if not variant:
            prepared = prepare_image(image, path, size, interpolation, encoding)
        else:
            encoded = match_encoding(image, encoding) if encoding is not None else image
            prepared = resize_image(encoded, size, interpolation)
        out.append((members, prepared))
    return out


def calibrated_logits(
    predictor: Predictor, inputs: list[list[tuple[list[int], Tensor]]], device: torch.device, batch_size: int
) -> Tensor:
    """(N,) mean member logit / T of prepared films (each a list of (members, uint8 input) per group)."""
    nets = [member.net.to(device).eval() for member in predictor.members]
    logits = torch.zeros(len(inputs), len(nets), dtype=torch.float64)
    for group in range(len(inputs[0]) if inputs else 0):
        members = inputs[0][group][0]
        for start in range(0, len(inputs), batch_size):
            batch = torch.stack([film[group][1] for film in inputs[start : start + batch_size]]).to(device)
            with torch.inference_mode():
                for k in members:
                    z = member_logits(nets[k], batch, predictor.members[k].tta)
                    logits[start : start + len(batch), k] = z.double().cpu()
    return logits.mean(dim=1) / predictor.temperature


def counterfactual_check(
    predictor: Predictor,
    paths: Sequence[str | os.PathLike[str]],
    families: Sequence[str] = FAMILIES,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    batch_size: int = 16,
) -> tuple[list[CounterfactualRow], dict[str, str]]:
    """Rows per family and class (films under a NORMAL/ or PNEUMONIA/ folder; others count as
    ``unlabelled``), and the files that could not be read with their reasons (left out)."""
    unknown = [f for f in families if f not in SHIFT_FAMILIES]
    if unknown:
        raise ValueError(f"unknown acquisition families {unknown}; known: {', '.join(FAMILIES)}")
    target = resolve_device(device)
    films: list[tuple[str, Tensor]] = []
    failed: dict[str, str] = {}
    for path in map(os.fspath, paths):
        try:
            films.append((path, read_image(path)))
        except ImageReadError as err:
            failed[path] = err.reason
    labels = [class_from_path(path) for path, _ in films]
    names = [CLASSES[y] if y is not None else "unlabelled" for y in labels]
    clean = calibrated_logits(
        predictor, [_member_inputs(predictor, p, im, False) for p, im in films], target, batch_size
    )
    t = predictor.threshold
    cut = math.log(t / (1 - t)) if 0 < t < 1 else (math.inf if t >= 1 else -math.inf)  # p >= t
    rows = []
    for family in families:
        variants = [
            _member_inputs(predictor, p, _variant(im, family, seed, i), True)
            for i, (p, im) in enumerate(films)
        ]
        shifted = calibrated_logits(predictor, variants, target, batch_size)
        for name in dict.fromkeys(names):
            keep = torch.tensor([n == name for n in names])
            change = (shifted - clean)[keep]
            before, after = clean[keep] >= cut, shifted[keep] >= cut
            rows.append(
                CounterfactualRow(
                    family,
                    name,
                    int(keep.sum()),
                    float(change.mean()),
                    float(change.abs().mean()),
                    int((before != after).sum()),
                    int(before.sum()),
                    int(after.sum()),
                )
            )
    return rows, failed


def render_rows(rows: Sequence[CounterfactualRow], threshold: float) -> list[str]:
    """A markdown table of :func:`counterfactual_check`'s rows."""
    lines = [
        f"| family | class | films | mean change | mean abs change | flipped at {threshold:.3f} | PNEUMONIA calls: as is -> with cue |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.family} | {r.label} | {r.n} | {r.mean_change:+.2f} | {r.abs_change:.2f} | {r.flipped} | "
            f"{r.positive_clean} -> {r.positive_with_cue} |"
        )
    return lines

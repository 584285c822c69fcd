"""Acquisition cues: simple image statistics that measure how a film was taken, not what it shows.

Models trained on the Kermany split can learn the acquisition look as evidence for the label:
PNEUMONIA films are more often tightly collimated (the body fills the frame), carry big burned-in
side markers ("R"/"L") and burned-in text (timestamps, "KV70", "A-P"), while NORMAL films mostly show
the shoulders with air at the top corners and a small marker. These functions put a number on each
cue so that its per-class distribution, and how well it alone predicts the label, can be measured.

Every function takes a uint8 batch ``(N, 1, H, W)`` of grayscale films and returns one value per
film. Thresholds are fractions of each film's own white level (its 99th intensity percentile), so the
rules do not depend on exposure or windowing. Sizes in pixels were tuned on 224 x 224 films.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

CUES: tuple[str, ...] = ("body_fraction", "top_corner_background", "marker_area", "text_score")
"""The statistics :func:`cue_values` computes, in table order."""
CLASS_NAMES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")

BACKGROUND_LEVEL = 0.2
"""Background is at most this fraction of the white level (air and collimated field are near black)."""
CORNER = 0.2
"""Side of each top-corner square, as a fraction of the film's height/width."""
OPENING = 9
"""Grey opening size (px): it erases strokes thinner than this, so ``film - opening`` keeps letters,
wires and bone edges while broad anatomy cancels; the opening itself is their surroundings."""

BAND = 0.25
"""Markers lie in the outer band: closer than this fraction of the side to an edge."""
MARKER_BRIGHT = 0.5
"""A marker holds pixels at least this fraction of the white level..."""
MARKER_CONTRAST = 0.25
"""...that exceed their surroundings by this fraction of the white level; the marker is the connected
region exceeding its surroundings by ``MARKER_EDGE`` x white level around them..."""
MARKER_EDGE = 0.15
MARKER_MAX_SIDE = 0.15
"""...whose box is 5 px to this fraction of each side and touches at most one frame edge..."""
MARKER_MAX_ASPECT = 3.5
"""...no more than this times taller than wide or wider than tall (letters are tall at 224 px)..."""
MARKER_STEM = 0.7
"""...whose strokes (pixels above 3/4 of its mean contrast) hold a straight vertical run of at least
this fraction of its height with at most ``MARKER_SERIF`` of the stroke pixels more than 1 px left of
it: the stem of an "R" or "L". Curved bone outlines, edge-enhanced shoulders and ECG lead clips have
no such left stem; it is what tells letters from them..."""
MARKER_SERIF = 0.05
MARKER_MAX_FILL = 0.6
"""...whose strokes fill at most this fraction of its box (letters are strokes, electrodes blobs)..."""
MARKER_SURROUND = 0.5
"""...and that is isolated, its surroundings averaging at most this fraction of its peak (a letter on
air), or saturated, its peak at least ``MARKER_SATURATED`` x white level (a letter on a grey field is
burned in brighter than the anatomy; rib and clavicle fragments are neither)."""
MARKER_SATURATED = 1.08

TEXT_REGION = (0.2, 0.3)
"""Text corners: height and width of the four corner boxes, as fractions of the film's sides."""
TEXT_CONTRAST = 0.15
"""Text ink exceeds its surroundings by this fraction of the white level..."""
TEXT_DARK = 0.2
"""...where the surroundings (the background under the ink) are at most this fraction of it."""
TEXT_GAP = 4
"""Ink pixels this close horizontally (px) join into one line."""
TEXT_MAX_HEIGHT = 0.06
"""A text line is 3 px to this fraction of the film's height tall (burned-in text is small)..."""
TEXT_MIN_ASPECT = 2.0
"""...at least this many times as wide as tall, narrower than the corner box..."""
TEXT_MIN_MARKS = 2
"""...holds at least this many separate ink marks (characters, or runs of merged ones; a bone edge is
one continuous ridge)..."""
TEXT_MAX_FILL = 0.85
"""...whose ink fills at most this fraction of its box (a collimator edge is a solid strip)..."""
TEXT_MAX_TISSUE = 0.1
"""...and at most this share of the 2 px frame around its box is tissue (brighter than
``TEXT_TISSUE`` x white level): text floats on air, a bright bone or body rim has tissue beside it."""
TEXT_TISSUE = 0.4

# 8-connectivity inside each film, none across the films of a batch.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


class _Parts(NamedTuple):
    """Connected components of a batch mask: the label image and, per label 1..K, its box and area."""

    labels: np.ndarray  # (N, H, W) int32, 0 = none
    film: np.ndarray
    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    area: np.ndarray

    @property
    def count(self) -> int:
        """Number of components K."""
        return len(self.area)


def _components(mask: np.ndarray) -> _Parts:
    """8-connected components of ``mask`` within each film."""
    labels, count = ndimage.label(mask, structure=_STRUCTURE)
    boxes = np.array(
        [
            (b[0].start, b[1].start, b[2].start, b[1].stop, b[2].stop)
            for b in (ndimage.find_objects(labels) if count else [])
        ],
        dtype=np.int64,
    ).reshape(count, 5)
    film, top, left, bottom, right = boxes.T
    area = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return _Parts(labels, film, top, left, bottom - top, right - left, area)


def _label_count(labels: np.ndarray, where: np.ndarray, count: int) -> np.ndarray:
    """Per label 1..count, how many of its pixels are in ``where``."""
    return np.bincount(labels[where], minlength=count + 1)[1:]


def _stems(pixel: np.ndarray, label: np.ndarray, h: int, w: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per label 0..count, its longest vertical run of pixels and that run's column (leftmost of equal runs).

    ``pixel`` are flat indices into an ``(N, h, w)`` batch; a run is a column's consecutive rows.
    """
    film, rest = np.divmod(pixel, h * w)
    row, col = np.divmod(rest, w)
    key = (film * w + col) * (h + 1) + row  # column-major, with a gap between columns
    order = np.argsort(key)
    key = key[order]
    run = np.cumsum(np.diff(key, prepend=-2) != 1)  # a new run wherever the next row does not follow
    length = np.bincount(run)[run]
    code = np.zeros(count + 1, dtype=np.int64)  # length * w + (w - 1 - column): max = longest, then leftmost
    np.maximum.at(code, label[order], length * w + (w - 1 - col[order]))
    return code // w, w - 1 - code % w


def _summed_area(mask: np.ndarray) -> np.ndarray:
    """Summed-area table of a batch mask, ``(N, H + 1, W + 1)``: box sums in four look-ups."""
    n, h, w = mask.shape
    table = np.zeros((n, h + 1, w + 1), dtype=np.int32)
    np.cumsum(mask, axis=1, dtype=np.int32, out=table[:, 1:, 1:])
    np.cumsum(table[:, 1:, 1:], axis=2, out=table[:, 1:, 1:])
    return table


def _box_sums(
    table: np.ndarray, film: np.ndarray, box: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Mask pixels and all pixels inside each ``(top, left, bottom, right)`` box, clipped to the frame."""
    h, w = table.shape[1] - 1, table.shape[2] - 1
    t, lo, b, r = np.clip(box[0], 0, h), np.clip(box[1], 0, w), np.clip(box[2], 0, h), np.clip(box[3], 0, w)
    return table[film, b, r] - table[film, t, r] - table[film, b, lo] + table[film, t, lo], (b - t) * (r - lo)


def _band_mask(h: int, w: int) -> np.ndarray:
    """The outer ``BAND`` of an ``h`` x ``w`` frame."""
    yy, xx = np.mgrid[:h, :w]
    return (np.minimum(yy, h - 1 - yy) < BAND * h) | (np.minimum(xx, w - 1 - xx) < BAND * w)


def _corner_crops(a: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """The four ``ch`` x ``cw`` corner boxes of each film, stacked: ``(4 N, ch, cw)``, TL, TR, BL, BR."""
    h, w = a.shape[1:]
    crops = (a[:, :ch, :cw], a[:, :ch, w - cw :], a[:, h - ch :, :cw], a[:, h - ch :, w - cw :])
    return np.stack(crops, axis=1).reshape(-1, ch, cw)


def _validate(images: Tensor) -> np.ndarray:
    """Check a ``(N, 1, H, W)`` uint8 batch; return it as a ``(N, H, W)`` uint8 array."""
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0-255 grayscale films), got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape (N, 1, H, W), got {tuple(images.shape)}")
    if images.shape[2] < 32 or images.shape[3] < 32:
        raise ValueError(f"images must be at least 32 x 32 pixels, got {tuple(images.shape[2:])}")
    return images[:, 0].detach().cpu().numpy()


def _white_level(u8: np.ndarray, q: float = 0.99) -> np.ndarray:
    """Per-film ``q`` intensity quantile, shape ``(N, 1, 1)``, at least 1.

    From a 256-bin histogram of every other row and column: close enough, and far faster than sorting.
    """
    n = u8.shape[0]
    sub = u8[:, ::2, ::2]
    sample = (
        sub.reshape(n, sub[0].size if n else 0).astype(np.int64)
        + (np.arange(n, dtype=np.int64) * 256)[:, None]
    )
    cdf = np.cumsum(np.bincount(sample.ravel(), minlength=n * 256).reshape(n, 256), axis=1)
    level = (cdf < q * cdf[:, -1:]).sum(axis=1).astype(np.float32)
    return np.maximum(level, 1.0)[:, None, None]


class _Films:
    """A validated batch and the per-film quantities the rules share, each computed once."""

    def __init__(self, images: Tensor) -> None:
        u8 = _validate(images)
        self.u8 = u8
        self.x = u8.astype(np.float32)
        self.white = _white_level(u8)

    @cached_property
    def surround(self) -> np.ndarray:
        """Each pixel's surroundings at the scale of letters: a grey opening of ``OPENING`` px."""
        return ndimage.grey_opening(self.u8, size=(1, OPENING, OPENING)).astype(np.float32)

    @cached_property
    def background(self) -> np.ndarray:
        """Pixels at most ``BACKGROUND_LEVEL`` x white level (3x3 mean) connected to the frame border.

        A flood fill from the border through dark pixels. Lungs are darker than tissue but well above
        this level and walled in by the chest wall and ribs, so they stay body.
        """
        smooth = ndimage.uniform_filter(self.x, size=(1, 3, 3))  # JPEG noise would leave speckle
        labels, count = ndimage.label(smooth <= BACKGROUND_LEVEL * self.white, structure=_STRUCTURE)
        border = np.zeros(count + 1, dtype=bool)
        for edge in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
            border[edge] = True
        border[0] = False
        return border[labels]

    def markers(self) -> tuple[_Parts, np.ndarray]:
        """Marker candidates and which of them pass every test (see :func:`marker_area`).

        Per-pixel work runs on the candidates' pixels only (a few percent of the frame), as flat arrays.
        """
        h, w = self.x.shape[1:]
        tophat = self.x - self.surround
        parts = _components(tophat >= MARKER_EDGE * self.white)
        k = parts.count
        pixel = np.flatnonzero(parts.labels)
        label = parts.labels.ravel()[pixel]
        x, top, surround = self.x.ravel()[pixel], tophat.ravel()[pixel], self.surround.ravel()[pixel]
        white = self.white.ravel()[pixel // (h * w)]
        band = _band_mask(h, w).ravel()[pixel % (h * w)]
        strong = (x >= MARKER_BRIGHT * white) & (top >= MARKER_CONTRAST * white) & band
        size = np.bincount(label, minlength=k + 1)
        stroke = top >= 0.75 * (np.bincount(label, top, k + 1) / np.maximum(size, 1))[label]
        stem, stem_col = _stems(pixel[stroke], label[stroke], h, w, k)
        strokes = np.bincount(label[stroke], minlength=k + 1)[1:]
        left_of_stem = np.bincount(label[stroke & (pixel % w < stem_col[label] - 1)], minlength=k + 1)[1:]
        peak = np.zeros(k + 1)
        np.maximum.at(peak, label, x)
        height, width = parts.height, parts.width
        keep = np.bincount(label[strong], minlength=k + 1)[1:] > 0
        keep &= (height >= 5) & (height <= MARKER_MAX_SIDE * h) & (width <= MARKER_MAX_SIDE * w)
        keep &= (height <= MARKER_MAX_ASPECT * width) & (width <= MARKER_MAX_ASPECT * height)
        edges = (
            (parts.top == 0) * 1 + (parts.left == 0) + (parts.top + height == h) + (parts.left + width == w)
        )
        keep &= edges <= 1  # anatomy cut by a frame corner, not a letter
        keep &= (stem[1:] >= MARKER_STEM * height) & (left_of_stem <= MARKER_SERIF * strokes)
        keep &= strokes <= MARKER_MAX_FILL * height * width
        isolated = np.bincount(label, surround, k + 1)[1:] <= MARKER_SURROUND * peak[1:] * size[1:]
        saturated = peak[1:] >= MARKER_SATURATED * self.white.ravel()[parts.film]
        return parts, keep & (isolated | saturated)

    def text_lines(self) -> tuple[_Parts, np.ndarray]:
        """Text-line candidates and which of them pass every test (see :func:`text_score`).

        Computed on the four corner boxes only, stacked as a batch of ``4 N`` crops: the labels are
        crop-shaped, while ``film``, ``top`` and ``left`` are given in the films' own coordinates.
        """
        h, w = self.x.shape[1:]
        ch, cw = round(TEXT_REGION[0] * h), round(TEXT_REGION[1] * w)
        x, surround = _corner_crops(self.x, ch, cw), _corner_crops(self.surround, ch, cw)
        white = np.repeat(self.white, 4, axis=0)
        ink = (x - surround >= TEXT_CONTRAST * white) & (surround <= TEXT_DARK * white)
        bridged = ndimage.minimum_filter1d(
            ndimage.maximum_filter1d(ink, TEXT_GAP + 1, axis=2), TEXT_GAP + 1, axis=2
        )
        parts = _components(bridged)
        marks, n_marks = ndimage.label(ink, structure=_STRUCTURE)
        pairs = np.unique(parts.labels[ink].astype(np.int64) * (n_marks + 1) + marks[ink])
        n_marks_in = np.bincount(pairs // (n_marks + 1), minlength=parts.count + 1)[1:]
        height, width, crop, top, left = parts.height, parts.width, parts.film, parts.top, parts.left
        keep = (height >= 3) & (height <= TEXT_MAX_HEIGHT * h) & (width >= TEXT_MIN_ASPECT * height)
        keep &= (
            (width < cw)
            & (_label_count(parts.labels, ink, parts.count) <= TEXT_MAX_FILL * height * width)
            & (n_marks_in >= TEXT_MIN_MARKS)
        )
        tissue = _summed_area(x > TEXT_TISSUE * white)
        outer, outer_area = _box_sums(tissue, crop, (top - 2, left - 2, top + height + 2, left + width + 2))
        inner, _ = _box_sums(tissue, crop, (top, left, top + height, left + width))
        keep &= outer - inner <= TEXT_MAX_TISSUE * np.maximum(outer_area - height * width, 1)
        corner = crop % 4  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
        placed = parts._replace(
            film=crop // 4, top=top + (corner >= 2) * (h - ch), left=left + (corner % 2) * (w - cw)
        )
        return placed, keep


def _body_fraction(films: _Films) -> Tensor:
    return torch.from_numpy(1.0 - films.background.mean(axis=(1, 2), dtype=np.float64))


def _top_corner_background(films: _Films) -> Tensor:
    h, w = films.x.shape[1:]
    ch, cw = round(CORNER * h), round(CORNER * w)
    corners = np.concatenate([films.background[:, :ch, :cw], films.background[:, :ch, w - cw :]], axis=2)
    return torch.from_numpy(corners.mean(axis=(1, 2), dtype=np.float64))


def _marker_area(films: _Films) -> Tensor:
    parts, keep = films.markers()
    best = np.zeros(len(films.x), dtype=np.float64)
    np.maximum.at(best, parts.film[keep], parts.area[keep])
    return torch.from_numpy(best / (films.x.shape[1] * films.x.shape[2]))


def _text_score(films: _Films) -> Tensor:
    parts, keep = films.text_lines()
    return torch.from_numpy(np.bincount(parts.film[keep], minlength=len(films.x)).astype(np.float64))


def body_fraction(images: Tensor) -> Tensor:
    """Share of the frame the body fills, ``(N,)`` float64: 1 for tight collimation.

    The frame minus the background: pixels at most ``BACKGROUND_LEVEL`` x white level (after a 3x3
    mean) connected to the frame border (a flood fill from the border through dark pixels). Burned-in
    marks on the background count as body; they cover well under 1% of a frame.
    """
    return _body_fraction(_Films(images))


def top_corner_background(images: Tensor) -> Tensor:
    """Mean background share (see :func:`body_fraction`) of the two top corner squares, ``(N,)``.

    The squares have ``CORNER`` of each side. Air above the shoulders shows as background there; a
    tightly collimated film has none (nor has one whose raised arms fill the top corners).
    """
    return _top_corner_background(_Films(images))


def marker_area(images: Tensor) -> Tensor:
    """Area (fraction of the frame) of the largest burned-in side marker ("R"/"L"), ``(N,)``; 0 if none.

    A marker is a compact bright letter standing out from its surroundings (the ``OPENING`` px grey
    opening): a connected region exceeding them by ``MARKER_EDGE`` x white level, holding pixels
    >= ``MARKER_BRIGHT`` x white level that exceed them by ``MARKER_CONTRAST`` x white level inside
    the outer ``BAND``; its box is 5 px to ``MARKER_MAX_SIDE`` of the side, at most
    ``MARKER_MAX_ASPECT`` long and touches at most one frame edge; its strokes have a straight left stem (``MARKER_STEM``) and fill at
    most ``MARKER_MAX_FILL`` of the box; and it lies on air (``MARKER_SURROUND``) or is burned in
    brighter than the anatomy (``MARKER_SATURATED``). Dim grey letters and letters touching other
    bright structures are missed; other stemmed letters ("K" of "KV59", "P" of "A-P") count, and now and
    then a straight fragment of clavicle passes.
    """
    return _marker_area(_Films(images))


def text_score(images: Tensor) -> Tensor:
    """Number of burned-in text lines (timestamps, "KV70", "A-P") in the four corner boxes, ``(N,)``.

    At 224 px such text is a faint, blurred band a few pixels tall, so the rule looks for that shape,
    not for letters. Ink: pixels exceeding their surroundings (the ``OPENING`` px grey opening) by
    ``TEXT_CONTRAST`` x white level where the surroundings are dark (<= ``TEXT_DARK`` x white level:
    text is burned onto air), inside the ``TEXT_REGION`` corner boxes; ink closer than ``TEXT_GAP`` px
    horizontally joins into a line. A line counts when it is 3 px to ``TEXT_MAX_HEIGHT`` of the height
    tall, ``TEXT_MIN_ASPECT`` times as wide as tall, holds ``TEXT_MIN_MARKS`` separate marks, fills at
    most ``TEXT_MAX_FILL`` of its box and has air around it (``TEXT_MAX_TISSUE``). Lines of a dense
    multi-line header block merge into one tall block and are not counted, so this is a lower bound;
    text printed over tissue is missed.
    """
    return _text_score(_Films(images))


def text_present(images: Tensor) -> Tensor:
    """Whether any burned-in text line is found (:func:`text_score` > 0), bool ``(N,)``."""
    return text_score(images) > 0


def cue_values(images: Tensor) -> dict[str, Tensor]:
    """All :data:`CUES` for a batch, each ``(N,)`` float64, sharing the intermediate images."""
    films = _Films(images)
    return {
        "body_fraction": _body_fraction(films),
        "top_corner_background": _top_corner_background(films),
        "marker_area": _marker_area(films),
        "text_score": _text_score(films),
    }


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Rank-based AUROC of ``scores`` for ``labels == 1`` (ties count half); nan without both classes.

    The Mann-Whitney statistic: the chance that a random positive scores above a random negative.
    Below 0.5 means the statistic is higher for the negatives.
    """
    s = torch.as_tensor(scores).detach().cpu().double().numpy().ravel()
    y = torch.as_tensor(labels).detach().cpu().numpy().ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2.0)[inverse]  # mean 1-based rank of each tie group
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _describe(v: Tensor) -> dict[str, float]:
    """Mean, quartiles and share above zero of one class's values (nan when the class is empty)."""
    if v.numel() == 0:
        return dict.fromkeys(("mean", "q1", "median", "q3", "nonzero"), float("nan"))
    q1, median, q3 = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=v.dtype)).tolist()
    return {
        "mean": float(v.mean()),
        "q1": q1,
        "median": median,
        "q3": q3,
        "nonzero": float((v > 0).double().mean()),
    }


def summarise_cues(values: dict[str, Tensor], labels: Tensor) -> dict[str, Any]:
    """Per class (0 NORMAL, 1 PNEUMONIA) mean, quartiles and share non-zero of each statistic in
    ``values``, and each statistic's single-cue AUROC for PNEUMONIA (see :func:`auroc`)."""
    y = torch.as_tensor(labels).detach().cpu().long().ravel()
    if bool(((y != 0) & (y != 1)).any()):
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    table: dict[str, Any] = {"n": {name: int((y == c).sum()) for c, name in enumerate(CLASS_NAMES)}}
    for cue, raw in values.items():
        v = torch.as_tensor(raw).detach().cpu().double().ravel()
        if v.numel() != y.numel():
            raise ValueError(f"{cue}: {v.numel()} values for {y.numel()} labels")
        table[cue] = {name: _describe(v[y == c]) for c, name in enumerate(CLASS_NAMES)}
        table[cue]["auroc"] = auroc(v, y)
    return table


def cue_table(images: Tensor, labels: Tensor, batch_size: int = 256) -> dict[str, Any]:
    """:func:`summarise_cues` of :func:`cue_values` over ``images``, ``batch_size`` films at a time
    (the intermediates take ~40 bytes per pixel)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    parts = [cue_values(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    values = {cue: torch.cat([p[cue] for p in parts]) if parts else torch.zeros(0) for cue in CUES}
    return summarise_cues(values, labels)

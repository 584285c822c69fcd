"""Synthetic acquisition cues: burned-in text, side markers, collimation, shutters and padding.

On the Kermany training split PNEUMONIA films are more often tightly collimated (lungs fill the frame),
carry large side markers and burned-in text (timestamps, exposure labels), while NORMAL films mostly
show shoulders and a small marker, so a classifier can learn the *acquisition look* as evidence. This
module draws those cues synthetically for two uses:

* label-preserving shift families for the deterministic evaluation suite (:data:`SHIFT_FAMILIES`): each
  ``fn(x, g)`` takes one float ``(1, H, W)`` image in [0, 255] and takes all its randomness from the CPU
  generator ``g``, so a result depends only on (image, generator seed);
* a batched training augmentation (:class:`AcquisitionAugment`) that draws the same cues on films of
  both classes, so that they stop carrying the label.

Text is rendered once per cap height with Pillow's built-in font (:func:`glyph_bank`) and pasted as
antialiased masks, so it looks like real burned-in annotations rather than blobs.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

MIN_CAP_PX = 4
"""Smallest cap height rendered: below it letters are no longer letters."""

_BLOCK_LINE_SCALE = 0.55  # lines of a stacked exposure block are smaller than single labels
_TEXT_MAX_WIDTH = 0.45  # a text label never spans more than this fraction of the image width
_TEXT_BOX_P = 0.2  # probability of a dark box behind a text label
_MARKER_BOX_P = 0.3  # probability of a boxed side marker


def _make_glyph_strings() -> dict[str, tuple[str, ...]]:
    """The annotation strings; a fixed seed, so every process renders the same bank."""
    rng = random.Random(1_857_263)
    times = tuple(
        f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}" for _ in range(10)
    )
    dates = tuple(
        f"{rng.randrange(2008, 2017)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}" for _ in range(6)
    )
    ids = (
        f"ID {rng.randrange(10**6, 10**7)}",
        f"ID:{rng.randrange(10**5, 10**6)}",
        f"P{rng.randrange(10**6, 10**7)}",
        f"{rng.randrange(10**7, 10**8)}",
        f"NO.{rng.randrange(10**4, 10**5)}",
    )
    blocks = tuple(
        f"kV {rng.randrange(55, 81)}\nmA {rng.choice((100, 160, 200, 250, 320))}\nmAs {rng.choice(mas)}"
        for mas in [("1.6", "2.0", "2.5", "3.2")] * 3
    ) + (f"KV{rng.randrange(55, 81)}\nmAs {rng.choice(('1.25', '2.5', '4.0'))}",)
    return {
        "marker": ("R", "L"),
        "timestamp": times,
        "date": dates,
        "exposure": (
            "KV59",
            "KV66",
            "KV70",
            "kVp 62",
            "kVp 75",
            "mAs 2.5",
            "mAs 1.6",
            "PORTABLE",
            "SUPINE",
            "AP",
        ),
        "patient_id": ids,
        "block": blocks,
    }


GLYPH_STRINGS: Mapping[str, tuple[str, ...]] = MappingProxyType(_make_glyph_strings())
"""Strings of the glyph bank by category; ``"marker"`` holds the side markers, the rest is text."""

TEXT_CATEGORIES: tuple[str, ...] = ("timestamp", "date", "exposure", "patient_id", "block")
"""Text categories, drawn with equal probability (then a string uniformly within the category)."""


# --------------------------------------------------------------------------------------------------
# glyph rendering


@functools.lru_cache(maxsize=1)
def freetype_available() -> bool:
    """Whether ``ImageFont.load_default(size=...)`` gives a scalable FreeType font (Pillow >= 10.1)."""
    try:
        font = ImageFont.load_default(size=40)
    except (TypeError, OSError, ImportError):
        return False
    return isinstance(font, ImageFont.FreeTypeFont)


@functools.lru_cache(maxsize=1)
def _freetype_cap_ratio() -> float:
    """Cap height of the default FreeType font per unit of font size (to ask for a cap height)."""
    font = ImageFont.load_default(size=200)
    _, top, _, bottom = font.getbbox("H")
    return (bottom - top) / 200.0


def _bitmap_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader is not None else ImageFont.load_default()


def _draw_ink(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, spacing: int) -> Image.Image:
    """``text`` in white on black, cropped to its ink."""
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.multiline_textbbox((0, 0), text, font=font, spacing=spacing)
    pad = 2
    image = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(image).multiline_text((pad - left, pad - top), text, fill=255, font=font, spacing=spacing)
    box = image.getbbox()
    return image.crop(box) if box is not None else image


def render_glyph(text: str, cap_px: int, boxed: bool = False, *, freetype: bool | None = None) -> Tensor:
    """Antialiased float mask (h, w) in [0, 1] of ``text`` whose capitals are ``cap_px`` pixels tall.

    Uses Pillow's built-in scalable font when available, otherwise its bitmap font resampled to size
    (blurrier but still letters). ``boxed`` draws a rectangle outline around the text, like a boxed
    lead marker. Multi-line text (``"\\n"``) is stacked with a third of a line of spacing.
    """
    if cap_px < 1:
        raise ValueError(f"cap_px must be >= 1, got {cap_px}")
    use_freetype = freetype_available() if freetype is None else freetype
    spacing = max(1, round(0.35 * cap_px))
    if use_freetype:
        font = ImageFont.load_default(size=max(1, round(cap_px / _freetype_cap_ratio())))
        ink = _draw_ink(text, font, spacing)
    else:
        font = _bitmap_font()
        native_cap = _draw_ink("H", font, 1).height  # a bitmap font's bbox is its line box, not its ink
        scale = cap_px / native_cap
        ink = _draw_ink(text, font, max(1, round(spacing / scale)))
        size = (max(1, round(ink.width * scale)), max(1, round(ink.height * scale)))
        ink = ink.resize(size, Image.Resampling.BILINEAR if scale >= 1 else Image.Resampling.BOX)
    if boxed:
        line = max(1, round(cap_px / 10))
        margin = max(1, round(0.35 * cap_px)) + line
        framed = Image.new("L", (ink.width + 2 * margin, ink.height + 2 * margin), 0)
        framed.paste(ink, (margin, margin))
        ImageDraw.Draw(framed).rectangle((0, 0, framed.width - 1, framed.height - 1), outline=255, width=line)
        ink = framed
    return torch.from_numpy(np.asarray(ink, dtype=np.float32) / 255.0)


@functools.lru_cache(maxsize=256)
def glyph_bank(cap_px: int) -> Mapping[str, tuple[Tensor, ...]]:
    """Every string of :data:`GLYPH_STRINGS` rendered at one cap height, built once per process and size.

    Keys are the categories of :data:`GLYPH_STRINGS` plus ``"marker_boxed"`` (the boxed side markers);
    the masks are aligned with the strings. Lines of a ``"block"`` are drawn at 0.55 of ``cap_px``, as the
    stacked exposure blocks on real films are smaller than the single labels. Treat the masks as read-only.
    """
    cap_px = max(MIN_CAP_PX, int(cap_px))
    bank: dict[str, tuple[Tensor, ...]] = {}
    for category, strings in GLYPH_STRINGS.items():
        cap = max(MIN_CAP_PX, round(_BLOCK_LINE_SCALE * cap_px)) if category == "block" else cap_px
        bank[category] = tuple(render_glyph(s, cap) for s in strings)
    bank["marker_boxed"] = tuple(render_glyph(s, cap_px, boxed=True) for s in GLYPH_STRINGS["marker"])
    return MappingProxyType(bank)


def _box_margin(cap_px: int) -> int:
    """Margin of the (optional) dark box around a text label."""
    return max(1, round(0.3 * cap_px))


# --------------------------------------------------------------------------------------------------
# drawing primitives (batched; shared by the shift families and the augmentation)


def _axis_taps(zoom: Tensor, shift: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Lower source index (B, n) and weight of the bilinear taps along one axis of length ``n``.

    Output pixel ``i`` samples the normalised input coordinate ``zoom * u_i + shift`` (``u_i`` the
    normalised pixel centre) with ``grid_sample``'s ``align_corners=False`` and border semantics; written
    so that ``zoom=1, shift=0`` lands exactly on the pixel centres (the identity is exact).
    """
    i = torch.arange(n, device=zoom.device, dtype=zoom.dtype)
    p = zoom[:, None] * (i + 0.5 - n / 2) + (shift[:, None] + 1) * (n / 2) - 0.5
    p = p.clamp(0, n - 1)
    low = p.floor().clamp(max=max(n - 2, 0))
    return low.long(), p - low


def _resample(x: Tensor, zoom: Tensor, shift: Tensor, samples: Tensor | None = None) -> Tensor:
    """Per-sample axis-aligned zoom + shift ((N, 2) as (x, y)) of the ``samples`` (N,) of a (B, 1, H, W)
    batch (all of them when None), bilinear; returns (N, 1, H, W).

    Equal to ``grid_sample(x, affine_grid(theta), padding_mode="border", align_corners=False)`` with
    ``theta = [[zoom_x, 0, shift_x], [0, zoom_y, shift_y]]``, but separable (a row gather, then a column
    gather): several times cheaper on CPU than building and sampling a (B, H, W, 2) grid.
    """
    batch, _, height, width = x.shape
    if samples is None:
        samples = torch.arange(batch, device=x.device)
    count = samples.shape[0]
    if height < 2 or width < 2:
        return x.index_select(0, samples)
    rows, wy = _axis_taps(zoom[:, 1], shift[:, 1], height)
    cols, wx = _axis_taps(zoom[:, 0], shift[:, 0], width)
    flat = x.reshape(batch * height, width)
    rows = (rows + samples[:, None] * height).reshape(-1)
    y = flat.index_select(0, rows).lerp_(flat.index_select(0, rows + 1), wy.reshape(-1, 1))
    y = y.view(count, height, width)
    out = torch.gather(y, 2, cols[:, None, :].expand(count, height, width))
    out.lerp_(torch.gather(y, 2, (cols + 1)[:, None, :].expand(count, height, width)), wx[:, None, :])
    return out.view(count, 1, height, width)


def _warp(
    x: Tensor,
    scale: Tensor,
    centre: Tensor,
    film: Tensor | None = None,
    film_centre: Tensor | None = None,
    fill: Tensor | None = None,
    samples: Tensor | None = None,
) -> Tensor:
    """Crop-and-resize, then shrink-and-pad, of the ``samples`` (N,) of a (B, 1, H, W) batch (all of them
    when None) in one resampling; returns (N, 1, H, W).

    In normalised coordinates ([-1, 1] across the image; all (N, 2) as (x, y)): the crop keeps the window
    of half-size ``scale`` around ``centre``; the result is shrunk to half-size ``film`` around
    ``film_centre`` and the outside set to ``fill`` (N,). ``scale=1, centre=0, film=1`` is the identity.
    """
    if film is None or film_centre is None or fill is None:
        return _resample(x, scale, centre, samples)
    out = _resample(x, scale / film, centre - scale * film_centre / film, samples)
    _, _, height, width = x.shape
    uy = (torch.arange(height, device=x.device, dtype=x.dtype) * 2 + 1) / height - 1
    ux = (torch.arange(width, device=x.device, dtype=x.dtype) * 2 + 1) / width - 1
    outside_rows = ((uy[None, :] - film_centre[:, 1:]).abs() > film[:, 1:]).to(x.dtype)  # (N, H)
    outside_cols = ((ux[None, :] - film_centre[:, :1]).abs() > film[:, :1]).to(x.dtype)  # (N, W)
    value = fill.view(-1, 1, 1, 1).to(out.dtype).expand_as(out)
    # two separable 0/1 blends: exact, and no (N, H, W) mask (broadcast bool ops are slow on CPU)
    return out.lerp_(value, outside_rows[:, None, :, None]).lerp_(value, outside_cols[:, None, None, :])


def _blades(x: Tensor, widths: Tensor, soft: Tensor, value: Tensor) -> Tensor:
    """Collimator blades, in place: bands of ``value`` (B,) over the edges, ``widths`` (B, 4) in pixels for
    the top, bottom, left and right edge (0: none), with a linear soft edge ``soft`` (B,) pixels wide."""
    _, _, height, width = x.shape
    y = torch.arange(height, device=x.device, dtype=x.dtype) + 0.5
    c = torch.arange(width, device=x.device, dtype=x.dtype) + 0.5
    soft = soft.clamp(min=0.5)[:, None]

    def band(coord: Tensor, w: Tensor) -> Tensor:
        ramp = ((w[:, None] - coord[None, :]) / soft + 0.5).clamp(0, 1)
        return ramp * (w[:, None] > 0)

    rows = torch.maximum(band(y, widths[:, 0]), band(height - y, widths[:, 1]))  # (B, H)
    cols = torch.maximum(band(c, widths[:, 2]), band(width - c, widths[:, 3]))  # (B, W)
    target = value.view(-1, 1, 1, 1).to(x.dtype).expand_as(x)
    # blending rows then columns gives opacity 1 - (1 - rows)(1 - cols) without an (B, H, W) map
    return x.lerp_(target, rows[:, None, :, None]).lerp_(target, cols[:, None, None, :])


_Num = Tensor | float

# Text labels sit in the corners (ay, ax as fractions of the free room: image minus label); a label whose
# partner corner on the same edge is free may instead slide anywhere along that edge.
_CORNERS: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0))
_PARTNER: tuple[int, ...] = (1, 0, 3, 2)
_SLIDE_P = 0.5
# Side marker places (ay_low, ay_high, ax): the two upper corners (they take text corners 0 and 1)
# and the upper half of either lateral edge.
_MARKER_PLACES: tuple[tuple[float, float, float], ...] = (
    (0.0, 0.0, 0.0),
    (0.0, 0.0, 1.0),
    (0.25, 0.55, 0.0),
    (0.25, 0.55, 1.0),
)


def _anchor_position(a: _Num, room: _Num, inset: _Num) -> _Num:
    """Top (or left) pixel of a label at fraction ``a`` of the free ``room``, ``inset`` pixels away from
    the edge it hugs (no inset half-way)."""
    return a * room + (1.0 - 2.0 * a) * inset


# --------------------------------------------------------------------------------------------------
# per-image shift families (evaluation suite)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (), generator=g))


def _check_image(x: Tensor) -> None:
    if x.ndim != 3 or x.shape[0] != 1 or not x.is_floating_point():
        raise ValueError(f"expected a float (1, H, W) image, got {tuple(x.shape)} {x.dtype}")


def _paste_label(
    x: Tensor,
    mask: Tensor,
    *,
    ay: float,
    ax: float,
    inset: float,
    margin: int,
    value: float,
    box_alpha: float = 0.0,
    box_value: float = 0.0,
) -> Tensor:
    """Composite ``mask`` (brightness ``value``) into a copy of the (1, H, W) image at anchor (ay, ax),
    over a box ``margin`` pixels wider than the glyph (opacity ``box_alpha``, 0 for none)."""
    height, width = x.shape[-2:]
    box_h, box_w = mask.shape[0] + 2 * margin, mask.shape[1] + 2 * margin
    room_y, room_x = max(0, height - box_h), max(0, width - box_w)
    top = min(max(0, round(_anchor_position(ay, room_y, inset))), room_y)
    left = min(max(0, round(_anchor_position(ax, room_x, inset))), room_x)
    out = x.clone()
    region = out[:, top : top + box_h, left : left + box_w]
    if box_alpha > 0:
        region.lerp_(torch.full_like(region, box_value), box_alpha)
    ink = region[:, margin : margin + mask.shape[0], margin : margin + mask.shape[1]]
    weight = mask[: ink.shape[-2], : ink.shape[-1]].to(device=x.device, dtype=x.dtype)
    ink.lerp_(torch.full_like(ink, value), weight)
    return out


def _text_mask(category: str, index: int, cap: int, max_width: float) -> tuple[Tensor, int]:
    """A text label's mask at ``cap`` px, made smaller until it fits ``max_width``; returns (mask, cap)."""
    while True:
        mask = glyph_bank(cap)[category][index]
        if mask.shape[1] + 2 * _box_margin(cap) <= max_width or cap <= MIN_CAP_PX:
            return mask, cap
        cap -= 1


def _burned_text(x: Tensor, g: torch.Generator) -> tuple[Tensor, set[int]]:
    """:func:`burned_text`, also returning the corners it took (a sliding label takes its whole edge)."""
    _check_image(x)
    height, width = x.shape[-2:]
    side = min(height, width)
    count = 1 + _randint(g, 3)
    corners = torch.randperm(len(_CORNERS), generator=g)[:count].tolist()
    used = set(corners)
    for corner in corners:
        category = TEXT_CATEGORIES[_randint(g, len(TEXT_CATEGORIES))]
        index = _randint(g, len(GLYPH_STRINGS[category]))
        cap = max(MIN_CAP_PX, round(_uniform(g, 0.03, 0.08) * side))
        mask, cap = _text_mask(category, index, cap, _TEXT_MAX_WIDTH * width)
        ay, ax = _CORNERS[corner]
        slide = _uniform(g, 0, 1) < _SLIDE_P and _PARTNER[corner] not in used
        if slide:
            ax = _uniform(g, 0, 1)
            used.add(_PARTNER[corner])
        boxed = _uniform(g, 0, 1) < _TEXT_BOX_P
        x = _paste_label(
            x,
            mask,
            ay=ay,
            ax=ax,
            inset=_uniform(g, 0.005, 0.03) * side,
            margin=_box_margin(cap),
            value=_uniform(g, 200, 255),
            box_alpha=_uniform(g, 0.8, 1.0) if boxed else 0.0,
            box_value=_uniform(g, 0, 20),
        )
    return x, used


def burned_text(x: Tensor, g: torch.Generator) -> Tensor:
    """1-3 burned-in text labels (time, date, exposure label or block, patient id) in distinct corners,
    some sliding along the top or bottom edge: near-white (200-255), cap height 3-8% of the side, at
    most 45% of the width, sometimes over a dark box."""
    return _burned_text(x, g)[0]


def _marker(
    x: Tensor, g: torch.Generator, size: tuple[float, float], taken: set[int] | None = None
) -> Tensor:
    """A side marker of cap height ``size`` (fractions of the side) at a place whose corner is not taken."""
    _check_image(x)
    side = min(x.shape[-2:])
    letter = _randint(g, 2)
    boxed = _uniform(g, 0, 1) < _MARKER_BOX_P
    cap = max(MIN_CAP_PX, round(_uniform(g, *size) * side))
    places = [i for i in range(len(_MARKER_PLACES)) if i >= 2 or i not in (taken or set())]
    ay_low, ay_high, ax = _MARKER_PLACES[places[_randint(g, len(places))]]
    return _paste_label(
        x,
        glyph_bank(cap)["marker_boxed" if boxed else "marker"][letter],
        ay=_uniform(g, ay_low, ay_high),
        ax=ax,
        inset=_uniform(g, 0.02, 0.08) * side,
        margin=0,
        value=_uniform(g, 210, 255),
    )


def marker_large(x: Tensor, g: torch.Generator) -> Tensor:
    """A large side marker ("R" or "L", sometimes boxed), cap height 8-15% of the side, in an upper corner
    or on the upper half of a lateral edge: the size seen on many PNEUMONIA films of the training split."""
    return _marker(x, g, (0.08, 0.15))


def marker_small(x: Tensor, g: torch.Generator) -> Tensor:
    """A small side marker, cap height 3-5% of the side: the size seen on most NORMAL films."""
    return _marker(x, g, (0.03, 0.05))


def collimation_tight(x: Tensor, g: torch.Generator) -> Tensor:
    """Tight collimation: keep a central 0.60-0.80 (linear) of height and width, centre jittered by up to
    3% of the side and aspect by up to 5%, resized back: shoulders and outer ribs leave the frame."""
    _check_image(x)
    keep = _uniform(g, 0.60, 0.80)
    aspect = math.exp(_uniform(g, -0.05, 0.05))
    scale = torch.tensor([[keep * aspect, keep / aspect]], dtype=x.dtype, device=x.device)
    centre = torch.tensor(
        [[_uniform(g, -0.06, 0.06), _uniform(g, -0.06, 0.06)]], dtype=x.dtype, device=x.device
    )
    return _warp(x.unsqueeze(0), scale, centre)[0]


def collimation_blades(x: Tensor, g: torch.Generator) -> Tensor:
    """Collimator blades / shutters: near-black (or, less often, bright) bands over 5-15% of the side at
    1-4 edges, with a soft edge."""
    _check_image(x)
    height, width = x.shape[-2:]
    count = 1 + _randint(g, 4)
    edges = torch.randperm(4, generator=g)[:count].tolist()
    widths = [0.0] * 4
    for edge in edges:
        widths[edge] = _uniform(g, 0.05, 0.15) * (height if edge < 2 else width)
    soft = _uniform(g, 0.005, 0.02) * min(height, width)
    dark = _uniform(g, 0, 1) < 0.75
    value = _uniform(g, 0, 15) if dark else _uniform(g, 235, 255)
    params = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in ([widths], [soft], [value]))
    return _blades(x.unsqueeze(0).clone(), *params)[0]


def border_pad(x: Tensor, g: torch.Generator) -> Tensor:
    """Letterbox: the film shrunk to 0.70-0.90 of the frame, moved off-centre by up to half the free room,
    and padded with a constant: black, white or the film's 1% quantile."""
    _check_image(x)
    film = _uniform(g, 0.70, 0.90)
    room = 1.0 - film
    offset = [_uniform(g, -0.5, 0.5) * room, _uniform(g, -0.5, 0.5) * room]
    kind = _randint(g, 3)
    fill = 0.0 if kind == 0 else 255.0 if kind == 1 else float(torch.quantile(x.reshape(-1).float(), 0.01))
    params = (
        torch.tensor(v, dtype=x.dtype, device=x.device)
        for v in ([[1.0, 1.0]], [[0.0, 0.0]], [[film, film]], [offset], [fill])
    )
    return _warp(x.unsqueeze(0), *params)[0]


def text_marker_crop(x: Tensor, g: torch.Generator) -> Tensor:
    """The combined worst case: tight collimation, then burned-in text, then a large side marker (kept
    off the corners the text took)."""
    x, taken = _burned_text(collimation_tight(x, g), g)
    return _marker(x, g, (0.08, 0.15), taken)


SHIFT_FAMILIES: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "burned_text": burned_text,
    "marker_large": marker_large,
    "marker_small": marker_small,
    "collimation_tight": collimation_tight,
    "collimation_blades": collimation_blades,
    "border_pad": border_pad,
    "text_marker_crop": text_marker_crop,
}
"""Acquisition shift families in a fixed order; each is ``fn(x, g) -> x`` on a float (1, H, W) image in
[0, 255] (on any device) with all randomness from the CPU generator ``g`` (the caller clamps)."""


# --------------------------------------------------------------------------------------------------
# batched training augmentation


def _cap_ladder(size: tuple[float, float], side: int, ratio: float = 1.1) -> list[int]:
    """Integer cap heights covering ``size`` (fractions of ``side``) in steps of about ``ratio``."""
    low = max(MIN_CAP_PX, math.floor(size[0] * side))
    high = max(low, math.ceil(size[1] * side))
    steps = max(1, math.ceil(math.log(high / low) / math.log(ratio))) if high > low else 1
    return sorted({round(low * (high / low) ** (i / steps)) for i in range(steps + 1)})


@dataclass
class _Cells:
    """Glyph masks of some strings at a ladder of cap heights, each in its own zero-padded cell.

    Uniform cells make a paste a plain gather of whole cells: no per-pixel index arithmetic into ragged
    masks. Cell 0 is blank (for samples without a label); a glyph sits ``margin`` pixels into its cell,
    and the (optional) box around it is ``box_h`` by ``box_w``.
    """

    cells: Tensor  # (n_ids, cell_h, cell_w) uint8
    ids: Tensor  # (n_caps, n_strings) cell id of each (cap, string)
    box_h: Tensor  # (n_ids,) glyph height + 2 margin
    box_w: Tensor  # (n_ids,)
    boundaries: Tensor  # (n_caps - 1,) geometric midpoints between the caps, for bucketize
    max_level: Tensor  # (n_strings,) largest cap level whose box fits the width limit
    line_h: int  # cell height enough for the single-line strings

    @classmethod
    def build(
        cls,
        masks: Sequence[Sequence[Tensor]],
        caps: Sequence[int],
        margins: bool,
        max_width: float,
        lines: int,
    ) -> _Cells:
        """``masks[level][string]`` is the string at ``caps[level]``; the first ``lines`` strings are single
        lines. Glyphs wider than ``max_width`` are never used (except at the smallest cap), so they do not
        widen the cells."""
        margin = [_box_margin(c) if margins else 0 for c in caps]
        n_caps, n_strings = len(caps), len(masks[0])
        box_h = torch.tensor([[m.shape[0] + 2 * margin[i] for m in row] for i, row in enumerate(masks)])
        box_w = torch.tensor([[m.shape[1] + 2 * margin[i] for m in row] for i, row in enumerate(masks)])
        levels = torch.arange(n_caps).view(n_caps, 1).expand(n_caps, n_strings)
        max_level = torch.where(box_w <= max_width, levels, 0).amax(dim=0)
        used = levels <= max_level
        cells = torch.zeros(
            n_caps * n_strings + 1, int(box_h[used].max()), int(box_w[used].max()), dtype=torch.uint8
        )
        for i, row in enumerate(masks):
            for j, m in enumerate(row):
                if used[i, j]:
                    p = margin[i]
                    cells[1 + i * n_strings + j, p : p + m.shape[0], p : p + m.shape[1]] = (
                        (m * 255).round().byte()
                    )
        caps_t = torch.tensor(caps, dtype=torch.float32)
        return cls(
            cells=cells,
            ids=torch.arange(1, n_caps * n_strings + 1).view(n_caps, n_strings),
            box_h=torch.cat((torch.zeros(1, dtype=torch.long), box_h.reshape(-1))),
            box_w=torch.cat((torch.zeros(1, dtype=torch.long), box_w.reshape(-1))),
            boundaries=(caps_t[:-1] * caps_t[1:]).sqrt(),
            max_level=max_level,
            line_h=int(box_h[:, :lines][used[:, :lines]].max()),
        )

    def to(self, device: torch.device) -> _Cells:
        return _Cells(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()})

    def lookup(self, string: Tensor, cap: Tensor) -> Tensor:
        """Cell ids of ``string`` at the ladder cap nearest to ``cap`` px (no wider than allowed)."""
        level = torch.bucketize(cap, self.boundaries.to(cap.dtype))
        return self.ids[torch.minimum(level, self.max_level[string]), string]


@dataclass
class _Kit:
    """Everything :class:`AcquisitionAugment` needs per image size and device, built once."""

    text: _Cells
    marker: _Cells
    counts: Tensor  # strings per text category
    starts: Tensor  # first string of each text category
    corners: Tensor  # (4, 2) _CORNERS
    partner: Tensor  # (4,) _PARTNER
    places: Tensor  # (4, 3) _MARKER_PLACES


def _paste_cells(
    flat: Tensor,
    size: tuple[int, int],
    cells: Tensor,
    *,
    sample: Tensor,
    top: Tensor,
    left: Tensor,
    value: Tensor,
    box: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> None:
    """Composite one glyph cell per sample into the flat (B*H*W) image ``flat``, in place.

    ``cells`` (N, h, w) uint8 go to the samples ``sample`` (N,) with their top-left at (``top``, ``left``)
    and brightness ``value`` (all (N,)); ``box`` is (opacity, value, box_h, box_w) of a dark box under
    the glyph. Only the change is scattered, with an add: where a cell sticks out of the image its
    indices are clamped onto the edge and its change is zeroed, so nothing is added twice.
    """
    height, width = size
    count, cell_h, cell_w = cells.shape
    device = flat.device
    rows = top[:, None] + torch.arange(cell_h, device=device)
    cols = left[:, None] + torch.arange(cell_w, device=device)
    inside = (rows < height).to(flat.dtype)[:, :, None] * (cols < width).to(flat.dtype)[:, None, :]
    rows = rows.clamp(max=height - 1) + sample[:, None] * height
    cols = cols.clamp(max=width - 1)
    index = (rows[:, :, None] * width + cols[:, None, :]).reshape(-1)
    current = flat.gather(0, index).view(count, cell_h, cell_w)
    out = current
    if box is not None:
        opacity, box_value, box_h, box_w = box
        rows_in = (torch.arange(cell_h, device=device) < box_h[:, None]).to(flat.dtype) * opacity[:, None]
        cols_in = (torch.arange(cell_w, device=device) < box_w[:, None]).to(flat.dtype)
        out = torch.lerp(
            out, box_value[:, None, None].expand_as(out), rows_in[:, :, None] * cols_in[:, None, :]
        )
    ink = cells.to(flat.dtype).mul_(1 / 255)
    out = torch.lerp(out, value[:, None, None].expand_as(out), ink)
    flat.scatter_add_(0, index, ((out - current) * inside).reshape(-1))


def _chosen(mask: Tensor) -> Tensor | None:
    """Samples to draw on: on CPU only the chosen ones (a host sync costs nothing there); elsewhere
    ``None``, meaning all of them, the others with identity parameters, so that the device never waits
    for the host. Both give the same result."""
    return mask.nonzero().squeeze(1) if mask.device.type == "cpu" else None


def _take(t: Tensor, rows: Tensor | None) -> Tensor:
    return t if rows is None else t.index_select(0, rows)


def _put(x: Tensor, rows: Tensor | None, values: Tensor) -> Tensor:
    """``values`` written back into ``x`` (in place) at ``rows``; all of ``values`` when ``rows`` is None."""
    return values if rows is None else x.index_copy_(0, rows, values)


def _probability(name: str, value: float) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return p


def _size_range(name: str, value: Sequence[float], upper: float) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not 0.0 < low <= high <= upper:
        raise ValueError(f"{name} must satisfy 0 < low <= high <= {upper}, got {value!r}")
    return low, high


_TEXT_SLOTS = 3


class AcquisitionAugment(torch.nn.Module):
    """Draws acquisition cues (crop, shutters, padding, burned-in text, side markers) on a training batch.

    Applied to films of both classes, it takes away the label information these cues carry in the
    training split. Each sample independently gets, with its probability: a central-ish crop of linear
    scale in ``crop_scale`` resized back (``p_crop``), dark or bright edge bands (``p_blades``), a shrink
    + constant pad (``p_pad``), 1-3 text labels with cap height in ``text_size`` (fractions of the side,
    ``p_text``) and one R/L marker with cap height in ``marker_size`` (``p_marker``).

    ``forward(x)`` takes a float (B, 1, H, W) batch in [0, 1] (after the geometric augmentation and the
    rescale) and returns a new tensor of the same shape, dtype and device. It is batched torch code
    without host syncs on accelerators (crop and pad are one separable bilinear resampling; glyphs are
    gathered from a per-size bank of cells and scattered). Randomness comes from ``generator`` (on
    ``x``'s device) or torch's global RNG on ``x``'s device, so a seeded run is reproducible.
    """

    def __init__(
        self,
        p_text: float = 0.5,
        p_marker: float = 0.5,
        p_crop: float = 0.5,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        p_blades: float = 0.2,
        p_pad: float = 0.2,
        text_size: tuple[float, float] = (0.03, 0.08),
        marker_size: tuple[float, float] = (0.03, 0.15),
        p_soften: float = 0.0,
    ) -> None:
        super().__init__()
        self.p_text = _probability("p_text", p_text)
        self.p_marker = _probability("p_marker", p_marker)
        self.p_crop = _probability("p_crop", p_crop)
        self.crop_scale = _size_range("crop_scale", crop_scale, 1.0)
        self.p_blades = _probability("p_blades", p_blades)
        self.p_pad = _probability("p_pad", p_pad)
        self.text_size = _size_range("text_size", text_size, 0.3)
        self.marker_size = _size_range("marker_size", marker_size, 0.3)
        self.p_soften = _probability("p_soften", p_soften)
        self._kits: dict[tuple[int, int, str], _Kit] = {}

    def extra_repr(self) -> str:
        return (
            f"p_text={self.p_text}, p_marker={self.p_marker}, p_crop={self.p_crop}, "
            f"crop_scale={self.crop_scale}, p_blades={self.p_blades}, p_pad={self.p_pad}, "
            f"text_size={self.text_size}, marker_size={self.marker_size}, p_soften={self.p_soften}"
        )

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or not x.is_floating_point():
            raise ValueError(f"expected a float (B, 1, H, W) batch, got {tuple(x.shape)} {x.dtype}")
        probabilities = (self.p_text, self.p_marker, self.p_crop, self.p_blades, self.p_pad, self.p_soften)
        if x.shape[0] == 0 or max(probabilities) == 0:
            return x.clone()

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=x.device)

        y = x.to(torch.float32, copy=True)
        if self.p_soften > 0:
            y = self._soften(y, rand)
        if self.p_crop > 0 or self.p_pad > 0:
            y = self._geometry(y, rand)
        if self.p_blades > 0:
            y = self._shutters(y, rand)
        if self.p_text > 0 or self.p_marker > 0:
            self._annotate(y, rand)
        return y.to(x.dtype)

    def _geometry(self, x: Tensor, rand: Callable[..., Tensor]) -> Tensor:
        """Crop (scale + small translation + slight aspect change) and pad, in one resampling."""
        batch = x.shape[0]
        crop = rand(batch) < self.p_crop
        low, high = self.crop_scale
        keep = low + (high - low) * rand(batch)
        aspect = torch.exp((2 * rand(batch) - 1) * 0.03)
        scale = torch.stack((keep * aspect, keep / aspect), dim=1).clamp(max=1.0)
        centre = (2 * rand(batch, 2) - 1) * (1.0 - scale).clamp(max=0.05)
        scale = torch.where(crop[:, None], scale, 1.0)
        centre = torch.where(crop[:, None], centre, 0.0)
        if self.p_pad == 0:
            rows = _chosen(crop)
            return _put(x, rows, _warp(x, _take(scale, rows), _take(centre, rows), samples=rows))
        pad = rand(batch) < self.p_pad
        film = torch.where(pad, 0.70 + 0.20 * rand(batch), 1.0)[:, None].expand(batch, 2)
        film_centre = (rand(batch, 2) - 0.5) * (1.0 - film)
        kind = rand(batch)
        rows = _chosen(crop | pad)
        sample = _take(x[:, 0, ::4, ::4], rows).flatten(1)
        quantile = sample.topk(max(1, round(0.01 * sample.shape[1])), dim=1, largest=False).values[:, -1]
        kind = _take(kind, rows)
        fill = torch.where(kind < 1 / 3, 0.0, torch.where(kind < 2 / 3, 1.0, quantile))
        params = [_take(t, rows) for t in (scale, centre, film, film_centre)]
        return _put(x, rows, _warp(x, *params, fill, samples=rows))

    def _soften(self, x: Tensor, rand: Callable[..., Tensor]) -> Tensor:
        """Down to a crop's scale and back up, with ``p_soften``: a crop resized back to the full size is
        softer than the film, and once uncropped films are softened alike the softness says nothing of
        the crop (nor, through the crop, of the label). Drawn before the crop, on any sample."""
        batch, _, height, width = x.shape
        chosen = rand(batch) < self.p_soften
        low, high = self.crop_scale
        scale = low + (high - low) * rand(batch)
        rows = _chosen(chosen)
        if rows is not None and rows.numel() == 0:
            return x
        out = x.clone()
        picked = range(batch) if rows is None else rows.tolist()
        for i in picked:  # one size per sample: a few small resizes, no larger than the batch
            s = float(scale[i])
            small = F.interpolate(
                x[i : i + 1],
                size=(max(2, round(height * s)), max(2, round(width * s))),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            out[i : i + 1] = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
        if rows is None:  # accelerator path: every sample processed, the unchosen ones kept as they were
            out = torch.where(chosen[:, None, None, None], out, x)
        return out

    def _shutters(self, x: Tensor, rand: Callable[..., Tensor]) -> Tensor:
        batch, _, height, width = x.shape
        on = rand(batch) < self.p_blades
        edges = rand(batch, 4) < 0.4
        forced = (rand(batch) * 4).long().clamp(max=3)  # at least one edge
        edges = edges | F.one_hot(forced, 4).bool()
        sides = torch.tensor([height, height, width, width], device=x.device, dtype=x.dtype)
        widths = (0.05 + 0.10 * rand(batch, 4)) * sides * (edges & on[:, None])
        soft = (0.005 + 0.015 * rand(batch)) * min(height, width)
        dark = rand(batch) < 0.75
        value = torch.where(dark, 0.06 * rand(batch), 0.9 + 0.1 * rand(batch))
        rows = _chosen(on)
        return _put(x, rows, _blades(_take(x, rows), *(_take(t, rows) for t in (widths, soft, value))))

    def _kit(self, height: int, width: int, device: torch.device) -> _Kit:
        """Glyph cells and constants for one image size and device (built once, then cached)."""
        key = (height, width, str(device))
        if key not in self._kits:
            side = min(height, width)
            text_caps = _cap_ladder(self.text_size, side)
            text = _Cells.build(
                [[m for c in TEXT_CATEGORIES for m in glyph_bank(cap)[c]] for cap in text_caps],
                text_caps,
                margins=True,
                max_width=_TEXT_MAX_WIDTH * width,
                lines=sum(len(GLYPH_STRINGS[c]) for c in TEXT_CATEGORIES[:-1]),
            )
            marker_caps = _cap_ladder(self.marker_size, side)
            marker = _Cells.build(
                [
                    list(glyph_bank(cap)["marker"]) + list(glyph_bank(cap)["marker_boxed"])
                    for cap in marker_caps
                ],
                marker_caps,
                margins=False,
                max_width=float(width),
                lines=2 * len(GLYPH_STRINGS["marker"]),
            )
            counts = torch.tensor([len(GLYPH_STRINGS[c]) for c in TEXT_CATEGORIES])
            self._kits[key] = _Kit(
                text=text.to(device),
                marker=marker.to(device),
                counts=counts.to(device),
                starts=(torch.cumsum(counts, 0) - counts).to(device),
                corners=torch.tensor(_CORNERS, device=device),
                partner=torch.tensor(_PARTNER, device=device),
                places=torch.tensor(_MARKER_PLACES, device=device),
            )
        return self._kits[key]

    def _annotate(self, x: Tensor, rand: Callable[..., Tensor]) -> None:
        """Paste one side marker and 1-3 text labels per chosen sample, slot by slot, in place."""
        batch, _, height, width = x.shape
        device = x.device
        side = min(height, width)
        kit = self._kit(height, width, device)
        flat = x.view(-1)
        size = (height, width)
        everyone = torch.arange(batch, device=device)
        taken = torch.zeros(batch, len(_CORNERS), dtype=torch.bool, device=device)
        if self.p_marker > 0:
            on = rand(batch) < self.p_marker
            place = (rand(batch) * len(_MARKER_PLACES)).long().clamp(max=len(_MARKER_PLACES) - 1)
            string = (rand(batch) < 0.5).long() + 2 * (rand(batch) < _MARKER_BOX_P).long()
            low, high = self.marker_size
            ids = kit.marker.lookup(string, (low + (high - low) * rand(batch)) * side)
            ids = torch.where(on, ids, 0)
            ay_low, ay_high, ax = kit.places[place].unbind(1)
            ay = ay_low + (ay_high - ay_low) * rand(batch)
            top, left = self._place(kit.marker, ids, ay, ax, rand, (0.02, 0.08), size)
            value = 0.75 + 0.25 * rand(batch)
            rows = _chosen(on)
            ids, top, left, value = (_take(t, rows) for t in (ids, top, left, value))
            sample = everyone if rows is None else rows
            _paste_cells(flat, size, kit.marker.cells[ids], sample=sample, top=top, left=left, value=value)
            # a marker in an upper corner takes that text corner
            taken |= (
                F.one_hot(place.clamp(max=len(_CORNERS) - 1), len(_CORNERS)).bool()
                & (on & (place < 2))[:, None]
            )
        if self.p_text > 0:
            text_on = rand(batch) < self.p_text
            count = 1 + (rand(batch) * _TEXT_SLOTS).long()
            corners = (rand(batch, len(_CORNERS)) + 2.0 * taken).argsort(dim=1)[:, :_TEXT_SLOTS]
            active = text_on[:, None] & (torch.arange(_TEXT_SLOTS, device=device) < count[:, None])
            # a label may slide along its edge only if no other label (or marker) holds the partner corner
            used = taken.scatter(1, corners, active | taken.gather(1, corners))
            low, high = self.text_size
            for slot in range(_TEXT_SLOTS):
                # only the first label may be a (tall) exposure block, so the others gather shorter cells
                n_categories = len(TEXT_CATEGORIES) if slot == 0 else len(TEXT_CATEGORIES) - 1
                category = (rand(batch) * n_categories).long().clamp(max=n_categories - 1)
                within = (rand(batch) * kit.counts[category]).long().clamp(max=kit.counts[category] - 1)
                ids = kit.text.lookup(
                    kit.starts[category] + within, (low + (high - low) * rand(batch)) * side
                )
                ids = torch.where(active[:, slot], ids, 0)
                corner = corners[:, slot]
                ay, ax = kit.corners[corner].unbind(1)
                slide = (rand(batch) < _SLIDE_P) & ~used.gather(1, kit.partner[corner][:, None]).squeeze(1)
                ax = torch.where(slide, rand(batch), ax)
                top, left = self._place(kit.text, ids, ay, ax, rand, (0.005, 0.03), size)
                opacity = torch.where(rand(batch) < _TEXT_BOX_P, 0.8 + 0.2 * rand(batch), 0.0)
                box_value = 0.08 * rand(batch)
                value = 0.75 + 0.25 * rand(batch)
                rows = _chosen(active[:, slot])
                ids, top, left, value, opacity, box_value = (
                    _take(t, rows) for t in (ids, top, left, value, opacity, box_value)
                )
                cells = kit.text.cells if slot == 0 else kit.text.cells[:, : kit.text.line_h]
                _paste_cells(
                    flat,
                    size,
                    cells[ids],
                    sample=everyone if rows is None else rows,
                    top=top,
                    left=left,
                    value=value,
                    box=(opacity, box_value, kit.text.box_h[ids], kit.text.box_w[ids]),
                )

    @staticmethod
    def _place(
        cells: _Cells,
        ids: Tensor,
        ay: Tensor,
        ax: Tensor,
        rand: Callable[..., Tensor],
        inset: tuple[float, float],
        size: tuple[int, int],
    ) -> tuple[Tensor, Tensor]:
        """Top-left pixel (B,) of each label box at anchor (``ay``, ``ax``), ``inset`` (fractions of the
        side) from the edges it hugs, clamped so that the box stays inside the image."""
        height, width = size
        pad = (inset[0] + (inset[1] - inset[0]) * rand(ids.shape[0])) * min(height, width)
        room_y = (height - cells.box_h[ids]).clamp(min=0)
        room_x = (width - cells.box_w[ids]).clamp(min=0)
        top = _anchor_position(ay, room_y, pad).round().long()
        left = _anchor_position(ax, room_x, pad).round().long()
        return torch.minimum(top.clamp(min=0), room_y), torch.minimum(left.clamp(min=0), room_x)

"""Synthetic acquisition cues: the evaluation shift families and the batched training augmentation."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xray.data import acquisition
from xray.data.acquisition import (
    GLYPH_STRINGS,
    SHIFT_FAMILIES,
    AcquisitionAugment,
    border_pad,
    collimation_blades,
    collimation_tight,
    freetype_available,
    glyph_bank,
    marker_large,
    marker_small,
    render_glyph,
)

SIDE = 224
OFF = {"p_text": 0.0, "p_marker": 0.0, "p_crop": 0.0, "p_blades": 0.0, "p_pad": 0.0}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def film(side: int = SIDE, seed: int = 0) -> torch.Tensor:
    """A (1, side, side) stand-in film in [0, 255]: a smooth body on a dark background plus noise."""
    g = generator(seed)
    coords = torch.linspace(-1, 1, side)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    body = 170 * torch.exp(-((xx / 0.7) ** 2 + (yy / 0.85) ** 2))
    return (30 + body + 10 * torch.randn(side, side, generator=g)).clamp(0, 255)[None]


def band_image(side: int, band: int, outside: float, inside: float) -> torch.Tensor:
    """(1, side, side): ``outside`` in an outer band ``band`` pixels wide, ``inside`` within."""
    x = torch.full((1, side, side), outside)
    x[:, band : side - band, band : side - band] = inside
    return x


# ------------------------------------------------------------------------------------------------
# glyph bank


def test_module_imports_no_project_code() -> None:
    tree = ast.parse(Path(acquisition.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "functools", "math", "random", "collections", "dataclasses", "types"} | {
        "numpy",
        "torch",
        "torchvision",
        "PIL",
    }


def test_freetype_detection_matches_pillow() -> None:
    """Pillow >= 10.1 with FreeType scales its default font; otherwise the bitmap fallback is used."""
    from PIL import ImageFont

    try:
        scalable = isinstance(ImageFont.load_default(size=20), ImageFont.FreeTypeFont)
    except TypeError:
        scalable = False
    assert freetype_available() is scalable


@pytest.mark.parametrize("freetype", [True, False])
@pytest.mark.parametrize("cap", [6, 12, 30])
def test_render_glyph_cap_height_and_antialiasing(freetype: bool, cap: int) -> None:
    if freetype and not freetype_available():
        pytest.skip("no FreeType")
    mask = render_glyph("R", cap, freetype=freetype)
    assert mask.dtype == torch.float32 and mask.ndim == 2
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    assert float(mask.max()) > 0.9
    if freetype:  # the bitmap fallback is only smooth where it is resampled
        assert ((mask > 0.05) & (mask < 0.95)).any(), "edges should be antialiased"
    ink_rows = (mask > 0.3).any(dim=1).nonzero()
    height = int(ink_rows.max() - ink_rows.min()) + 1
    assert abs(height - cap) <= max(1, round(0.15 * cap))
    boxed = render_glyph("R", cap, boxed=True, freetype=freetype)
    assert boxed.shape[0] > mask.shape[0] and boxed.shape[1] > mask.shape[1]
    assert float(boxed[0].mean()) > 0.5 and float(boxed[:, 0].mean()) > 0.5, "box outline on the border"


def test_glyph_bank_is_cached_and_complete() -> None:
    bank = glyph_bank(10)
    assert glyph_bank(10) is bank
    assert set(bank) == set(GLYPH_STRINGS) | {"marker_boxed"}
    for category, strings in GLYPH_STRINGS.items():
        assert len(bank[category]) == len(strings)
    # longer strings are wider; a multi-line block is taller than a single line
    widths = {s: m.shape[1] for s, m in zip(GLYPH_STRINGS["exposure"], bank["exposure"], strict=True)}
    assert widths["PORTABLE"] > widths["AP"]
    assert bank["block"][0].shape[0] > 2 * bank["timestamp"][0].shape[0] * 0.55
    stamp = GLYPH_STRINGS["timestamp"][0]
    assert len(stamp) == 8 and stamp[2] == stamp[5] == ":"


# ------------------------------------------------------------------------------------------------
# shift families


def test_shift_family_order() -> None:
    assert list(SHIFT_FAMILIES) == [
        "burned_text",
        "marker_large",
        "marker_small",
        "collimation_tight",
        "collimation_blades",
        "border_pad",
        "text_marker_crop",
    ]


@pytest.mark.parametrize("name", list(SHIFT_FAMILIES))
def test_shift_family_deterministic_and_seed_dependent(name: str) -> None:
    fn = SHIFT_FAMILIES[name]
    x = film()
    before = x.clone()
    a = fn(x, generator(7))
    b = fn(x, generator(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, fn(x, generator(8)))
    assert torch.equal(x, before), "the input must not be modified"


@pytest.mark.parametrize("name", list(SHIFT_FAMILIES))
@pytest.mark.parametrize("side", [16, 32, 97, SIDE])
def test_shift_family_shape_dtype_and_range(name: str, side: int) -> None:
    for seed in range(4):
        x = film(side, seed)
        out = SHIFT_FAMILIES[name](x, generator(seed))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all()
        assert float(out.min()) >= -1e-3 and float(out.max()) <= 255 + 1e-3
        clamped = out.clamp(0, 255)
        assert float(clamped.min()) >= 0 and float(clamped.max()) <= 255


def test_shift_families_keep_float64() -> None:
    x = film().double()
    for fn in SHIFT_FAMILIES.values():
        assert fn(x, generator(0)).dtype == torch.float64


def test_shift_family_rejects_batches() -> None:
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        collimation_tight(torch.zeros(2, 1, 32, 32), generator(0))


def test_collimation_tight_keeps_only_the_centre() -> None:
    # outer band of 8 px (3.6%) black: the crop keeps at most ~90% of the side, so no black remains
    x = band_image(SIDE, 8, 0.0, 255.0)
    for seed in range(20):
        assert float(collimation_tight(x, generator(seed)).min()) == 255.0


def test_collimation_tight_is_a_resized_centre_crop() -> None:
    ramp = torch.arange(SIDE, dtype=torch.float32)
    x = (ramp[None, :] + 0 * ramp[:, None])[None]  # value = column index
    y = (0 * ramp[None, :] + ramp[:, None])[None]  # value = row index
    for seed in range(10):
        out_x = collimation_tight(x, generator(seed))[0]
        out_y = collimation_tight(y, generator(seed))[0]
        # zoomed in: one output pixel spans 0.57-0.85 input pixels, in both directions
        slope_x = float(out_x[SIDE // 2, SIDE // 2 + 20] - out_x[SIDE // 2, SIDE // 2 - 20]) / 40
        slope_y = float(out_y[SIDE // 2 + 20, SIDE // 2] - out_y[SIDE // 2 - 20, SIDE // 2]) / 40
        assert 0.56 <= slope_x <= 0.85 and 0.56 <= slope_y <= 0.85
        # centred within the jitter (3% of the side)
        assert abs(float(out_x[SIDE // 2, SIDE // 2]) - SIDE / 2) <= 0.035 * SIDE
        assert abs(float(out_y[SIDE // 2, SIDE // 2]) - SIDE / 2) <= 0.035 * SIDE
        # the border of the output comes from the inner part of the input
        assert float(out_x[:, 0].min()) >= 0.04 * SIDE and float(out_x[:, -1].max()) <= 0.96 * SIDE


def test_resample_matches_grid_sample() -> None:
    g = generator(3)
    x = torch.rand(5, 1, 40, 56, generator=g)
    zoom = 0.5 + torch.rand(5, 2, generator=g)
    shift = 0.3 * (torch.rand(5, 2, generator=g) - 0.5)
    theta = torch.zeros(5, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = zoom[:, 0], zoom[:, 1], shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(acquisition._resample(x, zoom, shift), expected, atol=1e-5, rtol=1e-5)
    identity = acquisition._resample(x, torch.ones(5, 2), torch.zeros(5, 2))
    assert torch.equal(identity, x)


def changed_fraction(before: torch.Tensor, after: torch.Tensor) -> float:
    return float(((after - before).abs() > 1.0).float().mean())


@pytest.mark.parametrize("fn", [acquisition.burned_text, marker_large])
def test_text_and_large_marker_change_a_bounded_bright_area(fn) -> None:
    x = torch.full((1, SIDE, SIDE), 100.0)
    for seed in range(30):
        out = fn(x, generator(seed))
        changed = (out - x).abs() > 1.0
        assert 0.001 <= changed_fraction(x, out) <= 0.15, seed
        assert float(out[changed].max()) >= 195.0, "labels are burned in near-white"
        assert float(out.max()) <= 255.0


def test_marker_sizes() -> None:
    x = torch.full((1, SIDE, SIDE), 100.0)

    def ink_height(out: torch.Tensor) -> int:
        rows = ((out - x).abs() > 1.0).any(dim=-1)[0].nonzero()
        return int(rows.max() - rows.min()) + 1

    large = [ink_height(marker_large(x, generator(s))) for s in range(20)]
    small = [ink_height(marker_small(x, generator(s))) for s in range(20)]
    # cap heights of 8-15% and 3-5% of the side; boxed markers are taller
    assert min(large) >= 0.08 * SIDE - 2 and max(large) <= 0.32 * SIDE
    assert min(small) >= 0.03 * SIDE - 2 and max(small) <= 0.11 * SIDE
    assert sorted(small)[10] * 1.5 < sorted(large)[10]


def test_burned_text_stays_near_the_edges() -> None:
    x = torch.full((1, SIDE, SIDE), 100.0)
    for seed in range(30):
        changed = (acquisition.burned_text(x, generator(seed)) - x).abs()[0] > 1.0
        rows = changed.any(dim=1).nonzero().flatten()
        # labels hug the top or bottom edge: nothing in the middle third
        assert not ((rows > SIDE / 3) & (rows < 2 * SIDE / 3)).any(), seed


def test_border_pad_has_a_constant_border() -> None:
    x = film()
    fills = set()
    for seed in range(12):
        out = border_pad(x, generator(seed))[0]
        border = torch.cat((out[0], out[-1], out[:, 0], out[:, -1], out[1], out[:, 1]))
        assert torch.all(border == border[0]), seed
        fill = float(border[0])
        q01 = float(torch.quantile(x.flatten(), 0.01))
        assert fill in (0.0, 255.0) or math.isclose(fill, q01, rel_tol=1e-5, abs_tol=1e-4)
        fills.add("black" if fill == 0 else "white" if fill == 255 else "q01")
        # the film is shrunk into the frame: its centre is still there
        assert float(out[SIDE // 2, SIDE // 2]) > 100
    assert fills == {"black", "white", "q01"}


def test_collimation_blades_cover_edges_only() -> None:
    x = torch.full((1, SIDE, SIDE), 128.0)
    for seed in range(12):
        out = collimation_blades(x, generator(seed))[0]
        edges = torch.stack((out[0].mean(), out[-1].mean(), out[:, 0].mean(), out[:, -1].mean()))
        covered = ((edges - 128).abs() > 60).sum()
        assert 1 <= int(covered) <= 4
        # bands stay within 15% of the side (plus the soft edge)
        inner = out[int(0.18 * SIDE) : -int(0.18 * SIDE), int(0.18 * SIDE) : -int(0.18 * SIDE)]
        assert torch.all(inner == 128.0)


# ------------------------------------------------------------------------------------------------
# training augmentation


def batch(size: int = 6, side: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.stack([film(side, seed + i) for i in range(size)]) / 255


def test_augment_all_off_is_identity() -> None:
    x = batch()
    out = AcquisitionAugment(**OFF)(x)
    assert torch.equal(out, x)


def test_augment_nothing_drawn_is_identity() -> None:
    """Probabilities so small that no sample is chosen: every stage runs on an empty selection."""
    x = batch()
    tiny = {k: 1e-9 for k in OFF}
    assert torch.equal(AcquisitionAugment(**tiny)(x, generator=generator(0)), x)


def test_augment_non_square_and_single_sample() -> None:
    aug = AcquisitionAugment(p_text=1, p_marker=1, p_crop=1, p_blades=1, p_pad=1)
    x = torch.rand(3, 1, 40, 72, generator=generator(0))
    out = aug(x, generator=generator(1))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    one = aug(x[:1], generator=generator(1))
    assert one.shape == (1, 1, 40, 72)


def test_augment_crop_removes_the_band() -> None:
    side = SIDE
    x = (band_image(side, round(0.2 * side), 0.0, 1.0)[None]).repeat(8, 1, 1, 1)
    aug = AcquisitionAugment(**{**OFF, "p_crop": 1.0, "crop_scale": (0.5, 0.5)})
    out = aug(x, generator=generator(0))
    assert float(out.min()) == 1.0
    # and with no crop the band stays
    assert float(AcquisitionAugment(**{**OFF, "p_blades": 1.0})(x, generator=generator(0)).min()) < 0.1


def test_augment_soften_takes_the_fine_detail_a_crop_loses() -> None:
    """Softening resamples down to a crop's scale and back: a one-pixel checkerboard loses most of its
    contrast, a flat image keeps its value, and with p_soften=0 nothing changes."""
    checker = (
        ((torch.arange(SIDE)[:, None] + torch.arange(SIDE)[None, :]) % 2)
        .float()[None, None]
        .repeat(4, 1, 1, 1)
    )
    soft = AcquisitionAugment(**{**OFF, "p_soften": 1.0, "crop_scale": (0.6, 0.6)})
    out = soft(checker, generator=generator(0))
    assert out.shape == checker.shape
    assert float((out - out.mean()).abs().mean()) < 0.2 * float((checker - checker.mean()).abs().mean())
    flat = torch.full((2, 1, SIDE, SIDE), 0.4)
    torch.testing.assert_close(soft(flat, generator=generator(0)), flat)
    assert torch.equal(AcquisitionAugment(**OFF)(checker), checker)


def test_augment_reproducible() -> None:
    x = batch(8)
    aug = AcquisitionAugment(p_text=0.7, p_marker=0.7, p_crop=0.7, p_blades=0.5, p_pad=0.5)
    a = aug(x, generator=generator(1))
    b = aug(x, generator=generator(1))
    c = aug(x, generator=generator(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(5)
    d = aug(x)
    torch.manual_seed(5)
    assert torch.equal(d, aug(x))


def test_augment_subset_path_equals_full_batch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU only the chosen samples are processed; the accelerator path (all samples, identity
    parameters for the others) must give the same result."""
    x = batch(10, side=48)
    aug = AcquisitionAugment(p_text=0.5, p_marker=0.5, p_crop=0.5, p_blades=0.5, p_pad=0.5, p_soften=0.5)
    subset = aug(x, generator=generator(4))
    monkeypatch.setattr(acquisition, "_chosen", lambda mask: None)
    full = aug(x, generator=generator(4))
    torch.testing.assert_close(full, subset, atol=1e-6, rtol=0)


@pytest.mark.parametrize("side", [32, 33, 64, 97, SIDE])
def test_augment_any_size(side: int) -> None:
    x = batch(4, side=side)
    out = AcquisitionAugment(p_text=1, p_marker=1, p_crop=1, p_blades=1, p_pad=1)(x, generator=generator(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert all(not torch.equal(out[i], x[i]) for i in range(4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_augment_keeps_dtype_and_input(dtype: torch.dtype) -> None:
    x = batch().to(dtype)
    before = x.clone()
    out = AcquisitionAugment(p_text=1, p_marker=1)(x, generator=generator(0))
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(x, before)


def test_augment_labels_are_bright_and_bounded() -> None:
    x = torch.full((16, 1, SIDE, SIDE), 0.4)
    out = AcquisitionAugment(**{**OFF, "p_text": 1.0, "p_marker": 1.0})(x, generator=generator(0))
    for i in range(16):
        changed = (out[i] - x[i]).abs() > 1 / 255
        assert 0.002 <= float(changed.float().mean()) <= 0.2
        assert float(out[i][changed].max()) >= 0.74


def test_augment_pad_and_blades() -> None:
    x = torch.full((16, 1, 64, 64), 0.5)
    padded = AcquisitionAugment(**{**OFF, "p_pad": 1.0})(x, generator=generator(0))
    corners = padded[:, 0, 0, 0]
    assert torch.all((corners == 0) | (corners == 1) | (corners == 0.5))
    assert torch.all(padded[:, 0, 32, 32] == 0.5)
    bladed = AcquisitionAugment(**{**OFF, "p_blades": 1.0})(x, generator=generator(0))
    edge_means = torch.stack(
        (
            bladed[:, 0, 0].mean(1),
            bladed[:, 0, -1].mean(1),
            bladed[:, 0, :, 0].mean(1),
            bladed[:, 0, :, -1].mean(1),
        )
    )
    assert torch.all(((edge_means - 0.5).abs() > 0.3).any(dim=0)), "every sample has at least one blade"
    assert torch.all(bladed[:, 0, 20:44, 20:44] == 0.5)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"p_text": 1.5}, "p_text"),
        ({"p_marker": -0.1}, "p_marker"),
        ({"p_crop": float("nan")}, "p_crop"),
        ({"p_blades": "often"}, "p_blades"),
        ({"p_pad": 2}, "p_pad"),
        ({"crop_scale": (0.8, 0.6)}, "crop_scale"),
        ({"crop_scale": (0.0, 0.5)}, "crop_scale"),
        ({"crop_scale": (-0.2, 0.5)}, "crop_scale"),
        ({"crop_scale": (0.5, 1.2)}, "crop_scale"),
        ({"crop_scale": (0.5,)}, "crop_scale"),
        ({"text_size": (0.1, 0.05)}, "text_size"),
        ({"marker_size": (0.0, 0.1)}, "marker_size"),
        ({"p_soften": 1.1}, "p_soften"),
    ],
)
def test_augment_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        AcquisitionAugment(**kwargs)


def test_augment_accepts_lists_and_rejects_bad_batches() -> None:
    aug = AcquisitionAugment(crop_scale=[0.7, 0.9], text_size=[0.04, 0.06])
    assert aug.crop_scale == (0.7, 0.9)
    assert "crop_scale=(0.7, 0.9)" in repr(aug)
    with pytest.raises(ValueError, match="B, 1, H, W"):
        aug(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="B, 1, H, W"):
        aug(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shift_families_on_cuda() -> None:
    x = film()
    for name, fn in SHIFT_FAMILIES.items():
        out = fn(x.cuda(), generator(3))
        assert out.device.type == "cuda", name
        torch.testing.assert_close(out.cpu(), fn(x, generator(3)), atol=1e-3, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_on_cuda() -> None:
    x = batch(16, side=SIDE).cuda()
    aug = AcquisitionAugment(p_text=0.7, p_marker=0.7, p_crop=0.7, p_blades=0.5, p_pad=0.5)
    a = aug(x, generator=torch.Generator(device="cuda").manual_seed(0))
    b = aug(x, generator=torch.Generator(device="cuda").manual_seed(0))
    assert a.device == x.device and a.shape == x.shape
    assert torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1

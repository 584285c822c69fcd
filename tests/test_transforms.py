"""Tests for xray.data.transforms: the Keras affine against independent NumPy/SciPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchvision import tv_tensors

from xray.data.transforms import (
    KerasAugmentParams,
    KerasRandomAffine,
    Rescale,
    apply_affine,
    keras_affine_matrices,
    keras_augment_batch,
    rescale,
    resize_image,
    sample_keras_params,
    train_transform,
)

# Max abs error of keras_augment_batch vs each reference, filled by the comparison tests.
MAX_ERRORS: dict[str, float] = {}
TOL = 1e-3

# (theta deg, tx frac of H, ty frac of W, shear deg, zx, zy, hflip, vflip)
PARAM_SETS: list[tuple[float, float, float, float, float, float, bool, bool]] = [
    (0.0, 0.0, 0.0, 0.0, 1.0, 1.0, False, False),
    (30.0, 0.0, 0.0, 0.0, 1.0, 1.0, False, False),
    (-170.0, 0.0, 0.0, 0.0, 1.0, 1.0, False, False),
    (90.0, 0.0, 0.0, 0.0, 1.0, 1.0, True, False),
    (0.0, 0.2, -0.2, 0.0, 1.0, 1.0, False, False),
    (0.0, -0.13, 0.07, 0.0, 1.0, 1.0, False, True),
    (0.0, 0.0, 0.0, 0.1, 1.0, 1.0, False, False),
    (0.0, 0.0, 0.0, 20.0, 1.0, 1.0, False, False),
    (0.0, 0.0, 0.0, -35.0, 1.0, 1.0, False, False),
    (0.0, 0.0, 0.0, 0.0, 0.8, 1.2, False, False),
    (0.0, 0.0, 0.0, 0.0, 1.17, 0.83, True, True),
    (23.5, 0.11, -0.19, 0.1, 0.85, 1.15, True, False),
    (-28.0, -0.2, 0.2, 20.0, 1.2, 0.8, False, True),
    (137.0, 0.05, 0.15, -12.0, 0.9, 1.05, True, True),
]


def _params_for(size: int, sets=PARAM_SETS) -> KerasAugmentParams:
    cols = list(zip(*sets, strict=True))
    f = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return KerasAugmentParams(
        theta=f(cols[0]),
        tx=f(cols[1]) * size,
        ty=f(cols[2]) * size,
        shear=f(cols[3]),
        zx=f(cols[4]),
        zy=f(cols[5]),
        hflip=torch.tensor(cols[6]),
        vflip=torch.tensor(cols[7]),
    )


def _np_matrix(theta, tx, ty, shear, zx, zy, h, w) -> np.ndarray:
    """M = C R Shift Shear Zoom C^-1 in (x, y) = (col, row), written independently with NumPy."""
    t, s = np.deg2rad(theta), np.deg2rad(shear)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    shr = np.array([[1, -np.sin(s), 0], [0, np.cos(s), 0], [0, 0, 1]])
    zoom = np.diag([zx, zy, 1.0])
    cx, cy = (w - 1) / 2, (h - 1) / 2
    c = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]])
    c_inv = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
    return c @ rot @ shift @ shr @ zoom @ c_inv


def _reference_map_coordinates(img: np.ndarray, p: KerasAugmentParams, i: int) -> np.ndarray:
    """Per-pixel reference: sample M @ (c, r, 1) with map_coordinates(order=1, mode='nearest'), flip."""
    _, h, w = img.shape
    m = _np_matrix(*(float(getattr(p, k)[i]) for k in ("theta", "tx", "ty", "shear", "zx", "zy")), h, w)
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float64)
    pts = m @ np.stack([cc.ravel(), rr.ravel(), np.ones(h * w)])
    x_in, y_in = pts[0].reshape(h, w), pts[1].reshape(h, w)
    out = np.stack([ndimage.map_coordinates(ch, [y_in, x_in], order=1, mode="nearest") for ch in img])
    if bool(p.hflip[i]):
        out = out[:, :, ::-1]
    if bool(p.vflip[i]):
        out = out[:, ::-1, :]
    return out


def _reference_tf_keras(img: np.ndarray, p: KerasAugmentParams, i: int) -> np.ndarray:
    """tf_keras ``apply_affine_transform`` + ``apply_transform`` flips, channels-first, transcribed."""
    theta, tx, ty, shear, zx, zy = (
        float(getattr(p, k)[i]) for k in ("theta", "tx", "ty", "shear", "zx", "zy")
    )
    row_axis, col_axis = 1, 2
    t = np.deg2rad(theta)
    transform_matrix = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    transform_matrix = transform_matrix @ np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    s = np.deg2rad(shear)
    transform_matrix = transform_matrix @ np.array([[1, -np.sin(s), 0], [0, np.cos(s), 0], [0, 0, 1]])
    transform_matrix = transform_matrix @ np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
    h, w = img.shape[row_axis], img.shape[col_axis]
    o_x, o_y = float(h) / 2 - 0.5, float(w) / 2 - 0.5  # transform_matrix_offset_center(m, h, w)
    offset = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]])
    reset = np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    transform_matrix = offset @ transform_matrix @ reset
    # (x, y) -> (row, col): M' = P M P
    transform_matrix[:, [0, 1]] = transform_matrix[:, [1, 0]]
    transform_matrix[[0, 1]] = transform_matrix[[1, 0]]
    out = np.stack(
        [
            ndimage.affine_transform(
                ch, transform_matrix[:2, :2], transform_matrix[:2, 2], order=1, mode="nearest", cval=0.0
            )
            for ch in img
        ]
    )
    if bool(p.hflip[i]):
        out = np.flip(out, axis=col_axis)
    if bool(p.vflip[i]):
        out = np.flip(out, axis=row_axis)
    return out


def _compare(reference, name: str, size: int, channels: int) -> float:
    g = torch.Generator().manual_seed(size * 10 + channels)
    imgs = torch.rand(len(PARAM_SETS), channels, size, size, generator=g)
    params = _params_for(size)
    ours = keras_augment_batch(imgs, params).numpy()
    ref = np.stack([reference(imgs[i].double().numpy(), params, i) for i in range(len(PARAM_SETS))])
    err = float(np.abs(ours - ref).max())
    MAX_ERRORS[f"{name} size={size} C={channels}"] = err
    return err


@pytest.mark.parametrize(("size", "channels"), [(17, 1), (32, 2), (64, 1)])
def test_matches_scipy_map_coordinates_reference(size: int, channels: int) -> None:
    err = _compare(_reference_map_coordinates, "map_coordinates", size, channels)
    assert err < TOL, f"max abs error vs map_coordinates reference: {err:.3g}; all: {MAX_ERRORS}"


@pytest.mark.parametrize(("size", "channels"), [(17, 2), (32, 1), (64, 1)])
def test_matches_tf_keras_affine_transform_code_path(size: int, channels: int) -> None:
    err = _compare(_reference_tf_keras, "tf_keras affine_transform", size, channels)
    assert err < TOL, f"max abs error vs tf_keras code path: {err:.3g}; all: {MAX_ERRORS}"


def test_float64_matches_tf_keras_to_machine_precision() -> None:
    # In float64 the only difference left is rounding: the float32 errors above are float32 grid noise.
    p = _params_for(32)
    imgs = torch.rand(len(p), 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ours = keras_augment_batch(imgs, p)
    assert ours.dtype == torch.float64
    ref = np.stack([_reference_tf_keras(imgs[i].numpy(), p, i) for i in range(len(p))])
    err = float(np.abs(ours.numpy() - ref).max())
    MAX_ERRORS["tf_keras float64 size=32"] = err
    assert err < 1e-10, err


def test_matrices_match_numpy_formula() -> None:
    p = _params_for(32)
    ours = keras_affine_matrices(p.theta, p.tx, p.ty, p.shear, p.zx, p.zy, 20, 32).numpy()
    for i in range(len(p)):
        args = (float(getattr(p, k)[i]) for k in ("theta", "tx", "ty", "shear", "zx", "zy"))
        np.testing.assert_allclose(ours[i], _np_matrix(*args, 20, 32), atol=1e-9)


def test_non_square_matches_reference() -> None:
    imgs = torch.rand(len(PARAM_SETS), 1, 20, 31, generator=torch.Generator().manual_seed(3))
    p = _params_for(20)
    ours = keras_augment_batch(imgs, p).numpy()
    ref = np.stack([_reference_map_coordinates(imgs[i].double().numpy(), p, i) for i in range(len(p))])
    assert np.abs(ours - ref).max() < TOL


def test_identity_returns_input() -> None:
    x = torch.rand(3, 2, 33, 33)
    out = keras_augment_batch(x, KerasAugmentParams.identity(3))
    assert out.dtype == torch.float32
    assert (out - x).abs().max() < 1e-5


def test_flip_only_equals_torch_flip() -> None:
    x = torch.rand(4, 1, 16, 16)
    p = KerasAugmentParams.identity(4)
    p.hflip = torch.tensor([True, False, True, False])
    p.vflip = torch.tensor([False, True, True, False])
    out = keras_augment_batch(x, p)
    expected = torch.stack([x[0].flip(-1), x[1].flip(-2), x[2].flip(-1).flip(-2), x[3]])
    assert (out - expected).abs().max() < 1e-5


def test_apply_affine_uint8_and_float64() -> None:
    x8 = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    eye = torch.eye(3).expand(2, 3, 3)
    out = apply_affine(x8, eye)
    assert out.dtype == torch.float32
    assert (out - x8.float()).abs().max() < 1e-3  # still on the 0..255 scale
    x64 = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    assert apply_affine(x64, eye).dtype == torch.float64


def test_random_affine_independent_per_sample_and_seeded() -> None:
    t = KerasRandomAffine()
    img = torch.rand(1, 32, 32)
    batch = torch.stack([img, img])
    torch.manual_seed(0)
    out1 = t(batch)
    torch.manual_seed(0)
    out2 = t(batch)
    assert out1.shape == batch.shape
    assert not torch.allclose(out1[0], out1[1])
    assert torch.equal(out1, out2)


def test_random_affine_equals_batched_path() -> None:
    x = torch.randint(0, 256, (5, 1, 24, 24), dtype=torch.uint8)
    t = KerasRandomAffine(zoom_range=(0.7, 1.1), shear_range=15.0)
    torch.manual_seed(7)
    out = t(x)
    torch.manual_seed(7)
    p = sample_keras_params(5, 24, 24, zoom_range=(0.7, 1.1), shear_range=15.0)
    batched = keras_augment_batch(x, p)
    assert out.dtype == torch.float32
    assert (out - batched).abs().max() < 1e-5
    # Per-sample v2 path (single (C, H, W) images) with the same params.
    for i in range(5):
        single = t.transform(x[i], {"params": p[i]})
        assert single.shape == (1, 24, 24)
        assert (single - batched[i]).abs().max() < 1e-5


def test_random_affine_single_image_types() -> None:
    t = KerasRandomAffine()
    img = tv_tensors.Image(torch.randint(0, 256, (1, 20, 20), dtype=torch.uint8))
    out, label = t(img, 1)
    assert isinstance(out, tv_tensors.Image)
    assert out.shape == (1, 20, 20) and out.dtype == torch.float32
    assert label == 1
    plain = t(torch.rand(2, 20, 20))
    assert type(plain) is torch.Tensor and plain.shape == (2, 20, 20)


def test_parameter_distribution() -> None:
    n, h, w = 20_000, 64, 32
    p = sample_keras_params(n, h, w, generator=torch.Generator().manual_seed(0))
    assert p.theta.abs().max() <= 30 and p.theta.abs().max() > 29.5
    assert abs(float(p.theta.mean())) < 0.5
    assert p.tx.abs().max() <= 0.2 * h and p.tx.abs().max() > 0.19 * h  # tx from height_shift_range * H
    assert p.ty.abs().max() <= 0.2 * w and p.ty.abs().max() > 0.19 * w
    assert p.shear.abs().max() <= 0.1
    for z in (p.zx, p.zy):
        assert z.min() >= 0.8 and z.max() <= 1.2
    assert (p.zx != p.zy).all()
    corr = float(np.corrcoef(p.zx.numpy(), p.zy.numpy())[0, 1])
    assert abs(corr) < 0.05, corr
    assert 0.47 < float(p.hflip.float().mean()) < 0.53
    assert 0.47 < float(p.vflip.float().mean()) < 0.53
    # Keras's range >= 1 means pixels; an int means a random integer in [0, r) with a random sign.
    px = sample_keras_params(n, h, w, width_shift_range=5.0, height_shift_range=3)
    assert px.ty.abs().max() <= 5.0 and px.ty.abs().max() > 4.9
    assert set(px.tx.unique().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    none = sample_keras_params(10, h, w, zoom_range=(1, 1), horizontal_flip=False, vertical_flip=False)
    assert (none.zx == 1).all() and (none.zy == 1).all()
    assert not none.hflip.any() and not none.vflip.any()


def test_sample_params_generator_reproducible() -> None:
    a = sample_keras_params(8, 32, 32, generator=torch.Generator().manual_seed(1))
    b = sample_keras_params(8, 32, 32, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("theta", "tx", "zy", "hflip"))


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
def test_resize_image_shape_dtype(interpolation: str) -> None:
    img = torch.randint(0, 256, (1, 50, 70), dtype=torch.uint8)
    out = resize_image(img, 32, interpolation)
    assert out.shape == (1, 32, 32) and out.dtype == torch.uint8
    batch = resize_image(img.expand(3, 1, 50, 70), 24, interpolation)
    assert batch.shape == (3, 1, 24, 24) and batch.dtype == torch.uint8


def test_resize_bicubic_saturates_instead_of_wrapping() -> None:
    img = torch.zeros(1, 40, 40, dtype=torch.uint8)
    img[:, :, ::4] = 255
    img[:, :, 1::4] = 255
    as_float = resize_image(img.float(), 28, "bicubic")
    assert as_float.min() < -0.5 or as_float.max() > 255.5  # there is overshoot to clamp
    expected = as_float.clamp(0, 255).round()
    out = resize_image(img, 28, "bicubic")
    assert (out.float() - expected).abs().max() <= 1.0


def test_rescale() -> None:
    x = torch.tensor([0, 128, 255], dtype=torch.uint8)
    r = rescale(x)
    assert r.dtype == torch.float32 and r[0] == 0 and r[2] == 1
    f = torch.tensor([0.25, 0.5], dtype=torch.float64)
    assert rescale(f).dtype == torch.float32 and torch.equal(rescale(f), f.float())


def test_presets() -> None:
    x = torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8)
    assert torch.equal(Rescale()(x), rescale(x))  # the presets' Rescale is the batch path's rescale
    aug = {"zoom_range": [0.9, 1.1], "rotation_range": 10.0}
    torch.manual_seed(3)
    out = train_transform(aug)(x)
    torch.manual_seed(3)
    p = sample_keras_params(1, 16, 16, zoom_range=(0.9, 1.1), rotation_range=10.0)
    expected = keras_augment_batch(x[None], p)[0] / 255
    assert out.dtype == torch.float32 and out.max() <= 1.0
    assert (out - expected).abs().max() < 1e-6
    assert isinstance(train_transform(None).transforms[1], Rescale)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fill_mode": "constant"}, "fill_mode"),
        ({"fill_mode": "reflect"}, "fill_mode"),
        ({"rotation_range": -1.0}, "rotation_range"),
        ({"width_shift_range": -0.1}, "width_shift_range"),
        ({"height_shift_range": -2}, "height_shift_range"),
        ({"shear_range": -0.1}, "shear_range"),
        ({"zoom_range": 1.5}, "zoom_range"),
        ({"zoom_range": (1.2, 0.8)}, "zoom_range"),
        ({"zoom_range": (0.0, 1.0)}, "zoom_range"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        KerasRandomAffine(**kwargs)


def test_bad_interpolation_raises() -> None:
    with pytest.raises(ValueError, match="interpolation.*lanczos"):
        resize_image(torch.zeros(1, 8, 8, dtype=torch.uint8), 4, "lanczos")


def test_fill_mode_message_lists_unimplemented_modes() -> None:
    with pytest.raises(ValueError, match="'wrap'") as info:
        KerasRandomAffine(fill_mode="wrap")
    assert "'constant'" in str(info.value) and "'reflect'" in str(info.value)


def test_random_affine_rejects_pil_images() -> None:
    import PIL.Image

    with pytest.raises(TypeError, match="PILToTensor"):
        KerasRandomAffine()(PIL.Image.new("L", (8, 8)))


def test_the_seed_augmentation_has_one_home() -> None:
    """conf/data/kermany.yaml spells out KERAS_SEED_AUGMENT, the defaults of every augmentation entry."""
    import inspect

    from omegaconf import OmegaConf

    from tests.conftest import PROJECT_ROOT
    from xray.data.datamodule import XRayDataModule
    from xray.data.transforms import KERAS_SEED_AUGMENT, KerasRandomAffine, sample_keras_params

    yaml = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "data" / "kermany.yaml"))
    assert yaml["augment"] == KERAS_SEED_AUGMENT
    assert inspect.signature(XRayDataModule).parameters["augment"].default == KERAS_SEED_AUGMENT
    for fn in (KerasRandomAffine, sample_keras_params):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in KERAS_SEED_AUGMENT if k in params} == {
            k: v for k, v in KERAS_SEED_AUGMENT.items() if k in params
        }

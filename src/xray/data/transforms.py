"""Image transforms: resize, rescale and a Keras ``ImageDataGenerator``-compatible augmentation.

The original model was trained with tf_keras's ``ImageDataGenerator``, so the augmentation reproduces
*its* affine (parameter draws, matrix order, bilinear sampling with edge replication, flips), not
torchvision's ``RandomAffine`` (isotropic zoom, other shear convention). :class:`KerasRandomAffine` is
the ``v2`` transform; :func:`sample_keras_params` + :func:`keras_augment_batch` the batched path on the
accelerator. Rescaling (``x / 255``) is a separate last step, as Keras's ``standardize`` runs after
``apply_transform``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from xray.core.config_checks import is_num, require
from xray.data.io import read_image

ShiftRange = float | int | Sequence[float]
_Gen = torch.Generator | None

_INTERPOLATIONS: dict[str, InterpolationMode] = {
    m.value: m for m in (InterpolationMode.NEAREST, InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
}


def resize_image(img: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Squash ``(..., C, H, W)`` to ``size x size`` as Keras's ``flow_from_directory`` does (aspect
    ratio ignored), antialiased; uint8 stays uint8 (torchvision saturates bicubic overshoot)."""
    try:
        mode = _INTERPOLATIONS[interpolation]
    except (KeyError, TypeError):
        raise ValueError(
            f"interpolation={interpolation!r} is not supported; expected one of {sorted(_INTERPOLATIONS)}"
        ) from None
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got size={size!r}")
    if img.ndim < 3:
        raise ValueError(f"img must have shape (..., C, H, W), got {tuple(img.shape)}")
    return TF.resize(img, [size, size], interpolation=mode, antialias=True)


def load_resized(path: str | Path, image_size: int, interpolation: str) -> np.ndarray:
    """The eval preset on one file: a (S, S) uint8 array (training's cache, validation, prediction)."""
    return resize_image(read_image(path), image_size, interpolation)[0].numpy()


def rescale(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1; float input is taken as already rescaled and only cast to float32
    (unlike :class:`Rescale`, so calling this twice is harmless)."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if x.is_floating_point():
        return x.to(torch.float32)
    raise TypeError(f"rescale expects a uint8 or floating tensor, got dtype={x.dtype}")


def _is_pure_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, tv_tensors.TVTensor)


class _ImageTransform(v2.Transform):
    """Transforms only images: labels pass through (a bare ``v2.Lambda`` would not), and it pickles."""

    _transformed_types = (_is_pure_tensor, tv_tensors.Image)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = self._image(inpt.as_subclass(torch.Tensor), params)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class Rescale(_ImageTransform):
    """Keras ``rescale=1/255`` as the last step: float32 ``x / divisor`` for uint8 AND float input, since
    it receives :class:`KerasRandomAffine`'s float 0..255 output (for uint8 it equals :func:`rescale`)."""

    def __init__(self, divisor: float = 255.0) -> None:
        super().__init__()
        if not divisor > 0:
            raise ValueError(f"divisor must be > 0, got divisor={divisor!r}")
        self.divisor = float(divisor)

    def _image(self, x: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        if not (x.dtype == torch.uint8 or x.is_floating_point()):
            raise TypeError(f"Rescale expects a uint8 or floating tensor, got dtype={x.dtype}")
        return x.to(torch.float32).div_(self.divisor)


KERAS_SEED_AUGMENT: dict[str, Any] = {
    "rotation_range": 30.0,
    "width_shift_range": 0.2,
    "height_shift_range": 0.2,
    "shear_range": 0.1,
    "zoom_range": 0.2,
    "fill_mode": "nearest",
    "horizontal_flip": True,
    "vertical_flip": True,
}
"""The seed Keras project's settings: the defaults here and in the DataModule (a test keeps
``conf/data/kermany.yaml`` equal to them)."""
_SEED = KERAS_SEED_AUGMENT


@dataclass
class KerasAugmentParams:
    """Per-sample parameters, each a 1-D tensor of length B: ``theta``, ``shear`` in degrees; ``tx``,
    ``ty`` in pixels; ``zx``, ``zy`` zoom factors (>1 zooms out); ``hflip``, ``vflip`` bool. As in Keras,
    ``tx`` (the x = column shift) is drawn from ``height_shift_range``."""

    theta: torch.Tensor
    tx: torch.Tensor
    ty: torch.Tensor
    shear: torch.Tensor
    zx: torch.Tensor
    zy: torch.Tensor
    hflip: torch.Tensor
    vflip: torch.Tensor

    def __len__(self) -> int:
        return int(self.theta.shape[0])

    def __getitem__(self, idx: int | slice | torch.Tensor) -> KerasAugmentParams:
        """Select samples; an int keeps a batch dimension of 1 so the result stays a valid batch."""
        if isinstance(idx, numbers.Integral):
            i = int(idx)
            idx = slice(i, i + 1 if i != -1 else None)
        return KerasAugmentParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to(self, device: torch.device | str | None) -> KerasAugmentParams:
        """``non_blocking`` copies: no stream sync per training step."""
        return KerasAugmentParams(
            **{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)}
        )

    @classmethod
    def identity(
        cls, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> KerasAugmentParams:
        """Parameters that leave images unchanged."""
        zeros = torch.zeros(batch_size, dtype=dtype, device=device)
        ones = torch.ones(batch_size, dtype=dtype, device=device)
        no = torch.zeros(batch_size, dtype=torch.bool, device=device)
        return cls(zeros, zeros.clone(), zeros.clone(), zeros.clone(), ones, ones.clone(), no, no.clone())


def _host_matrix(rows: list[list[float]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Built on the host, copied ``non_blocking``: ``torch.tensor(..., device=cuda)`` would wait for
    every queued kernel, once per training step."""
    return torch.tensor(rows, dtype=dtype).to(device, non_blocking=True)


def _matrix_dtype(device: torch.device) -> torch.dtype:
    # float64 for exactness where it exists; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def keras_affine_matrices(
    theta_deg: torch.Tensor,
    tx: torch.Tensor,
    ty: torch.Tensor,
    shear_deg: torch.Tensor,
    zx: torch.Tensor,
    zy: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """Keras's ``M = C R(theta) Shift(tx, ty) Shear(shear) Zoom(zx, zy) C^-1`` as (B, 3, 3) float64
    (float32 on MPS): maps an OUTPUT pixel ``(x, y) = (column, row)`` to the INPUT point it samples.
    ``C`` centres on ``((W-1)/2, (H-1)/2)``; tf_keras swaps W and H there, which only non-square images see.
    """
    device = theta_deg.device
    dtype = _matrix_dtype(device)
    th, tx_, ty_, sh, zx_, zy_ = (
        v.to(device=device, dtype=dtype, non_blocking=True).reshape(-1)
        for v in (theta_deg, tx, ty, shear_deg, zx, zy)
    )
    th, sh = torch.deg2rad(th), torch.deg2rad(sh)
    cos, sin = torch.cos(th), torch.sin(th)
    sin_s, cos_s = torch.sin(sh), torch.cos(sh)
    zeros = torch.zeros_like(th)
    ones = torch.ones_like(th)

    def mat(rows: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rot = mat([[cos, -sin, zeros], [sin, cos, zeros], [zeros, zeros, ones]])
    shift = mat([[ones, zeros, tx_], [zeros, ones, ty_], [zeros, zeros, ones]])
    shear = mat([[ones, -sin_s, zeros], [zeros, cos_s, zeros], [zeros, zeros, ones]])
    zoom = mat([[zx_, zeros, zeros], [zeros, zy_, zeros], [zeros, zeros, ones]])

    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    centre = _host_matrix([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]], dtype, device)
    uncentre = _host_matrix([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]], dtype, device)
    return centre @ rot @ shift @ shear @ zoom @ uncentre


def _pixel_scale(size: int) -> float:
    """s in u = s * x - 1 for ``align_corners=True`` (u=-1 at pixel 0, +1 at pixel n-1); for size 1 any
    value works, as grid_sample maps every u to pixel 0."""
    return 2.0 / (size - 1) if size > 1 else 1.0


def apply_affine(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample ``(B, C, H, W)`` with pixel-space output->input matrices ``(B, 3, 3)``: bilinear with edge
    replication (Keras ``fill_mode='nearest'``, scipy ``order=1, mode='nearest'``). Integer input gives
    float32 on its 0..255 scale; half/bfloat16 are computed in float32 and cast back."""
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    if matrices.shape != (b, 3, 3):
        raise ValueError(f"matrices must have shape ({b}, 3, 3), got {tuple(matrices.shape)}")

    out_dtype = images.dtype if images.is_floating_point() else torch.float32
    compute_dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    x = images.as_subclass(torch.Tensor).to(compute_dtype)

    # "input pixel -> [-1, 1]" (align_corners=True) folded into M, applied to the output pixels as
    # broadcast (B, 2, H, W) planes: faster than a (B*H*W, 3) x (3, 2) matmul (benchmarks/README.md),
    # and affine_grid warns on size-1 axes.
    m = matrices.to(device=images.device, dtype=_matrix_dtype(images.device), non_blocking=True)
    norm = _host_matrix(
        [[_pixel_scale(w), 0.0, -1.0], [0.0, _pixel_scale(h), -1.0], [0.0, 0.0, 1.0]], m.dtype, m.device
    )
    to_grid = (norm @ m)[:, :2, :].to(compute_dtype)  # (B, 2, 3): output pixel (x, y, 1) -> input (u, v)
    ys = torch.arange(h, dtype=compute_dtype, device=images.device).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=compute_dtype, device=images.device).view(1, 1, 1, w)
    per_x, per_y, offset = (to_grid[:, :, i, None, None] for i in range(3))  # (B, 2, 1, 1) each
    grid = torch.addcmul(offset + per_y * ys, per_x, xs).permute(0, 2, 3, 1)

    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(out_dtype)


def keras_augment_batch(images: torch.Tensor, params: KerasAugmentParams) -> torch.Tensor:
    """Keras ``apply_transform`` on ``(B, C, H, W)``, each sample with its own parameters: affine, then
    horizontal, then vertical flip. Float output (uint8 -> float32 on the 0..255 scale, not rescaled)."""
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if len(params) != images.shape[0]:
        raise ValueError(f"params hold {len(params)} samples but the batch has {images.shape[0]}")
    p = params.to(images.device)
    h, w = images.shape[-2:]
    matrices = keras_affine_matrices(p.theta, p.tx, p.ty, p.shear, p.zx, p.zy, h, w)
    return apply_affine(images, matrices @ _flip_matrices(p.hflip, p.vflip, h, w))


def _flip_matrices(hflip: torch.Tensor, vflip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The flips after the affine as matrices: flipping the output grid samples exactly what flipping
    the result would, without two more passes over the images."""
    dtype = _matrix_dtype(hflip.device)
    sx = 1.0 - 2.0 * hflip.to(dtype).reshape(-1)
    sy = 1.0 - 2.0 * vflip.to(dtype).reshape(-1)
    flips = torch.zeros(sx.shape[0], 3, 3, dtype=dtype, device=hflip.device)
    flips[:, 0, 0], flips[:, 0, 2] = sx, (1.0 - sx) / 2.0 * (width - 1)
    flips[:, 1, 1], flips[:, 1, 2] = sy, (1.0 - sy) / 2.0 * (height - 1)
    flips[:, 2, 2] = 1.0
    return flips


def _uniform(lo: float, hi: float, n: int, generator: _Gen, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def _random_sign(n: int, generator: _Gen, device: torch.device) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=generator, device=device) * 2 - 1).to(torch.float64)


def _draw_shift(
    shift_range: ShiftRange, size: int, n: int, generator: _Gen, device: torch.device
) -> torch.Tensor:
    """Keras's shift draw: float r ~ U(-r, r); int r: an int in [0, r) with a random sign; a sequence:
    one of its values with a random sign. Times the image size when max(range) < 1."""
    if isinstance(shift_range, numbers.Real):
        if not shift_range:
            return torch.zeros(n, dtype=torch.float64, device=device)
        if isinstance(shift_range, numbers.Integral):
            values = torch.randint(0, int(shift_range), (n,), generator=generator, device=device)
            out = values.to(torch.float64) * _random_sign(n, generator, device)
        else:
            r = float(shift_range)
            out = _uniform(-r, r, n, generator, device)
        biggest = float(shift_range)
    else:
        choices = torch.tensor([float(v) for v in shift_range], dtype=torch.float64, device=device)
        idx = torch.randint(0, len(choices), (n,), generator=generator, device=device)
        out = choices[idx] * _random_sign(n, generator, device)
        biggest = float(choices.max())
    return out * size if biggest < 1 else out


def _zoom_bounds(zoom_range: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(zoom_range, numbers.Real) and not isinstance(zoom_range, bool):
        z = float(zoom_range)
        if not 0.0 <= z < 1.0:
            raise ValueError(f"zoom_range must be a float in [0, 1) or a pair [lo, hi], got {zoom_range!r}")
        return 1.0 - z, 1.0 + z
    try:
        lo, hi = (float(v) for v in zoom_range)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(
            f"zoom_range must be a float in [0, 1) or a pair [lo, hi], got {zoom_range!r}"
        ) from None
    if not 0.0 < lo <= hi:
        raise ValueError(f"zoom_range pair must satisfy 0 < lo <= hi, got zoom_range={zoom_range!r}")
    return lo, hi


def _check_nonneg(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {name}={value!r}")


def _check_shift(name: str, value: Any) -> None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        _check_nonneg(name, value)
        return
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0 or a sequence of numbers, got {value!r}") from None
    if not values:
        raise ValueError(f"{name} must not be an empty sequence")


def _check_ranges(
    rotation: Any, width_shift: Any, height_shift: Any, shear: Any, zoom: Any
) -> tuple[float, float]:
    """Validate the Keras ranges; returns the zoom bounds."""
    _check_nonneg("rotation_range", rotation)
    _check_nonneg("shear_range", shear)
    _check_shift("width_shift_range", width_shift)
    _check_shift("height_shift_range", height_shift)
    return _zoom_bounds(zoom)


def sample_keras_params(
    batch_size: int,
    height: int,
    width: int,
    *,
    rotation_range: float = _SEED["rotation_range"],
    width_shift_range: ShiftRange = _SEED["width_shift_range"],
    height_shift_range: ShiftRange = _SEED["height_shift_range"],
    shear_range: float = _SEED["shear_range"],
    zoom_range: float | Sequence[float] = _SEED["zoom_range"],
    horizontal_flip: bool = _SEED["horizontal_flip"],
    vertical_flip: bool = _SEED["vertical_flip"],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> KerasAugmentParams:
    """Keras ``get_random_transform`` per sample: theta, shear ~ U(+-range) degrees; zx and zy drawn
    independently (exactly 1 for zoom [1, 1]); each flip with p=0.5. Drawn on the generator's device (CPU
    by default, so ``torch.manual_seed`` reproduces them), stored as float32 (MPS has no float64)."""
    zlo, zhi = _check_ranges(rotation_range, width_shift_range, height_shift_range, shear_range, zoom_range)
    n = int(batch_size)
    gdev = generator.device if generator is not None else torch.device("cpu")

    rot = float(rotation_range)
    theta = _uniform(-rot, rot, n, generator, gdev)
    tx = _draw_shift(height_shift_range, height, n, generator, gdev)
    ty = _draw_shift(width_shift_range, width, n, generator, gdev)
    shr = float(shear_range)
    shear = _uniform(-shr, shr, n, generator, gdev)
    if zlo == 1.0 and zhi == 1.0:
        zx = zy = torch.ones(n, dtype=torch.float64, device=gdev)
    else:
        zx = _uniform(zlo, zhi, n, generator, gdev)
        zy = _uniform(zlo, zhi, n, generator, gdev)
    hflip = (torch.rand(n, generator=generator, device=gdev) < 0.5) & bool(horizontal_flip)
    vflip = (torch.rand(n, generator=generator, device=gdev) < 0.5) & bool(vertical_flip)

    params = KerasAugmentParams(*(v.to(torch.float32) for v in (theta, tx, ty, shear, zx, zy)), hflip, vflip)
    return params.to(device) if device is not None else params


class KerasRandomAffine(_ImageTransform):
    """Keras ``ImageDataGenerator``'s geometric augmentation as a v2 transform, on ``(C, H, W)`` or
    ``(B, C, H, W)`` (independent parameters per sample). Draws from the global torch RNG, so DataLoader's
    worker seeding and ``torch.manual_seed`` apply. Float output as :func:`keras_augment_batch`."""

    def __init__(
        self,
        rotation_range: float = _SEED["rotation_range"],
        width_shift_range: ShiftRange = _SEED["width_shift_range"],
        height_shift_range: ShiftRange = _SEED["height_shift_range"],
        shear_range: float = _SEED["shear_range"],
        zoom_range: float | Sequence[float] = _SEED["zoom_range"],
        fill_mode: str = _SEED["fill_mode"],
        horizontal_flip: bool = _SEED["horizontal_flip"],
        vertical_flip: bool = _SEED["vertical_flip"],
    ) -> None:
        super().__init__()
        if fill_mode != "nearest":
            raise ValueError(
                f"fill_mode={fill_mode!r} is not supported: only 'nearest' is implemented "
                "('constant', 'reflect' and 'wrap' are not)"
            )
        _check_ranges(rotation_range, width_shift_range, height_shift_range, shear_range, zoom_range)
        self.rotation_range = float(rotation_range)
        self.width_shift_range = _freeze(width_shift_range)
        self.height_shift_range = _freeze(height_shift_range)
        self.shear_range = float(shear_range)
        self.zoom_range = _freeze(zoom_range)
        self.fill_mode = fill_mode
        self.horizontal_flip = bool(horizontal_flip)
        self.vertical_flip = bool(vertical_flip)

    def check_inputs(self, flat_inputs: list[Any]) -> None:
        """PIL images, boxes, masks and videos are rejected rather than silently passed through."""
        for inpt in flat_inputs:
            if isinstance(inpt, PIL.Image.Image):
                raise TypeError(
                    "KerasRandomAffine works on tensors; convert PIL images with v2.PILToTensor()"
                )
            if isinstance(inpt, (tv_tensors.BoundingBoxes, tv_tensors.Mask, tv_tensors.Video)):
                raise TypeError(f"KerasRandomAffine does not support {type(inpt).__name__} inputs")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if not flat_inputs:
            return {"params": None}
        first = flat_inputs[0]
        if first.ndim not in (3, 4):
            raise ValueError(f"expected (C, H, W) or (B, C, H, W), got shape {tuple(first.shape)}")
        ranges = {k: v for k, v in vars(self).items() if k.endswith(("_range", "_flip"))}
        batch = first.shape[0] if first.ndim == 4 else 1
        return {"params": sample_keras_params(batch, *first.shape[-2:], **ranges, device=first.device)}

    def _image(self, x: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        if x.ndim == 3:
            return keras_augment_batch(x.unsqueeze(0), params["params"]).squeeze(0)
        return keras_augment_batch(x, params["params"])


def _freeze(value: Any) -> Any:
    """Plain float/int or tuple, so the module pickles and shows in ``repr`` (Hydra ListConfig too)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    return tuple(float(v) for v in value)


def train_transform(aug: dict[str, Any] | None = None) -> v2.Compose:
    """Training preset: Keras augmentation (``aug`` = its keyword arguments; None = defaults), rescale."""
    return v2.Compose([KerasRandomAffine(**dict(aug or {})), Rescale()])


def check_appearance(settings: Mapping[str, Any]) -> None:
    """``data.appearance``: known keys of :func:`appearance_augment_batch`, numbers >= 0, and its
    probabilities (``*_p``) at most 1; a ConfigError naming the key otherwise."""
    known = set(inspect.signature(appearance_augment_batch).parameters) - {"images", "generator"}
    ok = set(settings) <= known and all(
        is_num(v) and v >= 0 and (not k.endswith("_p") or v <= 1) for k, v in settings.items()
    )
    expected = f"a mapping of {', '.join(sorted(known))} to numbers >= 0 (the *_p probabilities <= 1)"
    require(ok, "data.appearance", expected, dict(settings))


def appearance_augment_batch(
    images: torch.Tensor,
    gamma: float = 0.0,
    contrast: float = 0.0,
    brightness: float = 0.0,
    blur_p: float = 0.0,
    noise: float = 0.0,
    sharpen_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image exposure and quality changes of ``(B, C, H, W)`` floats in [0, 1], as films from other
    machines differ (Keras only varies geometry). Each image draws: gamma exp(U(+-gamma)); contrast
    1 + U(+-contrast) about its mean; brightness offset U(+-brightness); with probability ``blur_p`` a
    3x3 Gaussian blur (sigma U(0.3, 1.2)), else with ``sharpen_p`` an unsharp mask with that kernel
    (amount U(0.5, 1.5); films can be sharper too); noise with std U(0, noise). Zero disables a term;
    clamped to [0, 1]."""
    b = images.shape[0]
    opts = {"device": images.device, "dtype": images.dtype}

    def uniform(lo: float, hi: float) -> torch.Tensor:
        u = torch.rand(b, 1, 1, 1, generator=generator, device=images.device if generator is None else "cpu")
        return (lo + (hi - lo) * u).to(**opts, non_blocking=True)

    x = images
    if gamma:
        x = x.clamp(min=1e-6).pow(uniform(-gamma, gamma).exp())
    if contrast:
        mean = x.mean(dim=(-3, -2, -1), keepdim=True)
        x = (x - mean) * (1 + uniform(-contrast, contrast)) + mean
    if brightness:
        x = x + uniform(-brightness, brightness)
    if blur_p or sharpen_p:
        sigma = uniform(0.3, 1.2)
        coords = torch.arange(-1, 2, **opts).view(1, 3)
        kernel1d = torch.exp(-(coords**2) / (2 * sigma.view(b, 1) ** 2))
        kernel1d = kernel1d / kernel1d.sum(dim=1, keepdim=True)
        kernel = (kernel1d[:, :, None] * kernel1d[:, None, :]).unsqueeze(1)  # (B, 1, 3, 3)
        c = x.shape[1]
        blurred = F.conv2d(
            F.pad(x.reshape(1, b * c, *x.shape[-2:]), (1, 1, 1, 1), mode="replicate"),
            kernel.repeat_interleave(c, dim=0),
            groups=b * c,
        ).reshape(x.shape)
        chosen = uniform(0.0, 1.0) < blur_p
        sharpened = x
        if sharpen_p:  # drawn after the blur's draws: sharpen_p=0 leaves the random stream as it was
            amount = uniform(0.5, 1.5)
            sharpened = torch.where(uniform(0.0, 1.0) < sharpen_p, x + amount * (x - blurred), x)
        x = torch.where(chosen, blurred, sharpened)
    if noise:
        std = uniform(0.0, noise)
        gauss = torch.randn(x.shape, generator=generator, device="cpu" if generator is not None else x.device)
        x = x + std * gauss.to(**opts, non_blocking=True)
    return x.clamp(0.0, 1.0)

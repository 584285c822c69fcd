"""Image transforms: resize, rescale and a Keras ``ImageDataGenerator``-compatible augmentation.

Style of torchvision's ``references/classification/presets.py``: small pure builders, no I/O.

The original model was trained with Keras's ``ImageDataGenerator`` (TensorFlow 2.6+ / tf_keras), so the
augmentation here reproduces *its* affine (parameter draws, matrix composition, bilinear sampling with
edge replication, flips) rather than torchvision's ``RandomAffine``, whose parametrisation differs
(isotropic zoom, shear convention, output->input direction). Two entry points share one implementation:

* :class:`KerasRandomAffine` - a ``torchvision.transforms.v2`` transform for ``Dataset``/CPU pipelines.
* :func:`sample_keras_params` + :func:`keras_augment_batch` - the batched path for a whole batch on the
  accelerator (e.g. in ``LightningModule.on_after_batch_transfer``).

Rescaling (``x / 255``) is always a separate, last step, as in Keras (``standardize`` runs after
``apply_transform``).
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

from xray.config_checks import is_num, require
from xray.data.io import read_image

__all__ = [
    "KerasAugmentParams",
    "KerasRandomAffine",
    "Rescale",
    "appearance_augment_batch",
    "apply_affine",
    "keras_affine_matrices",
    "keras_augment_batch",
    "rescale",
    "load_resized",
    "resize_image",
    "sample_keras_params",
    "train_transform",
]

ShiftRange = float | int | Sequence[float]

_INTERPOLATIONS: dict[str, InterpolationMode] = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


# --------------------------------------------------------------------------------------------------
# Resize / rescale
# --------------------------------------------------------------------------------------------------


def resize_image(img: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize ``(..., C, H, W)`` to a ``size x size`` square, ignoring aspect ratio.

    Keras's ``flow_from_directory(target_size=...)`` squashes the image to the target size, so we do too.
    ``antialias=True`` keeps downscaling of large radiographs from aliasing. For uint8 input the output is
    uint8: torchvision saturates bicubic overshoot to 0..255 (native uint8 kernel on CPU, explicit
    ``clamp_`` + ``round_`` on the float fallback used on GPU) instead of wrapping around.
    """
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
    """The eval preset on one file: read_image then resize, as a (S, S) uint8 array (training's decoded
    cache, validation and prediction all start here)."""
    return resize_image(read_image(path), image_size, interpolation)[0].numpy()


def rescale(x: torch.Tensor) -> torch.Tensor:
    """Map uint8 0..255 to float32 0..1 (Keras ``rescale=1/255``); float input is only cast to float32.

    Float input is taken to be already rescaled, so calling this twice is harmless. Note the float
    0..255 output of :class:`KerasRandomAffine` is *not* rescaled by this; the presets use
    :class:`Rescale`, which divides any input by 255 as Keras did.
    """
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if x.is_floating_point():
        return x.to(torch.float32)
    raise TypeError(f"rescale expects a uint8 or floating tensor, got dtype={x.dtype}")


def _is_pure_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, tv_tensors.TVTensor)


class Rescale(v2.Transform):
    """Keras ``rescale=1/255`` as the last pipeline step: float32 ``x / divisor`` for uint8 AND float input.

    Unlike :func:`rescale` it also divides float input, because in the training preset it receives the
    float 0..255 output of :class:`KerasRandomAffine` (Keras likewise multiplied its float32 0..255
    arrays). For uint8 input it equals :func:`rescale` bit for bit. Only the image is touched (labels pass
    through), which a bare ``v2.Lambda`` would not guarantee, and the class pickles into DataLoader
    workers.
    """

    _transformed_types = (_is_pure_tensor, tv_tensors.Image)

    def __init__(self, divisor: float = 255.0) -> None:
        super().__init__()
        if not divisor > 0:
            raise ValueError(f"divisor must be > 0, got divisor={divisor!r}")
        self.divisor = float(divisor)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        x = inpt.as_subclass(torch.Tensor)
        if not (x.dtype == torch.uint8 or x.is_floating_point()):
            raise TypeError(f"Rescale expects a uint8 or floating tensor, got dtype={x.dtype}")
        out = x.to(torch.float32).div_(self.divisor)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


# --------------------------------------------------------------------------------------------------
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
"""The seed Keras project's ``ImageDataGenerator`` settings: the defaults of :class:`KerasRandomAffine`,
:func:`sample_keras_params` and the DataModule (``conf/data/kermany.yaml`` spells them out; a test
keeps the two equal)."""
_SEED = KERAS_SEED_AUGMENT


# Keras affine: parameters, matrices, sampling
# --------------------------------------------------------------------------------------------------


@dataclass
class KerasAugmentParams:
    """Per-sample parameters of the Keras augmentation, each a 1-D tensor of length B.

    ``theta`` and ``shear`` in degrees; ``tx``/``ty`` in pixels (already multiplied by the image size);
    ``zx``/``zy`` zoom factors (>1 samples a larger area, i.e. zooms out); ``hflip``/``vflip`` bool.
    As in Keras, ``tx`` comes from ``height_shift_range`` but is the first (x = column) component of the
    shift matrix.
    """

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
        """Move to ``device``; the host-to-accelerator copies are ``non_blocking`` (no stream sync per step)."""
        return KerasAugmentParams(
            **{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)}
        )

    @property
    def device(self) -> torch.device:
        return self.theta.device

    @classmethod
    def identity(
        cls, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> KerasAugmentParams:
        """Parameters that leave images unchanged (handy in tests and for building explicit params)."""
        zeros = torch.zeros(batch_size, dtype=dtype, device=device)
        ones = torch.ones(batch_size, dtype=dtype, device=device)
        no = torch.zeros(batch_size, dtype=torch.bool, device=device)
        return cls(zeros, zeros.clone(), zeros.clone(), zeros.clone(), ones, ones.clone(), no, no.clone())

    def matrices(self, height: int, width: int) -> torch.Tensor:
        """Pixel-space (B, 3, 3) output->input matrices, see :func:`keras_affine_matrices`."""
        return keras_affine_matrices(
            self.theta, self.tx, self.ty, self.shear, self.zx, self.zy, height, width
        )


def _host_matrix(rows: list[list[float]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant built on the host and copied ``non_blocking``: ``torch.tensor(..., device=cuda)``
    would copy synchronously, i.e. wait for every kernel queued so far, once per training step."""
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
    """Keras's ``M = C R(theta) Shift(tx, ty) Shear(shear) Zoom(zx, zy) C^-1`` as a (B, 3, 3) tensor.

    Coordinates are ``(x, y) = (column, row)`` in pixels; ``M`` maps an OUTPUT pixel to the INPUT
    location it samples (scipy ``affine_transform`` convention). ``C`` translates to the true centre
    ``((W-1)/2, (H-1)/2)``; tf_keras passes ``(h, w)`` where it wants ``(w, h)``, which differs only for
    non-square images. float64 (float32 on MPS) on the device of ``theta_deg``.
    """
    device = theta_deg.device
    dtype = _matrix_dtype(device)

    def as_vec(v: torch.Tensor) -> torch.Tensor:
        v = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
        return v.to(device=device, dtype=dtype, non_blocking=True).reshape(-1)

    th = torch.deg2rad(as_vec(theta_deg))
    sh = torch.deg2rad(as_vec(shear_deg))
    tx_, ty_, zx_, zy_ = (as_vec(v) for v in (tx, ty, zx, zy))
    b = th.shape[0]
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
    m = centre @ rot @ shift @ shear @ zoom @ uncentre
    return m.reshape(b, 3, 3)


def _pixel_to_normalized(size: int) -> tuple[float, float]:
    """Scale/offset with u = s * x + o for ``align_corners=True`` (u=-1 at pixel 0, +1 at pixel n-1)."""
    if size <= 1:
        return 1.0, -1.0  # any value works: grid_sample maps every u to pixel 0 when size == 1
    return 2.0 / (size - 1), -1.0


def apply_affine(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample ``(B, C, H, W)`` images with pixel-space output->input matrices ``(B, 3, 3)``.

    Bilinear with edge replication, i.e. ``scipy.ndimage.map_coordinates(order=1, mode='nearest')`` /
    Keras ``fill_mode='nearest'``, via ``grid_sample(padding_mode='border', align_corners=True)``:
    with ``align_corners=True`` pixel ``x`` is ``u = 2x/(W-1) - 1`` exactly, so the grid is just
    ``normalize(M @ (x, y, 1))`` over the output pixels (built directly: ``affine_grid`` warns on size-1
    axes). Integer input is computed in float32 on its 0..255 scale; half/bfloat16 are computed in
    float32 (grid precision) and cast back.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    if matrices.shape != (b, 3, 3):
        raise ValueError(f"matrices must have shape ({b}, 3, 3), got {tuple(matrices.shape)}")

    out_dtype = images.dtype if images.is_floating_point() else torch.float32
    compute_dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    x = images.as_subclass(torch.Tensor).to(compute_dtype)

    # Fold "input pixel -> [-1, 1]" into M (in float64 where available), then apply it to the exact
    # integer pixel coordinates of the output grid. The grid is affine in x and y, so it is built as
    # (B, 2, H, W) planes, offset + y-term broadcast along W, then handed over as a (B, H, W, 2) view:
    # the (B*H*W, 3) x (3, 2) product it replaces is a shape no BLAS is fast at (43% of a 500 px CPU
    # batch, more than the sampling itself; benchmarks/README.md).
    m = matrices.to(device=images.device, dtype=_matrix_dtype(images.device), non_blocking=True)
    sx, ox = _pixel_to_normalized(w)
    sy, oy = _pixel_to_normalized(h)
    norm = _host_matrix([[sx, 0.0, ox], [0.0, sy, oy], [0.0, 0.0, 1.0]], m.dtype, m.device)
    to_grid = (norm @ m)[:, :2, :].to(compute_dtype)  # (B, 2, 3): output pixel (x, y, 1) -> input (u, v)
    ys = torch.arange(h, dtype=compute_dtype, device=images.device).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=compute_dtype, device=images.device).view(1, 1, 1, w)
    per_x, per_y, offset = (to_grid[:, :, i, None, None] for i in range(3))  # (B, 2, 1, 1) each
    grid = torch.addcmul(offset + per_y * ys, per_x, xs).permute(0, 2, 3, 1)

    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(out_dtype)


def keras_augment_batch(images: torch.Tensor, params: KerasAugmentParams) -> torch.Tensor:
    """Keras ``apply_transform`` for a batch: affine, then horizontal flip, then vertical flip.

    ``images`` is ``(B, C, H, W)``; the result is float (uint8 -> float32 on the 0..255 scale, no
    rescale). Each sample uses its own parameters, so this is the GPU-side batched augmentation.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if len(params) != images.shape[0]:
        raise ValueError(f"params hold {len(params)} samples but the batch has {images.shape[0]}")
    params = params.to(images.device)
    h, w = images.shape[-2:]
    return apply_affine(images, params.matrices(h, w) @ _flip_matrices(params.hflip, params.vflip, h, w))


def _flip_matrices(hflip: torch.Tensor, vflip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Flips after the affine, folded into it: flipping the output grid (x -> W-1-x, y -> H-1-y) is
    exactly the same resampling as flipping the resampled image, without two extra passes over it."""
    dtype = _matrix_dtype(hflip.device)
    sx = 1.0 - 2.0 * hflip.to(dtype).reshape(-1)
    sy = 1.0 - 2.0 * vflip.to(dtype).reshape(-1)
    flips = torch.zeros(sx.shape[0], 3, 3, dtype=dtype, device=hflip.device)
    flips[:, 0, 0], flips[:, 0, 2] = sx, (1.0 - sx) / 2.0 * (width - 1)
    flips[:, 1, 1], flips[:, 1, 2] = sy, (1.0 - sy) / 2.0 * (height - 1)
    flips[:, 2, 2] = 1.0
    return flips


def _uniform(
    lo: float, hi: float, n: int, generator: torch.Generator | None, gen_device: torch.device
) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
    return lo + (hi - lo) * u


def _random_sign(n: int, generator: torch.Generator | None, gen_device: torch.device) -> torch.Tensor:
    bits = torch.randint(0, 2, (n,), generator=generator, device=gen_device)
    return (bits * 2 - 1).to(torch.float64)


def _draw_shift(
    shift_range: ShiftRange, size: int, n: int, generator: torch.Generator | None, gen_device: torch.device
) -> torch.Tensor:
    """Keras ``get_random_transform`` shift draw, including its int / list special cases.

    float r: U(-r, r); int r: ``np.random.choice(r)`` (an int in [0, r)) times a random sign;
    sequence: one of its values times a random sign. Multiplied by the image size when max(range) < 1.
    """
    zeros = torch.zeros(n, dtype=torch.float64, device=gen_device)
    if isinstance(shift_range, numbers.Real):
        if not shift_range:
            return zeros
        if isinstance(shift_range, numbers.Integral):
            values = torch.randint(0, int(shift_range), (n,), generator=generator, device=gen_device)
            out = values.to(torch.float64) * _random_sign(n, generator, gen_device)
        else:
            r = float(shift_range)
            out = _uniform(-r, r, n, generator, gen_device)
        biggest = float(shift_range)
    else:
        choices = torch.tensor([float(v) for v in shift_range], dtype=torch.float64, device=gen_device)
        idx = torch.randint(0, len(choices), (n,), generator=generator, device=gen_device)
        out = choices[idx] * _random_sign(n, generator, gen_device)
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
    """Draw independent Keras ``get_random_transform`` parameters for each of ``batch_size`` samples.

    theta ~ U(+-rotation_range) deg; tx from ``height_shift_range`` (x ``height`` if < 1), ty from
    ``width_shift_range`` (x ``width`` if < 1); shear ~ U(+-shear_range) deg; zx, zy independent
    U(lo, hi) of the zoom range (exactly 1 when lo == hi == 1); each flip with p=0.5 when enabled.
    Draws happen on the generator's device (CPU by default, so ``torch.manual_seed`` / a CPU generator
    reproduce them) and the result is moved to ``device``; stored as float32 (MPS has no float64).
    """
    _check_nonneg("rotation_range", rotation_range)
    _check_nonneg("shear_range", shear_range)
    _check_shift("width_shift_range", width_shift_range)
    _check_shift("height_shift_range", height_shift_range)
    zlo, zhi = _zoom_bounds(zoom_range)
    n = int(batch_size)
    gdev = generator.device if generator is not None else torch.device("cpu")

    rot = float(rotation_range)
    theta = _uniform(-rot, rot, n, generator, gdev)
    tx = _draw_shift(height_shift_range, height, n, generator, gdev)
    ty = _draw_shift(width_shift_range, width, n, generator, gdev)
    shr = float(shear_range)
    shear = _uniform(-shr, shr, n, generator, gdev)
    if zlo == 1.0 and zhi == 1.0:
        zx = torch.ones(n, dtype=torch.float64, device=gdev)
        zy = torch.ones(n, dtype=torch.float64, device=gdev)
    else:
        zx = _uniform(zlo, zhi, n, generator, gdev)
        zy = _uniform(zlo, zhi, n, generator, gdev)
    hflip = (torch.rand(n, generator=generator, device=gdev) < 0.5) & bool(horizontal_flip)
    vflip = (torch.rand(n, generator=generator, device=gdev) < 0.5) & bool(vertical_flip)

    f32 = torch.float32
    params = KerasAugmentParams(
        theta.to(f32), tx.to(f32), ty.to(f32), shear.to(f32), zx.to(f32), zy.to(f32), hflip, vflip
    )
    return params.to(device) if device is not None else params


# --------------------------------------------------------------------------------------------------
# v2 transform + presets
# --------------------------------------------------------------------------------------------------


class KerasRandomAffine(v2.Transform):
    """Keras ``ImageDataGenerator`` geometric augmentation as a torchvision v2 transform.

    Accepts a single image ``(C, H, W)`` or a batch ``(B, C, H, W)`` (plain tensor or
    ``tv_tensors.Image``); every sample gets independent parameters. Output is float (uint8 input ->
    float32 on the 0..255 scale); rescale separately. Randomness comes from the global torch RNG so that
    DataLoader's per-worker seeding gives different augmentations per worker and ``torch.manual_seed``
    makes runs reproducible. Use :meth:`apply_params` (or :func:`keras_augment_batch`) for explicit
    parameters.
    """

    # Only images are transformed; other inputs (e.g. int or tensor labels) pass through, while
    # PIL images, boxes, masks and videos are rejected in check_inputs rather than silently skipped.
    _transformed_types = (_is_pure_tensor, tv_tensors.Image)

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
        _check_nonneg("rotation_range", rotation_range)
        _check_nonneg("shear_range", shear_range)
        _check_shift("width_shift_range", width_shift_range)
        _check_shift("height_shift_range", height_shift_range)
        _zoom_bounds(zoom_range)
        self.rotation_range = float(rotation_range)
        self.width_shift_range = _freeze(width_shift_range)
        self.height_shift_range = _freeze(height_shift_range)
        self.shear_range = float(shear_range)
        self.zoom_range = _freeze(zoom_range)
        self.fill_mode = fill_mode
        self.horizontal_flip = bool(horizontal_flip)
        self.vertical_flip = bool(vertical_flip)

    def check_inputs(self, flat_inputs: list[Any]) -> None:
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
        batch = first.shape[0] if first.ndim == 4 else 1
        h, w = first.shape[-2:]
        params = sample_keras_params(
            batch,
            h,
            w,
            rotation_range=self.rotation_range,
            width_shift_range=self.width_shift_range,
            height_shift_range=self.height_shift_range,
            shear_range=self.shear_range,
            zoom_range=self.zoom_range,
            horizontal_flip=self.horizontal_flip,
            vertical_flip=self.vertical_flip,
            device=first.device,
        )
        return {"params": params}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = self.apply_params(inpt.as_subclass(torch.Tensor), params["params"])
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out

    @staticmethod
    def apply_params(images: torch.Tensor, params: KerasAugmentParams) -> torch.Tensor:
        """Deterministic part: apply given params to ``(C, H, W)`` (one sample) or ``(B, C, H, W)``."""
        if images.ndim == 3:
            return keras_augment_batch(images.unsqueeze(0), params).squeeze(0)
        return keras_augment_batch(images, params)


def _freeze(value: Any) -> Any:
    """Plain float/int or tuple, so the module pickles and shows in ``repr`` (Hydra ListConfig too)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    return tuple(float(v) for v in value)


def train_transform(aug: dict[str, Any] | None = None) -> v2.Compose:
    """Training preset: Keras augmentation (``aug`` = its keyword arguments; None = defaults), rescale."""
    return v2.Compose([KerasRandomAffine(**dict(aug or {})), Rescale()])


# --------------------------------------------------------------------------------------------------
# Appearance augmentation (acquisition variation), batched on the training device
# --------------------------------------------------------------------------------------------------


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
    """Random per-image exposure and quality changes of ``(B, C, H, W)`` floats in [0, 1].

    Films from other machines differ in tone curve, contrast, exposure, sharpness and noise; the
    Keras recipe only varies geometry. Each image draws: gamma = exp(U(-gamma, gamma)); contrast factor
    1 + U(-contrast, contrast) about its own mean; brightness offset U(-brightness, brightness); with
    probability ``blur_p`` a 3x3 Gaussian blur (sigma U(0.3, 1.2)); otherwise, with probability
    ``sharpen_p``, an unsharp mask with the same kernel (amount U(0.5, 1.5)), since films can also be
    sharper than these (the originals of the 224 px training files are); Gaussian noise with std
    U(0, noise). Zero disables a term; the result is clamped to [0, 1].
    """
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

"""Random affine distortion of image batches (training augmentation)."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from nestsynth.errors import NestError


def affine_matrix(
    angle: float | torch.Tensor,
    tx: float | torch.Tensor,
    ty: float | torch.Tensor,
    scale: float | torch.Tensor,
    shear: float | torch.Tensor,
    size: tuple[int, int] = (1, 1),
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Build ``affine_grid`` matrices from explicit transform parameters.

    The forward transform, about the image centre and in pixel units, is
    ``scale * R(angle) @ Shear_x(shear)`` followed by a shift of ``(tx * W, ty * H)``
    pixels (positive ``tx`` moves content right, positive ``ty`` down).  The
    returned matrix is its inverse in the normalized coordinates of
    ``affine_grid(..., align_corners=False)``, so ``tx = 1 / W`` moves content by
    exactly one pixel.

    Args:
        angle: rotation in degrees.
        tx: horizontal shift as a fraction of the width.
        ty: vertical shift as a fraction of the height.
        scale: isotropic scale factor (> 0).
        shear: horizontal shear angle in degrees.
        size: image ``(H, W)``; only the aspect ratio matters.
        dtype: dtype of the result.
        device: device of the result.

    Returns:
        A ``(..., 2, 3)`` tensor, the parameters broadcast together (``(2, 3)`` for scalars).
    """
    params = [torch.as_tensor(v, dtype=dtype, device=device) for v in (angle, tx, ty, scale, shear)]
    angle, tx, ty, scale, shear = torch.broadcast_tensors(*params)
    h, w = size
    a, s = torch.deg2rad(angle), torch.deg2rad(shear)
    cos, sin, tan = torch.cos(a), torch.sin(a), torch.tan(s)
    # forward M = scale * [[cos, cos*tan - sin], [sin, sin*tan + cos]]; det(M) = scale**2
    m00, m01 = scale * cos, scale * (cos * tan - sin)
    m10, m11 = scale * sin, scale * (sin * tan + cos)
    det = scale * scale
    # inverse, conjugated by the pixel -> normalized scaling diag(2/W, 2/H)
    i00, i01 = m11 / det, -m01 / det * (h / w)
    i10, i11 = -m10 / det * (w / h), m00 / det
    sx, sy = 2.0 * tx, 2.0 * ty
    row0 = torch.stack([i00, i01, -(i00 * sx + i01 * sy)], dim=-1)
    row1 = torch.stack([i10, i11, -(i10 * sx + i11 * sy)], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp images with per-sample ``affine_grid`` matrices.

    Args:
        x: images ``(B, C, H, W)``, floating point.
        theta: ``(B, 2, 3)`` or ``(2, 3)`` matrices from :func:`affine_matrix`.

    Returns:
        Warped images of the same shape and dtype (bilinear, zero padding).
    """
    theta = theta.to(device=x.device, dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _check(x: torch.Tensor, generator: object, ranges: dict, scale: object) -> tuple[float, float]:
    """Validate the arguments of :func:`random_affine`; return the scale range."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise NestError(f"random_affine needs a floating-point (B, C, H, W) tensor, got {got}.")
    if not isinstance(generator, torch.Generator):
        raise NestError(f"random_affine needs a torch.Generator, got {type(generator).__name__}.")
    for key, value in ranges.items():
        if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise NestError(f"random_affine {key} must be a finite number >= 0, got {value!r}.")
    try:
        lo, hi = (float(v) for v in scale)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not (0 < lo <= hi < math.inf):
        raise NestError(
            f"random_affine scale must be a pair (low, high) with 0 < low <= high, got {scale!r}."
        )
    return lo, hi


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    rotate: float = 15.0,
    shift: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
    shear: float = 10.0,
    batch: int | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Apply an independent random affine distortion to every image of a batch.

    Per sample: rotation uniform in ``[-rotate, rotate]`` degrees, shift uniform
    in ``[-shift, shift]`` of the image size on each axis, isotropic scale uniform
    in ``scale``, shear uniform in ``[-shear, shear]`` degrees.  All random numbers
    come from ``generator``, so equal generator states give equal outputs.

    Args:
        x: images ``(B, C, H, W)``, floating point, on any device.
        generator: source of randomness (its device is used for drawing).
        rotate: largest rotation in degrees.
        shift: largest shift as a fraction of height/width.
        scale: ``(low, high)`` range of the scale factor.
        shear: largest shear angle in degrees.
        batch, start: ``x`` is rows ``start..start + len(x)`` of a batch of ``batch`` images:
            the distortions of the whole batch are drawn (the generator advances as for
            the whole batch) and those rows' are applied; under torchrun each rank distorts
            its slice of the global batch this way.  Default: ``x`` is the whole batch.

    Returns:
        The distorted images, same shape, dtype and device as ``x``.

    Raises:
        NestError: on a non-image tensor, a non-generator or invalid ranges.
    """
    lo, hi = _check(x, generator, {"rotate": rotate, "shift": shift, "shear": shear}, scale)
    if (x.shape[0] if batch is None else batch) == 0:
        return x.clone()
    u = torch.rand((x.shape[0] if batch is None else batch, 5), generator=generator, device=generator.device)
    if batch is not None:
        u = u[start:start + x.shape[0]]
        if x.shape[0] == 0:
            return x.clone()
    u = u.to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    sym = 2.0 * u - 1.0
    theta = affine_matrix(
        sym[:, 0] * rotate,
        sym[:, 1] * shift,
        sym[:, 2] * shift,
        lo + (hi - lo) * u[:, 3],
        sym[:, 4] * shear,
        size=(x.shape[2], x.shape[3]),
        dtype=u.dtype,
        device=x.device,
    )
    return apply_affine(x, theta)

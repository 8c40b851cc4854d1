"""SML's post-processing of a score map: iterative boundary suppression and dilated smoothing.

Pure tensor functions on ``[B, H, W]`` maps, any device. Used by SML
(:mod:`lightning_modules.scoring.sml`) and, optionally, to smooth other score maps (FRE's
``smoothing_dilation``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dilated_smoothing", "prediction_boundaries", "suppress_boundaries"]


def _check_map(x: Tensor, name: str) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape [B, H, W], got {tuple(x.shape)}")


# ----------------------------------------------------------------------------- boundaries
# Morphology and box filters below are written as shifted slices of [B, H, W] maps rather than
# max_pool2d / conv2d: for single-channel maps PyTorch's CPU pooling and dilated convolution
# kernels are tens of times slower than a few elementwise passes, and on GPU both are
# memory-bound anyway. Slices also work on integer class maps directly.


def _neighbour_reduce(x: Tensor, dim: int, op: Callable[..., Tensor]) -> Tensor:
    """``op`` (torch.maximum / torch.minimum) of each element and its two neighbours along ``dim``;
    neighbours outside the image are ignored (geodesic border)."""
    out = x.clone()
    n = x.shape[dim]
    # out[i] = op(out[i], x[i - 1]) for i >= 1, then out[i] = op(out[i], x[i + 1]) for i < n - 1
    after_first, before_last = out.narrow(dim, 1, n - 1), out.narrow(dim, 0, n - 1)
    op(after_first, x.narrow(dim, 0, n - 1), out=after_first)
    op(before_last, x.narrow(dim, 1, n - 1), out=before_last)
    return out


def _dilate_cross(x: Tensor) -> Tensor:
    """Grey dilation of ``[B, H, W]`` by the 3x3 cross (a pixel and its 4-neighbours)."""
    return torch.maximum(_neighbour_reduce(x, -2, torch.maximum), _neighbour_reduce(x, -1, torch.maximum))


def _erode_square(x: Tensor) -> Tensor:
    """Grey erosion of ``[B, H, W]`` by the 3x3 square (separable: rows, then columns)."""
    return _neighbour_reduce(_neighbour_reduce(x, -2, torch.minimum), -1, torch.minimum)


def prediction_boundaries(pred: Tensor, erosion_border_value: float | None = None) -> Tensor:
    """Boundary pixels of a predicted class map, as in the official ``find_boundaries``.

    A pixel is on a boundary when the dilation of the class map by the 3x3 *cross* (its own and
    its 4-neighbours' labels) and the erosion by the 3x3 *square* (its 8-neighbourhood) differ,
    treating class indices as grey levels. Since the cross lies inside the square, that is: some
    4-neighbour has a different class, or some diagonal neighbour has a *lower* class index
    (a higher-indexed diagonal neighbour alone does not make a boundary; this asymmetry is the
    official definition).

    Args:
        pred: ``[B, H, W]`` integer class map.
        erosion_border_value: None (default) ignores pixels outside the image, which is what
            kornia's morphology does today (``border_type="geodesic"``). The kornia commit pinned
            by the official code padded the erosion with the constant 1.0 instead, so that every
            image-border pixel predicted as a class >= 2 is a boundary; pass ``1.0`` to reproduce
            that exactly. (Its dilation padded with 0, which never matters for labels >= 0.)

    Returns:
        bool ``[B, H, W]``.
    """
    _check_map(pred, "pred")
    dilated = _dilate_cross(pred)
    eroded = _erode_square(pred)
    if erosion_border_value is not None:
        # A constant pad enters the 3x3 window of exactly the outermost ring of pixels.
        ring = torch.ones(pred.shape[-2:], dtype=torch.bool, device=pred.device)
        ring[1:-1, 1:-1] = False
        eroded = torch.where(ring, eroded.double().clamp_max(float(erosion_border_value)), eroded.double())
        dilated = dilated.double()
    return dilated != eroded


def _expansion_radii(boundary_width: int, boundary_iterations: int) -> list[int]:
    """L1 radius by which the boundary is expanded at each suppression step (official schedule).

    Step ``i`` uses ``width - i * (width // iterations) - 1``, and 0 on the last step (or
    throughout when ``width == 0``): 4/4 -> [3, 2, 1, 0], 2/2 -> [1, 0], 6/3 -> [5, 3, 0].
    """
    if boundary_width < 0 or boundary_iterations < 0:
        raise ValueError(
            f"boundary_width and boundary_iterations must be >= 0, got {boundary_width} and {boundary_iterations}"
        )
    if boundary_iterations == 0:
        return []
    if boundary_width % boundary_iterations != 0:
        # The official code asserts this: the width shrinks by an integer step per iteration.
        raise ValueError(
            f"boundary_width ({boundary_width}) must be a multiple of boundary_iterations ({boundary_iterations})"
        )
    step = boundary_width // boundary_iterations
    return [
        0 if (boundary_width == 0 or i == boundary_iterations - 1) else boundary_width - step * i - 1
        for i in range(boundary_iterations)
    ]


def suppress_boundaries(
    sml: Tensor,
    pred: Tensor,
    boundary_width: int = 4,
    boundary_iterations: int = 4,
    erosion_border_value: float | None = None,
) -> Tensor:
    """Iterative boundary suppression of a score map (official ``BoundarySuppressionWithSmoothing``).

    The boundary ``B0`` of ``pred`` (see :func:`prediction_boundaries`) is computed once. At step
    ``i`` (of ``boundary_iterations``) the boundary is ``B0`` expanded by the L1 ball (diamond) of
    radius ``r_i = width - i * (width // iterations) - 1`` (0 on the last step), so the band
    shrinks towards the class edges. Every pixel of that band takes the mean of the current
    values of the non-band pixels in its 3x3 neighbourhood, where the neighbourhood is taken on
    the replication-padded map (an image-border pixel's replicated copies count once per copy,
    as with the official ``ReplicationPad2d`` + 3x3 convolution); a band pixel with no non-band
    neighbour keeps its value. Pixels outside the band never change. Each step reads the
    previous step's output.

    Args:
        sml: ``[B, H, W]`` float score map (higher = in-distribution, but any map works).
        pred: ``[B, H, W]`` integer predicted class map that defines the boundaries.
        boundary_width: total width; must be a multiple of ``boundary_iterations``.
        boundary_iterations: number of steps; 0 returns ``sml`` unchanged.
        erosion_border_value: see :func:`prediction_boundaries`.

    Returns:
        ``[B, H, W]``, the dtype of ``sml``.
    """
    _check_map(sml, "sml")
    if pred.shape != sml.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and sml {tuple(sml.shape)} must have the same shape")
    radii = _expansion_radii(boundary_width, boundary_iterations)
    if not radii:
        return sml

    # An L1 ball of radius r is r successive 3x3-cross dilations; since the radii shrink, one
    # pass of max(radii) dilations yields every band. Inside a rectangle, iterating the
    # geodesic cross equals one clipped diamond dilation (L1 paths stay inside the image).
    band = prediction_boundaries(pred, erosion_border_value)
    bands = [band]
    for _ in range(max(radii)):
        bands.append(_dilate_cross(bands[-1]))

    out = sml
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    for radius in radii:
        in_band = bands[radius]
        # Band values are replaced by 0 with where() (not a product) so that a non-finite
        # value inside the band cannot turn its neighbours' means into NaN.
        total = _box3_replicate(torch.where(in_band, zero, out))
        count = _box3_replicate((~in_band).to(out.dtype))
        out = torch.where(in_band & (count > 0), total / count, out)
    return out


def _box3_replicate(x: Tensor) -> Tensor:
    """3x3 box sum of ``[B, H, W]`` over the replication-padded map (clamped indices)."""
    padded = F.pad(x.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    rows = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
    return rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]


# ----------------------------------------------------------------------------- smoothing
def _gaussian_1d(kernel_size: int, sigma: float) -> list[float]:
    """Normalized 1-D Gaussian taps ``exp(-(t - (k-1)/2)**2 / (2 sigma**2))``, summing to 1.

    Python floats (float64): scalar weights need no device tensor and no host-device copy.
    """
    centre = (kernel_size - 1) / 2
    taps = [math.exp(-((t - centre) ** 2) / (2.0 * sigma**2)) for t in range(kernel_size)]
    total = math.fsum(taps)
    return [tap / total for tap in taps]


def _smooth(x: Tensor, kernel_size: int, dilation: int, sigma: float) -> Tensor:
    _check_map(x, "x")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    taps = _gaussian_1d(kernel_size, sigma)
    height, width = x.shape[-2:]
    pad = dilation * (kernel_size - 1) // 2
    padded = F.pad(x.unsqueeze(1), (pad, pad, pad, pad), mode="replicate").squeeze(1)
    # The normalized 2-D Gaussian is the outer product of normalized 1-D ones and the padding is
    # applied once up front, so a pass along rows then columns equals the 2-D kernel.
    rows = taps[0] * padded[..., :width]
    for k in range(1, kernel_size):
        rows.add_(padded[..., k * dilation : k * dilation + width], alpha=taps[k])
    out = taps[0] * rows[:, :height]
    for k in range(1, kernel_size):
        out.add_(rows[:, k * dilation : k * dilation + height], alpha=taps[k])
    return out


def dilated_smoothing(x: Tensor, kernel_size: int = 7, dilation: int = 6, sigma: float = 1.0) -> Tensor:
    """Dilated Gaussian smoothing of a ``[B, H, W]`` map (official second stage).

    ``out[i, j] = sum_{a, b} G[a, b] * x_pad[i + d*(a - c), j + d*(b - c)]`` with
    ``G[a, b] ∝ exp(-((a - c)**2 + (b - c)**2) / (2 sigma**2))`` normalized to sum 1,
    ``c = (kernel_size - 1) / 2``, ``d = dilation``, and ``x_pad`` the replication-padded map
    (indices clamped to the image). Output has the input's size. The official code fixes the
    Gaussian at 7x7, sigma 1 and pads by ``3 * dilation``; this generalizes both to any odd
    ``kernel_size`` and ``sigma`` and is identical at the defaults. Half precision is upcast.
    """
    return _smooth(x, kernel_size, dilation, sigma)

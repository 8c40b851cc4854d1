"""Standardized Max Logits (SML) and the max-logit / softmax baselines.

Jung et al., "Standardized Max Logits: A Simple yet Effective Approach for Identifying Unexpected
Road Obstacles in Urban-Scene Segmentation", ICCV 2021. The functions in the first part of this
file are pure tensor math (no Lightning), shaped ``logits [B, K, H, W] -> score [B, H, W]`` with
higher = more anomalous, and run on any device.

The pipeline, checked line by line against the authors' code (github.com/shjung13/
Standardized-max-logits, ``calculate_statistics.py`` and ``network/deepv3.py``):

1. Statistics (``sml_accumulate`` / ``sml_statistics``): for each class ``c``, the mean and the
   *sample* standard deviation (``torch.var`` default, divisor ``N - 1``) of the max logit over
   the training pixels whose predicted class is ``c``. The official script collects all pixels of
   an image (no ignore mask) and stops after its first 50 batches; here the sums stream over the
   whole fitting set, and a ``valid`` mask can leave pixels out.
2. ``SML = (max_c l_c - mean[c*]) / std[c*]`` with ``c*`` the predicted class.
3. Iterative boundary suppression (``suppress_boundaries``): the boundary of the predicted class
   map is computed once, expanded by L1 balls of shrinking radius, and boundary pixels take the
   mean of their non-boundary 3x3 neighbours, ``boundary_iterations`` times.
4. Dilated smoothing (``dilated_smoothing``): a normalized 7x7 Gaussian (sigma 1) convolution
   with dilation 6 over a replication-padded map.

The anomaly score is ``-SML`` after post-processing (the authors negate it at evaluation time).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.base import MethodOutput

# The baselines live with every segmenter; re-exported because they are SML's comparison points.
from lightning_modules.baselines import (  # noqa: F401
    _check_logits,
    baseline_scores,
    entropy_score,
    max_logit_score,
    msp_score,
)
from lightning_modules.segmenter import DeepLabV3PlusSegmenter

# ---------------------------------------------------------------------------------------------
# Pure functions: statistics, SML, post-processing, baselines
# ---------------------------------------------------------------------------------------------

# A class's max logits count as constant when their variance is below this fraction of their
# mean square (std < 1e-5 x RMS): far above float64 rounding of the streamed sums, far below
# the spread of any real logit distribution.
_DEGENERATE_VARIANCE_RATIO = 1e-10


def _check_map(x: Tensor, name: str) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape [B, H, W], got {tuple(x.shape)}")


# ----------------------------------------------------------------------------- statistics
def sml_accumulate(
    logits: Tensor,
    sums: Tensor,
    sq_sums: Tensor,
    counts: Tensor,
    valid: Tensor | None = None,
) -> None:
    """Add one batch to the per-class running sums of the max logit (in place).

    For every pixel, ``m = max_k logits[:, k]`` and ``c = argmax_k logits[:, k]``; then
    ``sums[c] += m``, ``sq_sums[c] += m**2``, ``counts[c] += 1``. The sums are additive, so
    several batches (or processes, via all-reduce) combine by addition.

    Args:
        logits: ``[B, K, H, W]`` closed-set logits (any float dtype; reduced in float32, summed
            in float64).
        sums: ``[K]`` float64 accumulator of max logits, updated in place.
        sq_sums: ``[K]`` float64 accumulator of squared max logits, updated in place.
        counts: ``[K]`` float64 or int64 accumulator of pixel counts, updated in place.
        valid: optional bool ``[B, H, W]``; only pixels where it is True are counted (pass
            ``mask != IGNORE_INDEX`` to skip ignore-labelled pixels). None counts every pixel,
            as the official code does.

    All tensors must be on the same device. No host synchronization (safe inside a GPU step).
    """
    logits = _check_logits(logits)
    num_classes = logits.shape[1]
    for name, acc in (("sums", sums), ("sq_sums", sq_sums), ("counts", counts)):
        if acc.shape != (num_classes,):
            raise ValueError(f"{name} must have shape [{num_classes}] to match the logits, got {tuple(acc.shape)}")
    for name, acc in (("sums", sums), ("sq_sums", sq_sums)):
        if acc.dtype != torch.float64:
            raise TypeError(f"{name} must be float64 (streamed sums lose precision otherwise)")
    if counts.dtype not in (torch.float64, torch.int64):
        raise TypeError(f"counts must be float64 or int64, got {counts.dtype}")

    max_logit, pred = logits.max(dim=1)
    index = pred.reshape(-1)
    values = max_logit.reshape(-1).to(torch.float64)
    if valid is None:
        weights = torch.ones_like(index, dtype=counts.dtype)
    else:
        if valid.shape != max_logit.shape:
            raise ValueError(
                f"valid must have shape {tuple(max_logit.shape)} (the logits' [B, H, W]), got {tuple(valid.shape)}"
            )
        keep = valid.reshape(-1).to(torch.bool)
        # where() rather than a product: a non-finite logit at a skipped pixel must not leak in.
        values = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
        weights = keep.to(counts.dtype)
    # index_add_ instead of bincount: bincount reads the maximum index back to the host on CUDA.
    sums.index_add_(0, index, values)
    sq_sums.index_add_(0, index, values * values)
    counts.index_add_(0, index, weights)


def sml_statistics(sums: Tensor, sq_sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class mean and sample standard deviation of the max logit from the running sums.

    ``mean = S / N`` and ``std = sqrt((Q - S**2 / N) / (N - 1))`` (divisor ``N - 1``, as
    ``torch.var`` in the official statistics script).

    Degenerate classes get neutral statistics and a ``UserWarning`` naming them:

    * never predicted (``N = 0``): mean 0, std 1 (SML = max logit for such pixels);
    * a single pixel (``N = 1``) or constant max logits (zero variance): the mean, std 1.

    Returns:
        ``(means, stds)``, both ``[K]`` float64 on the device of ``sums``.
    """
    n = counts.to(torch.float64)
    seen = n > 0
    n_safe = n.clamp_min(1.0)
    means = torch.where(seen, sums / n_safe, torch.zeros_like(sums))
    variance = ((sq_sums - sums * means) / (n - 1.0).clamp_min(1.0)).clamp_min(0.0)
    mean_square = sq_sums / n_safe
    degenerate = seen & ((n < 2) | (variance <= _DEGENERATE_VARIANCE_RATIO * mean_square))
    stds = torch.where(seen & ~degenerate, variance.sqrt(), torch.ones_like(variance))

    unseen_classes = (~seen).nonzero().flatten().tolist()
    if unseen_classes:
        warnings.warn(
            f"SML statistics: class(es) {unseen_classes} were never predicted on the fitting pixels; "
            "using mean 0, std 1 for them",
            UserWarning,
            stacklevel=2,
        )
    degenerate_classes = degenerate.nonzero().flatten().tolist()
    if degenerate_classes:
        warnings.warn(
            f"SML statistics: class(es) {degenerate_classes} have fewer than 2 pixels or constant max "
            "logits (zero standard deviation); using std 1 for them",
            UserWarning,
            stacklevel=2,
        )
    return means, stds


# ----------------------------------------------------------------------------- SML
def standardized_max_logit(logits: Tensor, class_means: Tensor, class_stds: Tensor) -> tuple[Tensor, Tensor]:
    """Standardized max logit and predicted class.

    ``SML[b, h, w] = (max_k logits[b, k, h, w] - mean[c]) / std[c]``, ``c = argmax_k logits``
    (ties go to the lowest class index).

    Args:
        logits: ``[B, K, H, W]``; half precision is upcast to float32.
        class_means, class_stds: ``[K]`` (any float dtype/device; cast to the logits'),
            ``class_stds > 0``.

    Returns:
        ``(sml [B, H, W] float, pred [B, H, W] int64)``. Higher SML = more in-distribution.
    """
    logits = _check_logits(logits)
    num_classes = logits.shape[1]
    if class_means.shape != (num_classes,) or class_stds.shape != (num_classes,):
        raise ValueError(
            f"class_means and class_stds must have shape [{num_classes}], got "
            f"{tuple(class_means.shape)} and {tuple(class_stds.shape)}"
        )
    max_logit, pred = logits.max(dim=1)
    means = class_means.to(device=logits.device, dtype=logits.dtype)
    stds = class_stds.to(device=logits.device, dtype=logits.dtype)
    return (max_logit - means[pred]) / stds[pred], pred


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


# ----------------------------------------------------------------------------- full score
def sml_anomaly_score(
    logits: Tensor,
    class_means: Tensor,
    class_stds: Tensor,
    boundary_width: int = 4,
    boundary_iterations: int = 4,
    kernel_size: int = 7,
    dilation: int = 6,
    sigma: float = 1.0,
    boundary_suppression: bool = True,
    dilated_smoothing: bool = True,
    erosion_border_value: float | None = None,
) -> Tensor:
    """SML anomaly score ``[B, H, W]``: minus the post-processed standardized max logit.

    ``standardized_max_logit`` -> ``suppress_boundaries`` (if ``boundary_suppression``) ->
    ``dilated_smoothing`` (if ``dilated_smoothing``) -> negate, so that higher = more anomalous.
    Defaults are the paper's (width 4, 4 iterations, 7x7 Gaussian, sigma 1, dilation 6).
    Computed in float32 for half-precision logits (float64 logits stay float64).
    """
    sml, pred = standardized_max_logit(logits, class_means, class_stds)
    if boundary_suppression:
        sml = suppress_boundaries(sml, pred, boundary_width, boundary_iterations, erosion_border_value)
    if dilated_smoothing:
        sml = _smooth(sml, kernel_size, dilation, sigma)
    return -sml


# ---------------------------------------------------------------------------------------------
# The method: a DeepLabV3+ segmenter wrapped with SML
# ---------------------------------------------------------------------------------------------


class SMLStatistics(nn.Module):
    """SML's post-hoc statistics as checkpointed buffers, for any method that has logits.

    ``update`` accumulates float64 sums of the max logit per predicted class (like the official
    statistics script, every pixel counts and labels are not used); a method sums
    ``accumulators()`` across processes, then ``finalize`` turns them into ``means``/``stds``.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        f64 = torch.float64
        self.register_buffer("sums", torch.zeros(num_classes, dtype=f64))
        self.register_buffer("sq_sums", torch.zeros(num_classes, dtype=f64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=f64))
        self.register_buffer("means", torch.zeros(num_classes, dtype=f64))
        self.register_buffer("stds", torch.ones(num_classes, dtype=f64))

    def reset(self) -> None:
        for buffer in self.accumulators():
            buffer.zero_()

    def update(self, logits: Tensor) -> None:
        sml_accumulate(logits, self.sums, self.sq_sums, self.counts)

    def accumulators(self) -> list[Tensor]:
        return [self.sums, self.sq_sums, self.counts]

    def finalize(self) -> None:
        means, stds = sml_statistics(self.sums, self.sq_sums, self.counts)
        self.means.copy_(means)
        self.stds.copy_(stds)

    def score(self, logits: Tensor, **postprocessing: Any) -> Tensor:
        """``sml_anomaly_score`` with these statistics; ``postprocessing`` as its keyword arguments."""
        return sml_anomaly_score(logits, self.means.float(), self.stds.float(), **postprocessing)


class SMLSegmenter(DeepLabV3PlusSegmenter):
    """DeepLabV3+ trained with cross-entropy, scored by Standardized Max Logits.

    The per-class max-logit statistics are fitted after training in one pass over the training
    split (``fit_posthoc``), accumulated in float64 buffers that are summed across processes and
    saved in the checkpoint. MSP, MaxLogit and entropy are reported beside SML from the same logits.

    Args (besides the segmenter's, see ``DeepLabV3PlusSegmenter``):
        boundary_suppression, boundary_width, boundary_iterations: iterative boundary suppression.
        dilated_smoothing, kernel_size, dilation, sigma: the dilated Gaussian smoothing.
        erosion_border_value: ``None`` ignores out-of-image pixels when eroding the class map;
            1.0 reproduces the official code's pinned kornia, which pads the erosion with 1.
    """

    method_name = "sml"

    def __init__(
        self,
        boundary_suppression: bool = True,
        boundary_width: int = 4,
        boundary_iterations: int = 4,
        dilated_smoothing: bool = True,
        kernel_size: int = 7,
        dilation: int = 6,
        sigma: float = 1.0,
        erosion_border_value: float | None = None,
        **segmenter_kwargs: Any,
    ) -> None:
        super().__init__(**segmenter_kwargs)
        self.sml = SMLStatistics(self.num_classes)

    @property
    def needs_posthoc(self) -> bool:
        return True

    def reset_posthoc(self) -> None:
        self.sml.reset()

    def update_posthoc(self, batch: Mapping[str, Tensor]) -> None:
        self.sml.update(self(batch["image"]))

    def posthoc_accumulators(self) -> list[Tensor]:
        return self.sml.accumulators()

    def finalize_posthoc(self) -> None:
        self.sml.finalize()

    def sml_score(self, logits: Tensor) -> Tensor:
        hp = self.hparams
        return self.sml.score(
            logits,
            boundary_width=hp.boundary_width,
            boundary_iterations=hp.boundary_iterations,
            kernel_size=hp.kernel_size,
            dilation=hp.dilation,
            sigma=hp.sigma,
            boundary_suppression=hp.boundary_suppression,
            dilated_smoothing=hp.dilated_smoothing,
            erosion_border_value=hp.erosion_border_value,
        )

    def segment(self, image: Tensor) -> MethodOutput:
        logits = self(image)
        return MethodOutput(logits, {"sml": self.sml_score(logits), **baseline_scores(logits)})

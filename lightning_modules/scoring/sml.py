"""Standardized Max Logits (SML): statistics, the score and a checkpointable scorer.

Jung et al., "Standardized Max Logits: A Simple yet Effective Approach for Identifying Unexpected
Road Obstacles in Urban-Scene Segmentation", ICCV 2021. Shared by every method that scores logits
with SML (the SML segmenter, the dual decoder's semantic head). The functions are pure tensor math,
shaped ``logits [B, K, H, W] -> score [B, H, W]`` with higher = more anomalous, on any device.

The pipeline, checked line by line against the authors' code (github.com/shjung13/
Standardized-max-logits, ``calculate_statistics.py`` and ``network/deepv3.py``):

1. Statistics (``sml_accumulate`` / ``sml_statistics``): for each class ``c``, the mean and the
   *sample* standard deviation (``torch.var`` default, divisor ``N - 1``) of the max logit over
   the training pixels whose predicted class is ``c``. The official script collects all pixels of
   an image (no ignore mask) and stops after its first 50 batches; here the sums stream over the
   whole fitting set, and a ``valid`` mask can leave pixels out.
2. ``SML = (max_c l_c - mean[c*]) / std[c*]`` with ``c*`` the predicted class.
3. Iterative boundary suppression and 4. dilated smoothing: :mod:`lightning_modules.scoring.postprocessing`.

The anomaly score is ``-SML`` after post-processing (the authors negate it at evaluation time).
:class:`SMLScorer` keeps the statistics as checkpointed buffers together with the post-processing
options (:class:`SMLOptions`), so that every SML score of the project is computed the same way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from lightning_modules.scoring.baselines import _check_logits
from lightning_modules.scoring.postprocessing import _smooth, suppress_boundaries

__all__ = [
    "SMLOptions",
    "SMLPostprocessing",
    "SMLScorer",
    "sml_accumulate",
    "sml_anomaly_score",
    "sml_statistics",
    "standardized_max_logit",
]

# A class's max logits count as constant when their variance is below this fraction of their
# mean square (std < 1e-5 x RMS): far above float64 rounding of the streamed sums, far below
# the spread of any real logit distribution.
_DEGENERATE_VARIANCE_RATIO = 1e-10


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


class SMLOptions(TypedDict, total=False):
    """SML's post-processing options as one config block (``model.init_args.sml``); see :class:`SMLPostprocessing`."""

    boundary_suppression: bool
    boundary_width: int
    boundary_iterations: int
    dilated_smoothing: bool
    kernel_size: int
    dilation: int
    sigma: float
    erosion_border_value: float | None


@dataclass(frozen=True)
class SMLPostprocessing:
    """The post-processing of an SML score; the defaults are the paper's.

    Attributes:
        boundary_suppression, boundary_width, boundary_iterations: iterative boundary suppression.
        dilated_smoothing, kernel_size, dilation, sigma: the dilated Gaussian smoothing.
        erosion_border_value: ``None`` ignores out-of-image pixels when eroding the class map;
            1.0 reproduces the official code's pinned kornia, which pads the erosion with 1.

    The sizes are pixels, so they depend on the image size (the published ones were set for
    Cityscapes-size images; ``benchmarks/sml_postprocessing_sweep.py`` chooses them on a held-out set).
    """

    boundary_suppression: bool = True
    boundary_width: int = 4
    boundary_iterations: int = 4
    dilated_smoothing: bool = True
    kernel_size: int = 7
    dilation: int = 6
    sigma: float = 1.0
    erosion_border_value: float | None = None

    def __post_init__(self) -> None:
        for name in ("boundary_width", "boundary_iterations", "kernel_size", "dilation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if "boundary" in name else 1):
                raise ValueError(f"model.sml.{name} must be a non-negative integer (>= 1 for sizes), got {value!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"model.sml.kernel_size must be odd, got {self.kernel_size}")
        if not (isinstance(self.sigma, int | float) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"model.sml.sigma must be a positive number, got {self.sigma!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | SMLPostprocessing | None) -> SMLPostprocessing:
        """Build from a config block; unknown keys are an error that names them."""
        if options is None:
            return cls()
        if isinstance(options, SMLPostprocessing):
            return options
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"model.sml: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(options))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SMLScorer(nn.Module):
    """SML's post-hoc statistics as checkpointed buffers and its post-processing, for any logits.

    ``update`` accumulates float64 sums of the max logit per predicted class (like the official
    statistics script, every pixel counts and labels are not used); the owning method declares
    :meth:`accumulators` as post-hoc accumulators (summed across processes), then ``finalize``
    turns them into ``means``/``stds``. ``score`` applies :class:`SMLPostprocessing`.

    Example:
        >>> scorer = SMLScorer(3, {"boundary_width": 2, "dilation": 3})
        >>> logits = torch.randn(2, 3, 32, 32)
        >>> scorer.update(logits); scorer.finalize()
        >>> scorer.score(logits).shape
        torch.Size([2, 32, 32])
    """

    def __init__(self, num_classes: int, options: Mapping[str, Any] | SMLPostprocessing | None = None) -> None:
        super().__init__()
        self.postprocessing = SMLPostprocessing.from_options(options)
        f64 = torch.float64
        self.register_buffer("sums", torch.zeros(num_classes, dtype=f64))
        self.register_buffer("sq_sums", torch.zeros(num_classes, dtype=f64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=f64))
        self.register_buffer("means", torch.zeros(num_classes, dtype=f64))
        self.register_buffer("stds", torch.ones(num_classes, dtype=f64))

    #: Names of the accumulator buffers, relative to this module.
    ACCUMULATORS = ("sums", "sq_sums", "counts")

    def update(self, logits: Tensor) -> None:
        sml_accumulate(logits, self.sums, self.sq_sums, self.counts)

    def accumulators(self) -> list[Tensor]:
        return [getattr(self, name) for name in self.ACCUMULATORS]

    def finalize(self) -> None:
        means, stds = sml_statistics(self.sums, self.sq_sums, self.counts)
        self.means.copy_(means)
        self.stds.copy_(stds)

    def score(self, logits: Tensor) -> Tensor:
        """The SML anomaly score ``[B, H, W]`` of ``logits`` with these statistics and options."""
        return sml_anomaly_score(logits, self.means.float(), self.stds.float(), **self.postprocessing.as_dict())

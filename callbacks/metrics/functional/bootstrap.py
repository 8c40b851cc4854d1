"""Bootstrap intervals over test images from per-image summaries (no pixels, no re-inference).

A test split's images are the sampling unit: resampling them with replacement and recomputing a
metric gives its sampling spread. Everything here works on *per-image summaries* whose size does
not depend on the image resolution:

- for the pooled AUPR, AUROC and FPR95, a quantile sketch of each image's negative and of its
  positive scores (:class:`ScoreSketch`: at most ``Q`` points of the sorted keys of
  :mod:`.keys`, evenly spaced in rank, each with the exact number of pixels below and at or below
  it). Sketches follow each image's scores wherever they lie (any scale, offset, sign, a mass
  saturating at one value or spread over many decades), and are exact for images with at most
  ``Q`` pixels of a class;
- for the per-image means, the per-image values themselves;
- for mIoU, each image's K x K confusion matrix.

At ``compute`` the sketches are put on one set of score columns (:func:`pooled_columns`). A
resample is a row of multinomial counts ``w`` (how often each image was drawn); its pooled
histogram is ``w @ counts`` (all resamples at once: ``[B, N] @ [N, columns]``), a per-image mean
``(w @ v) / (w @ 1)`` over the usable images, mIoU the IoU of ``w @ confusion``. The generator is
NumPy's PCG64 seeded with ``(seed, N)``: the same seed, image count and image order give the same
resamples, so two methods scored on the same images are resampled identically
(:func:`paired_interval`), and the result does not depend on how many processes produced the
summaries (:func:`canonical_order`).

Intervals are percentile intervals at ``level`` (0.95 by default). The common columns are coarser
than the metric's own histogram, so a pooled value computed on them may differ slightly from the
exact one; the interval is the percentile interval of the column-based replicates moved by that
difference (``exact + (q - columns)``), which leaves it unchanged wherever the columns are exact.

>>> import numpy as np
>>> weights = resample_weights(3, 4, seed=0)
>>> weights.shape, weights.sum(axis=1).tolist()
((4, 3), [3.0, 3.0, 3.0, 3.0])
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from callbacks.metrics.functional.per_image import SortedImages

__all__ = [
    "BOOTSTRAP_LEVEL",
    "LOWER_IS_BETTER",
    "MAX_POOLED_BINS",
    "NEG_SKETCH_SIZE",
    "NO_IMAGE_ID",
    "PAIRED_KEYS",
    "POS_SKETCH_SIZE",
    "SKETCH_PAD",
    "ScoreSketch",
    "as_image_ids",
    "binned_metrics",
    "bootstrap_replicates",
    "canonical_order",
    "check_bootstrap_samples",
    "check_bootstrap_seed",
    "image_id",
    "image_sketches",
    "image_sketches_sorted",
    "mean_replicates",
    "miou_replicates",
    "paired_comparison",
    "paired_interval",
    "percentile_interval",
    "pooled_columns",
    "pooled_replicates",
    "resample_weights",
    "sketch_sorted",
]

#: Coverage of the intervals.
BOOTSTRAP_LEVEL = 0.95
#: Sketch points kept per image of its negatives and of its positives (12 bytes each: 9 KiB per image).
NEG_SKETCH_SIZE = 512
POS_SKETCH_SIZE = 256
#: Columns of the common histogram the pooled resamples are computed on (before merging runs of
#: columns without positives); bounds the ``[B, N] @ [N, columns]`` product.
MAX_POOLED_BINS = 1024
#: Key of unused sketch points: above every float32 key (at most ``KEY_POS_INF``).
SKETCH_PAD = np.iinfo(np.int32).max
#: The image id of images without a name.
NO_IMAGE_ID = -1


# ----------------------------------------------------------------------------------------- arguments
def check_bootstrap_samples(value: Any) -> int:
    """``value`` as an int if it is a valid number of resamples (0 turns the bootstrap off), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(
            f"bootstrap_samples (resamples of the test images; 0 turns the intervals off) must be a "
            f"non-negative integer, got {value!r}"
        )
    return int(value)


def check_bootstrap_seed(value: Any) -> int:
    """``value`` as an int if it is a valid seed (a non-negative integer), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"bootstrap_seed must be a non-negative integer, got {value!r}")
    return int(value)


def image_id(name: str | None) -> int:
    """A stable 63-bit id of an image name (``NO_IMAGE_ID`` for ``None``): the first 8 bytes of its BLAKE2b hash.

    The same name gives the same id in every process and run, so per-image summaries of two
    methods (or of several processes) can be matched and put in one canonical order.

    >>> image_id("t5/300") == image_id("t5/300"), image_id(None)
    (True, -1)
    """
    if name is None:
        return NO_IMAGE_ID
    digest = hashlib.blake2b(str(name).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def as_image_ids(image_ids: Any, batch: int, device: torch.device) -> Tensor:
    """``image_ids`` (``None``, a sequence of ints or an integer tensor of ``batch`` entries) as int64 on ``device``."""
    if image_ids is None:
        return torch.full((batch,), NO_IMAGE_ID, dtype=torch.int64, device=device)
    ids = torch.as_tensor(image_ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.shape != (batch,):
        raise ValueError(
            f"image_ids must be {batch} integers (one per image of the batch), got {tuple(ids.shape)} of {ids.dtype}"
        )
    return ids.to(device=device, dtype=torch.int64)


# ----------------------------------------------------------------------------------------- per-image sketches
class ScoreSketch(NamedTuple):
    """Quantile sketches of one class's scores (negatives or positives) in each of ``N`` images.

    Row ``i`` holds at most ``Q`` points of that image's sorted keys: all of them when the image
    has at most ``Q`` pixels of the class, else the keys at the ranks ``round(j (n - 1) / (Q - 1))``,
    ``j = 0..Q-1`` (the smallest and the largest included). With each point, the exact number of
    the image's pixels of the class scoring below it and at or below it, so the image's cumulative
    count is exact at every point (ties included) and, between two points, known at both ends.
    Unused points hold ``SKETCH_PAD`` and the class's pixel count.
    """

    keys: Tensor  # int32 [N, Q], non-decreasing along each row
    below: Tensor  # int32 [N, Q]: pixels with a smaller key
    upto: Tensor  # int32 [N, Q]: pixels with a key at most this one


def _sketch_positions(count: np.ndarray | Tensor, size: int) -> np.ndarray | Tensor:
    """Ranks of the sketch points for classes of ``count`` pixels ``[..., 1]`` (integer arithmetic only)."""
    if isinstance(count, Tensor):
        j = torch.arange(size, device=count.device)
    else:
        j = np.arange(size)
    spread = (j * (count - 1) + (size - 1) // 2) // max(size - 1, 1)
    return spread * (count > size) + j * (count <= size)


def sketch_sorted(values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sketch of one image's sorted keys of one class: ``(keys, below, upto)``, each ``[size]`` int32."""
    count = values.size
    keys = np.full(size, SKETCH_PAD, dtype=np.int32)
    below = np.full(size, count, dtype=np.int32)
    upto = np.full(size, count, dtype=np.int32)
    if count:
        used = min(count, size)
        points = values[_sketch_positions(np.int64(count), size)[:used]]
        keys[:used] = points
        below[:used] = np.searchsorted(values, points, side="left")
        upto[:used] = np.searchsorted(values, points, side="right")
    return keys, below, upto


def image_sketches_sorted(images: SortedImages, neg_size: int, pos_size: int) -> tuple[ScoreSketch, ScoreSketch]:
    """Sketches of every image's negatives and positives from ``sort_images``' output (NumPy; CPU path)."""
    rows = images.negatives.shape[0]
    out = []
    for size in (neg_size, pos_size):
        out.append([np.empty((rows, size), dtype=np.int32) for _ in range(3)])
    for r in range(rows):
        neg = images.negatives[r, : int(images.num_negatives[r])]
        pos = images.positives[images.positive_starts[r] : images.positive_starts[r + 1]]
        for arrays, values, size in ((out[0], neg, neg_size), (out[1], pos, pos_size)):
            for array, field in zip(arrays, sketch_sorted(values, size), strict=True):
                array[r] = field
    neg_sketch, pos_sketch = (ScoreSketch(*(torch.from_numpy(a) for a in arrays)) for arrays in out)
    return neg_sketch, pos_sketch


def image_sketches(
    keys: Tensor, positive: Tensor, valid: Tensor, neg_size: int, pos_size: int
) -> tuple[ScoreSketch, ScoreSketch]:
    """Sketches of every image's negatives and positives from ``[B, N]`` int32 keys, on their device.

    Fixed-shape operations only (a sort per row and class, gathers, batched binary searches): no
    host synchronisation. Same result as :func:`image_sketches_sorted`.
    """
    valid = valid.bool()
    positive = positive.bool() & valid
    pad = torch.full_like(keys, SKETCH_PAD)
    sketches = []
    for members, size in ((valid & ~positive, neg_size), (positive, pos_size)):
        row = torch.sort(torch.where(members, keys, pad), dim=1).values
        count = members.sum(1, keepdim=True)
        length = row.shape[1]
        if length == 0:
            row, length = pad.new_full((row.shape[0], 1), SKETCH_PAD), 1
        position = _sketch_positions(count, size).clamp_max(length - 1)
        used = torch.arange(size, device=keys.device) < count
        points = torch.where(used, row.gather(1, position), SKETCH_PAD)
        below = torch.where(used, torch.searchsorted(row, points, side="left"), count)
        upto = torch.where(used, torch.searchsorted(row, points, side="right"), count)
        sketches.append(ScoreSketch(points.int(), below.int(), upto.int()))
    return sketches[0], sketches[1]


def _cumulative_at(sketch: Sequence[np.ndarray], boundaries: np.ndarray) -> np.ndarray:
    """Each image's count of pixels with a key at most each boundary, ``[N, C]`` float64.

    Exact at the image's sketch points; between two of them the pixels strictly inside are spread
    evenly over the keys in between (linear in the key, i.e. in float32 steps).
    """
    keys, below, upto = (np.asarray(a, dtype=np.int64) for a in sketch)
    rows, size = keys.shape
    if rows == 0 or boundaries.size == 0:
        return np.zeros((rows, boundaries.size))
    count = upto.max(axis=1, initial=0)[:, None]
    # Frame every row with a point below all keys (nothing below it) and one above (everything).
    low, high = np.full((rows, 1), -(1 << 32)), np.full((rows, 1), 1 << 32)
    keys = np.concatenate([low, keys, high], axis=1)
    below = np.concatenate([np.zeros_like(low), below, count], axis=1).reshape(-1)
    upto = np.concatenate([np.zeros_like(low), upto, count], axis=1).reshape(-1)
    # One search over all rows: row r's keys are offset by r * 2**34, so the rows stay apart.
    base = np.arange(rows, dtype=np.int64)[:, None] << 34
    flat = (keys + base).reshape(-1)
    query = (boundaries.astype(np.int64)[None, :] + base).reshape(-1)
    after = np.searchsorted(flat, query, side="right")  # the first point above the boundary
    before = after - 1  # the last point at or below it
    gap = np.maximum(flat[after] - flat[before] - 1, 1)  # keys strictly between the two points
    inside = below[after] - upto[before]  # pixels strictly between them
    value = upto[before] + (query - flat[before]) / gap * inside
    return value.reshape(rows, boundaries.size)


def _unique(values: np.ndarray) -> np.ndarray:
    """The distinct values, sorted (a sort and a comparison: faster here than NumPy's hash-based ``unique``)."""
    values = np.sort(values, axis=None)
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if values.size else values


def _weighted_quantile_keys(sketch: Sequence[np.ndarray], levels: int) -> np.ndarray:
    """Keys at ``levels`` evenly spaced quantiles of the pooled class distribution the sketches describe."""
    keys, _, upto = (np.asarray(a, dtype=np.int64) for a in sketch)
    weights = np.diff(upto, axis=1, prepend=0).reshape(-1)  # pixels each point stands for
    keys = keys.reshape(-1)
    keep = weights > 0
    keys, weights = keys[keep], weights[keep]
    if keys.size == 0:
        return keys
    order = np.argsort(keys, kind="stable")
    keys, cumulative = keys[order], np.cumsum(weights[order])
    targets = np.arange(1, levels + 1, dtype=np.float64) * (cumulative[-1] / levels)
    return _unique(keys[np.minimum(np.searchsorted(cumulative, targets, side="left"), keys.size - 1)])


def pooled_columns(
    neg_sketch: Sequence[np.ndarray], pos_sketch: Sequence[np.ndarray], max_columns: int = MAX_POOLED_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Every image's negatives and positives on one common set of score columns: ``[N, C]`` float64 each.

    The column boundaries are every key of the sketches when there are at most ``max_columns``
    distinct ones (then the counts are exact wherever the sketches are: images with at most ``Q``
    pixels of a class), else ``max_columns / 2`` evenly spaced quantiles of the pooled negatives
    and as many of the pooled positives. A column holds the keys above the previous boundary up
    to its own and counts as one tied score. Then each run of consecutive columns without
    positives in any image becomes one column: that changes no AP, AUROC or FPR95 of any resample.
    Columns are in increasing score order. A function of the set of images only.
    """
    neg_sketch = [np.asarray(a) for a in neg_sketch]
    pos_sketch = [np.asarray(a) for a in pos_sketch]
    rows = neg_sketch[0].shape[0]
    candidates = _unique(np.concatenate([neg_sketch[0].reshape(-1), pos_sketch[0].reshape(-1)]))
    candidates = candidates[candidates != SKETCH_PAD].astype(np.int64)
    if candidates.size == 0:
        return np.zeros((rows, 0)), np.zeros((rows, 0))
    if candidates.size <= max_columns:
        boundaries = candidates
    else:
        half = max(max_columns // 2, 1)
        parts = [_weighted_quantile_keys(sketch, half) for sketch in (neg_sketch, pos_sketch)]
        boundaries = _unique(np.concatenate([*parts, candidates[-1:]]))
    neg = np.diff(_cumulative_at(neg_sketch, boundaries), axis=1, prepend=0.0)
    pos = np.diff(_cumulative_at(pos_sketch, boundaries), axis=1, prepend=0.0)
    has_pos = pos.sum(0) > 0
    keep = has_pos.copy()
    keep[1:] |= has_pos[:-1]  # a run without positives starts after a column with some
    keep[0] = True
    first = np.flatnonzero(keep)
    return np.add.reduceat(neg, first, axis=1), np.add.reduceat(pos, first, axis=1)


# ----------------------------------------------------------------------------------------- canonical order
def canonical_order(ids: np.ndarray, rows: Iterable[np.ndarray] = ()) -> np.ndarray:
    """The permutation that sorts images by id, and images sharing an id by their content.

    Gathering per-image summaries from several processes changes their order; sorting by a key
    of the image itself makes the resamples (which draw image positions) independent of it. Rows
    with equal ids and equal content are interchangeable, so any order among them gives the same
    results.
    """
    ids = np.asarray(ids, dtype=np.int64)
    content = np.zeros(ids.size, dtype=np.uint64)
    values, counts = np.unique(ids, return_counts=True)
    repeated = np.flatnonzero(np.isin(ids, values[counts > 1]))
    if repeated.size:
        arrays = [np.ascontiguousarray(np.asarray(a).reshape(ids.size, -1)) for a in rows]
        for i in repeated:
            digest = hashlib.blake2b(digest_size=8)
            for array in arrays:
                digest.update(array[i].tobytes())
            content[i] = int.from_bytes(digest.digest(), "little")
    return np.lexsort((content, ids))


# ----------------------------------------------------------------------------------------- resampling
def resample_weights(num_images: int, num_samples: int, seed: int) -> np.ndarray:
    """``[num_samples, num_images]`` float64 counts: how often each image is drawn in each resample."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(num_images)]))
    if num_images == 0:
        return np.zeros((num_samples, 0))
    # Each resample draws num_images positions uniformly with replacement; count them per row.
    draws = rng.integers(0, num_images, size=(num_samples, num_images))
    draws += np.arange(num_samples)[:, None] * num_images
    counts = np.bincount(draws.reshape(-1), minlength=num_samples * num_images)
    return counts.reshape(num_samples, num_images).astype(np.float64)


def binned_metrics(neg: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """AP, AUROC and first-reaching FPR95 of each row of per-bin counts (``[..., bins]``, increasing score).

    Row by row the same definitions as :func:`~callbacks.metrics.functional.curves.binary_metrics_from_counts`
    (each bin one tied score; NaN where undefined), for counts given as floats: weighted sums of
    integer counts (exact in float64) or fractional ones, such as interpolated or expected counts
    (the metrics do not change when all counts are scaled).
    """
    neg, pos = np.asarray(neg, dtype=np.float64), np.asarray(pos, dtype=np.float64)
    if neg.shape[-1] == 0:
        neg, pos = np.zeros((*neg.shape[:-1], 1)), np.zeros((*pos.shape[:-1], 1))
    # Counts at or above each bin from forward sums (exact: integer-valued float64 below 2**53).
    below_pos, below_neg = np.cumsum(pos, axis=-1), np.cumsum(neg, axis=-1)
    num_pos, num_neg = below_pos[..., -1], below_neg[..., -1]
    tp = num_pos[..., None] - below_pos + pos
    fp = num_neg[..., None] - below_neg + neg
    # Counts may be fractional (interpolated sketches, expected counts): divide only where the
    # denominator is positive, never by a clamped one.
    flagged = tp + fp
    precision = np.divide(tp, flagged, out=np.zeros_like(tp), where=flagged > 0)
    has_pos = num_pos > 0
    both = has_pos & (num_neg > 0)
    aupr = np.where(has_pos, (pos * precision).sum(-1) / np.where(has_pos, num_pos, 1.0), np.nan)
    pairs = np.where(both, num_pos * num_neg, 1.0)
    auroc = np.where(both, (neg * (tp - 0.5 * pos)).sum(-1) / pairs, np.nan)
    # tp is non-increasing along the bins: those reaching 95% TPR form a prefix.
    reach = 100.0 * tp >= 95.0 * num_pos[..., None]
    index95 = np.maximum(reach.sum(-1) - 1, 0)
    fp95 = np.take_along_axis(fp, index95[..., None], axis=-1)[..., 0]
    fpr95 = np.where(both, fp95 / np.where(both, num_neg, 1.0), np.nan)
    return {"aupr": aupr, "auroc": auroc, "fpr95": fpr95}


def pooled_replicates(weights: np.ndarray, neg: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Pooled AP, AUROC and FPR95 of every resample: ``binned_metrics(weights @ neg, weights @ pos)``, each ``[B]``."""
    columns = neg.shape[1]
    both = np.asarray(weights, dtype=np.float64) @ np.concatenate([neg, pos], axis=1).astype(np.float64)
    return binned_metrics(both[:, :columns], both[:, columns:])


def mean_replicates(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The mean of per-image ``values`` over the usable (finite) images of every resample, ``[B]``.

    Images whose value is NaN (no anomaly, or no normal pixel) take no part, as in the metric's
    mean; a resample without any usable image gives NaN.
    """
    values = np.asarray(values, dtype=np.float64)
    usable = np.isfinite(values)
    weights = np.asarray(weights, dtype=np.float64)
    total = weights @ np.where(usable, values, 0.0)
    count = weights @ usable.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.where(count > 0, count, 1.0), np.nan)


def miou_replicates(weights: np.ndarray, confusion: np.ndarray) -> np.ndarray:
    """mIoU of every resample from per-image ``[N, K, K]`` confusion matrices (classes absent from both skipped)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    count, k = confusion.shape[0], confusion.shape[-1]
    summed = (np.asarray(weights, dtype=np.float64) @ confusion.reshape(count, k * k)).reshape(-1, k, k)
    true_pos = np.diagonal(summed, axis1=1, axis2=2)
    union = summed.sum(1) + summed.sum(2) - true_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_pos / np.where(union > 0, union, 1.0), np.nan)
    present = np.isfinite(iou)
    return np.where(present.any(1), np.where(present, iou, 0.0).sum(1) / np.maximum(present.sum(1), 1), np.nan)


# ----------------------------------------------------------------------------------------- intervals
def percentile_interval(
    replicates: np.ndarray, level: float = BOOTSTRAP_LEVEL, shift: float = 0.0
) -> tuple[float, float]:
    """The ``level`` percentile interval of the finite ``replicates``, moved by ``shift``.

    Resamples where the metric is undefined (NaN: e.g. no anomaly pixel drawn) are left out; when
    fewer than half are finite, the interval is ``(nan, nan)``.
    """
    replicates = np.asarray(replicates, dtype=np.float64)
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0 or 2 * finite.size < replicates.size or not math.isfinite(shift):
        return (math.nan, math.nan)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return (float(low + shift), float(high + shift))


def bootstrap_replicates(
    weights: np.ndarray,
    sketches: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None,
    values: Mapping[str, np.ndarray] | None = None,
    confusion: np.ndarray | None = None,
    max_columns: int = MAX_POOLED_BINS,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Replicates ``[B]`` of every metric the summaries allow, and each metric's value on the summaries.

    ``sketches`` (the negatives' and the positives' :class:`ScoreSketch`) give the pooled ``aupr``,
    ``auroc``, ``fpr95``; ``values`` (name -> ``[N]``) give the mean of each; ``confusion``
    (``[N, K, K]``) gives ``miou``. The second dict holds each metric computed on the summaries
    with every image once (the identity resample): for the pooled metrics the value on the common
    columns, by which :func:`percentile_interval` moves the interval onto the exact value.
    """
    replicates: dict[str, np.ndarray] = {}
    identity: dict[str, float] = {}
    count = np.asarray(weights).shape[1]
    ones = np.ones((1, count))
    if sketches is not None:
        neg, pos = pooled_columns(*sketches, max_columns)
        replicates.update(pooled_replicates(weights, neg, pos))
        identity.update({key: float(value[0]) for key, value in pooled_replicates(ones, neg, pos).items()})
    for name, array in (values or {}).items():
        replicates[name] = mean_replicates(weights, array)
        identity[name] = float(mean_replicates(ones, array)[0])
    if confusion is not None:
        replicates["miou"] = miou_replicates(weights, confusion)
        identity["miou"] = float(miou_replicates(ones, confusion)[0])
    return replicates, identity


def paired_interval(
    first: np.ndarray,
    second: np.ndarray,
    difference: float,
    binned_difference: float | None = None,
    level: float = BOOTSTRAP_LEVEL,
) -> dict[str, Any]:
    """Interval of ``metric(A) - metric(B)`` from replicates of both drawn with the *same* resamples.

    ``difference`` is the point difference of the exact values, ``binned_difference`` the one of
    the summaries' identity resample (``None``: the same). The interval is the percentile interval
    of ``first - second`` moved by their gap, as in :func:`percentile_interval`; ``excludes_zero``
    says whether the two differ at that level.
    """
    replicates = np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)
    shift = 0.0 if binned_difference is None else float(difference) - float(binned_difference)
    low, high = percentile_interval(replicates, level, shift)
    return {
        "difference": float(difference),
        "ci": (low, high),
        "excludes_zero": bool(math.isfinite(low) and math.isfinite(high) and (low > 0 or high < 0)),
    }


# ----------------------------------------------------------------------------------------- paired comparison
#: Headline metrics compared between methods, and those where lower is better.
PAIRED_KEYS = ("aupr", "auroc", "fpr95", "aupr_per_image", "auroc_per_image", "fpr95_per_image", "miou")
LOWER_IS_BETTER = frozenset({"fpr95", "fpr95_per_image", "fpr95_first_per_image"})
#: Columns of a summary's ``values`` (as ``AnomalyMetrics`` keeps them).
_VALUE_FIELDS = ("aupr_per_image", "auroc_per_image", "fpr95_per_image", "fpr95_first_per_image")


def _common_images(summaries: Mapping[str, Mapping[str, Any]]) -> np.ndarray:
    """The image ids every summary holds, in one order; ValueError when they cannot be paired."""
    reference: np.ndarray | None = None
    for name, summary in summaries.items():
        for part in ("image_id", "confusion_image_id"):
            if part not in summary:
                continue
            ids = np.asarray(summary[part], dtype=np.int64)
            if (ids == NO_IMAGE_ID).any():
                raise ValueError(f"'{name}' has images without a name: they cannot be matched between methods")
            if np.unique(ids).size != ids.size:
                raise ValueError(f"'{name}' has several images with the same name: they cannot be matched")
            if reference is None:
                reference = ids
            elif ids.size != reference.size or not np.array_equal(np.sort(ids), np.sort(reference)):
                raise ValueError(f"'{name}' was not scored on the same test images as the others")
    if reference is None:
        raise ValueError("no per-image summaries to compare")
    return np.sort(reference)


def _aligned(ids: np.ndarray, array: Any) -> Any:
    """``array`` (rows in the order of ``ids``, or a tuple of such arrays) reordered to increasing ids."""
    position = np.argsort(ids, kind="stable")
    if isinstance(array, tuple):
        return tuple(np.asarray(a)[position] for a in array)
    return np.asarray(array)[position]


def paired_comparison(
    summaries: Mapping[str, Mapping[str, Any]],
    values: Mapping[str, Mapping[str, float]],
    samples: int,
    seed: int,
    keys: Sequence[str] = PAIRED_KEYS,
    level: float = BOOTSTRAP_LEVEL,
) -> dict[str, Any]:
    """Intervals of every method and of the difference of every pair, all on the *same* resamples of the images.

    Args:
        summaries: per method (in table order), its per-image summaries: ``image_id`` ``[N]``,
            ``values`` ``[N, 4]`` (``AnomalyMetrics`` columns), ``neg_sketch``/``pos_sketch``, and
            optionally ``confusion`` ``[N, K, K]`` with its own ``confusion_image_id``.
        values: per method, the exact headline values (the metric's own results).
        samples, seed: the resamples (as in the metrics, so the per-method intervals are theirs).
        keys: the metrics compared (those a method's summaries cannot give are skipped).

    Returns ``num_images``; ``intervals`` (method -> key -> ``(low, high)``); ``pairs``, one entry
    per pair ``(a, b)`` in table order with ``metrics`` (key -> ``difference`` = value(a) - value(b),
    its interval ``ci`` and ``excludes_zero``); ``best`` (key -> the ``method`` with the best value,
    ``higher_is_better``, and ``not_distinguishable``: the methods whose paired interval against it
    contains 0). Raises ValueError when the methods were not scored on the same named images.
    """
    order = _common_images(summaries)
    weights = resample_weights(order.size, samples, seed)
    replicates: dict[str, dict[str, np.ndarray]] = {}
    identity: dict[str, dict[str, float]] = {}
    intervals: dict[str, dict[str, tuple[float, float]]] = {}
    for name, summary in summaries.items():
        ids = np.asarray(summary.get("image_id", ()), dtype=np.int64)
        sketches = None
        per_image = {}
        if "neg_sketch" in summary:
            sketches = (
                _aligned(ids, tuple(summary["neg_sketch"])),
                _aligned(ids, tuple(summary["pos_sketch"])),
            )
            columns = _aligned(ids, summary["values"])
            per_image = {field: columns[:, j] for j, field in enumerate(_VALUE_FIELDS) if field in keys}
        confusion = None
        if "confusion" in summary and "miou" in keys:
            confusion = _aligned(np.asarray(summary["confusion_image_id"]), summary["confusion"])
        replicates[name], identity[name] = bootstrap_replicates(weights, sketches, per_image, confusion)
        intervals[name] = {
            key: percentile_interval(replicates[name][key], level, values[name][key] - identity[name][key])
            for key in keys
            if key in replicates[name]
        }
    names = list(summaries)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            metrics = {
                key: paired_interval(
                    replicates[a][key],
                    replicates[b][key],
                    values[a][key] - values[b][key],
                    identity[a][key] - identity[b][key],
                    level,
                )
                for key in keys
                if key in replicates[a] and key in replicates[b]
            }
            pairs.append({"a": a, "b": b, "metrics": metrics})
    best: dict[str, dict[str, Any]] = {}
    for key in keys:
        candidates = [n for n in names if key in replicates[n] and math.isfinite(values[n][key])]
        if not candidates:
            continue
        higher = key not in LOWER_IS_BETTER
        leader = max(candidates, key=lambda n: values[n][key] if higher else -values[n][key])
        tied = []
        for other in candidates:
            if other == leader:
                continue
            result = paired_interval(
                replicates[leader][key],
                replicates[other][key],
                values[leader][key] - values[other][key],
                identity[leader][key] - identity[other][key],
                level,
            )
            if not result["excludes_zero"]:
                tied.append(other)
        best[key] = {"method": leader, "higher_is_better": higher, "not_distinguishable": tied}
    return {"num_images": int(order.size), "intervals": intervals, "pairs": pairs, "best": best}

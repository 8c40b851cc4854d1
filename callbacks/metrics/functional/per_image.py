"""Exact per-image AP, AUROC and FPR95: the StreetHazards reference protocol.

The reference code (hendrycks/anomaly-seg, ``anom_utils.py``) evaluates every test image that
contains anomalies on its own: AP is scikit-learn's ``average_precision_score``, AUROC its
``roc_auc_score``, and FPR95 comes from ``fpr_and_fdr_at_recall``: over the image's distinct
score thresholds, from the first one reaching full recall up to the highest one, it takes the
threshold whose recall is closest to 0.95 (``argmin |recall - 0.95|`` in float64, the first
minimum in that order, i.e. the lowest such threshold) and reports its false positive rate. That
threshold may recall slightly less than 95%; the pooled metric of ``AnomalyMetrics`` uses the first
threshold reaching 95% instead.

Each image's pixels are sorted and equal scores form one threshold, so the values are exact.

>>> import torch
>>> scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
>>> positive = torch.tensor([[True, False, True, False, False, False]])
>>> result = per_image_metrics(scores, positive, torch.ones_like(positive))
>>> round(float(result.aupr[0]), 4), float(result.auroc[0]), float(result.fpr95[0])
(0.8333, 0.875, 0.25)
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from callbacks.metrics.functional import _backend
from callbacks.metrics.functional.keys import float_to_key

__all__ = [
    "PER_IMAGE_CHUNK_PIXELS",
    "RECALL_LEVEL",
    "PerImageMetrics",
    "SortedImages",
    "per_image_metrics",
    "per_image_metrics_from_keys",
    "per_image_metrics_sorted",
    "sort_images",
]

#: The recall whose closest operating point gives the reference FPR95.
RECALL_LEVEL = 0.95

# The torch path packs (row, key, label) into one int64: bits 0 (label), 1..33 (the int32 key plus
# _KEY_BIAS, at least 1, so that 0 marks an ignored pixel), 34.. (the row).
_KEY_BIAS = (1 << 31) + 1
_ROW_SHIFT = 34
_FIELD_MASK = (1 << _ROW_SHIFT) - 1
# Stands for "no pixel" in sorted int32 rows: above every key (keys are at most 0x7F800000).
_SENTINEL = np.iinfo(np.int32).max

# Rows processed together by ``per_image_metrics`` are capped at this many pixels, which bounds
# its temporary memory independently of batch size: on the torch path about a dozen int64 arrays
# of this size (about 1 GB at 2**23 pixels: a batch of eight 720x1280 images is one chunk, one
# sort and a few device-wide scans).
PER_IMAGE_CHUNK_PIXELS = 1 << 23


class PerImageMetrics(NamedTuple):
    """Per-image results, each ``[B]``; values are NaN where ``usable`` is False."""

    aupr: Tensor  # float64
    auroc: Tensor  # float64
    fpr95: Tensor  # float64, the reference code's closest-recall rule
    usable: Tensor  # bool: the image has at least one positive and one negative valid pixel
    fpr95_first: Tensor  # float64, FPR at the first threshold (high to low) whose TPR reaches 0.95


class SortedImages(NamedTuple):
    """A batch of keys split by class and sorted per image (NumPy), shared by per-image and pooled counting."""

    negatives: np.ndarray  # int32 [B, N]: row r's negative keys ascending, then _SENTINEL
    num_negatives: np.ndarray  # int64 [B]
    positives: np.ndarray  # int32 [P]: the positive keys, image by image, ascending within each
    positive_starts: np.ndarray  # int64 [B + 1]: image r's positives are positives[starts[r]:starts[r + 1]]


def sort_images(keys: np.ndarray, positive: np.ndarray, valid: np.ndarray) -> SortedImages:
    """Sort each row's negative and positive keys (``[B, N]`` int32 keys, bool masks).

    NaN keys must have been rejected before: one could equal the sentinel.
    """
    rows, length = keys.shape
    negative = valid & ~positive
    negatives = np.where(negative, keys, _SENTINEL)
    negatives.sort(axis=1)  # NumPy's SIMD sort: several times faster than torch's on CPU
    flat = np.flatnonzero(valid & positive)
    row = flat // max(length, 1)
    # Rows stay apart and keys sort within them: (row << 32) | (key + 2**31) is increasing in both.
    packed = (row << 32) | (keys.reshape(-1)[flat].astype(np.int64) + (1 << 31))
    packed.sort()
    starts = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=rows), out=starts[1:])
    return SortedImages(
        negatives=negatives,
        num_negatives=negative.sum(axis=1),
        positives=((packed & 0xFFFFFFFF) - (1 << 31)).astype(np.int32),
        positive_starts=starts,
    )


def _reference_fp95(tp: np.ndarray, neg_at_or_below: np.ndarray, fp: np.ndarray, num_pos: int, num_neg: int) -> int:
    """False positives at the reference code's FPR95 threshold, from one image's positives (ascending).

    Only thresholds at or above the lowest positive are candidates, and a threshold's recall
    equals that of the positive group at or just above it, so the closest recall is found among
    the positives' groups; the lowest threshold with that recall lies just above the next lower
    positive group (or is the lowest positive's group when there is none below).
    """
    distance = np.abs(tp / num_pos - RECALL_LEVEL)
    best = tp[distance == distance.min()].max()  # ties: the lowest threshold, i.e. the larger TP
    below = np.count_nonzero(tp > best)  # positives scoring lower than that group (a prefix)
    if below == 0:
        return int(fp[0])
    return int(num_neg - neg_at_or_below[below - 1])


def per_image_metrics_sorted(images: SortedImages) -> PerImageMetrics:
    """Exact per-image metrics from ``sort_images``' output (NumPy; binary searches per positive)."""
    rows = images.negatives.shape[0]
    aupr, auroc, fpr95 = np.full(rows, np.nan), np.full(rows, np.nan), np.full(rows, np.nan)
    fpr95_first = np.full(rows, np.nan)
    usable = np.zeros(rows, dtype=bool)
    for r in range(rows):
        num_neg = int(images.num_negatives[r])
        pos = images.positives[images.positive_starts[r] : images.positive_starts[r + 1]]
        num_pos = pos.size
        if num_pos == 0 or num_neg == 0:
            continue
        neg = images.negatives[r, :num_neg]
        neg_below = np.searchsorted(neg, pos, side="left")
        # Negatives tied with a positive: rare with continuous scores, so search again only there.
        neg_at_or_below = neg_below.copy()
        tied = np.flatnonzero(neg[np.minimum(neg_below, num_neg - 1)] == pos)
        if tied.size:
            neg_at_or_below[tied] = np.searchsorted(neg, pos[tied], side="right")
        # Positives scoring >= this one's score (its whole tie group included), and negatives.
        tp = num_pos - np.searchsorted(pos, pos, side="left")
        fp = num_neg - neg_below
        usable[r] = True
        aupr[r] = np.sum(tp / (tp + fp)) / num_pos
        # Pairs with the negative strictly below count 1, tied 1/2: (below + at_or_below) / 2.
        auroc[r] = (int(neg_below.sum()) + int(neg_at_or_below.sum())) / (2.0 * num_pos * num_neg)
        fpr95[r] = _reference_fp95(tp, neg_at_or_below, fp, num_pos, num_neg) / num_neg
        # The first ROC point reaching 95% TPR is the highest positive group whose recall does.
        reaching = tp / num_pos >= RECALL_LEVEL
        fpr95_first[r] = fp[reaching][np.argmin(tp[reaching])] / num_neg
    return PerImageMetrics(
        aupr=torch.from_numpy(aupr),
        auroc=torch.from_numpy(auroc),
        fpr95=torch.from_numpy(fpr95),
        usable=torch.from_numpy(usable),
        fpr95_first=torch.from_numpy(fpr95_first),
    )


def per_image_metrics(
    scores: Tensor,
    positive: Tensor,
    valid: Tensor,
    chunk_pixels: int = PER_IMAGE_CHUNK_PIXELS,
    implementation: Literal["auto", "numpy", "torch"] = "auto",
) -> PerImageMetrics:
    """Exact AP, AUROC and FPR95 of every image on its own, as the StreetHazards reference code computes them.

    Equal scores form one threshold (a "group"), as in scikit-learn. With ``TP_g``/``FP_g`` the
    positives/negatives scoring ``>=`` group ``g``'s score and ``P``/``N`` the image's positives/negatives:

    - ``aupr`` = (1/P) * sum over positive pixels of ``TP_g / (TP_g + FP_g)`` of their group
      (``average_precision_score``);
    - ``auroc`` = ``(U_lt + U_eq / 2) / (P N)`` with ``U_lt``/``U_eq`` the (positive, negative)
      pairs where the negative scores lower/equal, summed in exact integers (``roc_auc_score``);
    - ``fpr95`` = ``FP_g / N`` of the group whose recall ``TP_g / P`` is closest to 0.95, among the
      groups from the highest down to the first with recall 1, ties to the lowest such group
      (``fpr_and_fdr_at_recall``; see the module docstring).

    Args:
        scores: ``[B, N]`` float scores (converted to float32), higher = more anomalous. Must not
            contain NaN where ``valid``.
        positive: ``[B, N]`` bool, anomaly pixels.
        valid: ``[B, N]`` bool, pixels that take part (ignored pixels are False).
        chunk_pixels: rows are processed in groups of at most this many pixels (at least one row)
            to bound temporary memory.
        implementation: see ``per_image_metrics_from_keys``.
    """
    return per_image_metrics_from_keys(float_to_key(scores), positive, valid, chunk_pixels, implementation)


def per_image_metrics_from_keys(
    keys: Tensor,
    positive: Tensor,
    valid: Tensor,
    chunk_pixels: int = PER_IMAGE_CHUNK_PIXELS,
    implementation: Literal["auto", "numpy", "torch"] = "auto",
) -> PerImageMetrics:
    """``per_image_metrics`` on scores already mapped by ``float_to_key`` (``[B, N]`` int32).

    ``implementation``: ``"torch"`` runs on the tensors' device with fixed-shape operations only
    (no host synchronisation, suits CUDA): one sort of each chunk's packed (row, key, label)
    values and 1-D scans over the whole chunk. ``"numpy"`` (CPU tensors) sorts each image's
    negatives with NumPy's SIMD sort and binary-searches the positives in them, several times
    faster on CPU. ``"auto"`` picks ``"numpy"`` for CPU tensors. Both give identical results.
    """
    if keys.ndim != 2 or positive.shape != keys.shape or valid.shape != keys.shape:
        raise ValueError(
            f"expected [B, N] scores, positive and valid of one shape, got {tuple(keys.shape)}, "
            f"{tuple(positive.shape)}, {tuple(valid.shape)}"
        )
    if implementation == "auto":
        implementation = "numpy" if _backend.numpy_on_cpu(keys) else "torch"
    if implementation == "numpy":

        def chunk(k: Tensor, p: Tensor, v: Tensor) -> PerImageMetrics:
            return per_image_metrics_sorted(sort_images(k.numpy(), p.numpy(), v.numpy()))

    else:
        chunk = _per_image_chunk
    rows_per_chunk = max(1, chunk_pixels // max(keys.shape[1], 1))
    parts = [
        chunk(
            keys[i : i + rows_per_chunk],
            positive[i : i + rows_per_chunk],
            valid[i : i + rows_per_chunk],
        )
        for i in range(0, keys.shape[0], rows_per_chunk)
    ]
    if not parts:
        empty = torch.empty(0, dtype=torch.float64, device=keys.device)
        return PerImageMetrics(empty, empty, empty, torch.empty(0, dtype=torch.bool, device=keys.device), empty)
    return PerImageMetrics(*(torch.cat(field) for field in zip(*parts, strict=True)))


def _per_image_chunk(keys: Tensor, positive: Tensor, valid: Tensor) -> PerImageMetrics:
    rows, length = keys.shape
    device = keys.device
    positive = positive & valid
    # One sort of the whole chunk: (row, key, label) packed into one int64, so that the rows stay
    # apart (each keeps its `length` slots, in order) and equal scores stay adjacent within a row
    # (their order inside a tie group is irrelevant below); ignored pixels take field 0 and go first.
    # Then every scan is a 1-D scan over the whole chunk (on CUDA a device-wide scan; a scan along
    # the rows of a [B, N] tensor runs each long row on one block), and every per-row quantity is
    # a reduction over the [B, N] view.
    field = torch.where(
        valid, ((keys.long() + _KEY_BIAS) << 1) | positive.long(), torch.zeros_like(keys, dtype=torch.long)
    )
    row_index = torch.arange(rows, device=device)
    packed = torch.sort(((row_index.unsqueeze(1) << _ROW_SHIFT) | field).reshape(-1)).values
    field = packed & _FIELD_MASK
    is_valid = field != 0
    is_pos = is_valid & ((field & 1) == 1)
    is_neg = is_valid & ~is_pos
    cum_pos = torch.cumsum(is_pos.long(), 0)
    cum_neg = torch.cumsum(is_neg.long(), 0)
    # Counts of the rows before each row, and of each row.
    pos_end, neg_end = cum_pos.view(rows, length)[:, -1], cum_neg.view(rows, length)[:, -1]
    pos_before = torch.cat([pos_end.new_zeros(1), pos_end[:-1]])
    neg_before = torch.cat([neg_end.new_zeros(1), neg_end[:-1]])
    num_pos, num_neg = (pos_end - pos_before).unsqueeze(1), (neg_end - neg_before).unsqueeze(1)

    # First slot of each element's tie group (same row and key): a binary search in the sorted
    # keys, fully parallel (a running maximum of group starts would be another scan).
    group = packed >> 1
    first = torch.searchsorted(group, group, side="left")
    # Positives / negatives of the row scoring strictly below the element's group.
    pos_below = ((cum_pos - is_pos.long())[first]).view(rows, length) - pos_before.unsqueeze(1)
    neg_below = ((cum_neg - is_neg.long())[first]).view(rows, length) - neg_before.unsqueeze(1)
    is_valid, is_pos, is_neg = is_valid.view(rows, length), is_pos.view(rows, length), is_neg.view(rows, length)
    key = (field >> 1).view(rows, length)
    tp = num_pos - pos_below  # scoring >= the group's score
    fp = num_neg - neg_below

    p = num_pos.squeeze(-1)
    n = num_neg.squeeze(-1)
    precision = tp.double() / (tp + fp).clamp_min(1).double()
    aupr = torch.where(is_pos, precision, 0.0).sum(-1) / p.clamp_min(1).double()
    # U_lt: for each positive, negatives strictly below; U_gt: for each negative, positives
    # strictly below (the pairs the negative wins). Both exact in int64.
    u_lt = torch.where(is_pos, neg_below, 0).sum(-1)
    u_gt = torch.where(is_neg, pos_below, 0).sum(-1)
    auroc = (p * n + u_lt - u_gt).double() / (2 * p * n).clamp_min(1).double()
    # Reference FPR95: every element stands for its group; candidates are the groups at or above
    # the lowest positive; the smallest |recall - 0.95| wins, ties to the lowest group (largest FP).
    lowest_positive = torch.where(is_pos, key, torch.full_like(key, 1 << 40)).amin(-1, keepdim=True)
    candidate = is_valid & (key >= lowest_positive)
    distance = (tp.double() / num_pos.clamp_min(1).double() - RECALL_LEVEL).abs()
    distance = torch.where(candidate, distance, torch.full_like(distance, float("inf")))
    closest = distance == distance.amin(-1, keepdim=True)
    fp95 = torch.where(candidate & closest, fp, torch.full_like(fp, -1)).amax(-1)
    fpr95 = fp95.double() / n.clamp_min(1).double()
    # First-reaching FPR95: the positive group with the fewest TP among those recalling >= 0.95.
    reaching = is_pos & (tp.double() / num_pos.clamp_min(1).double() >= RECALL_LEVEL)
    fewest = torch.where(reaching, tp, torch.full_like(tp, 1 << 40)).amin(-1, keepdim=True)
    fp_first = torch.where(reaching & (tp == fewest), fp, torch.full_like(fp, -1)).amax(-1)
    fpr95_first = fp_first.double() / n.clamp_min(1).double()

    usable = (p > 0) & (n > 0)
    nan = torch.full_like(aupr, float("nan"))
    return PerImageMetrics(
        aupr=torch.where(usable, aupr, nan),
        auroc=torch.where(usable, auroc, nan),
        fpr95=torch.where(usable, fpr95, nan),
        usable=usable,
        fpr95_first=torch.where(usable, fpr95_first, nan),
    )

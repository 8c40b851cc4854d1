"""Exact per-image AP, AUROC and FPR95 (the StreetHazards reference protocol).

Each image's valid pixels are sorted on their device and equal scores form one threshold, as in
scikit-learn, so the values are exact.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from callbacks.metrics.functional import _backend
from callbacks.metrics.functional.keys import float_to_key

__all__ = ["PER_IMAGE_CHUNK_PIXELS", "PerImageMetrics", "per_image_metrics", "per_image_metrics_from_keys"]

# Sort key that lies below every packed (key << 1 | label) value; marks ignored pixels.
_EXCLUDED = -(1 << 40)

# Rows processed together by ``per_image_metrics`` are capped at this many pixels, which bounds
# its temporary memory (about a dozen int64/float64 arrays of this size) independently of batch size.
PER_IMAGE_CHUNK_PIXELS = 1 << 21


class PerImageMetrics(NamedTuple):
    """Per-image results, each ``[B]``; values are NaN where ``usable`` is False."""

    aupr: Tensor  # float64
    auroc: Tensor  # float64
    fpr95: Tensor  # float64
    usable: Tensor  # bool: the image has at least one positive and one negative valid pixel


def _sort_rows(values: Tensor) -> Tensor:
    """Ascending sort of each row (values only)."""
    if _backend.numpy_on_cpu(values):
        # NumPy's SIMD integer sort (x86-simd-sort) is several times faster than torch's CPU sort.
        return torch.from_numpy(np.sort(values.numpy(), axis=-1))
    return torch.sort(values, dim=-1).values


def per_image_metrics(
    scores: Tensor,
    positive: Tensor,
    valid: Tensor,
    chunk_pixels: int = PER_IMAGE_CHUNK_PIXELS,
    implementation: Literal["auto", "numpy", "torch"] = "auto",
) -> PerImageMetrics:
    """Exact AP, AUROC and FPR95 of every image on its own, with scikit-learn's tie handling.

    Each row is sorted on its device; equal scores form one threshold (a "group"), as in
    ``sklearn.metrics.precision_recall_curve``/``roc_curve``. With ``TP_g``/``FP_g`` the positives/
    negatives scoring ``>=`` group ``g``'s score:

    - ``aupr`` = (1/P) * sum over positive pixels of ``TP_g / (TP_g + FP_g)`` of their group,
      which equals sum_g (R_g - R_{g-1}) * P_g;
    - ``auroc`` = ``(U_lt + 0.5 U_eq) / (P N)`` with ``U_lt``/``U_eq`` the (positive, negative)
      pairs where the negative scores lower/equal, computed as ``(P N + U_lt - U_gt) / (2 P N)``
      in exact integer arithmetic;
    - ``fpr95`` = ``FP_g / N`` of the highest-scoring group with ``TP_g >= 0.95 P``.

    Note: the original StreetHazards code takes the FPR at the point whose recall is *closest*
    to 0.95 (``argmin |recall - 0.95|``), which may lie just below 0.95; this function uses the
    first point reaching it (scikit-learn ``roc_curve`` convention), like the pooled metric.

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
    (no host synchronisation, suits CUDA); ``"numpy"`` (CPU tensors) sorts with NumPy's SIMD sort
    and then works on the positive pixels only, several times faster on CPU. ``"auto"`` picks
    ``"numpy"`` for CPU tensors. Both give identical results.
    """
    if keys.ndim != 2 or positive.shape != keys.shape or valid.shape != keys.shape:
        raise ValueError(
            f"expected [B, N] scores, positive and valid of one shape, got {tuple(keys.shape)}, "
            f"{tuple(positive.shape)}, {tuple(valid.shape)}"
        )
    if implementation == "auto":
        implementation = "numpy" if _backend.numpy_on_cpu(keys) else "torch"
    chunk = {"numpy": _per_image_chunk_numpy, "torch": _per_image_chunk}[implementation]
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
        return PerImageMetrics(empty, empty, empty, torch.empty(0, dtype=torch.bool, device=keys.device))
    return PerImageMetrics(*(torch.cat(field) for field in zip(*parts, strict=True)))


def _per_image_chunk(keys: Tensor, positive: Tensor, valid: Tensor) -> PerImageMetrics:
    rows, length = keys.shape
    device = keys.device
    positive = positive & valid
    # Pack (key, label) into one sortable int64 so that a values-only sort suffices: equal scores
    # stay adjacent (their order inside a tie group is irrelevant below), ignored pixels go first.
    packed = (keys.long() << 1) | positive.long()
    packed = _sort_rows(torch.where(valid, packed, torch.full_like(packed, _EXCLUDED)))

    is_valid = packed != _EXCLUDED
    is_pos = is_valid & ((packed & 1) == 1)
    is_neg = is_valid & ~is_pos
    cum_pos = is_pos.cumsum(-1)
    cum_neg = is_neg.cumsum(-1)
    num_pos = cum_pos[:, -1:]
    num_neg = cum_neg[:, -1:]

    key = packed >> 1
    group_start = torch.ones_like(is_valid)
    group_start[:, 1:] = key[:, 1:] != key[:, :-1]
    # Index of the first element of each element's tie group (starts increase along the row).
    position = torch.arange(length, device=device).expand(rows, length)
    start = torch.cummax(torch.where(group_start, position, 0), dim=-1).values
    # Positives / negatives scoring strictly below the element's group.
    pos_below = (cum_pos - is_pos.long()).gather(-1, start)
    neg_below = (cum_neg - is_neg.long()).gather(-1, start)
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
    reaches = is_valid & (100 * tp >= 95 * num_pos)
    fp95 = torch.where(reaches, fp, num_neg).amin(-1)
    fpr95 = fp95.double() / n.clamp_min(1).double()

    usable = (p > 0) & (n > 0)
    nan = torch.full_like(aupr, float("nan"))
    return PerImageMetrics(
        aupr=torch.where(usable, aupr, nan),
        auroc=torch.where(usable, auroc, nan),
        fpr95=torch.where(usable, fpr95, nan),
        usable=usable,
    )


def _per_image_chunk_numpy(keys: Tensor, positive: Tensor, valid: Tensor) -> PerImageMetrics:
    """CPU version of ``_per_image_chunk``: one global sort, then work on positives only."""
    rows, length = keys.shape
    valid_np = valid.numpy()
    positive_np = positive.numpy() & valid_np
    # Row r's packed values live in [r * 2**34 - 2**33, r * 2**34 + 2**32), so one sort of the
    # flattened batch sorts every row and keeps rows apart. Packed = (key << 1 | is_positive):
    # inside a tie group negatives precede positives; excluded pixels sit below their row.
    row_base = (np.arange(rows, dtype=np.int64) << 34)[:, None]
    packed = (keys.numpy().astype(np.int64) << 1) | positive_np
    packed += row_base
    np.copyto(packed, np.broadcast_to(row_base - (1 << 33), packed.shape), where=~valid_np)
    flat = np.sort(packed, axis=None)
    del packed

    num_excluded = length - valid_np.sum(axis=1)
    num_pos = positive_np.sum(axis=1)
    num_neg = length - num_excluded - num_pos
    first_pos = np.cumsum(num_pos) - num_pos  # index of each row's first positive in pos_at
    pos_at = np.flatnonzero(flat & 1)  # positions of the positives, ascending (excluded are even)
    row = pos_at // length
    first_valid = row * length + num_excluded[row]
    rank = np.arange(pos_at.size) - first_pos[row]  # positives before this one in its row
    # First element of the positive's tie group: the first value >= (key << 1 | 0) in its row.
    group_start = np.searchsorted(flat, flat[pos_at] - 1, side="left")
    pos_below = np.searchsorted(pos_at, group_start, side="left") - first_pos[row]
    neg_below = (group_start - first_valid) - pos_below
    # Tied negatives precede the positive, so those up to it are exactly the ones scoring <= it.
    neg_at_or_below = (pos_at - first_valid) - rank
    tp = num_pos[row] - pos_below
    fp = num_neg[row] - neg_below

    usable = (num_pos > 0) & (num_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        aupr = np.bincount(row, weights=tp / (tp + fp), minlength=rows) / num_pos
        # Pairs with the negative strictly below + at-or-below = 2 * (U_lt + U_eq / 2).
        pairs = np.bincount(row, weights=neg_below + neg_at_or_below, minlength=rows)
        auroc = pairs / (2.0 * num_pos * num_neg)
        # The first threshold reaching 95% TPR is the group of the ceil(0.95 P)-th highest positive.
        needed = (95 * num_pos + 99) // 100
        target = np.clip(first_pos + num_pos - needed, 0, max(pos_at.size - 1, 0))
        fp95 = fp[target] if pos_at.size else np.zeros(rows, dtype=np.int64)
        fpr95 = fp95 / num_neg
    nan = np.full(rows, np.nan)
    return PerImageMetrics(
        aupr=torch.from_numpy(np.where(usable, aupr, nan)),
        auroc=torch.from_numpy(np.where(usable, auroc, nan)),
        fpr95=torch.from_numpy(np.where(usable, fpr95, nan)),
        usable=torch.from_numpy(usable),
    )

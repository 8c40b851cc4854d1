"""Score thresholds (operating points) from cumulative counts, and pixel counts at given thresholds.

The cumulative counts are those of :meth:`callbacks.metrics.AnomalyMetrics.operating_points`:
``tp[i]``/``fp[i]`` are the anomaly/normal pixels with ``score >= thresholds[i]``, thresholds
decreasing. Every threshold here means "flag ``score >= threshold``".

Example:
    >>> import torch
    >>> tp, fp = torch.tensor([1, 2, 3, 3]), torch.tensor([0, 0, 1, 5])
    >>> thresholds = torch.tensor([0.9, 0.8, 0.5, 0.1], dtype=torch.float64)
    >>> threshold_at_recall(tp, fp, thresholds, 0.95)
    0.5
    >>> best_f1_threshold(tp, fp, thresholds)
    (0.5, 0.8571428571428571)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "best_f1_threshold",
    "check_thresholds",
    "counts_at_thresholds",
    "rates_from_counts",
    "threshold_at_recall",
]


def check_thresholds(thresholds: Sequence[float]) -> list[float]:
    """``thresholds`` as floats; ``ValueError`` (one line) unless one or more, all finite."""
    try:
        values = [float(t) for t in thresholds]
    except (TypeError, ValueError):
        raise ValueError(f"thresholds must be one or more finite score thresholds, got {thresholds!r}") from None
    if not values or not all(math.isfinite(t) for t in values):
        raise ValueError(f"thresholds must be one or more finite score thresholds, got {list(thresholds)}")
    return values


def threshold_at_recall(tp: Tensor, fp: Tensor, thresholds: Tensor, recall: float) -> float:
    """The highest threshold whose recall reaches ``recall`` (the operating point of FPR95 at 0.95).

    NaN when there are no positives.
    """
    if tp.numel() == 0 or int(tp[-1]) == 0:
        return math.nan
    reached = torch.nonzero(tp.double() >= recall * float(tp[-1])).flatten()
    return float(thresholds[int(reached[0])])


def best_f1_threshold(tp: Tensor, fp: Tensor, thresholds: Tensor) -> tuple[float, float]:
    """``(threshold, F1)`` of the operating point with the highest pixel F1 (the highest threshold on ties).

    ``F1 = 2 TP / (2 TP + FP + FN)``; ``(nan, nan)`` when there are no positives.
    """
    if tp.numel() == 0 or int(tp[-1]) == 0:
        return math.nan, math.nan
    tp, fp = tp.double(), fp.double()
    f1 = 2 * tp / (tp + fp + tp[-1])
    best = int(torch.argmax(f1))  # the first maximum: the highest threshold
    return float(thresholds[best]), float(f1[best])


def counts_at_thresholds(
    scores: Tensor, mask: Tensor, thresholds: Tensor, anomaly_index: int = 13, ignore_index: int = 255
) -> Tensor:
    """``[T, 4]`` int64 pixel counts ``(TP, FP, FN, TN)`` of ``score >= thresholds[t]``.

    ``scores`` and ``mask`` ``[...]`` of one shape; ``ignore_index`` pixels are left out, every
    other non-anomaly pixel is a negative. Stays on the scores' device (no host synchronisation).
    """
    valid = mask != ignore_index
    positive = (mask == anomaly_index) & valid
    negative = valid & ~positive
    flagged = scores.reshape(1, -1) >= thresholds.to(scores.dtype).reshape(-1, 1)
    positive, negative = positive.reshape(1, -1), negative.reshape(1, -1)
    tp = (flagged & positive).sum(dim=1)
    fp = (flagged & negative).sum(dim=1)
    fn = positive.sum(dim=1) - tp
    tn = negative.sum(dim=1) - fp
    return torch.stack([tp, fp, fn, tn], dim=1).to(torch.int64)


def rates_from_counts(counts: Sequence[int]) -> dict[str, float]:
    """TPR, FPR, precision and F1 from ``(TP, FP, FN, TN)``; NaN where undefined."""
    tp, fp, fn, tn = (int(c) for c in counts)

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    return {
        "tpr": ratio(tp, tp + fn),
        "fpr": ratio(fp, fp + tn),
        "precision": ratio(tp, tp + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }

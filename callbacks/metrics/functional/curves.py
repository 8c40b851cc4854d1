"""AP, AUROC, FPR at 95% TPR and curve points from per-bin (or per-score) counts.

Bins run in increasing score order; each bin is one tied score, exactly as scikit-learn treats
equal scores, so counts of distinct float32 values give scikit-learn's numbers.

>>> import torch
>>> result = binary_metrics_from_counts(torch.tensor([3, 1, 0]), torch.tensor([0, 1, 2]))
>>> round(float(result["aupr"]), 4), round(float(result["auroc"]), 4), float(result["fpr95"])
(0.9167, 0.9583, 0.25)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["binary_metrics_from_counts", "binned_error_bounds", "cumulative_counts", "select_curve_points"]


def cumulative_counts(neg_counts: Tensor, pos_counts: Tensor) -> tuple[Tensor, Tensor]:
    """True and false positives when predicting "anomaly" for every bin at or above each bin.

    Bins are in increasing score order; ``tp[b] = sum(pos_counts[b:])``, ``fp[b] = sum(neg_counts[b:])``.
    """
    tp = pos_counts.flip(-1).cumsum(-1).flip(-1)
    fp = neg_counts.flip(-1).cumsum(-1).flip(-1)
    return tp, fp


def binary_metrics_from_counts(neg_counts: Tensor, pos_counts: Tensor) -> dict[str, Tensor]:
    """AP, AUROC and FPR at 95% TPR from per-bin counts, treating each bin as one tied score.

    Definitions (``b`` runs over bins from the highest score down, ``TP_b``/``FP_b`` count the
    pixels at or above bin ``b``, ``P``/``N`` the positives/negatives):

    - ``aupr`` = sum_b (R_b - R_{b-1}) * P_b with recall ``R_b = TP_b / P`` and precision
      ``P_b = TP_b / (TP_b + FP_b)`` (scikit-learn's ``average_precision_score``);
    - ``auroc`` = trapezoidal area under the ROC curve through the bin operating points, i.e.
      ``P(s_pos > s_neg) + 0.5 P(s_pos == s_neg)`` with ties meaning "same bin";
    - ``fpr95`` = ``FP_b / N`` at the first bin (scanning from high to low score) where
      ``TP_b >= 0.95 P``; ``index95`` is that bin. The comparison is done in integers
      (``100 TP >= 95 P``), which is exactly what the float comparison ``TP/P >= 0.95`` decides.

    Args:
        neg_counts, pos_counts: 1-D integer tensors of equal length.

    Returns:
        float64 scalar tensors ``aupr``, ``auroc``, ``fpr95`` (NaN where undefined: no positives,
        or for ``auroc``/``fpr95`` no negatives; ``aupr`` is 1 without negatives, as in
        scikit-learn), int64 ``index95`` (-1 without positives), and int64 ``num_pos``/``num_neg``.
    """
    if neg_counts.numel() == 0:  # an empty bin changes nothing and keeps the indexing below valid
        neg_counts, pos_counts = neg_counts.new_zeros(1), pos_counts.new_zeros(1)
    tp, fp = cumulative_counts(neg_counts.long(), pos_counts.long())
    num_pos, num_neg = tp[0], fp[0]
    pos_f, tp_f, fp_f = pos_counts.double(), tp.double(), fp.double()
    p_f, n_f = num_pos.double(), num_neg.double()
    nan = torch.full_like(p_f, float("nan"))

    precision = tp_f / (tp_f + fp_f).clamp_min(1.0)
    aupr = torch.where(num_pos > 0, (pos_f * precision).sum() / p_f.clamp_min(1.0), nan)
    # Pairs (pos, neg): the negative in bin b is beaten by the positives above b and ties with
    # those in b, so it contributes TP_above + 0.5 pos_b = TP_b - 0.5 pos_b.
    pairs = (neg_counts.double() * (tp_f - 0.5 * pos_f)).sum()
    both = (num_pos > 0) & (num_neg > 0)
    auroc = torch.where(both, pairs / (p_f * n_f).clamp_min(1.0), nan)
    # tp is non-increasing in b, so the bins reaching 95% TPR form a prefix.
    reach = 100 * tp >= 95 * num_pos
    index95 = torch.where(num_pos > 0, reach.sum() - 1, torch.full_like(num_pos, -1))
    fp95 = fp.gather(0, index95.clamp_min(0).reshape(1))[0].double()
    fpr95 = torch.where(both, fp95 / n_f.clamp_min(1.0), nan)
    return {
        "aupr": aupr,
        "auroc": auroc,
        "fpr95": fpr95,
        "index95": index95,
        "num_pos": num_pos,
        "num_neg": num_neg,
    }


def binned_error_bounds(neg_counts: Tensor, pos_counts: Tensor, exact: Tensor) -> dict[str, Tensor]:
    """Guaranteed bounds on the distance between ``binary_metrics_from_counts`` and the exact metrics.

    The bins (increasing score order) must hold disjoint score intervals; ``exact[b]`` says that
    bin ``b`` holds a single distinct score (or nothing), so its pixels are true ties. Inside any
    other bin the pixels' order is unknown, and the exact metrics are those of *some* order with
    ties of the bin's pixels. With ``T``/``F`` the positives/negatives in higher bins and ``p``/``n``
    those of bin ``b`` (``P``/``N`` in all):

    - AP is a sum over bins of ``C_b / P``, and ``C_b`` (the precisions of the bin's positives)
      depends only on ``T, F, p, n`` and the order inside the bin. It is largest with all ``p``
      positives tied above the negatives, ``p (T + p) / (T + p + F)``, and smallest with the
      negatives first and the positives distinct below them, ``sum_{i=1..p} (T + i) / (T + i + F +
      n) = p - (F + n) sum_{i=1..p} 1 / (A + i)`` with ``A = T + F + n``; the harmonic sum is at
      most ``log1p(p / (A + 1/2))`` (``1/x`` is convex, so ``1/(A + i)`` is at most its mean over
      ``[A + i - 1/2, A + i + 1/2]``). The binned value counts the bin as one tie, ``p (T + p) / (T
      + p + F + n)``, which lies between; ``aupr`` bounds the larger of the two one-sided sums.
    - AUROC: pairs in different bins are ordered, pairs inside bin ``b`` count 1/2 in the binned
      value and 0, 1/2 or 1 in the exact one: ``auroc = sum_b p_b n_b / (2 P N)`` over inexact bins.
    - FPR95: the exact first threshold reaching 95% TPR lies in the bin ``binary_metrics_from_counts``
      stops at (the positives above it are fewer than ``0.95 P``, with it at least as many), so the
      exact false positives lie between those above that bin and those up to its end:
      ``fpr95 = n_b / N`` unless the bin is exact.

    Returns float64 scalars ``aupr``, ``auroc``, ``fpr95`` (NaN where the metric is undefined). They
    hold for the real-valued sums; float64 rounding of the sums (far below 1e-12 here) comes on top.

    >>> import torch
    >>> bounds = binned_error_bounds(torch.tensor([3, 1]), torch.tensor([0, 2]), torch.tensor([False, False]))
    >>> round(float(bounds["auroc"]), 4), float(bounds["fpr95"])
    (0.125, 0.25)
    """
    neg = neg_counts.long()
    pos = pos_counts.long()
    if neg.numel() == 0:
        neg, pos, exact = neg.new_zeros(1), pos.new_zeros(1), exact.new_ones(1)
    tp, fp = cumulative_counts(neg, pos)
    num_pos, num_neg = tp[0].double(), fp[0].double()
    p, n = pos.double(), neg.double()
    above_pos, above_neg = (tp - pos).double(), (fp - neg).double()
    inexact = ~exact.bool()
    nan = torch.full_like(num_pos, float("nan"))

    # AP: C_max - C and C - C_min per bin, written as differences to avoid cancellation.
    reach = above_pos + p + above_neg
    gain = p * (above_pos + p) * n / (reach.clamp_min(1.0) * (reach + n).clamp_min(1.0))
    before = above_pos + above_neg + n
    loss = (above_neg + n) * (torch.log1p(p / (before + 0.5)) - p / (before + p).clamp_min(1.0))
    gain = torch.where(inexact & (pos > 0), gain, 0.0)
    loss = torch.where(inexact & (pos > 0), loss.clamp_min(0.0), 0.0)
    aupr = torch.where(num_pos > 0, torch.maximum(gain.sum(), loss.sum()) / num_pos.clamp_min(1.0), nan)

    both = (num_pos > 0) & (num_neg > 0)
    pairs = torch.where(inexact, p * n, 0.0).sum()
    auroc = torch.where(both, pairs / (2.0 * (num_pos * num_neg).clamp_min(1.0)), nan)

    index95 = ((100 * tp >= 95 * tp[0]).sum() - 1).clamp_min(0)
    at95 = torch.where(inexact[index95], n[index95], 0.0)
    fpr95 = torch.where(both, at95 / num_neg.clamp_min(1.0), nan)
    return {"aupr": aupr, "auroc": auroc, "fpr95": fpr95}


def select_curve_points(tpr: Tensor, fpr: Tensor, max_points: int) -> Tensor:
    """Indices of at most ``max_points`` curve points, spread evenly along TPR and along FPR.

    ``tpr`` and ``fpr`` are non-decreasing (operating points from high to low threshold). Half
    the budget goes to the first point reaching each of evenly spaced TPR levels, half to FPR
    levels, so both the ROC curve (x = FPR) and the PR curve (x = recall = TPR) keep their
    shape; the first and last points are always kept.
    """
    num = tpr.numel()
    if num <= max_points:
        return torch.arange(num, device=tpr.device)
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    per_axis = max(max_points // 2, 1)
    levels = torch.linspace(0.0, 1.0, per_axis, device=tpr.device, dtype=tpr.dtype)
    picks = torch.cat(
        [
            torch.searchsorted(tpr.contiguous(), levels),
            torch.searchsorted(fpr.contiguous(), levels),
            torch.tensor([0, num - 1], device=tpr.device),
        ]
    )
    picks = torch.unique(picks.clamp(0, num - 1))
    if picks.numel() > max_points:  # only when max_points is odd and every pick is distinct
        keep = torch.linspace(0, picks.numel() - 1, max_points, device=tpr.device).round().long()
        picks = picks[keep]
    return picks

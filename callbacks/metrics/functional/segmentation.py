"""Closed-set segmentation: confusion-matrix cells and IoU.

>>> import torch
>>> iou_from_confusion_matrix(torch.tensor([[2, 1], [0, 3]]))["miou"].item()
0.7083333333333333
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["confusion_matrix_index", "iou_from_confusion_matrix"]


def confusion_matrix_index(preds: Tensor, target: Tensor, num_classes: int, excluded: Tensor) -> tuple[Tensor, Tensor]:
    """Flat confusion-matrix cell of every pixel, for ``accumulate_counts``.

    Cell ``target * K + pred`` for pixels with both values in ``[0, K)``; pixels that are not
    ``excluded`` but have a label or prediction outside ``[0, K)`` go to the overflow cell
    ``K * K`` so that the caller can report them.

    Returns:
        ``(index, include)``: int64 cells and a bool mask (False for excluded pixels).
    """
    preds = preds.long().reshape(-1)
    target = target.long().reshape(-1)
    include = ~excluded.reshape(-1)
    in_range = (target >= 0) & (target < num_classes) & (preds >= 0) & (preds < num_classes)
    overflow = torch.full_like(target, num_classes * num_classes)
    return torch.where(in_range, target * num_classes + preds, overflow), include


def iou_from_confusion_matrix(confmat: Tensor) -> dict[str, Tensor]:
    """Per-class IoU, mean IoU and pixel accuracy from a ``[K, K]`` matrix (rows = label).

    ``iou_c = C_cc / (sum_j C_cj + sum_i C_ic - C_cc)``; NaN for classes absent from both labels
    and predictions, which the mean skips. ``pixel_accuracy = trace(C) / sum(C)``.
    """
    confmat = confmat.double()
    true_pos = confmat.diagonal()
    union = confmat.sum(0) + confmat.sum(1) - true_pos
    iou = torch.where(union > 0, true_pos / union.clamp_min(1.0), torch.full_like(union, float("nan")))
    total = confmat.sum()
    pixel_accuracy = torch.where(total > 0, true_pos.sum() / total.clamp_min(1.0), float("nan"))
    return {"iou": iou, "miou": torch.nanmean(iou), "pixel_accuracy": pixel_accuracy}


def segmentation_metrics(
    preds_or_logits: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255, anomaly_index: int = 13
) -> dict[str, Tensor]:
    """One-shot twin of ``SegmentationMetrics``: IoU, mIoU, pixel accuracy and the confusion matrix.

    ``preds_or_logits``: logits ``[B, K, H, W]`` (argmax over ``K``) or class predictions ``[B, H, W]``;
    pixels labelled ``ignore_index`` or ``anomaly_index`` are excluded, as are (silently, unlike the
    metric) pixels whose label or prediction lies outside ``0..K-1``.

    >>> import torch
    >>> result = segmentation_metrics(torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[0, 1], [0, 1]]]), 2)
    >>> round(result["miou"].item(), 4), result["confusion_matrix"].tolist()
    (0.5833, [[1, 1], [0, 2]])
    """
    preds = preds_or_logits.argmax(1) if preds_or_logits.ndim == target.ndim + 1 else preds_or_logits
    excluded = (target == ignore_index) | (target == anomaly_index)
    index, include = confusion_matrix_index(preds, target, num_classes, excluded)
    cells = num_classes * num_classes
    include = include & (index < cells)
    confmat = torch.bincount(index[include], minlength=cells).view(num_classes, num_classes)
    return {**iou_from_confusion_matrix(confmat), "confusion_matrix": confmat}

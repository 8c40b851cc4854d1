"""Closed-set segmentation quality (mIoU, per-class IoU, pixel accuracy) from a confusion matrix.

>>> import torch
>>> metric = SegmentationMetrics(num_classes=2)
>>> metric.update(torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[0, 1], [0, 1]]]))
>>> round(metric.compute()["miou"], 4)
0.5833
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from callbacks.metrics.functional import accumulate_counts, confusion_matrix_index, iou_from_confusion_matrix
from datamodules.labels import ANOMALY_INDEX, IGNORE_INDEX

__all__ = ["SegmentationMetrics"]


class SegmentationMetrics(Metric):
    """Closed-set segmentation quality from a confusion matrix over the known classes.

    ``update(preds_or_logits, target)``: logits ``[B, K, H, W]`` (argmax over ``K``) or class
    predictions ``[B, H, W]``, and labels ``[B, H, W]``. Pixels labelled ``ignore_index`` or
    ``anomaly_index`` are excluded. ``compute()`` returns ``miou`` (mean over classes present in
    labels or predictions), ``iou`` (K floats; NaN for a class absent from both, excluded from the
    mean), ``pixel_accuracy`` and ``confusion_matrix`` (K x K nested list of ints, rows = label,
    columns = prediction).

    State: ``K * K + 1`` int64 counts, summed across processes; the extra cell counts evaluated
    pixels whose label or prediction lies outside ``0..K-1``, which ``compute()`` reports as an
    error (checking in ``update`` would synchronise the GPU every batch). Counting uses
    ``bincount`` on CPU and, on CUDA, ``scatter_add_`` (integer atomics), or a sort when
    deterministic algorithms are enabled: no torch fallback that scales with pixels x bins.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    confmat: Tensor

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        anomaly_index: int = ANOMALY_INDEX,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.anomaly_index = int(anomaly_index)
        self.add_state("confmat", torch.zeros(self.num_classes**2 + 1, dtype=torch.int64), dist_reduce_fx="sum")

    @property
    def confusion_matrix(self) -> Tensor:
        """The (local) ``[K, K]`` int64 confusion matrix, rows = label, columns = prediction."""
        return self.confmat[:-1].view(self.num_classes, self.num_classes)

    def update(self, preds_or_logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """Accumulate a batch of logits ``[B, K, H, W]`` or predictions ``[B, H, W]``."""
        preds = preds_or_logits.detach()
        if preds.ndim == target.ndim + 1:
            if preds.shape[1] != self.num_classes:
                raise ValueError(f"logits have {preds.shape[1]} channels but num_classes is {self.num_classes}")
            if preds.shape[:1] + preds.shape[2:] != target.shape:
                raise ValueError(
                    f"logits {tuple(preds.shape)} do not match target {tuple(target.shape)} "
                    "(expected [B, K, H, W] and [B, H, W])"
                )
            preds = preds.argmax(dim=1)
        elif preds.shape != target.shape:
            raise ValueError(
                f"expected logits [B, K, H, W] or predictions [B, H, W] matching target "
                f"{tuple(target.shape)}, got {tuple(preds.shape)}"
            )
        elif preds.is_floating_point():
            raise TypeError(
                f"predictions of the same shape as the target must be integer class indices, got {preds.dtype}"
            )
        if target.is_floating_point():
            raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
        excluded = (target == self.ignore_index) | (target == self.anomaly_index)
        index, include = confusion_matrix_index(preds, target, self.num_classes, excluded)
        accumulate_counts(self.confmat, index, include)

    def compute(self) -> dict[str, Any]:
        """``miou``, ``iou``, ``pixel_accuracy`` and ``confusion_matrix`` (see the class docstring)."""
        out_of_range = int(self.confmat[-1])
        if out_of_range:
            raise ValueError(
                f"{out_of_range} evaluated pixels had a label or prediction outside 0..{self.num_classes - 1} "
                f"(labels must be class indices, {self.anomaly_index} for anomaly or {self.ignore_index} "
                "for ignore); check num_classes and the label mapping."
            )
        confmat = self.confusion_matrix
        if int(confmat.sum()) == 0:
            rank_zero_warn(f"{type(self).__name__}.compute(): no evaluated pixels; every metric is NaN.", UserWarning)
        result = iou_from_confusion_matrix(confmat)
        return {
            "miou": float(result["miou"]),
            "iou": result["iou"].tolist(),
            "pixel_accuracy": float(result["pixel_accuracy"]),
            "confusion_matrix": confmat.tolist(),
        }

"""Exact pixel counts (TP, FP, FN, TN) of an anomaly score at fixed thresholds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from callbacks.metrics.functional.operating_points import check_thresholds, counts_at_thresholds, rates_from_counts
from callbacks.metrics.packed_sync import PackedSyncMetric

__all__ = ["ThresholdCounts"]


class ThresholdCounts(PackedSyncMetric):
    """TPR, FPR, precision and F1 of "flag ``score >= threshold``" at each of ``thresholds``.

    Integer counts on the scores' device (no host synchronisation in ``update``), summed across
    processes.

    Example:
        >>> metric = ThresholdCounts([0.5])
        >>> metric.update(torch.tensor([[0.9, 0.2, 0.7]]), torch.tensor([[13, 13, 0]]))
        >>> result = metric.compute()[0]
        >>> result["tpr"], result["fpr"], result["precision"]
        (0.5, 1.0, 0.5)
    """

    full_state_update = False

    def __init__(
        self, thresholds: Sequence[float], anomaly_index: int = 13, ignore_index: int = 255, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.thresholds = check_thresholds(thresholds)
        self.anomaly_index, self.ignore_index = int(anomaly_index), int(ignore_index)
        self.add_state("counts", torch.zeros(len(self.thresholds), 4, dtype=torch.int64), dist_reduce_fx="sum")
        self._threshold_tensor: Tensor | None = None

    def update(self, scores: Tensor, mask: Tensor) -> None:  # type: ignore[override]
        if self._threshold_tensor is None or self._threshold_tensor.device != scores.device:
            self._threshold_tensor = torch.tensor(self.thresholds, dtype=torch.float64, device=scores.device)
        self.counts += counts_at_thresholds(
            scores.float(), mask, self._threshold_tensor, self.anomaly_index, self.ignore_index
        )

    def compute(self) -> list[dict[str, Any]]:
        counts = self.counts.cpu().tolist()
        return [{"threshold": t, **rates_from_counts(c)} for t, c in zip(self.thresholds, counts, strict=True)]

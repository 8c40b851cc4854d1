"""Exact counts of images, valid pixels and anomaly pixels of a split (summed across processes)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from callbacks.metrics.packed_sync import PackedSyncMetric

__all__ = ["SplitCounts"]


class SplitCounts(PackedSyncMetric):
    """Exact int64 counts of images, valid (non-ignored) pixels and anomaly pixels seen.

    >>> import torch
    >>> counts = SplitCounts(ignore_index=255, anomaly_index=13)
    >>> counts.update(torch.tensor([[[0, 13], [255, 13]]]))
    >>> counts.compute()
    {'images': 1, 'valid_pixels': 3, 'anomaly_pixels': 2}
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, ignore_index: int, anomaly_index: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.anomaly_index = anomaly_index
        self.add_state("counts", torch.zeros(3, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, mask: Tensor) -> None:  # type: ignore[override]
        valid = (mask != self.ignore_index).sum()
        anomaly = (mask == self.anomaly_index).sum()
        self.counts += torch.stack([torch.full_like(valid, mask.shape[0]), valid, anomaly])

    def compute(self) -> dict[str, int]:
        images, valid, anomaly = self.counts.tolist()
        return {"images": images, "valid_pixels": valid, "anomaly_pixels": anomaly}

"""Component-level anomaly metrics (SegmentMeIfYouCan's sIoU, PPV and F1) at given score thresholds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from callbacks.metrics.functional.components import (
    SIOU_THRESHOLDS,
    component_counts,
    image_component_table,
    label_anomalies,
)
from callbacks.metrics.functional.operating_points import check_thresholds
from callbacks.metrics.packed_sync import PackedSyncMetric

__all__ = ["ComponentMetrics"]


class ComponentMetrics(PackedSyncMetric):
    """sIoU, PPV, TP/FN/FP and F1 of anomaly components at each of ``thresholds`` (score thresholds).

    Every image is binarised at each score threshold and split into components as the
    SegmentMeIfYouCan benchmark does (:mod:`callbacks.metrics.functional.components`); only
    integer counts and float64 sums per threshold are kept (no score maps), summed across
    processes, so 2 processes give what 1 gives. ``compute()`` returns one dict per score
    threshold, in the order given: ``threshold``, ``sIoU_gt`` (mean over anomaly components),
    ``PPV`` (mean precision over predicted components), ``F1_mean`` (over ``siou_thresholds``),
    ``F1_25``/``F1_50``/``F1_75``, ``TP``/``FN``/``FP`` at each of those three, ``F1`` per sIoU
    threshold, and the component counts; undefined values are NaN.

    Args:
        thresholds: score thresholds (a pixel is predicted anomalous when ``score > threshold``).
        min_prediction_size: predicted components below this many pixels are dropped (the
            benchmark's anomaly track: 500 at its resolution; scale with the evaluation resolution).
        min_anomaly_size: anomaly components below this many pixels become void (the benchmark: 100).
        siou_thresholds: where TP/FN/FP are counted (the benchmark's ``linspace(0.25, 0.75, 11)``).
        anomaly_index, ignore_index: label values of anomaly and void pixels.

    Example:
        >>> metric = ComponentMetrics([0.5], min_prediction_size=1, min_anomaly_size=1)
        >>> labels = torch.zeros(1, 6, 8, dtype=torch.long); labels[0, 1:4, 1:4] = 13
        >>> scores = torch.zeros(1, 6, 8); scores[0, 1:4, 1:3] = 1.0
        >>> metric.update(scores, labels)
        >>> result = metric.compute()[0]
        >>> round(result["sIoU_gt"], 3), result["PPV"], result["F1_50"], result["F1_75"]
        (0.667, 1.0, 1.0, 0.0)
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self,
        thresholds: Sequence[float],
        min_prediction_size: int = 500,
        min_anomaly_size: int = 100,
        siou_thresholds: Sequence[float] = SIOU_THRESHOLDS,
        anomaly_index: int = 13,
        ignore_index: int = 255,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.thresholds = check_thresholds(thresholds)
        self.siou_thresholds = tuple(float(t) for t in siou_thresholds)
        if not self.siou_thresholds or not all(0.0 <= t <= 1.0 for t in self.siou_thresholds):
            raise ValueError(f"siou_thresholds must lie in [0, 1], got {list(siou_thresholds)}")
        for name, value in (("min_prediction_size", min_prediction_size), ("min_anomaly_size", min_anomaly_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        self.min_prediction_size, self.min_anomaly_size = min_prediction_size, min_anomaly_size
        self.anomaly_index, self.ignore_index = int(anomaly_index), int(ignore_index)
        num_t, num_s = len(self.thresholds), len(self.siou_thresholds)
        for name in ("tp", "fn", "fp"):
            self.add_state(name, torch.zeros(num_t, num_s, dtype=torch.int64), dist_reduce_fx="sum")
        for name in ("num_anomalies", "num_predicted"):
            self.add_state(name, torch.zeros(num_t, dtype=torch.int64), dist_reduce_fx="sum")
        for name in ("siou_sum", "precision_sum"):
            self.add_state(name, torch.zeros(num_t, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: Tensor, mask: Tensor) -> None:  # type: ignore[override]
        """Accumulate a batch: ``scores`` ``[B, H, W]`` (or ``[H, W]``), ``mask`` labels of the same shape."""
        if scores.shape != mask.shape or scores.dim() not in (2, 3):
            raise ValueError(
                f"expected [B, H, W] scores and mask of one shape, got {tuple(scores.shape)}, {tuple(mask.shape)}"
            )
        if scores.dim() == 2:
            scores, mask = scores[None], mask[None]
        # Connected components run on the host (scipy); one transfer per batch.
        self.update_host(scores.detach().float().cpu().numpy(), mask.detach().cpu().numpy())

    def update_host(self, host_scores: np.ndarray, host_labels: np.ndarray) -> None:
        """:meth:`update` on host arrays ``[B, H, W]`` (for a caller that already copied them)."""
        totals = {name: np.zeros(tuple(default.shape), np.float64 if default.is_floating_point() else np.int64)
                  for name, default in self._defaults.items()}  # fmt: skip
        for image_scores, image_labels in zip(host_scores, host_labels, strict=True):
            truth = label_anomalies(image_labels, self.anomaly_index)  # the same at every threshold
            for t, threshold in enumerate(self.thresholds):
                table = image_component_table(
                    image_scores,
                    image_labels,
                    threshold,
                    self.anomaly_index,
                    self.ignore_index,
                    self.min_prediction_size,
                    self.min_anomaly_size,
                    truth=truth,
                )
                counts = component_counts(table.siou, table.precision, self.siou_thresholds)
                for name in totals:
                    totals[name][t] += counts[name]
        for name, value in totals.items():
            state = getattr(self, name)
            state += torch.from_numpy(value).to(state.device)

    def compute(self) -> list[dict[str, Any]]:
        tp, fn, fp = (getattr(self, name).cpu().numpy() for name in ("tp", "fn", "fp"))
        anomalies, predicted = self.num_anomalies.cpu().numpy(), self.num_predicted.cpu().numpy()
        siou_sum, precision_sum = self.siou_sum.cpu().numpy(), self.precision_sum.cpu().numpy()
        results = []
        for t, threshold in enumerate(self.thresholds):
            denominator = 2 * tp[t] + fn[t] + fp[t]
            with np.errstate(invalid="ignore", divide="ignore"):
                f1 = np.where(denominator > 0, 2 * tp[t] / np.maximum(denominator, 1), np.nan)
            result: dict[str, Any] = {
                "threshold": threshold,
                "sIoU_gt": float(siou_sum[t] / anomalies[t]) if anomalies[t] else math.nan,
                "PPV": float(precision_sum[t] / predicted[t]) if predicted[t] else math.nan,
                "F1_mean": float(np.mean(f1)),
                "F1": [float(v) for v in f1],
                "siou_thresholds": list(self.siou_thresholds),
                "num_anomaly_components": int(anomalies[t]),
                "num_predicted_components": int(predicted[t]),
            }
            for level in (0.25, 0.5, 0.75):
                hit = [s for s, v in enumerate(self.siou_thresholds) if abs(v - level) < 1e-9]
                key = int(round(level * 100))
                if hit:
                    s = hit[0]
                    result.update(
                        {
                            f"F1_{key}": float(f1[s]),
                            f"TP_{key}": int(tp[t, s]),
                            f"FN_{key}": int(fn[t, s]),
                            f"FP_{key}": int(fp[t, s]),
                        }  # fmt: skip
                    )
            results.append(result)
        return results

"""The metric library: streaming ``torchmetrics.Metric`` classes over the pure functions of :mod:`.functional`.

- :class:`AnomalyMetrics`: pooled and per-image AUPR, AUROC, FPR95 of an anomaly score;
- :class:`SegmentationMetrics`: closed-set mIoU, per-class IoU and pixel accuracy;
- :class:`NegativeScoreHistogram`: per-class score histogram of negative pixels (false-positive breakdown);
- :class:`SplitCounts`: exact image / valid-pixel / anomaly-pixel counts of a split;
- :class:`ComponentMetrics`: SegmentMeIfYouCan's component-level sIoU, PPV and F1 at score thresholds;
- :class:`ThresholdCounts`: exact pixel TPR, FPR, precision and F1 at score thresholds;
- :class:`SizeStrataMetrics`: anomaly components per size bin, the share found and pixel TPR at thresholds.
"""

from callbacks.metrics.anomaly import AnomalyMetrics
from callbacks.metrics.components import ComponentMetrics
from callbacks.metrics.negative_histogram import NegativeScoreHistogram
from callbacks.metrics.segmentation import SegmentationMetrics
from callbacks.metrics.size_strata import SizeStrataMetrics
from callbacks.metrics.split_counts import SplitCounts
from callbacks.metrics.threshold_counts import ThresholdCounts

__all__ = [
    "AnomalyMetrics",
    "ComponentMetrics",
    "NegativeScoreHistogram",
    "SegmentationMetrics",
    "SizeStrataMetrics",
    "SplitCounts",
    "ThresholdCounts",
]

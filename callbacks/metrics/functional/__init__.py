"""Pure tensor functions behind the streaming anomaly and segmentation metrics.

Everything here is stateless and works on CPU and CUDA tensors alike, so each piece can be
tested against scikit-learn or a direct NumPy computation without Lightning:

- :mod:`.anomaly`: ``anomaly_metrics``, the exact one-shot twin of ``AnomalyMetrics``;
- :mod:`.keys`: float32 scores to order-preserving integer keys and back;
- :mod:`.histogram`: the adaptive score histogram (layout, bin index, exact re-binning, allocation);
- :mod:`.counting`: exact integer counting into a flat histogram;
- :mod:`.curves`: AP, AUROC, FPR95, their error bounds and curve points from per-bin counts;
- :mod:`.per_image`: exact per-image metrics (the StreetHazards reference protocol);
- :mod:`.segmentation`: confusion matrix and IoU, and ``segmentation_metrics``, the one-shot twin of
  ``SegmentationMetrics``;
- :mod:`.false_positives`: the per-class split of false positives at a threshold;
- :mod:`.bootstrap`: intervals over test images from per-image summaries (quantile sketches of
  each image's scores, per-image values, confusion matrices), seeded resampling, percentile and
  paired intervals.
"""

from callbacks.metrics.functional.anomaly import anomaly_metrics
from callbacks.metrics.functional.counting import accumulate_counts
from callbacks.metrics.functional.curves import (
    binary_metrics_from_counts,
    binned_error_bounds,
    cumulative_counts,
    select_curve_points,
)
from callbacks.metrics.functional.false_positives import false_positive_breakdown
from callbacks.metrics.functional.histogram import (
    BinLayout,
    HistogramLayout,
    adaptive_layout,
    bin_index,
    bin_layout,
    bin_lower_edge,
    fixed_layout,
    flat_index,
    layout_tensors,
    plan_layout,
    range_layout,
    rebin_counts,
    rebin_tensors,
)
from callbacks.metrics.functional.keys import KEY_NEG_INF, KEY_POS_INF, float_to_key, key_to_float
from callbacks.metrics.functional.per_image import (
    PER_IMAGE_CHUNK_PIXELS,
    PerImageMetrics,
    per_image_metrics,
    per_image_metrics_from_keys,
)
from callbacks.metrics.functional.segmentation import (
    confusion_matrix_index,
    iou_from_confusion_matrix,
    segmentation_metrics,
)

__all__ = [
    "KEY_NEG_INF",
    "KEY_POS_INF",
    "PER_IMAGE_CHUNK_PIXELS",
    "BinLayout",
    "HistogramLayout",
    "PerImageMetrics",
    "accumulate_counts",
    "adaptive_layout",
    "anomaly_metrics",
    "bin_index",
    "bin_layout",
    "bin_lower_edge",
    "binary_metrics_from_counts",
    "binned_error_bounds",
    "confusion_matrix_index",
    "cumulative_counts",
    "false_positive_breakdown",
    "fixed_layout",
    "flat_index",
    "float_to_key",
    "iou_from_confusion_matrix",
    "key_to_float",
    "layout_tensors",
    "per_image_metrics",
    "per_image_metrics_from_keys",
    "plan_layout",
    "range_layout",
    "rebin_counts",
    "rebin_tensors",
    "segmentation_metrics",
    "select_curve_points",
]

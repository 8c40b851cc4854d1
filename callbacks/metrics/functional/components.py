"""Component-level anomaly metrics of the SegmentMeIfYouCan benchmark (sIoU, PPV, F1 over sIoU thresholds).

The rules, as ``road_anomaly_benchmark/metrics/instance_segmentation.py`` applies them to one image:

1. The score map is binarised at a score threshold (``score > threshold``, strictly); predicted
   pixels on void labels are dropped.
2. Ground-truth anomaly regions and predicted regions are split into 8-connected components.
3. Predicted components smaller than ``min_prediction_size`` pixels are dropped; ground-truth
   components smaller than ``min_anomaly_size`` pixels become void (the benchmark's loop also
   tests the background, which becomes void if it has fewer pixels: kept, for exactness).
4. Everything is then restricted to the region of interest (labels not void).
5. For each ground-truth component ``k``, with ``P(k)`` the predicted components touching it:
   ``sIoU(k) = |k ∩ P(k)| / (|P(k)| + |k| - |k ∩ P(k)| - |P(k) ∩ other ground-truth components|)``
   (the *adjusted* union: predicted pixels on other anomalies do not count against ``k``).
6. For each predicted component ``j``: ``precision(j) = |j ∩ any ground truth| / |j|``.
7. At an sIoU threshold ``t``: TP = ground-truth components with ``sIoU >= t``, FN = the others,
   FP = predicted components with ``precision < t``; summed over images,
   ``F1_t = 2 TP / (2 TP + FN + FP)``; ``sIoU_gt`` and ``PPV`` are means over all components of
   the split; ``F1_mean`` the mean of ``F1_t`` over the thresholds (``linspace(0.25, 0.75, 11)``).

Implemented with one contingency table of (ground-truth component, predicted component) pixel
counts per image, so every component's terms are sums over its row or column.

Example:
    >>> import numpy as np
    >>> labels = np.zeros((6, 8), dtype=np.int64); labels[1:4, 1:4] = 13
    >>> scores = np.zeros((6, 8)); scores[1:4, 1:3] = 1.0        # covers 6 of the 9 anomaly pixels
    >>> siou, precision = image_components(scores, labels, 0.5, min_prediction_size=1, min_anomaly_size=1)
    >>> siou.round(3).tolist(), precision.tolist()
    ([0.667], [1.0])
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["SIOU_THRESHOLDS", "component_counts", "image_components"]

#: The benchmark's sIoU thresholds.
SIOU_THRESHOLDS = tuple(float(t) for t in np.linspace(0.25, 0.75, 11))
_EIGHT_CONNECTED = np.ones((3, 3), dtype=np.uint8)


def image_components(
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    anomaly_index: int = 13,
    ignore_index: int = 255,
    min_prediction_size: int = 500,
    min_anomaly_size: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """``(sIoU of every ground-truth component, precision of every predicted component)`` of one image.

    Args:
        scores: ``[H, W]`` anomaly scores (higher = more anomalous).
        labels: ``[H, W]`` labels: ``anomaly_index`` anomaly, ``ignore_index`` void, the rest normal.
        threshold: pixels with ``score > threshold`` are predicted anomalous.
        min_prediction_size, min_anomaly_size: the benchmark's size filters in pixels (its anomaly
            track: 500 and 100, at its evaluation resolution).
    """
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"expected [H, W] scores and labels of one shape, got {scores.shape} and {labels.shape}")
    void = labels == ignore_index
    truth, num_truth = ndimage.label(labels == anomaly_index, structure=_EIGHT_CONNECTED)
    predicted, num_predicted = ndimage.label((scores > threshold) & ~void, structure=_EIGHT_CONNECTED)

    predicted_sizes = np.bincount(predicted.ravel(), minlength=num_predicted + 1)
    small = predicted_sizes < min_prediction_size
    small[0] = False  # the background stays background (the benchmark sets it to 0: no change)
    predicted[small[predicted]] = 0
    truth_sizes = np.bincount(truth.ravel(), minlength=num_truth + 1)
    region = ~void & ~(truth_sizes < min_anomaly_size)[truth]  # small anomalies (or background) become void

    g, p = truth[region].astype(np.int64), predicted[region].astype(np.int64)
    # Contingency table over the region: table[k, j] pixels of ground-truth component k (0: none)
    # in predicted component j (0: none), on the components present.
    truth_ids, g = np.unique(g, return_inverse=True)
    predicted_ids, p = np.unique(p, return_inverse=True)
    table = np.bincount(g * len(predicted_ids) + p, minlength=len(truth_ids) * len(predicted_ids))
    table = table.reshape(len(truth_ids), len(predicted_ids)).astype(np.float64)
    gt_rows = np.flatnonzero(truth_ids > 0)
    pred_cols = np.flatnonzero(predicted_ids > 0)
    sizes = table.sum(axis=0)  # predicted component sizes in the region (column 0: unpredicted)
    on_background = table[truth_ids == 0].sum(axis=0)  # predicted pixels on no anomaly

    pred_sizes = sizes[pred_cols]
    on_anomalies = pred_sizes - on_background[pred_cols]  # each prediction's pixels on any anomaly
    rows = table[gt_rows][:, pred_cols]  # [anomalies, predictions]
    touching = rows > 0
    intersection = rows.sum(axis=1)
    # |P(k)| + |k| - |k ∩ P(k)| - |P(k) ∩ other anomalies|, with the last term the touching
    # predictions' pixels on anomalies other than k
    union = (
        (touching * pred_sizes).sum(axis=1)
        + table[gt_rows].sum(axis=1)
        - intersection
        - (touching * (on_anomalies - rows)).sum(axis=1)
    )
    return intersection / union, on_anomalies / pred_sizes


def component_counts(
    siou: np.ndarray, precision: np.ndarray, siou_thresholds: tuple[float, ...] = SIOU_THRESHOLDS
) -> dict[str, np.ndarray | float | int]:
    """One image's (or a split's) summable component statistics: TP/FN/FP per sIoU threshold,
    the sums and counts behind the mean sIoU and PPV."""
    thresholds = np.asarray(siou_thresholds, dtype=np.float64)
    return {
        "tp": (siou[None, :] >= thresholds[:, None]).sum(axis=1),
        "fn": (siou[None, :] < thresholds[:, None]).sum(axis=1),
        "fp": (precision[None, :] < thresholds[:, None]).sum(axis=1),
        "siou_sum": float(siou.sum()),
        "num_anomalies": int(siou.size),
        "precision_sum": float(precision.sum()),
        "num_predicted": int(precision.size),
    }

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

from typing import NamedTuple

import numpy as np
from scipy import ndimage

__all__ = [
    "SIOU_THRESHOLDS",
    "ImageComponents",
    "component_counts",
    "image_component_table",
    "image_components",
    "label_anomalies",
]

#: The benchmark's sIoU thresholds.
SIOU_THRESHOLDS = tuple(float(t) for t in np.linspace(0.25, 0.75, 11))
_EIGHT_CONNECTED = np.ones((3, 3), dtype=np.uint8)


class ImageComponents(NamedTuple):
    """The components of one image at one threshold (see :func:`image_component_table`)."""

    #: sIoU of every ground-truth component kept (in label order of ``truth``).
    siou: np.ndarray
    #: Precision of every predicted component kept.
    precision: np.ndarray
    #: Pixel count of every ground-truth component kept (its area at evaluation resolution).
    truth_sizes: np.ndarray
    #: Label of every ground-truth component kept in ``truth``.
    truth_ids: np.ndarray
    #: ``[H, W]`` ground-truth component labels (0: no anomaly).
    truth: np.ndarray


def label_anomalies(labels: np.ndarray, anomaly_index: int = 13) -> tuple[np.ndarray, int]:
    """8-connected components of the anomaly pixels of ``labels``: ``(component labels, count)``."""
    return ndimage.label(labels == anomaly_index, structure=_EIGHT_CONNECTED)


def image_component_table(
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    anomaly_index: int = 13,
    ignore_index: int = 255,
    min_prediction_size: int = 500,
    min_anomaly_size: int = 100,
    truth: tuple[np.ndarray, int] | None = None,
) -> ImageComponents:
    """Every component of one image at ``threshold``: sIoU, precision and area (the rules above).

    Args:
        scores: ``[H, W]`` anomaly scores (higher = more anomalous).
        labels: ``[H, W]`` labels: ``anomaly_index`` anomaly, ``ignore_index`` void, the rest normal.
        threshold: pixels with ``score > threshold`` are predicted anomalous.
        min_prediction_size, min_anomaly_size: the benchmark's size filters in pixels (its anomaly
            track: 500 and 100, at its evaluation resolution).
        truth: ``label_anomalies(labels)`` when already computed (it does not depend on the threshold).
    """
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"expected [H, W] scores and labels of one shape, got {scores.shape} and {labels.shape}")
    void = labels == ignore_index
    truth_map, num_truth = truth if truth is not None else label_anomalies(labels, anomaly_index)
    predicted, num_predicted = ndimage.label((scores > threshold) & ~void, structure=_EIGHT_CONNECTED)
    # Only pixels on an anomaly or a prediction enter the table (the rest would only fill its
    # unused corner [0, 0]): every step below is linear in them, not in the image.
    where = np.flatnonzero((truth_map > 0) | (predicted > 0))
    g, p = truth_map.ravel()[where].astype(np.int64), predicted.ravel()[where].astype(np.int64)
    small_prediction = np.bincount(p, minlength=num_predicted + 1) < min_prediction_size
    small_prediction[0] = False  # the background stays background (the benchmark: no change)
    p[small_prediction[p]] = 0
    # Small anomalies become void; so does the background (all non-anomaly pixels, most of them
    # outside this selection) when it is smaller than the limit, as in the benchmark's loop.
    truth_sizes = np.bincount(g, minlength=num_truth + 1)
    truth_sizes[0] = labels.size - truth_sizes[1:].sum()
    small_truth = truth_sizes < min_anomaly_size
    keep = ~small_truth[g] & ~void.ravel()[where]
    g, p = g[keep], p[keep]
    # Contingency table over the region: table[k, j] pixels of ground-truth component k (0: none)
    # in predicted component j (0: none); rows and columns of components absent from it dropped.
    table = np.bincount(g * (num_predicted + 1) + p, minlength=(num_truth + 1) * (num_predicted + 1))
    table = table.reshape(num_truth + 1, num_predicted + 1).astype(np.float64)
    truth_ids = np.flatnonzero(table.sum(axis=1) > 0)
    truth_ids = truth_ids[truth_ids > 0]
    predicted_ids = np.flatnonzero(table.sum(axis=0) > 0)
    predicted_ids = predicted_ids[predicted_ids > 0]
    table = table[np.concatenate([[0], truth_ids])][:, np.concatenate([[0], predicted_ids])]
    gt_rows = np.arange(1, len(truth_ids) + 1)
    pred_cols = np.arange(1, len(predicted_ids) + 1)
    sizes = table.sum(axis=0)  # predicted component sizes in the region (column 0: unpredicted)
    on_background = table[0]  # predicted pixels on no anomaly

    pred_sizes = sizes[pred_cols]
    on_anomalies = pred_sizes - on_background[pred_cols]  # each prediction's pixels on any anomaly
    rows = table[gt_rows][:, pred_cols]  # [anomalies, predictions]
    touching = rows > 0
    intersection = rows.sum(axis=1)
    gt_sizes = table[gt_rows].sum(axis=1)
    # |P(k)| + |k| - |k ∩ P(k)| - |P(k) ∩ other anomalies|, with the last term the touching
    # predictions' pixels on anomalies other than k
    union = (
        (touching * pred_sizes).sum(axis=1) + gt_sizes - intersection - (touching * (on_anomalies - rows)).sum(axis=1)
    )
    return ImageComponents(
        siou=intersection / union,
        precision=on_anomalies / pred_sizes,
        truth_sizes=gt_sizes.astype(np.int64),
        truth_ids=truth_ids,
        truth=truth_map,
    )


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

    Arguments as :func:`image_component_table`, which also returns the components' areas.
    """
    table = image_component_table(
        scores, labels, threshold, anomaly_index, ignore_index, min_prediction_size, min_anomaly_size
    )
    return table.siou, table.precision


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

"""Reference computations the metric tests compare against, and checks of the references themselves.

Everything here is written from the definitions (scikit-learn for AP/AUROC, a float64
transcription of the StreetHazards reference code's ``fpr_and_fdr_at_recall`` for the per-image
FPR95), independently of the library's histogram and per-image code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from callbacks.metrics import AnomalyMetrics

ANOMALY, IGNORE = 13, 255


def sklearn_metrics(scores: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    """Pooled AP, AUROC, FPR at the first ROC point with TPR >= 0.95 and its threshold (float64)."""
    scores = scores.astype(np.float64)
    fpr, tpr, thresholds = roc_curve(positive, scores, drop_intermediate=False)
    first = int(np.argmax(tpr >= 0.95))
    return {
        "aupr": average_precision_score(positive, scores),
        "auroc": roc_auc_score(positive, scores),
        "fpr95": float(fpr[first]),
        "threshold95": float(thresholds[first]),
    }


def reference_fpr_at_recall(positive: np.ndarray, scores: np.ndarray, recall_level: float = 0.95) -> float:
    """The StreetHazards reference code's FPR at 95% recall, transcribed in float64.

    Scores sorted from high to low; the last index of each run of equal scores is a threshold;
    true/false positives are counted up to it; the curve is read from the first threshold with
    full recall back up to the highest threshold, a point with recall 1 and no false positive is
    appended, and the point whose recall is closest to ``recall_level`` (the first one in that
    order among equals) gives the FPR.
    """
    positive = positive.astype(bool)
    order = np.argsort(scores, kind="mergesort")[::-1]
    ranked_scores = scores[order].astype(np.float64)
    ranked_positive = positive[order]
    last_of_run = np.concatenate([np.flatnonzero(np.diff(ranked_scores)), [ranked_positive.size - 1]])
    true_pos = np.cumsum(ranked_positive, dtype=np.float64)[last_of_run]
    false_pos = 1 + last_of_run - true_pos
    recall = true_pos / true_pos[-1]
    full = int(np.searchsorted(true_pos, true_pos[-1]))
    recall = np.concatenate([recall[full::-1], [1.0]])
    false_pos = np.concatenate([false_pos[full::-1], [0.0]])
    pick = int(np.argmin(np.abs(recall - recall_level)))
    return float(false_pos[pick] / np.sum(~positive))


def reference_per_image(scores: np.ndarray, mask: np.ndarray) -> tuple[dict[str, float], int]:
    """Mean of the reference code's per-image AUROC, AP, FPR95 over images with both classes."""
    values = []
    for image_scores, image_mask in zip(scores, mask, strict=True):
        valid = image_mask != IGNORE
        positive = image_mask[valid] == ANOMALY
        if positive.all() or not positive.any():
            continue
        s = image_scores[valid].astype(np.float64)
        values.append(
            {
                "aupr": average_precision_score(positive, s),
                "auroc": roc_auc_score(positive, s),
                "fpr95": reference_fpr_at_recall(positive, s),
            }
        )
    means = {key: float(np.mean([v[key] for v in values])) if values else float("nan") for key in ("aupr", "auroc")}
    means["fpr95"] = float(np.mean([v["fpr95"] for v in values])) if values else float("nan")
    return means, len(values)


def make_mask(rng: np.random.Generator, positive: np.ndarray, ignore_fraction: float = 0.05) -> np.ndarray:
    """Labels: anomaly where ``positive``, random known classes elsewhere, some ignore pixels."""
    mask = np.where(positive, ANOMALY, rng.integers(0, 13, positive.shape))
    mask[rng.random(positive.shape) < ignore_fraction] = IGNORE
    return mask


def anomaly_blocks(rng: np.random.Generator, shape: tuple[int, int, int] = (6, 60, 80)) -> np.ndarray:
    """Rectangular anomaly blocks, one to three per image (some images get none)."""
    positive = np.zeros(shape, dtype=bool)
    images, height, width = shape
    for image in range(images):
        for _ in range(int(rng.integers(0 if image == images - 1 else 1, 4))):
            h, w = int(rng.integers(4, height // 2)), int(rng.integers(4, width // 2))
            top, left = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
            positive[image, top : top + h, left : left + w] = True
    return positive


def run_metric(scores: np.ndarray, mask: np.ndarray, batches: int = 1, **kwargs) -> tuple[dict, AnomalyMetrics]:
    metric = AnomalyMetrics(anomaly_index=ANOMALY, ignore_index=IGNORE, **kwargs)
    for part_scores, part_mask in zip(np.array_split(scores, batches), np.array_split(mask, batches), strict=True):
        metric.update(torch.from_numpy(part_scores), torch.from_numpy(part_mask))
    return metric.compute(), metric


def score_ordered_counts(metric: AnomalyMetrics) -> torch.Tensor:
    """``[2, bins]`` counts in increasing score order (layout-independent view of a state)."""
    from callbacks.metrics.functional.histogram import score_order

    return metric.counts[:, score_order(metric.layout)]


# ------------------------------------------------------------------------------------------------
# The references themselves
# ------------------------------------------------------------------------------------------------
def test_reference_fpr_hand_computed_cases() -> None:
    # Recall 0.5 then 1.0 (first full recall at 0.7): 1.0 is closest; one negative above it.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    positive = np.array([1, 0, 1, 0, 0, 0], dtype=bool)
    assert reference_fpr_at_recall(positive, scores) == pytest.approx(1 / 4)
    # 20 positives: recall 19/20 = 0.95 exactly at the 19th; the plateau of negatives right below
    # it keeps recall 0.95, and the lowest threshold of that plateau wins (FP = 3, not 0).
    scores = np.concatenate([np.arange(40.0, 21.0, -1.0), [20.5, 20.4, 20.3], [10.0], np.arange(9.0, 0.0, -1.0)])
    positive = np.zeros(scores.size, dtype=bool)
    positive[:19] = True
    positive[22] = True
    assert positive.sum() == 20
    assert reference_fpr_at_recall(positive, scores) == pytest.approx(3 / (scores.size - 20))
    # Recall 0.94 (plateau ending with FP 1) and 0.96 (a positive tied with a negative: FP 2) are
    # equally far from 0.95 in float64; the lower threshold (0.96) wins.
    assert abs(47 / 50 - 0.95) == abs(48 / 50 - 0.95)
    scores = np.concatenate([np.arange(100.0, 53.0, -1.0), [53.0, 52.0, 52.0, 51.0, 50.0], np.arange(49.0, 44.0, -1.0)])
    positive = np.array([True] * 47 + [False, True, False, True, True] + [False] * 5)
    assert positive.sum() == 50 and scores.size == 57
    assert reference_fpr_at_recall(positive, scores) == pytest.approx(2 / 7)


def test_reference_per_image_skips_images_without_both_classes() -> None:
    scores = np.random.default_rng(0).normal(size=(3, 4, 4))
    mask = np.zeros((3, 4, 4), dtype=np.int64)
    mask[0, 0] = ANOMALY
    mask[1] = ANOMALY
    _, count = reference_per_image(scores, mask)
    assert count == 1

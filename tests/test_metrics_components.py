"""Component-level metrics against a direct transcription of the SegmentMeIfYouCan rules.

The reference below follows the benchmark's per-image procedure step by step with boolean masks
and set membership (binarise, 8-connected components, size filters, region of interest, the
adjusted-union sIoU per anomaly, the precision per prediction) and its aggregation over images;
it shares no code with the contingency-table implementation it checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from callbacks.metrics import ComponentMetrics
from callbacks.metrics.functional.components import SIOU_THRESHOLDS, image_components

ANOMALY, VOID = 13, 255


def reference_image(scores, labels, threshold, min_pred, min_gt):
    structure = np.ones((3, 3))
    predicted_mask = (scores > threshold) & (labels != VOID)
    truth, n_truth = ndimage.label(labels == ANOMALY, structure)
    predicted, n_pred = ndimage.label(predicted_mask, structure)
    for comp in range(1, n_pred + 1):
        if (predicted == comp).sum() < min_pred:
            predicted[predicted == comp] = 0
    edited = labels.copy()
    for comp in range(n_truth + 1):
        if (truth == comp).sum() < min_gt:
            edited[truth == comp] = VOID
    roi = edited != VOID
    g, p = truth[roi], predicted[roi]
    siou = []
    for k in np.unique(g[g > 0]):
        under = np.unique(p[(g == k) & (p > 0)])
        intersection = np.sum((g == k) & np.isin(p, under))
        others = np.sum(~np.isin(g, [0, k]) & np.isin(p, under))
        union = np.sum(np.isin(p, under)) + np.sum(g == k) - intersection - others
        siou.append(intersection / union)
    precision = []
    for j in np.unique(p[p > 0]):
        precision.append(np.sum((p == j) & (g > 0)) / np.sum(p == j))
    return np.array(siou), np.array(precision)


def random_scene(rng: np.random.Generator, shape=(48, 64)):
    """Labels with several anomaly blobs (some touching, some tiny), void strips, and noisy scores
    that follow the anomalies loosely, so predictions split, merge and spill over."""
    labels = rng.integers(0, 5, shape)
    for _ in range(rng.integers(1, 6)):
        r, c = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        h, w = rng.integers(1, 14), rng.integers(1, 14)
        labels[r : r + h, c : c + w] = ANOMALY
    labels[rng.integers(0, shape[0]), :] = VOID
    labels[:, rng.integers(0, shape[1])] = VOID
    scores = ndimage.gaussian_filter((labels == ANOMALY).astype(float), 1.5) + rng.normal(0, 0.15, shape)
    return scores.astype(np.float32), labels


@pytest.mark.parametrize("seed", range(12))
def test_image_components_match_the_benchmark_rules(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores, labels = random_scene(rng)
    for threshold in (0.2, 0.35, 0.5):
        for min_pred, min_gt in ((1, 1), (6, 4), (30, 20)):
            siou, precision = image_components(scores, labels, threshold, ANOMALY, VOID, min_pred, min_gt)
            ref_siou, ref_precision = reference_image(scores, labels, threshold, min_pred, min_gt)
            np.testing.assert_allclose(siou, ref_siou, rtol=0, atol=1e-12)
            np.testing.assert_allclose(precision, ref_precision, rtol=0, atol=1e-12)


def test_adjusted_union_ignores_predictions_on_other_anomalies() -> None:
    labels = np.zeros((5, 12), dtype=np.int64)
    labels[1:4, 1:4] = ANOMALY  # A: 9 pixels
    labels[1:4, 6:9] = ANOMALY  # B: 9 pixels, separated by two normal columns
    scores = np.zeros((5, 12))
    scores[1:4, 1:9] = 1.0  # one predicted component over A, the gap (6 px) and B
    siou, precision = image_components(scores, labels, 0.5, min_prediction_size=1, min_anomaly_size=1)
    # For A: intersection 9, union 24 + 9 - 9 - 9 (B's pixels do not count against A) = 15
    np.testing.assert_allclose(siou, [9 / 15, 9 / 15])
    np.testing.assert_allclose(precision, [18 / 24])


def test_size_filters_and_void() -> None:
    labels = np.zeros((8, 8), dtype=np.int64)
    labels[0:2, 0:2] = ANOMALY  # 4 pixels: below min_anomaly_size 5, becomes void
    labels[4:8, 4:8] = ANOMALY  # 16 pixels
    labels[:, 3] = VOID
    scores = np.zeros((8, 8))
    scores[0:2, 0:3] = 1.0  # on the small anomaly and a normal pixel: 6 pixels, 2 on void after filtering
    scores[4:8, 4:8] = 1.0
    scores[6, 0] = 1.0  # a 1-pixel prediction: dropped by min_prediction_size 2
    siou, precision = image_components(scores, labels, 0.5, min_prediction_size=2, min_anomaly_size=5)
    ref = reference_image(scores, labels, 0.5, 2, 5)
    np.testing.assert_allclose(siou, ref[0])
    np.testing.assert_allclose(precision, ref[1])
    assert siou.tolist() == [1.0] and sorted(precision.tolist()) == [0.0, 1.0]


def test_metric_aggregates_like_the_benchmark_and_merges_exactly() -> None:
    rng = np.random.default_rng(7)
    scenes = [random_scene(rng) for _ in range(6)]
    thresholds = [0.2, 0.4]
    metric = ComponentMetrics(thresholds, min_prediction_size=5, min_anomaly_size=3)
    halves = [ComponentMetrics(thresholds, min_prediction_size=5, min_anomaly_size=3) for _ in range(2)]
    for i, (scores, labels) in enumerate(scenes):
        batch = torch.from_numpy(scores)[None], torch.from_numpy(labels)[None]
        metric.update(*batch)
        halves[i % 2].update(*batch)
    results = metric.compute()
    assert [r["threshold"] for r in results] == thresholds
    for result, threshold in zip(results, thresholds, strict=True):
        per_image = [reference_image(s, lab, threshold, 5, 3) for s, lab in scenes]
        siou = np.concatenate([r[0] for r in per_image])
        precision = np.concatenate([r[1] for r in per_image])
        f1 = []
        for t in SIOU_THRESHOLDS:
            tp, fn, fp = (siou >= t).sum(), (siou < t).sum(), (precision < t).sum()
            f1.append(2 * tp / (2 * tp + fn + fp))
        assert result["sIoU_gt"] == pytest.approx(siou.mean(), abs=1e-12)
        assert result["PPV"] == pytest.approx(precision.mean(), abs=1e-12)
        assert result["F1_mean"] == pytest.approx(np.mean(f1), abs=1e-12)
        assert result["F1_50"] == pytest.approx(f1[5], abs=1e-12)
        assert result["TP_25"] + result["FN_25"] == siou.size == result["num_anomaly_components"]
    # Two processes' states summed (what torchmetrics' sync does) equal one pass over everything.
    halves[0].merge_state(halves[1])
    for merged, whole in zip(halves[0].compute(), results, strict=True):
        for key in ("TP_25", "FN_50", "FP_75", "num_predicted_components"):
            assert merged[key] == whole[key]
        assert merged["F1_mean"] == pytest.approx(whole["F1_mean"], abs=1e-12)


def test_no_anomaly_and_bad_options() -> None:
    metric = ComponentMetrics([0.5], min_prediction_size=1, min_anomaly_size=1)
    metric.update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    result = metric.compute()[0]
    assert np.isnan(result["sIoU_gt"]) and np.isnan(result["PPV"]) and np.isnan(result["F1_mean"])
    for bad in ({"thresholds": []}, {"thresholds": [float("nan")]}, {"thresholds": [0.5], "min_anomaly_size": -1},
                {"thresholds": [0.5], "siou_thresholds": [1.5]}):  # fmt: skip
        with pytest.raises(ValueError):
            ComponentMetrics(**bad)

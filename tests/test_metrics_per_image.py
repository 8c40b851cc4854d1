"""Per-image metrics follow the StreetHazards reference code (AP, AUROC, FPR95 of ``anom_utils.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_metrics_reference import (
    ANOMALY,
    IGNORE,
    anomaly_blocks,
    make_mask,
    reference_fpr_at_recall,
    reference_per_image,
    run_metric,
)

from callbacks.metrics.functional import per_image_metrics
from callbacks.metrics.functional.per_image import RECALL_LEVEL


def _random_images(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows with continuous scores, heavy ties, constant rows, tied signed zeros, tiny positive sets."""
    rng = np.random.default_rng(seed)
    rows, length = 24, 700
    scores = rng.normal(size=(rows, length)).astype(np.float32)
    positive = rng.random((rows, length)) < rng.uniform(0.01, 0.5, (rows, 1))
    scores += positive * rng.uniform(0.0, 2.0, (rows, 1)).astype(np.float32)
    scores[1] = np.round(scores[1] * 2)  # a few distinct values: ties everywhere
    scores[2] = np.round(scores[2] * 20) / 20  # many ties, plateaus of negatives
    scores[3] = 0.5  # constant
    scores[4, ::2], scores[4, 1::2] = -0.0, 0.0  # signed zeros tie
    positive[5] = False
    positive[5, :3] = True  # three positives: recall steps of 1/3
    positive[6] = False
    positive[6, :20] = True  # recall 19/20 = 0.95 exactly
    scores[6, :20] = np.linspace(10, 5, 20)
    positive[7] = False
    positive[7, :50] = True  # recall 47/50 and 48/50 equally far from 0.95 in float64
    scores[8] = rng.integers(0, 4, length)  # four distinct values
    valid = rng.random((rows, length)) < 0.9
    valid[9, :] = False
    valid[9, :10] = True  # ten valid pixels
    positive[10] = False  # no positives: unusable
    return scores, positive, valid


@pytest.mark.parametrize("implementation", ["numpy", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_image_metrics_equal_the_reference_code(implementation: str, seed: int) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores, positive, valid = _random_images(seed)
    result = per_image_metrics(
        torch.from_numpy(scores), torch.from_numpy(positive), torch.from_numpy(valid), implementation=implementation
    )
    for row in range(scores.shape[0]):
        s, y = scores[row][valid[row]].astype(np.float64), positive[row][valid[row]]
        if y.all() or not y.any():
            assert not result.usable[row] and np.isnan(result.fpr95[row].item())
            continue
        assert result.usable[row]
        assert result.aupr[row].item() == pytest.approx(average_precision_score(y, s), abs=1e-12), row
        assert result.auroc[row].item() == pytest.approx(roc_auc_score(y, s), abs=1e-12), row
        assert result.fpr95[row].item() == reference_fpr_at_recall(y, s), row


def test_numpy_and_torch_per_image_paths_agree_and_chunking_changes_nothing() -> None:
    scores, positive, valid = _random_images(3)
    inputs = (torch.from_numpy(scores), torch.from_numpy(positive), torch.from_numpy(valid))
    numpy_result = per_image_metrics(*inputs, implementation="numpy")
    torch_result = per_image_metrics(*inputs, implementation="torch")
    chunked = per_image_metrics(*inputs, chunk_pixels=1, implementation="numpy")
    for field in ("aupr", "auroc", "fpr95"):
        a, b, c = (getattr(r, field) for r in (numpy_result, torch_result, chunked))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15, equal_nan=True)
        torch.testing.assert_close(a, c, rtol=0, atol=0, equal_nan=True)


def test_reference_rule_differs_from_first_threshold_rule_where_documented() -> None:
    # 20 positives, 19 of them on top: recall exactly 0.95 before any negative (FP 0), followed by
    # a plateau of three negatives. The first threshold reaching 95% has FP 0; the reference rule
    # takes the lowest threshold of the plateau (FP 3).
    scores = np.concatenate([np.arange(40.0, 21.0, -1.0), [20.5, 20.4, 20.3], [10.0], np.arange(9.0, 0.0, -1.0)])
    positive = np.zeros(scores.size, dtype=bool)
    positive[:19] = True
    positive[22] = True
    result = per_image_metrics(
        torch.from_numpy(scores[None].astype(np.float32)),
        torch.from_numpy(positive[None]),
        torch.ones(1, scores.size, dtype=torch.bool),
    )
    assert result.fpr95.item() == pytest.approx(3 / 12) == reference_fpr_at_recall(positive, scores)
    assert RECALL_LEVEL == 0.95


def test_anomaly_metrics_per_image_protocol_matches_reference() -> None:
    rng = np.random.default_rng(20)
    positive = anomaly_blocks(rng, (8, 60, 80))
    scores = (np.round(rng.normal(size=positive.shape) * 8) / 8 + positive).astype(np.float32)  # ties
    mask = make_mask(rng, positive)
    mask[2] = np.where(rng.random(mask.shape[1:]) < 0.5, ANOMALY, IGNORE)  # anomaly + ignore only: skipped
    result, _ = run_metric(scores, mask, batches=3)
    expected, count = reference_per_image(scores, mask)
    assert result["num_images_per_image"] == count
    for key in ("aupr", "auroc", "fpr95"):
        assert result[f"{key}_per_image"] == pytest.approx(expected[key], abs=1e-12), key


def first_reaching_fpr95(scores: np.ndarray, positive: np.ndarray) -> float:
    """FPR at the first ROC point (scikit-learn's, from high to low threshold) whose TPR >= 0.95."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(positive, scores, drop_intermediate=False)
    return float(fpr[np.argmax(tpr >= RECALL_LEVEL)])


@pytest.mark.parametrize("implementation", ["numpy", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_image_first_reaching_fpr95_equals_the_first_roc_point(implementation: str, seed: int) -> None:
    scores, positive, valid = _random_images(seed)
    result = per_image_metrics(
        torch.from_numpy(scores), torch.from_numpy(positive), torch.from_numpy(valid), implementation=implementation
    )
    for row in range(scores.shape[0]):
        s, y = scores[row][valid[row]].astype(np.float64), positive[row][valid[row]]
        if y.all() or not y.any():
            assert np.isnan(result.fpr95_first[row].item())
            continue
        assert result.fpr95_first[row].item() == first_reaching_fpr95(s, y), row
    # The rules differ: the reference takes the lowest threshold of the closest recall (negatives
    # down to the next positive count), the first-reaching rule the highest reaching 0.95.
    assert (result.fpr95_first[result.usable] != result.fpr95[result.usable]).any()

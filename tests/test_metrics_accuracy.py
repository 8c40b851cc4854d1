"""Pooled ``AnomalyMetrics`` against scikit-learn on score distributions that concentrate mass, with error bounds.

Every case checks both promises: the values are within 1e-4 (AUPR, AUROC) and 1e-3 (FPR95) of
scikit-learn, and the exact values lie within the reported ``*_error_bound`` of them. Small
histograms (``num_bits=16``) make the bounds non-trivial, so that their rigour is tested too.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from test_metrics_reference import (
    ANOMALY,
    IGNORE,
    anomaly_blocks,
    make_mask,
    run_metric,
    sklearn_metrics,
)

from callbacks.metrics import AnomalyMetrics
from callbacks.metrics.functional import binary_metrics_from_counts, float_to_key

TOL_AREA, TOL_FPR = 1e-4, 1e-3
ROUNDING = 1e-12  # float64 sums on top of the bounds


def _u(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Exponent uniform in [0, 6]: 10**-u spans six decades."""
    return rng.uniform(0.0, 6.0, shape)


def _log_uniform(rng: np.random.Generator, positive: np.ndarray) -> np.ndarray:
    magnitude = 10.0 ** rng.uniform(-30, 30, positive.shape) * np.where(positive, 50.0, 1.0)
    sign = np.where(rng.random(positive.shape) < np.where(positive, 0.2, 0.5), -1.0, 1.0)
    return sign * magnitude


def _bf16(rng: np.random.Generator, positive: np.ndarray) -> np.ndarray:
    values = torch.from_numpy(rng.normal(0.0, 1.0, positive.shape) + positive)
    return values.to(torch.bfloat16).float().numpy()


def _saturated_softmax(rng: np.random.Generator, positive: np.ndarray) -> np.ndarray:
    """Max softmax probability of confident logits: most values are exactly 1.0 in float32."""
    margin = rng.normal(np.where(positive, 6.0, 14.0), 4.0).astype(np.float32)
    return (1.0 / (1.0 + np.exp(-margin, dtype=np.float32))).astype(np.float32)


# Score generators: (rng, positive mask) -> scores (cast to float32 by the tests), higher = more anomalous
# for the discriminative ones. The first block reproduces the families.
FAMILIES = {
    # confidence saturating towards 1: 1 - 10**-u
    "saturating_confidence": lambda rng, pos: 1.0 - 10.0 ** -(_u(rng, pos.shape) + 0.8 * pos),
    # negated confidence near -1
    "negated_confidence": lambda rng, pos: -(1.0 - 10.0 ** -(_u(rng, pos.shape) + 0.8 * ~pos)),
    # mass near 1 plus values below 0: the range crosses zero
    "near_one_and_below_zero": lambda rng, pos: np.where(
        rng.random(pos.shape) < np.where(pos, 0.8, 0.5),
        1.0 - 10.0 ** -_u(rng, pos.shape),
        -rng.exponential(1.0, pos.shape),
    ),
    # two tight clusters, near 0 and near 1
    "two_clusters_0_and_1": lambda rng, pos: np.where(
        rng.random(pos.shape) < np.where(pos, 0.7, 0.3), 1.0 - 10.0 ** -_u(rng, pos.shape), 10.0 ** -_u(rng, pos.shape)
    ),
    # other ways of concentrating mass
    "saturated_softmax": _saturated_softmax,
    "sigmoid_of_large_logits": lambda rng, pos: 1.0 / (1.0 + np.exp(-rng.normal(np.where(pos, 12.0, 8.0), 4.0))),
    "bf16_rounded": _bf16,
    "offset_1e4": lambda rng, pos: 1e4 + rng.normal(0.0, 1.0, pos.shape) + pos,
    "offset_1e6_tiny_steps": lambda rng, pos: 1e6 + 10.0 ** -_u(rng, pos.shape) * 64 * (1 + pos),
    "tiny_decades_near_zero": lambda rng, pos: 10.0 ** -(5 * _u(rng, pos.shape) - 2.0 * pos),
    "negative_offset_ties": lambda rng, pos: -3e5 + np.round(rng.normal(0.0, 2.0, pos.shape) + pos, 1),
    # the families of the original tests
    "normal_0_1": lambda rng, pos: rng.normal(0.0, 1.0, pos.shape) + 1.5 * pos,
    "normal_1e3_1e-2": lambda rng, pos: rng.normal(1e3, 1e-2, pos.shape) + 1.5e-2 * pos,
    "normal_-5_100": lambda rng, pos: rng.normal(-5.0, 100.0, pos.shape) + 150.0 * pos,
    "msp_like": lambda rng, pos: 1.0 - rng.beta(0.5, 20.0, pos.shape) * np.where(pos, 0.2, 1.0),
    "logit_like": lambda rng, pos: np.clip(rng.normal(5.0 + 10.0 * pos, 8.0), -20.0, 40.0),
    "log_uniform_1e-30_1e30": _log_uniform,
    "heavy_ties": lambda rng, pos: np.round(rng.normal(0.0, 1.0, pos.shape) + pos, 0) / 4.0,
}


def _case(name: str, layout: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(f"{name}/{layout}".encode()))
    if layout == "blocks":  # the setting: 6 images of 60x80 with anomaly blocks
        positive = anomaly_blocks(rng, (6, 60, 80))
    else:  # ~2e5 pixels, 2% scattered anomalies
        positive = rng.random((4, 192, 256)) < 0.02
    with np.errstate(over="ignore"):
        scores = np.asarray(FAMILIES[name](rng, positive)).astype(np.float32)
    return scores, make_mask(rng, positive)


def _check(result: dict, scores: np.ndarray, mask: np.ndarray, within_tolerance: bool) -> dict[str, float]:
    valid = mask != IGNORE
    expected = sklearn_metrics(scores[valid], mask[valid] == ANOMALY)
    errors = {key: abs(result[key] - expected[key]) for key in ("aupr", "auroc", "fpr95")}
    for key, error in errors.items():
        assert error <= result[f"{key}_error_bound"] + ROUNDING, (key, error, result[f"{key}_error_bound"])
    if within_tolerance:
        assert errors["aupr"] <= TOL_AREA and errors["auroc"] <= TOL_AREA and errors["fpr95"] <= TOL_FPR, errors
    # threshold95 reproduces the reported operating point exactly on the data.
    flagged = scores[valid] >= result["threshold95"]
    labels = mask[valid] == ANOMALY
    assert flagged[labels].mean() >= 0.95
    assert flagged[~labels].mean() == pytest.approx(result["fpr95"], abs=1e-12)
    assert result["threshold95"] <= expected["threshold95"]
    if result["fpr95_error_bound"] == 0:
        assert result["fpr95"] == pytest.approx(expected["fpr95"], abs=1e-15)
    return errors


@pytest.mark.parametrize("layout", ["blocks", "scattered"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_pooled_metrics_match_sklearn_with_bounds(name: str, layout: str) -> None:
    scores, mask = _case(name, layout)
    result, _ = run_metric(scores, mask, batches=3)
    _check(result, scores, mask, within_tolerance=True)
    for key in ("aupr", "auroc", "fpr95"):
        assert result[f"{key}_error_bound"] <= TOL_AREA, (key, result[f"{key}_error_bound"])


@pytest.mark.filterwarnings("ignore:.*leaves error bounds above")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_bounds_hold_with_a_small_histogram(name: str) -> None:
    """2**16 sub-bins for ~2e5 pixels spread over many coarse bins: merged bins, non-zero bounds."""
    scores, mask = _case(name, "scattered")
    for batches in (1, 4):
        result, _ = run_metric(scores, mask, batches=batches, num_bits=16)
        _check(result, scores, mask, within_tolerance=False)


def test_bounds_are_attained_when_positives_sit_above_negatives_inside_every_bin() -> None:
    """The worst case the bounds allow for: in every merged bin all positives score just above all negatives.

    In each of 2000 coarse bins, negatives at one float and positives at the next float up, and one
    more negative near the coarse bin's top: its sub-bins must span that range, so with 2**16
    sub-bins in all they are far wider than two floats and the pair shares one.
    """
    rng = np.random.default_rng(5)
    coarse = np.sort(rng.choice(np.arange(200, 65336), 2000, replace=False))
    base_keys = (coarse - 32768) * 65536 + 0x1000
    negatives = rng.integers(20, 80, coarse.size)
    positives = rng.integers(0, 40, coarse.size)
    keys = np.concatenate([np.repeat(base_keys, negatives), base_keys + 0xE000, np.repeat(base_keys + 1, positives)])
    labels = np.concatenate([np.zeros(negatives.sum() + coarse.size, bool), np.ones(positives.sum(), bool)])
    values = np.where(keys < 0, -(-keys).astype(np.int32).view(np.float32), keys.astype(np.int32).view(np.float32))
    scores, mask = values.astype(np.float32)[None, None, :], np.where(labels, ANOMALY, 0)[None, None, :]
    with pytest.warns(UserWarning, match="leaves error bounds above"):
        result, _ = run_metric(scores, mask, num_bits=16)
    errors = _check(result, scores, mask, within_tolerance=False)
    assert result["auroc_error_bound"] > 1e-4
    assert errors["auroc"] == pytest.approx(result["auroc_error_bound"], rel=1e-9)
    assert errors["fpr95"] == pytest.approx(result["fpr95_error_bound"], rel=1e-9)
    assert errors["aupr"] >= 0.5 * result["aupr_error_bound"]


@pytest.mark.slow
def test_1e8_pixels_streamed_in_image_chunks_stay_accurate_in_fixed_memory() -> None:
    """1e8 pixels of the most concentrated family (confidence saturating towards 1), 720x1280 chunks.

    The stream is drawn from a population of 2**24 scored pixels (so the exact metrics follow from
    how often each population pixel was drawn, without keeping 1e8 scores); the population itself
    comes from the family and holds about 1.2e6 distinct float32 scores, most within 1e-4 of 1.
    """
    rng = np.random.default_rng(2024)
    population = 1 << 24
    positive = rng.random(population) < 0.05
    scores = (1.0 - 10.0 ** -(_u(rng, (population,)) + 0.8 * positive)).astype(np.float32)
    distinct, group = np.unique(float_to_key(torch.from_numpy(scores)).numpy(), return_inverse=True)
    drawn = np.zeros(population, dtype=np.int64)

    height, width = 720, 1280
    target = 100_000_000
    metric = AnomalyMetrics(anomaly_index=1, ignore_index=255)
    state_bytes = sum(getattr(metric, name).numel() * getattr(metric, name).element_size() for name in metric._defaults)
    seen, picks = 0, []
    while seen < target:
        pick = rng.integers(0, population, height * width)
        picks.append(pick)
        if len(picks) == 16 or seen + height * width >= target:
            # one bincount per 16 chunks: each allocates and adds 2**24 counters
            drawn += np.bincount(np.concatenate(picks), minlength=population)
            picks = []
        chunk_scores = torch.from_numpy(scores[pick].reshape(1, height, width))
        chunk_mask = torch.from_numpy(positive[pick].astype(np.int64).reshape(1, height, width))
        metric.update(chunk_scores, chunk_mask)
        seen += height * width
    after_bytes = sum(getattr(metric, name).numel() * getattr(metric, name).element_size() for name in metric._defaults)
    assert after_bytes == state_bytes  # nothing grows with the pixels

    result = metric.compute()
    neg = np.bincount(group, weights=drawn * ~positive, minlength=distinct.size).astype(np.int64)
    pos = np.bincount(group, weights=drawn * positive, minlength=distinct.size).astype(np.int64)
    assert neg.sum() + pos.sum() == seen == result["num_valid_pixels"]
    exact = binary_metrics_from_counts(torch.from_numpy(neg), torch.from_numpy(pos))
    for key, tolerance in (("aupr", TOL_AREA), ("auroc", TOL_AREA), ("fpr95", TOL_FPR)):
        error = abs(result[key] - float(exact[key]))
        assert error <= result[f"{key}_error_bound"] + ROUNDING, (key, error, result[f"{key}_error_bound"])
        assert error <= tolerance, (key, error)
        assert result[f"{key}_error_bound"] <= TOL_AREA, (key, result[f"{key}_error_bound"])

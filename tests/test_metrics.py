"""Streaming anomaly and segmentation metrics against scikit-learn and direct NumPy computations."""

from __future__ import annotations

import functools
import resource
import warnings
import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from callbacks.metrics import AnomalyMetrics, SegmentationMetrics, anomaly
from callbacks.metrics.functional import (
    KEY_NEG_INF,
    KEY_POS_INF,
    BinLayout,
    _backend,
    accumulate_counts,
    bin_index,
    bin_layout,
    bin_lower_edge,
    binary_metrics_from_counts,
    fixed_layout,
    float_to_key,
    iou_from_confusion_matrix,
    key_to_float,
    per_image_metrics,
    rebin_counts,
)
from callbacks.metrics.functional import keys as key_module

ANOMALY, IGNORE = 13, 255
TOL_AREA, TOL_FPR, TOL_EXACT = 1e-4, 1e-3, 1e-6


# ------------------------------------------------------------------------------------------------
# References written from the definitions
# ------------------------------------------------------------------------------------------------
def sklearn_metrics(scores: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    """AP, AUROC, FPR at the first ROC point with TPR >= 0.95 and its threshold (float64 input)."""
    scores = scores.astype(np.float64)
    fpr, tpr, thresholds = roc_curve(positive, scores, drop_intermediate=False)
    first = int(np.argmax(tpr >= 0.95))
    return {
        "aupr": average_precision_score(positive, scores),
        "auroc": roc_auc_score(positive, scores),
        "fpr95": float(fpr[first]),
        "threshold95": float(thresholds[first]),
    }


def sklearn_per_image(scores: np.ndarray, mask: np.ndarray) -> tuple[dict[str, float], int]:
    """Mean of the per-image scikit-learn metrics over images with positives and negatives."""
    values = []
    for image_scores, image_mask in zip(scores, mask, strict=True):
        valid = image_mask != IGNORE
        positive = image_mask[valid] == ANOMALY
        if positive.all() or not positive.any():
            continue
        values.append(sklearn_metrics(image_scores[valid], positive))
    means = {key: float(np.mean([v[key] for v in values])) for key in ("aupr", "auroc", "fpr95")}
    return means, len(values)


def make_mask(rng: np.random.Generator, positive: np.ndarray, ignore_fraction: float = 0.05) -> np.ndarray:
    """Labels: anomaly where ``positive``, random known classes elsewhere, some ignore pixels."""
    mask = np.where(positive, ANOMALY, rng.integers(0, 13, positive.shape))
    mask[rng.random(positive.shape) < ignore_fraction] = IGNORE
    return mask


def run_metric(scores: np.ndarray, mask: np.ndarray, batches: int = 1, **kwargs) -> tuple[dict, AnomalyMetrics]:
    metric = AnomalyMetrics(anomaly_index=ANOMALY, ignore_index=IGNORE, **kwargs)
    for part_scores, part_mask in zip(np.array_split(scores, batches), np.array_split(mask, batches), strict=True):
        metric.update(torch.from_numpy(part_scores), torch.from_numpy(part_mask))
    return metric.compute(), metric


# Score generators: (positive mask) -> float32 scores of the same shape, higher = more anomalous.
def _log_uniform(rng: np.random.Generator, positive: np.ndarray) -> np.ndarray:
    magnitude = 10.0 ** rng.uniform(-30, 30, positive.shape) * np.where(positive, 50.0, 1.0)
    sign = np.where(rng.random(positive.shape) < np.where(positive, 0.2, 0.5), -1.0, 1.0)
    return sign * magnitude


DISTRIBUTIONS = {
    "normal_0_1": lambda rng, pos: rng.normal(0.0, 1.0, pos.shape) + 1.5 * pos,
    "normal_1e3_1e-2": lambda rng, pos: rng.normal(1e3, 1e-2, pos.shape) + 1.5e-2 * pos,
    "normal_-5_100": lambda rng, pos: rng.normal(-5.0, 100.0, pos.shape) + 150.0 * pos,
    "msp_like": lambda rng, pos: 1.0 - rng.beta(0.5, 20.0, pos.shape) * np.where(pos, 0.2, 1.0),
    "logit_like": lambda rng, pos: np.clip(rng.normal(5.0 + 10.0 * pos, 8.0), -20.0, 40.0),
    "log_uniform_1e-30_1e30": _log_uniform,
    "heavy_ties": lambda rng, pos: np.round(rng.normal(0.0, 1.0, pos.shape) + pos, 0) / 4.0,
}


# ------------------------------------------------------------------------------------------------
# AnomalyMetrics against scikit-learn
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
@pytest.mark.parametrize("anomaly_rate", [0.02, 0.2])
def test_pooled_and_per_image_match_sklearn(name: str, anomaly_rate: float) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{name}/{anomaly_rate}".encode()))
    shape = (4, 192, 256)  # ~2e5 pixels
    positive = rng.random(shape) < anomaly_rate
    scores = DISTRIBUTIONS[name](rng, positive).astype(np.float32)
    mask = make_mask(rng, positive)
    result, metric = run_metric(scores, mask, batches=2)

    valid = mask != IGNORE
    expected = sklearn_metrics(scores[valid], mask[valid] == ANOMALY)
    assert result["aupr"] == pytest.approx(expected["aupr"], abs=TOL_AREA)
    assert result["auroc"] == pytest.approx(expected["auroc"], abs=TOL_AREA)
    assert result["fpr95"] == pytest.approx(expected["fpr95"], abs=TOL_FPR)

    # threshold95 reproduces the reported operating point exactly on the data ...
    flagged = scores[valid] >= result["threshold95"]
    labels = mask[valid] == ANOMALY
    assert flagged[labels].mean() >= 0.95
    assert flagged[~labels].mean() == pytest.approx(result["fpr95"], abs=1e-12)
    # ... and lies within one bin below scikit-learn's (an observed score).
    layout = metric.layout
    assert result["threshold95"] <= expected["threshold95"]
    gap = abs(expected["threshold95"] - result["threshold95"])
    assert gap <= layout.max_relative_width * abs(expected["threshold95"]) + 1e-38

    per_image, count = sklearn_per_image(scores, mask)
    assert result["num_images_per_image"] == count == 4
    for key in ("aupr", "auroc", "fpr95"):
        assert result[f"{key}_per_image"] == pytest.approx(per_image[key], abs=TOL_EXACT)

    assert result["num_valid_pixels"] == valid.sum()
    assert result["anomaly_fraction"] == pytest.approx(labels.mean(), rel=1e-12)


def test_narrow_distribution_is_binned_at_full_float32_resolution() -> None:
    rng = np.random.default_rng(1)
    positive = rng.random((2, 128, 128)) < 0.1
    scores = (rng.normal(1e3, 1e-2, positive.shape) + 1e-2 * positive).astype(np.float32)
    mask = make_mask(rng, positive)
    result, metric = run_metric(scores, mask)
    assert metric.layout.shift == 0  # one bin per float32 value: exact
    valid = mask != IGNORE
    expected = sklearn_metrics(scores[valid], mask[valid] == ANOMALY)
    for key in ("aupr", "auroc", "fpr95", "threshold95"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12)


def test_constant_scores() -> None:
    rng = np.random.default_rng(2)
    positive = rng.random((3, 64, 64)) < 0.1
    mask = make_mask(rng, positive)
    scores = np.full(positive.shape, 0.75, dtype=np.float32)
    result, _ = run_metric(scores, mask)
    labels = mask[mask != IGNORE] == ANOMALY
    assert result["aupr"] == pytest.approx(labels.mean(), abs=1e-12)
    assert result["auroc"] == 0.5
    assert result["fpr95"] == 1.0
    assert result["threshold95"] == 0.75
    assert result["aupr_per_image"] == pytest.approx(sklearn_per_image(scores, mask)[0]["aupr"], abs=1e-12)
    assert result["auroc_per_image"] == 0.5


def test_image_without_anomaly_is_skipped_by_per_image_protocol() -> None:
    rng = np.random.default_rng(3)
    shape = (4, 96, 96)
    positive = rng.random(shape) < 0.05
    positive[1] = False  # no anomaly: skipped
    mask = make_mask(rng, positive)
    mask[2] = np.where(rng.random(shape[1:]) < 0.5, ANOMALY, IGNORE)  # only anomaly + ignore: skipped
    mask[3, :10] = IGNORE
    scores = (rng.normal(size=shape) + positive).astype(np.float32)
    result, _ = run_metric(scores, mask)
    expected, count = sklearn_per_image(scores, mask)
    assert count == 2 and result["num_images_per_image"] == 2
    for key in ("aupr", "auroc", "fpr95"):
        assert result[f"{key}_per_image"] == pytest.approx(expected[key], abs=TOL_EXACT)


def test_streaming_equals_one_update() -> None:
    rng = np.random.default_rng(4)
    shape = (6, 64, 80)
    positive = rng.random(shape) < 0.1
    # Widening ranges across batches force re-binning: narrow first, then wide.
    scale = np.array([1e-3, 1e-3, 1.0, 10.0, 1e6, 1e-2])[:, None, None]
    scores = ((rng.normal(size=shape) + positive) * scale).astype(np.float32)
    mask = make_mask(rng, positive)
    single, single_metric = run_metric(scores, mask, num_bits=14)
    streamed, streamed_metric = run_metric(scores, mask, batches=6, num_bits=14)
    assert torch.equal(single_metric.counts, streamed_metric.counts)
    assert int(single_metric.key_min) == int(streamed_metric.key_min)
    for key, value in single.items():
        assert streamed[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key

    # forward() and merge_state() accumulate through _reduce_states: same counts.
    forwarded = AnomalyMetrics(num_bits=14)
    for i in range(shape[0]):
        batch_result = forwarded(torch.from_numpy(scores[i : i + 1]), torch.from_numpy(mask[i : i + 1]))
        assert set(batch_result) == set(single)
    assert torch.equal(forwarded.counts, single_metric.counts)
    first, second = AnomalyMetrics(num_bits=14), AnomalyMetrics(num_bits=14)
    first.update(torch.from_numpy(scores[4:]), torch.from_numpy(mask[4:]))
    second.update(torch.from_numpy(scores[:4]), torch.from_numpy(mask[:4]))
    first.merge_state(second)
    assert torch.equal(first.counts, single_metric.counts)
    assert first.compute()["aupr_per_image"] == pytest.approx(single["aupr_per_image"], abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_are_upcast_exactly(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(5)
    positive = rng.random((3, 96, 96)) < 0.1
    scores = torch.from_numpy(rng.normal(size=positive.shape) + positive).to(dtype)
    mask = torch.from_numpy(make_mask(rng, positive))
    metric = AnomalyMetrics()
    metric.update(scores, mask)
    result = metric.compute()
    upcast = scores.float().numpy()
    valid = mask.numpy() != IGNORE
    expected = sklearn_metrics(upcast[valid], mask.numpy()[valid] == ANOMALY)
    # Half-precision values are far coarser than the bins: every bin holds one value, exact.
    for key in ("aupr", "auroc", "fpr95"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12)
    per_image, _ = sklearn_per_image(upcast, mask.numpy())
    assert result["aupr_per_image"] == pytest.approx(per_image["aupr"], abs=TOL_EXACT)


def test_nan_scores_raise_and_leave_state_untouched() -> None:
    scores = torch.randn(2, 16, 16)
    mask = torch.zeros(2, 16, 16, dtype=torch.long)
    mask[:, :4] = ANOMALY
    metric = AnomalyMetrics(num_bits=12)
    metric.update(scores, mask)
    before = metric.counts.clone()
    bad = scores.clone()
    bad[0, 5, :3] = float("nan")
    with pytest.raises(ValueError, match="anomaly scores contain 3 NaN values"):
        metric.update(bad, mask)
    assert torch.equal(metric.counts, before)
    # NaN on ignored pixels is not evaluated and therefore fine.
    ignored = mask.clone()
    ignored[0, 5, :3] = IGNORE
    metric.update(bad, ignored)


def test_infinite_and_extreme_scores_are_ordered() -> None:
    rng = np.random.default_rng(6)
    positive = rng.random((2, 64, 64)) < 0.2
    scores = (rng.normal(size=positive.shape) * 1e29).astype(np.float32)
    scores[positive & (rng.random(positive.shape) < 0.3)] = np.inf
    scores[~positive & (rng.random(positive.shape) < 0.05)] = -np.inf
    scores.flat[:5] = [1e30, -1e30, 0.0, -0.0, 1e-45]
    mask = make_mask(rng, positive)
    result, _ = run_metric(scores, mask)
    valid = mask != IGNORE
    # scikit-learn refuses infinities; replacing them by the float64 extremes keeps the order.
    wide = scores.astype(np.float64)
    finite = np.where(np.isposinf(wide), 1e300, np.where(np.isneginf(wide), -1e300, wide))
    expected = sklearn_metrics(finite[valid], mask[valid] == ANOMALY)
    for key in ("aupr", "auroc"):
        assert result[key] == pytest.approx(expected[key], abs=TOL_AREA)
    assert result["fpr95"] == pytest.approx(expected["fpr95"], abs=TOL_FPR)
    per_image, _ = sklearn_per_image(finite, mask)
    assert result["auroc_per_image"] == pytest.approx(per_image["auroc"], abs=TOL_EXACT)


@pytest.mark.filterwarnings("ignore:.*per-image metrics are undefined")
@pytest.mark.filterwarnings("ignore:.*was called before the ``update`` method")
def test_no_positives_no_negatives_and_empty_give_nan_with_warning() -> None:
    scores = torch.randn(2, 8, 8)
    normal = torch.zeros(2, 8, 8, dtype=torch.long)

    metric = AnomalyMetrics(num_bits=10)
    metric.update(scores, normal)
    with pytest.warns(UserWarning, match="no anomaly pixels"):
        result = metric.compute()
    for key in ("aupr", "auroc", "fpr95", "threshold95", "aupr_per_image", "fpr95_per_image"):
        assert np.isnan(result[key]), key
    assert result["anomaly_fraction"] == 0.0 and result["num_valid_pixels"] == 128
    assert result["num_images_per_image"] == 0

    metric = AnomalyMetrics(num_bits=10)
    metric.update(scores, torch.full_like(normal, ANOMALY))
    with pytest.warns(UserWarning, match="every valid pixel is an anomaly"):
        result = metric.compute()
    assert result["aupr"] == 1.0  # scikit-learn's value without negatives
    assert np.isnan(result["auroc"]) and np.isnan(result["fpr95"])
    assert np.isfinite(result["threshold95"])

    metric = AnomalyMetrics(num_bits=10)
    with pytest.warns(UserWarning, match="no valid pixels"):
        result = metric.compute()
    assert all(np.isnan(result[key]) for key in ("aupr", "auroc", "fpr95", "anomaly_fraction"))
    assert result["num_valid_pixels"] == 0

    metric = AnomalyMetrics(num_bits=10)
    metric.update(scores, torch.full_like(normal, IGNORE))
    with pytest.warns(UserWarning, match="no valid pixels"):
        assert np.isnan(metric.compute()["aupr"])


def test_input_validation() -> None:
    metric = AnomalyMetrics(num_bits=10)
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.randn(2, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point"):
        metric.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="must differ"):
        AnomalyMetrics(anomaly_index=3, ignore_index=3)


def test_curves_and_tensorboard_counts() -> None:
    rng = np.random.default_rng(7)
    positive = rng.random((2, 128, 128)) < 0.1
    scores = (rng.normal(size=positive.shape) + 2 * positive).astype(np.float32)
    mask = make_mask(rng, positive)
    _, metric = run_metric(scores, mask)
    valid = mask != IGNORE
    labels = mask[valid] == ANOMALY
    values = scores[valid]

    curves = metric.curves(max_points=200)
    assert set(curves) == {"thresholds", "tpr", "fpr", "precision", "recall"}
    assert 100 <= len(curves["tpr"]) <= 200
    assert curves["thresholds"][0] == np.inf and curves["tpr"][0] == 0 and curves["precision"][0] == 1
    assert np.all(np.diff(curves["thresholds"]) < 0)
    assert np.all(np.diff(curves["tpr"]) >= 0) and np.all(np.diff(curves["fpr"]) >= 0)
    assert curves["tpr"][-1] == 1.0 and curves["fpr"][-1] == 1.0
    # Every point is the exact operating point of "score >= threshold".
    for t, tpr, fpr, precision in list(
        zip(curves["thresholds"], curves["tpr"], curves["fpr"], curves["precision"], strict=True)
    )[1::17]:
        flagged = values >= t
        assert tpr == pytest.approx(flagged[labels].mean(), abs=1e-12)
        assert fpr == pytest.approx(flagged[~labels].mean(), abs=1e-12)
        assert precision == pytest.approx(labels[flagged].mean(), abs=1e-12)
    np.testing.assert_array_equal(curves["recall"], curves["tpr"])

    raw = metric.pr_curve_counts()
    assert raw["num_thresholds"] == len(raw["precision"]) <= 127
    tp, fp = raw["true_positive_counts"], raw["false_positive_counts"]
    assert np.all(np.diff(tp) <= 0) and np.all(np.diff(fp) <= 0)  # increasing thresholds
    np.testing.assert_array_equal(tp + raw["false_negative_counts"], labels.sum())
    np.testing.assert_array_equal(fp + raw["true_negative_counts"], (~labels).sum())
    np.testing.assert_allclose(raw["precision"], tp / (tp + fp))
    np.testing.assert_allclose(raw["recall"], tp / labels.sum())
    assert tp[0] == labels.sum()  # entry 0 flags everything

    # The dict is exactly add_pr_curve_raw's keyword arguments.
    from torch.utils.tensorboard.summary import pr_curve_raw

    pr_curve_raw(
        "pr",
        raw["true_positive_counts"],
        raw["false_positive_counts"],
        raw["true_negative_counts"],
        raw["false_negative_counts"],
        raw["precision"],
        raw["recall"],
        raw["num_thresholds"],
    )

    empty = AnomalyMetrics(num_bits=10)
    empty.update(torch.randn(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.warns(UserWarning, match="both anomaly and normal"):
        assert len(empty.curves()["tpr"]) == 0


def test_deterministic_mode_gives_identical_results_with_bounded_memory() -> None:
    rng = np.random.default_rng(8)
    positive = rng.random((4, 256, 256)) < 0.05
    scores = (rng.normal(size=positive.shape) + positive).astype(np.float32)
    mask = make_mask(rng, positive)
    reference, reference_metric = run_metric(scores, mask, batches=2)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        result, metric = run_metric(scores, mask, batches=2)
        segmentation = SegmentationMetrics(13)
        segmentation.update(torch.from_numpy(rng.integers(0, 13, mask.shape)), torch.from_numpy(mask))
        segmentation.compute()
    finally:
        torch.use_deterministic_algorithms(previous)
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert torch.equal(metric.counts, reference_metric.counts)
    assert result == reference
    # State (64 MiB) plus per-batch temporaries: nothing that scales with pixels x bins.
    assert rss_growth_mib < 1024


@pytest.mark.parametrize("counting", ["auto", "sort"])
def test_device_code_path_matches_cpu_fast_path(monkeypatch: pytest.MonkeyPatch, counting: str) -> None:
    """The torch-only code (what runs on CUDA) agrees with the NumPy fast path used on CPU.

    ``counting="sort"`` also routes the histogram through the sort-based counting used on CUDA
    under deterministic algorithms.
    """
    rng = np.random.default_rng(15)
    positive = rng.random((4, 96, 128)) < 0.05
    scores = (rng.normal(size=positive.shape) + positive).astype(np.float32)
    scores[0, 0, :4] = [-0.0, 0.0, np.inf, -np.inf]
    mask = make_mask(rng, positive)
    reference, reference_metric = run_metric(scores, mask, batches=2)

    monkeypatch.setattr(_backend, "NUMPY_ON_CPU", False)
    if counting == "sort":
        monkeypatch.setattr(anomaly, "accumulate_counts", functools.partial(accumulate_counts, method="sort"))
    result, metric = run_metric(scores, mask, batches=2)
    assert torch.equal(metric.counts, reference_metric.counts)
    for key, value in reference.items():
        assert result[key] == pytest.approx(value, abs=1e-15), key
    with pytest.raises(ValueError, match="1 NaN values"):
        metric.update(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[ANOMALY, 0]]))


# ------------------------------------------------------------------------------------------------
# Functional pieces
# ------------------------------------------------------------------------------------------------
def test_float_keys_preserve_order_and_invert() -> None:
    ordered = torch.tensor(
        [-np.inf, -3e38, -1e30, -1.0, -1e-38, -1e-45, 0.0, 1e-45, 1e-38, 1.0, 1e30, 3e38, np.inf],
        dtype=torch.float32,
    )
    keys = float_to_key(ordered)
    assert torch.all(keys[1:] > keys[:-1])
    assert keys[0] == KEY_NEG_INF and keys[-1] == KEY_POS_INF
    assert float_to_key(torch.tensor([-0.0])) == float_to_key(torch.tensor([0.0]))
    # Random bit patterns: order agrees with float comparison, keys invert exactly.
    bits = torch.randint(-(2**31), 2**31 - 1, (20000,), dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    values = values[~torch.isnan(values)]
    keys = float_to_key(values)
    order = torch.argsort(values.double())
    assert torch.all(keys[order][1:] >= keys[order][:-1])
    roundtrip = key_to_float(keys)
    assert torch.equal(roundtrip == 0, values == 0)
    nonzero = values != 0
    assert torch.equal(roundtrip[nonzero].view(torch.int32), values[nonzero].view(torch.int32))
    nan_keys = float_to_key(torch.tensor([float("nan"), -float("nan")]))
    assert ((nan_keys > KEY_POS_INF) | (nan_keys < KEY_NEG_INF)).all()
    # The torch implementation (used on CUDA) gives the same keys as the NumPy one.
    all_values = bits.view(torch.float32)
    assert torch.equal(key_module._float_to_key_array(all_values.clone()), float_to_key(all_values))


def test_bin_layout_is_minimal_and_rebinning_is_exact() -> None:
    rng = np.random.default_rng(9)
    for num_bits in (4, 8, 12):
        for _ in range(30):
            lo, hi = sorted(int(v) for v in rng.integers(KEY_NEG_INF, KEY_POS_INF, 2))
            layout = bin_layout(lo, hi, num_bits)
            assert (hi >> layout.shift) - (lo >> layout.shift) < layout.num_bins
            if layout.shift:
                shift = layout.shift - 1
                assert (hi >> shift) - (lo >> shift) >= layout.num_bins
            # Counts re-binned into a wider range equal counts binned directly in it.
            keys = torch.from_numpy(rng.integers(lo, hi + 1, 5000)).to(torch.int32)
            wider = bin_layout(
                max(lo - int(rng.integers(0, 2**30)), KEY_NEG_INF),
                min(hi + int(rng.integers(0, 2**30)), KEY_POS_INF),
                num_bits,
            )
            direct = torch.bincount(bin_index(keys, wider), minlength=wider.num_bins)
            binned = torch.bincount(bin_index(keys, layout), minlength=layout.num_bins)
            assert torch.equal(rebin_counts(binned.view(1, -1), layout, wider)[0], direct)
    # Same bin width, range moved down: a pure shift of the counts.
    keys = torch.arange(0, 101, dtype=torch.int32)
    narrow, moved = bin_layout(0, 100, 8), bin_layout(-50, 100, 8)
    assert narrow.shift == moved.shift == 0
    counts = torch.bincount(bin_index(keys, narrow), minlength=256)
    assert torch.equal(rebin_counts(counts, narrow, moved), torch.bincount(bin_index(keys, moved), minlength=256))

    layout = fixed_layout(10)  # covers every int32 key, NaN patterns included
    extremes = torch.tensor([-(2**31), KEY_NEG_INF, 0, KEY_POS_INF, 2**31 - 1], dtype=torch.int32)
    assert bin_index(extremes, layout).tolist() == [0, 1, 512, 1022, 1023]
    assert bin_layout(KEY_NEG_INF, KEY_POS_INF, 10).shift == layout.shift


def test_bin_lower_edge_separates_bins() -> None:
    rng = np.random.default_rng(10)
    values = torch.from_numpy((rng.normal(size=20000) * 10.0 ** rng.uniform(-20, 20, 20000)).astype(np.float32))
    keys = float_to_key(values)
    layout = bin_layout(int(keys.min()), int(keys.max()), 10)
    bins = bin_index(keys, layout)
    edges = bin_lower_edge(bins, layout)
    assert torch.all(values >= edges)
    below = bin_lower_edge(bins + 1, layout)  # next bin's edge lies above every value of this bin
    assert torch.all(values < below)
    layout = BinLayout(shift=8, offset=KEY_NEG_INF >> 8, num_bins=16)
    assert bin_lower_edge(torch.tensor([0]), layout).item() == -np.inf  # clamped, not NaN


def test_metrics_from_unit_bins_equal_sklearn_exactly() -> None:
    rng = np.random.default_rng(11)
    scores = rng.integers(0, 300, 20000)
    positive = rng.random(20000) < (scores / 600.0)
    neg = torch.bincount(torch.from_numpy(scores[~positive]), minlength=300)
    pos = torch.bincount(torch.from_numpy(scores[positive]), minlength=300)
    result = binary_metrics_from_counts(neg, pos)
    expected = sklearn_metrics(scores, positive)
    assert result["aupr"].item() == pytest.approx(expected["aupr"], abs=1e-12)
    assert result["auroc"].item() == pytest.approx(expected["auroc"], abs=1e-12)
    assert result["fpr95"].item() == pytest.approx(expected["fpr95"], abs=1e-12)
    assert result["index95"].item() == expected["threshold95"]


@pytest.mark.parametrize("implementation", ["numpy", "torch"])
def test_per_image_metrics_ties_and_ignored_pixels(implementation: str) -> None:
    rng = np.random.default_rng(12)
    scores = rng.normal(size=(7, 3000)).astype(np.float32)
    scores[1] = np.round(scores[1] * 2)  # heavy ties
    scores[2] = 0.5  # constant
    scores[3, ::2] = -0.0  # signed zeros tie with +0.0
    scores[3, 1::2] = 0.0
    positive = rng.random(scores.shape) < 0.1
    scores[4] += positive[4]
    valid = rng.random(scores.shape) < 0.8
    positive[5], positive[6, :50] = False, True  # no positives; only positives among valid pixels
    valid[6, 50:] = False
    inputs = (torch.from_numpy(scores), torch.from_numpy(positive), torch.from_numpy(valid))
    result = per_image_metrics(*inputs, implementation=implementation)
    assert result.usable.tolist() == [True] * 5 + [False, False]
    assert result.aupr[5:].isnan().all() and result.fpr95[5:].isnan().all()
    for row in range(5):
        expected = sklearn_metrics(scores[row][valid[row]], positive[row][valid[row]])
        assert result.aupr[row].item() == pytest.approx(expected["aupr"], abs=1e-12)
        assert result.auroc[row].item() == pytest.approx(expected["auroc"], abs=1e-12)
        assert result.fpr95[row].item() == pytest.approx(expected["fpr95"], abs=1e-12)
    chunked = per_image_metrics(*inputs, chunk_pixels=1, implementation=implementation)
    other = per_image_metrics(*inputs, implementation="torch" if implementation == "numpy" else "numpy")
    for field in ("aupr", "auroc", "fpr95"):
        torch.testing.assert_close(getattr(chunked, field), getattr(result, field), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(getattr(other, field), getattr(result, field), rtol=0, atol=1e-15, equal_nan=True)


@pytest.mark.parametrize("method", ["scatter", "bincount", "sort"])
def test_accumulate_counts_methods(method: str) -> None:
    rng = np.random.default_rng(13)
    index = rng.integers(0, 500, 10000)
    include = rng.random(10000) < 0.7
    counts = torch.full((500,), 3, dtype=torch.int64)
    accumulate_counts(counts, torch.from_numpy(index), torch.from_numpy(include), method=method)
    expected = np.bincount(index[include], minlength=500) + 3
    np.testing.assert_array_equal(counts.numpy(), expected)


# ------------------------------------------------------------------------------------------------
# SegmentationMetrics
# ------------------------------------------------------------------------------------------------
def numpy_confusion(preds: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    keep = (target != IGNORE) & (target != ANOMALY)
    matrix = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(matrix, (target[keep], preds[keep]), 1.0)
    return matrix


def test_segmentation_metrics_match_numpy() -> None:
    rng = np.random.default_rng(14)
    num_classes = 6
    target = rng.integers(0, num_classes, (3, 40, 50))
    target[rng.random(target.shape) < 0.1] = IGNORE
    target[rng.random(target.shape) < 0.05] = ANOMALY
    logits = rng.normal(size=(3, num_classes, 40, 50)).astype(np.float32)
    logits[:, 2] += 2 * (target == 2)  # make class 2 easy
    preds = logits.argmax(1)

    from_logits = SegmentationMetrics(num_classes)
    from_logits.update(torch.from_numpy(logits[:2]), torch.from_numpy(target[:2]))
    from_logits.update(torch.from_numpy(logits[2:]), torch.from_numpy(target[2:]))
    result = from_logits.compute()
    from_preds = SegmentationMetrics(num_classes)
    from_preds.update(torch.from_numpy(preds), torch.from_numpy(target))
    assert from_preds.compute() == result

    matrix = numpy_confusion(preds, target, num_classes)
    np.testing.assert_array_equal(np.array(result["confusion_matrix"]), matrix)
    np.testing.assert_array_equal(from_logits.confusion_matrix.numpy(), matrix)
    iou = np.diag(matrix) / (matrix.sum(0) + matrix.sum(1) - np.diag(matrix))
    np.testing.assert_allclose(result["iou"], iou, rtol=1e-12)
    assert result["miou"] == pytest.approx(iou.mean(), rel=1e-12)
    assert result["pixel_accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum(), rel=1e-12)


def test_segmentation_absent_class_is_nan_and_excluded() -> None:
    target = torch.tensor([[[0, 0, 1, 1], [IGNORE, ANOMALY, 1, 0]]])
    preds = torch.tensor([[[0, 1, 1, 1], [3, 3, 1, 0]]])  # class 3 only where excluded
    metric = SegmentationMetrics(4)
    metric.update(preds, target)
    result = metric.compute()
    # class 0: TP 2, row 3, column 2 -> 2/3; class 1: TP 3, row 3, column 4 -> 3/4; 2 and 3 absent.
    assert result["iou"][:2] == pytest.approx([2 / 3, 3 / 4])
    assert np.isnan(result["iou"][2]) and np.isnan(result["iou"][3])
    assert result["miou"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert result["pixel_accuracy"] == pytest.approx(5 / 6)
    direct = iou_from_confusion_matrix(metric.confusion_matrix)
    assert direct["miou"].item() == pytest.approx(result["miou"])


def test_segmentation_errors_and_empty() -> None:
    metric = SegmentationMetrics(3)
    with pytest.raises(ValueError, match="channels"):
        metric.update(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class indices"):
        metric.update(torch.randn(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    metric.update(torch.tensor([[[0, 5]]]), torch.tensor([[[0, 1]]]))
    with pytest.raises(ValueError, match="1 evaluated pixels had a label or prediction outside 0..2"):
        metric.compute()

    empty = SegmentationMetrics(3)
    empty.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), IGNORE))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = empty.compute()
    assert any("no evaluated pixels" in str(w.message) for w in caught)
    assert np.isnan(result["miou"]) and np.isnan(result["pixel_accuracy"])

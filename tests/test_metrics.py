"""``AnomalyMetrics`` and ``SegmentationMetrics`` behaviour, and the functional pieces, against direct computations.

Accuracy of the pooled metrics on many score distributions is in ``test_metrics_accuracy.py``,
the per-image protocol in ``test_metrics_per_image.py``, the histogram internals in
``test_metrics_histogram.py``, DDP in ``test_metrics_ddp.py``.
"""

from __future__ import annotations

import functools
import resource
import warnings

import numpy as np
import pytest
import torch
from test_metrics_reference import (
    ANOMALY,
    IGNORE,
    make_mask,
    reference_per_image,
    run_metric,
    score_ordered_counts,
    sklearn_metrics,
)

from callbacks.metrics import AnomalyMetrics, SegmentationMetrics, anomaly
from callbacks.metrics.functional import (
    KEY_NEG_INF,
    KEY_POS_INF,
    BinLayout,
    _backend,
    accumulate_counts,
    anomaly_metrics,
    bin_index,
    bin_layout,
    bin_lower_edge,
    binary_metrics_from_counts,
    fixed_layout,
    float_to_key,
    iou_from_confusion_matrix,
    key_to_float,
    rebin_counts,
    segmentation_metrics,
)
from callbacks.metrics.functional import keys as key_module


# ------------------------------------------------------------------------------------------------
# AnomalyMetrics
# ------------------------------------------------------------------------------------------------
def test_result_keys_bookkeeping_and_exact_twin() -> None:
    rng = np.random.default_rng(0)
    positive = rng.random((4, 96, 128)) < 0.05
    scores = (rng.normal(size=positive.shape) + 2 * positive).astype(np.float32)
    mask = make_mask(rng, positive)
    result, _ = run_metric(scores, mask, batches=2)
    exact = anomaly_metrics(torch.from_numpy(scores), torch.from_numpy(mask), ANOMALY, IGNORE)
    assert (
        set(result)
        == set(exact)
        == {
            "aupr",
            "auroc",
            "fpr95",
            "threshold95",
            "aupr_error_bound",
            "auroc_error_bound",
            "fpr95_error_bound",
            "aupr_per_image",
            "auroc_per_image",
            "fpr95_per_image",
            "fpr95_first_per_image",
            "num_images_per_image",
            "anomaly_fraction",
            "num_valid_pixels",
        }
    )
    valid = mask != IGNORE
    expected = sklearn_metrics(scores[valid], mask[valid] == ANOMALY)
    for key in ("aupr", "auroc", "fpr95", "threshold95"):  # the one-shot twin is exact
        assert exact[key] == pytest.approx(expected[key], abs=1e-12), key
    for key in ("aupr", "auroc", "fpr95"):
        assert abs(result[key] - exact[key]) <= result[f"{key}_error_bound"] + 1e-12
        assert result[f"{key}_per_image"] == pytest.approx(exact[f"{key}_per_image"], abs=1e-15)
    per_image, count = reference_per_image(scores, mask)
    assert result["num_images_per_image"] == exact["num_images_per_image"] == count == 4
    assert result["aupr_per_image"] == pytest.approx(per_image["aupr"], abs=1e-12)
    assert result["num_valid_pixels"] == exact["num_valid_pixels"] == valid.sum()
    assert result["anomaly_fraction"] == pytest.approx((mask[valid] == ANOMALY).mean(), rel=1e-12)


def test_narrow_distribution_is_binned_at_full_float32_resolution() -> None:
    rng = np.random.default_rng(1)
    positive = rng.random((2, 128, 128)) < 0.1
    scores = (rng.normal(1e3, 1e-2, positive.shape) + 1e-2 * positive).astype(np.float32)
    mask = make_mask(rng, positive)
    result, metric = run_metric(scores, mask)
    used = metric.coarse_shift[metric.coarse_shift >= 0]
    assert used.numel() <= 2 and bool((used == 0).all())  # one bin per float32 value: exact
    valid = mask != IGNORE
    expected = sklearn_metrics(scores[valid], mask[valid] == ANOMALY)
    for key in ("aupr", "auroc", "fpr95", "threshold95"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12)
    for key in ("aupr", "auroc", "fpr95"):
        assert result[f"{key}_error_bound"] == 0.0


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
    assert result["aupr_per_image"] == pytest.approx(reference_per_image(scores, mask)[0]["aupr"], abs=1e-12)
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
    expected, count = reference_per_image(scores, mask)
    assert count == 2 and result["num_images_per_image"] == 2
    for key in ("aupr", "auroc", "fpr95"):
        assert result[f"{key}_per_image"] == pytest.approx(expected[key], abs=1e-12)


def _assert_same(result: dict, expected: dict) -> None:
    """Equal results; per-image means only up to the order of their float64 sums."""
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith("_per_image"):
            assert result[key] == pytest.approx(value, rel=1e-14, abs=1e-15), key
        else:
            assert result[key] == value or (np.isnan(value) and np.isnan(result[key])), key


def test_streaming_forward_and_merge_state() -> None:
    """Exactly equal whatever the order while every coarse bin fits at full resolution; within bounds otherwise."""
    rng = np.random.default_rng(4)
    shape = (6, 64, 80)
    positive = rng.random(shape) < 0.1
    narrow = (rng.uniform(1.0, 1.2, shape) + 0.05 * positive).astype(np.float32)  # ~30 coarse bins
    mask = make_mask(rng, positive)
    single, single_metric = run_metric(narrow, mask)
    streamed, streamed_metric = run_metric(narrow, mask, batches=6)
    assert torch.equal(score_ordered_counts(single_metric), score_ordered_counts(streamed_metric))
    _assert_same(streamed, single)
    forwarded = AnomalyMetrics(anomaly_index=ANOMALY, ignore_index=IGNORE)
    for i in range(shape[0]):
        batch_result = forwarded(torch.from_numpy(narrow[i : i + 1]), torch.from_numpy(mask[i : i + 1]))
        assert set(batch_result) == set(single)
    assert torch.equal(score_ordered_counts(forwarded), score_ordered_counts(single_metric))
    first, second = (AnomalyMetrics(anomaly_index=ANOMALY, ignore_index=IGNORE) for _ in range(2))
    first.update(torch.from_numpy(narrow[4:]), torch.from_numpy(mask[4:]))
    second.update(torch.from_numpy(narrow[:4]), torch.from_numpy(mask[:4]))
    first.merge_state(second)
    _assert_same(first.compute(), single)

    # Widening ranges across batches and a small budget: layouts differ, results stay within bounds.
    scale = np.array([1e-3, 1e-3, 1.0, 10.0, 1e6, 1e-2])[:, None, None]
    wide = ((rng.normal(size=shape) + positive) * scale).astype(np.float32)
    valid = mask != IGNORE
    expected = sklearn_metrics(wide[valid], mask[valid] == ANOMALY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        single, single_metric = run_metric(wide, mask, num_bits=16)
        streamed, streamed_metric = run_metric(wide, mask, batches=6, num_bits=16)
        first, second = (AnomalyMetrics(anomaly_index=ANOMALY, ignore_index=IGNORE, num_bits=16) for _ in range(2))
        first.update(torch.from_numpy(wide[3:]), torch.from_numpy(mask[3:]))
        second.update(torch.from_numpy(wide[:3]), torch.from_numpy(mask[:3]))
        first.merge_state(second)
        merged = first.compute()
    for result in (single, streamed, merged):
        for key in ("aupr", "auroc", "fpr95"):
            assert abs(result[key] - expected[key]) <= result[f"{key}_error_bound"] + 1e-12, key
        for key in ("aupr_per_image", "auroc_per_image", "fpr95_per_image", "num_valid_pixels"):
            assert result[key] == pytest.approx(single[key], rel=1e-12), key
    for metric in (streamed_metric, first):
        assert torch.equal(metric.counts.sum(1), single_metric.counts.sum(1))
        assert torch.equal(metric.coarse_count, single_metric.coarse_count)
        assert int((metric.counts.sum(0) > 0).sum()) <= metric.num_bins


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_are_upcast_exactly(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(5)
    positive = rng.random((3, 96, 96)) < 0.1
    scores = torch.from_numpy(rng.normal(size=positive.shape) + positive).to(dtype)
    mask = torch.from_numpy(make_mask(rng, positive))
    metric = AnomalyMetrics(anomaly_index=ANOMALY, ignore_index=IGNORE)
    metric.update(scores, mask)
    result = metric.compute()
    upcast = scores.float().numpy()
    valid = mask.numpy() != IGNORE
    expected = sklearn_metrics(upcast[valid], mask.numpy()[valid] == ANOMALY)
    # Half-precision values are far coarser than the bins: every bin holds one value, exact.
    for key in ("aupr", "auroc", "fpr95"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12)
        assert result[f"{key}_error_bound"] == 0.0
    per_image, _ = reference_per_image(upcast, mask.numpy())
    assert result["aupr_per_image"] == pytest.approx(per_image["aupr"], abs=1e-12)


def test_nan_scores_raise_and_leave_state_untouched() -> None:
    scores = torch.randn(2, 16, 16)
    mask = torch.zeros(2, 16, 16, dtype=torch.long)
    mask[:, :4] = ANOMALY
    metric = AnomalyMetrics(num_bits=16)
    metric.update(scores, mask)
    before = {name: getattr(metric, name).clone() for name in metric._defaults}
    bad = scores.clone()
    bad[0, 5, :3] = float("nan")
    with pytest.raises(ValueError, match="anomaly scores contain 3 NaN values"):
        metric.update(bad, mask)
    for name, value in before.items():
        assert torch.equal(getattr(metric, name), value), name
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
    for key in ("aupr", "auroc", "fpr95"):
        assert abs(result[key] - expected[key]) <= min(result[f"{key}_error_bound"] + 1e-12, 1e-4), key
    per_image, _ = reference_per_image(finite, mask)
    assert result["auroc_per_image"] == pytest.approx(per_image["auroc"], abs=1e-12)


@pytest.mark.filterwarnings("ignore:.*per-image metrics are undefined")
@pytest.mark.filterwarnings("ignore:.*was called before the ``update`` method")
def test_no_positives_no_negatives_and_empty_give_nan_with_warning() -> None:
    scores = torch.randn(2, 8, 8)
    normal = torch.zeros(2, 8, 8, dtype=torch.long)

    metric = AnomalyMetrics(num_bits=16)
    metric.update(scores, normal)
    with pytest.warns(UserWarning, match="no anomaly pixels"):
        result = metric.compute()
    for key in ("aupr", "auroc", "fpr95", "threshold95", "aupr_per_image", "fpr95_per_image", "aupr_error_bound"):
        assert np.isnan(result[key]), key
    assert result["anomaly_fraction"] == 0.0 and result["num_valid_pixels"] == 128
    assert result["num_images_per_image"] == 0

    metric = AnomalyMetrics(num_bits=16)
    metric.update(scores, torch.full_like(normal, ANOMALY))
    with pytest.warns(UserWarning, match="every valid pixel is an anomaly"):
        result = metric.compute()
    assert result["aupr"] == 1.0  # scikit-learn's value without negatives
    assert np.isnan(result["auroc"]) and np.isnan(result["fpr95"])
    assert np.isfinite(result["threshold95"])

    metric = AnomalyMetrics(num_bits=16)
    with pytest.warns(UserWarning, match="no valid pixels"):
        result = metric.compute()
    assert all(np.isnan(result[key]) for key in ("aupr", "auroc", "fpr95", "anomaly_fraction"))
    assert result["num_valid_pixels"] == 0

    metric = AnomalyMetrics(num_bits=16)
    metric.update(scores, torch.full_like(normal, IGNORE))
    with pytest.warns(UserWarning, match="no valid pixels"):
        assert np.isnan(metric.compute()["aupr"])


def test_input_validation() -> None:
    metric = AnomalyMetrics(num_bits=16)
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.randn(2, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point"):
        metric.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="must differ"):
        AnomalyMetrics(anomaly_index=3, ignore_index=3)
    for bad in (15, 29, 22.5, True, "22"):
        with pytest.raises(ValueError, match=r"num_bits .* must be an integer in 16\.\.28"):
            AnomalyMetrics(num_bits=bad)


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

    empty = AnomalyMetrics(num_bits=16)
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
@pytest.mark.filterwarnings("ignore:.*leaves error bounds above")
def test_device_code_path_matches_cpu_fast_path(monkeypatch: pytest.MonkeyPatch, counting: str) -> None:
    """The torch-only code (what runs on CUDA) agrees with the NumPy fast path used on CPU.

    ``counting="sort"`` also routes the histogram through the sort-based counting used on CUDA
    under deterministic algorithms.
    """
    rng = np.random.default_rng(15)
    positive = rng.random((4, 96, 128)) < 0.05
    scores = (rng.normal(size=positive.shape) + positive).astype(np.float32)
    scores[0, 0, :4] = [-0.0, 0.0, np.inf, -np.inf]
    scores[1] = 1.0 - 10.0 ** -rng.uniform(0, 6, scores.shape[1:])  # concentrated: full-resolution coarse bins
    scores[2] *= 10.0 ** rng.uniform(-20, 20, scores.shape[1:])  # many coarse bins: the budget is re-allocated
    mask = make_mask(rng, positive)
    reference, reference_metric = run_metric(scores, mask, batches=2, num_bits=17)

    monkeypatch.setattr(_backend, "NUMPY_ON_CPU", False)
    if counting == "sort":
        monkeypatch.setattr(anomaly, "accumulate_counts", functools.partial(accumulate_counts, method="sort"))
    result, metric = run_metric(scores, mask, batches=2, num_bits=17)
    for name in reference_metric._defaults:
        got, expected = getattr(metric, name), getattr(reference_metric, name)
        if got.is_floating_point():  # per-image sums: float64, summed in another order
            torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
        else:
            assert torch.equal(got, expected), name
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
    assert float_to_key(torch.tensor([-0.0])) == float_to_key(torch.tensor([0.0])) == 0
    assert torch.equal(float_to_key(-ordered), -float_to_key(ordered))  # symmetric
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
    assert bin_index(extremes, layout).tolist() == [0, 2, 512, 1022, 1023]
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


def test_segmentation_functional_twin_matches_metric() -> None:
    rng = np.random.default_rng(16)
    target = rng.integers(0, 5, (2, 30, 40))
    target[rng.random(target.shape) < 0.1] = IGNORE
    target[rng.random(target.shape) < 0.05] = ANOMALY
    logits = torch.from_numpy(rng.normal(size=(2, 5, 30, 40)).astype(np.float32))
    metric = SegmentationMetrics(5)
    metric.update(logits, torch.from_numpy(target))
    result = metric.compute()
    twin = segmentation_metrics(logits, torch.from_numpy(target), 5)
    assert twin["confusion_matrix"].tolist() == result["confusion_matrix"]
    assert twin["miou"].item() == pytest.approx(result["miou"], abs=1e-15)
    assert twin["pixel_accuracy"].item() == pytest.approx(result["pixel_accuracy"], abs=1e-15)

"""Bootstrap intervals over test images (``callbacks.metrics.functional.bootstrap`` and the metrics' ``*_ci``).

- the CPU (NumPy) and device (torch) sketches agree; the identity resample reproduces the metric's
  own values; the replicates equal a naive bootstrap that repeats the resampled images' pixels and
  scores them with scikit-learn; mIoU likewise;
- intervals depend neither on batching, order nor (tests/test_metrics_ddp.py) the number of
  processes; the per-image state does not grow with the resolution; ``bootstrap_samples=0`` keeps
  nothing;
- coverage: many synthetic test sets from a known generator, the 95% intervals cover the population
  value (from a very large sample) in 92-98% of the draws, pooled and per image;
- paired differences: a method against itself with independent noise is not flagged, a clearly
  stronger score against a weaker one is, on the same images.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import ndtr
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from callbacks.evaluation import AnomalyEvaluation
from callbacks.metrics import AnomalyMetrics, SegmentationMetrics
from callbacks.metrics.anomaly import CI_KEYS, PER_IMAGE_FIELDS
from callbacks.metrics.functional.bootstrap import (
    NEG_SKETCH_SIZE,
    POS_SKETCH_SIZE,
    binned_metrics,
    bootstrap_replicates,
    image_id,
    image_sketches,
    image_sketches_sorted,
    mean_replicates,
    paired_comparison,
    percentile_interval,
    pooled_columns,
    pooled_replicates,
    resample_weights,
)
from callbacks.metrics.functional.curves import binary_metrics_from_counts
from callbacks.metrics.functional.keys import float_to_key
from callbacks.metrics.functional.per_image import per_image_metrics_sorted, sort_images
from callbacks.protocol import EvaluationOptionError

ANOMALY, IGNORE = 13, 255


def small_split(seed: int, images: int = 8, shape: tuple[int, int] = (10, 12), step: float = 0.05):
    """Scores rounded to ``step`` (ties), anomalies in most images, a few ignored pixels."""
    rng = np.random.default_rng(seed)
    positive = rng.random((images, *shape)) < rng.uniform(0.0, 0.3, (images, 1, 1))
    positive[0] = False  # an image without anomalies
    scores = rng.normal(size=positive.shape) + rng.normal(0, 0.5, (images, 1, 1)) + 1.2 * positive
    scores = np.round(scores / step) * step
    mask = np.where(positive, ANOMALY, rng.integers(0, 13, positive.shape))
    mask[rng.random(mask.shape) < 0.05] = IGNORE
    return torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(mask)


def summary_arrays(metric: AnomalyMetrics) -> tuple[tuple, dict[str, np.ndarray]]:
    summary = metric.image_summary()
    values = {field: summary["values"][:, j] for j, field in enumerate(PER_IMAGE_FIELDS)}
    return (summary["neg_sketch"], summary["pos_sketch"]), values


# ------------------------------------------------------------------------------------------ exactness
def test_sketches_of_the_numpy_and_torch_paths_agree() -> None:
    rng = np.random.default_rng(0)
    for trial in range(12):
        length = int(rng.integers(0, 900))
        scores = rng.normal(size=(3, length))
        if trial % 2:
            scores = np.round(scores, 1)  # ties, across classes too
        positive = rng.random((3, length)) < rng.choice([0.0, 0.1, 0.6])
        valid = rng.random((3, length)) < 0.9
        valid[trial % 3] &= trial % 4 != 0  # sometimes an image with no valid pixel
        keys = float_to_key(torch.from_numpy(scores.astype(np.float32)))
        neg_size, pos_size = int(rng.choice([2, 7, 64])), int(rng.choice([2, 5, 32]))
        on_device = image_sketches(keys, torch.from_numpy(positive), torch.from_numpy(valid), neg_size, pos_size)
        on_host = image_sketches_sorted(sort_images(keys.numpy(), positive, valid), neg_size, pos_size)
        for a, b in zip(on_device, on_host, strict=True):
            for field, x, y in zip(a._fields, a, b, strict=True):
                assert torch.equal(x, y), (trial, field)


def test_identity_resample_reproduces_the_metrics_own_values() -> None:
    scores, mask = small_split(1)
    metric = AnomalyMetrics(num_bits=16, bootstrap_samples=20)
    metric.update(scores, mask, image_ids=list(range(len(scores))))
    result = metric.compute()
    sketches, values = summary_arrays(metric)
    # every image has at most 512 negatives and 256 positives, and the split fewer than 1024
    # distinct scores: the common columns are exact, so the identity resample is the metric itself
    _, identity = bootstrap_replicates(np.ones((1, len(scores))), sketches, values)
    for key in ("aupr", "auroc", "fpr95", *PER_IMAGE_FIELDS):
        assert identity[key] == pytest.approx(result[key], abs=1e-12), key
    assert result["aupr_error_bound"] == 0.0


def _weighted_pooled(scores: np.ndarray, positive: np.ndarray, weight: np.ndarray) -> dict[str, float]:
    """scikit-learn on the pixels of the resampled images (an image drawn k times counts k times)."""
    keep = weight > 0
    scores, positive, weight = scores[keep], positive[keep], weight[keep]
    fpr, tpr, _ = roc_curve(positive, scores, sample_weight=weight, drop_intermediate=False)
    return {
        "aupr": average_precision_score(positive, scores, sample_weight=weight),
        "auroc": roc_auc_score(positive, scores, sample_weight=weight),
        "fpr95": float(fpr[np.argmax(tpr >= 0.95)]),
    }


def test_replicates_equal_a_naive_bootstrap_with_scikit_learn() -> None:
    scores, mask = small_split(2)
    count, samples, seed = len(scores), 40, 3
    metric = AnomalyMetrics(num_bits=16, bootstrap_samples=samples, bootstrap_seed=seed)
    metric.update(scores, mask, image_ids=[image_id(f"img{i}") for i in range(count)])
    result = metric.compute()
    order = np.argsort([image_id(f"img{i}") for i in range(count)])  # the metric's canonical order
    sketches, values = summary_arrays(metric)
    weights = resample_weights(count, samples, seed)
    replicates, _ = bootstrap_replicates(weights, sketches, values)

    valid = (mask != IGNORE).numpy()[order]
    pixel_scores, pixel_positive = scores.numpy()[order], (mask == ANOMALY).numpy()[order]
    per_image = per_image_metrics_sorted(
        sort_images(float_to_key(scores).numpy()[order].reshape(count, -1), pixel_positive.reshape(count, -1),
                    valid.reshape(count, -1))
    )  # fmt: skip
    naive = {key: [] for key in replicates}
    for w in weights:
        pixel_weight = np.broadcast_to(w[:, None, None], valid.shape)[valid]
        for key, value in _weighted_pooled(pixel_scores[valid], pixel_positive[valid], pixel_weight).items():
            naive[key].append(value)
        columns = (per_image.aupr, per_image.auroc, per_image.fpr95, per_image.fpr95_first)
        for field, column in zip(PER_IMAGE_FIELDS, columns, strict=True):
            column = column.numpy()
            usable = np.isfinite(column) & (w > 0)
            naive[field].append(np.average(column[usable], weights=w[usable]))
    for key in replicates:
        np.testing.assert_allclose(replicates[key], naive[key], rtol=0, atol=1e-12, err_msg=key)
        low, high = np.quantile(naive[key], [0.025, 0.975])
        assert result[f"{key}_ci"] == pytest.approx((low, high), abs=1e-12), key


def test_miou_interval_equals_a_naive_bootstrap() -> None:
    rng = np.random.default_rng(4)
    target = torch.from_numpy(rng.integers(0, 5, (12, 9, 9)))
    target[0, :3] = IGNORE
    preds = torch.where(torch.from_numpy(rng.random(target.shape) < 0.6), target.clamp_max(4), 2)
    metric = SegmentationMetrics(5, bootstrap_samples=50, bootstrap_seed=1)
    for start in range(0, 12, 5):
        metric.update(
            preds[start : start + 5], target[start : start + 5], image_ids=list(range(start, min(start + 5, 12)))
        )
    result = metric.compute()
    naive = []
    for w in resample_weights(12, 50, 1):
        confusion = np.zeros((5, 5))
        for i in range(12):
            keep = target[i] != IGNORE
            np.add.at(confusion, (target[i][keep].numpy(), preds[i][keep].numpy()), w[i])
        union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
        naive.append(np.nanmean(np.where(union > 0, np.diag(confusion) / np.maximum(union, 1), np.nan)))
    assert result["miou_ci"] == pytest.approx(tuple(np.quantile(naive, [0.025, 0.975])), abs=1e-12)
    assert result["miou_ci"][0] <= result["miou"] <= result["miou_ci"][1]


# ------------------------------------------------------------------------------------------ invariance and cost
def test_intervals_depend_on_neither_batching_nor_order() -> None:
    # Scores within [1, 1.12): every coarse bin at full resolution, so the pooled values (which the
    # pooled intervals are moved onto) do not depend on the order either.
    scores, mask = small_split(5, images=24, shape=(16, 16), step=1e-4)
    scores = 1.0 + 0.01 * (scores - scores.min()) / (scores.max() - scores.min()) * 10
    ids = [image_id(f"t5/{i}") for i in range(24)]
    results = []
    for batch, perm in (
        (24, np.arange(24)),
        (5, np.random.default_rng(0).permutation(24)),
        (3, np.arange(24)[::-1].copy()),
    ):
        for named in (True, False):  # without names, images are put in the order of their content
            metric = AnomalyMetrics(bootstrap_samples=100, bootstrap_seed=2)
            for start in range(0, 24, batch):
                index = perm[start : start + batch]
                metric.update(scores[index], mask[index], image_ids=[ids[i] for i in index] if named else None)
            results.append((named, metric.compute()))
    for named in (True, False):
        first = next(result for n, result in results if n == named)
        for n, result in results:
            if n == named:
                assert {k: result[k] for k in result if k.endswith("_ci")} == {
                    k: first[k] for k in first if k.endswith("_ci")
                }
    assert set(first) >= {f"{key}_ci" for key in CI_KEYS} and first["aupr_error_bound"] == 0.0
    for key in CI_KEYS:
        low, high = first[f"{key}_ci"]
        assert low <= first[key] <= high, key


def test_per_image_state_does_not_grow_with_resolution() -> None:
    sizes = {}
    for side in (16, 128):
        scores, mask = small_split(6, images=3, shape=(side, side), step=1e-4)
        metric = AnomalyMetrics(num_bits=16, bootstrap_samples=10)
        metric.update(scores, mask)
        sizes[side] = sum(
            t.numel() * t.element_size()
            for name in ("image_ids", "image_values", "image_neg_sketch", "image_pos_sketch")
            for t in getattr(metric, name)
        )
    assert sizes[16] == sizes[128] == 3 * (8 + 4 * 8 + 3 * 4 * (NEG_SKETCH_SIZE + POS_SKETCH_SIZE))


def test_zero_samples_keep_nothing_and_add_no_keys() -> None:
    scores, mask = small_split(7)
    metric = AnomalyMetrics(num_bits=16)
    metric.update(scores, mask, image_ids=list(range(len(scores))))
    assert not hasattr(metric, "image_values") and "image_values" not in metric._defaults
    assert not any(key.endswith("_ci") for key in metric.compute()) and metric.image_summary() is None
    segmentation = SegmentationMetrics(13)
    segmentation.update(mask.clamp_max(12), mask)
    assert "miou_ci" not in segmentation.compute()


@pytest.mark.parametrize("value", [-1, 2.5, "10", True, None])
def test_bad_bootstrap_arguments_raise_clear_errors(value) -> None:
    with pytest.raises(ValueError, match="bootstrap_samples .* must be a non-negative integer"):
        AnomalyMetrics(num_bits=16, bootstrap_samples=value)
    with pytest.raises(ValueError, match="bootstrap_samples"):
        SegmentationMetrics(13, bootstrap_samples=value)
    with pytest.raises(EvaluationOptionError, match="evaluation.bootstrap_samples"):
        AnomalyEvaluation(bootstrap_samples=value)
    with pytest.raises(ValueError, match="bootstrap_seed must be a non-negative integer"):
        AnomalyMetrics(num_bits=16, bootstrap_samples=10, bootstrap_seed=value if value != 2.5 else -3)
    with pytest.raises(ValueError, match="image_ids must be 2 integers"):
        AnomalyMetrics(num_bits=16, bootstrap_samples=10).update(
            torch.zeros(2, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long), [1]
        )


def test_one_test_image_gives_nan_intervals_with_a_warning() -> None:
    scores, mask = small_split(8, images=2)
    metric = AnomalyMetrics(num_bits=16, bootstrap_samples=50)
    metric.update(scores[1:], mask[1:], image_ids=[7])
    segmentation = SegmentationMetrics(13, bootstrap_samples=50)
    segmentation.update(mask[1:].clamp_max(12), mask[1:], image_ids=[7])
    with pytest.warns(UserWarning, match="at least 2 test images, got 1"):
        result = metric.compute()
    with pytest.warns(UserWarning, match="at least 2 images, got 1"):
        miou = segmentation.compute()
    assert math.isfinite(result["aupr"]) and math.isfinite(miou["miou"])
    assert all(math.isnan(v) for key in CI_KEYS for v in result[f"{key}_ci"])
    assert all(math.isnan(v) for v in miou["miou_ci"])
    # two images but one with anomalies: the per-image means have no interval, the pooled ones do
    metric = AnomalyMetrics(num_bits=16, bootstrap_samples=50)
    metric.update(scores, mask, image_ids=[1, 2])
    with pytest.warns(UserWarning, match="only 1 image has both"):
        result = metric.compute()
    assert math.isfinite(result["auroc_ci"][0]) and math.isnan(result["auroc_per_image_ci"][0])


def test_percentile_interval_leaves_out_undefined_resamples() -> None:
    replicates = np.r_[np.linspace(0.0, 1.0, 101), [np.nan] * 20]
    assert percentile_interval(replicates) == pytest.approx((0.025, 0.975))
    assert percentile_interval(replicates, shift=0.5) == pytest.approx((0.525, 1.475))
    assert all(math.isnan(v) for v in percentile_interval(np.r_[0.5, [np.nan] * 3]))


def test_common_columns_are_exact_when_everything_fits_and_close_otherwise() -> None:
    rng = np.random.default_rng(9)
    scores = rng.normal(size=(6, 3000)) + 1.5 * (np.arange(3000) < 300)
    positive = np.broadcast_to(np.arange(3000) < 300, scores.shape)
    keys = float_to_key(torch.from_numpy(scores.astype(np.float32))).numpy()
    images = sort_images(keys, positive, np.ones_like(positive))
    sketches = [tuple(t.numpy() for t in s) for s in image_sketches_sorted(images, 512, 256)]
    neg, pos = pooled_columns(*sketches)
    assert neg.shape[1] <= 1024 and neg.sum() == pytest.approx(6 * 2700) and pos.sum() == pytest.approx(6 * 300)
    unique, inverse = np.unique(keys.reshape(-1), return_inverse=True)
    flat = positive.reshape(-1)
    exact = binary_metrics_from_counts(
        torch.from_numpy(np.bincount(inverse[~flat], minlength=unique.size)),
        torch.from_numpy(np.bincount(inverse[flat], minlength=unique.size)),
    )
    _, identity = bootstrap_replicates(np.ones((1, 6)), sketches)
    assert identity["auroc"] == pytest.approx(float(exact["auroc"]), abs=1e-3)
    assert identity["aupr"] == pytest.approx(float(exact["aupr"]), abs=1e-2)


# ------------------------------------------------------------------------------------------ coverage
#: 600 test sets of 150 images, 1000 resamples (the default). The percentile interval over images is a
#: little narrow for small sets (see the README for longer runs at 50, 150 and 300 images).
PIXELS, LEVELS, POPULATION, DRAWS, TEST_IMAGES, SAMPLES = 256, 10.0, 30_000, 600, 150, 1000


def generator_images(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """A known generator: per image a random shift, a random separation, anomalies in 70% of images.

    Scores are Gaussian, on a grid of ``1 / LEVELS``; returns each image's histogram of negatives and
    of positives over the grid (``[count, bins]``, increasing score): exact per-image summaries.
    """
    shift = rng.normal(0.0, 0.7, (count, 1))
    separation = rng.normal(1.5, 0.5, (count, 1))
    anomalies = np.where(rng.random(count) < 0.7, rng.integers(8, 80, count), 0)
    positive = np.arange(PIXELS)[None, :] < anomalies[:, None]
    scores = rng.standard_normal((count, PIXELS), dtype=np.float32) + shift + separation * positive
    level = np.clip(np.round(scores * LEVELS).astype(np.int64) + 200, 0, 399)  # scores within [-10, 10)
    cell = np.arange(count)[:, None] * 400 + level
    neg = np.bincount(cell[~positive], minlength=count * 400).reshape(count, 400)
    pos = np.bincount(cell[positive], minlength=count * 400).reshape(count, 400)
    used = (neg + pos).any(0)  # empty grid points change nothing: leave them out
    return neg[:, used], pos[:, used]


def population_pooled() -> dict[str, float]:
    """The generator's pooled AUPR and AUROC over infinitely many images: those of its expected histogram.

    Pooled over images, negative scores are N(0, 1 + 0.7**2) and positive ones N(1.5, 1 + 0.7**2 +
    0.5**2), weighted by the expected numbers of negatives and positives per image (anomalies are
    drawn independently of shifts and separations), then put on the same grid.
    """
    expected_positives = 0.7 * (8 + 79) / 2
    edges = (np.arange(-200, 201) - 0.5) / LEVELS
    edges[0], edges[-1] = -np.inf, np.inf  # the grid's clipping
    histograms = []
    for mean, variance, count in ((0.0, 1.49, PIXELS - expected_positives), (1.5, 1.74, expected_positives)):
        histograms.append(count * np.diff(ndtr((edges - mean) / math.sqrt(variance))))
    result = binned_metrics(*histograms)
    return {"aupr": float(result["aupr"]), "auroc": float(result["auroc"])}


def test_intervals_cover_the_population_value_in_92_to_98_percent_of_test_sets() -> None:
    truth = population_pooled()
    rng = np.random.default_rng(2024)
    neg, pos = generator_images(rng, POPULATION)  # the per-image means' population values, from a large sample
    per_image = binned_metrics(neg, pos)  # each image on its own (NaN without anomalies)
    truth["aupr_per_image"] = float(np.nanmean(per_image["aupr"]))
    truth["auroc_per_image"] = float(np.nanmean(per_image["auroc"]))
    sample = binned_metrics(neg.sum(0), pos.sum(0))  # the pooled values of that sample, for comparison
    assert float(sample["auroc"]) == pytest.approx(truth["auroc"], abs=0.003)
    assert float(sample["aupr"]) == pytest.approx(truth["aupr"], abs=0.01)
    neg, pos = generator_images(rng, DRAWS * TEST_IMAGES)  # DRAWS test sets of TEST_IMAGES images
    per_image = binned_metrics(neg, pos)
    covered = dict.fromkeys(truth, 0)
    for draw in range(DRAWS):
        rows = slice(draw * TEST_IMAGES, (draw + 1) * TEST_IMAGES)
        weights = resample_weights(TEST_IMAGES, SAMPLES, seed=draw)
        replicates = pooled_replicates(weights, neg[rows], pos[rows])
        for key in ("aupr", "auroc"):
            replicates[f"{key}_per_image"] = mean_replicates(weights, per_image[key][rows])
        if draw < 2:  # the metric's own path, from per-image sketches, resamples the same values
            same, _ = bootstrap_replicates(weights, _sketches_of(neg[rows], pos[rows]), {})
            for key in ("aupr", "auroc", "fpr95"):
                np.testing.assert_allclose(same[key], replicates[key], rtol=0, atol=1e-12)
        for key, value in truth.items():
            low, high = percentile_interval(replicates[key])
            covered[key] += low <= value <= high
    coverage = {key: count / DRAWS for key, count in covered.items()}
    assert all(0.92 <= rate <= 0.98 for rate in coverage.values()), coverage


def _sketches_of(neg: np.ndarray, pos: np.ndarray) -> tuple[tuple, tuple]:
    """Sketches (as ``AnomalyMetrics`` keeps them) of images given as histograms over the score grid."""
    grid = np.arange(neg.shape[1], dtype=np.float64)  # any increasing scores: only the order matters
    scores = [np.concatenate([np.repeat(grid, n), np.repeat(grid, p)]) for n, p in zip(neg, pos, strict=True)]
    labels = [np.concatenate([np.zeros(n.sum(), bool), np.ones(p.sum(), bool)]) for n, p in zip(neg, pos, strict=True)]
    keys = float_to_key(torch.from_numpy(np.stack(scores).astype(np.float32))).numpy()
    images = sort_images(keys, np.stack(labels), np.ones(keys.shape, dtype=bool))
    return tuple(tuple(t.numpy() for t in sketch) for sketch in image_sketches_sorted(images, 512, 256))


# ------------------------------------------------------------------------------------------ paired differences
def _method_summary(scores: np.ndarray, positive: np.ndarray, names: list[str]) -> tuple[dict, dict]:
    metric = AnomalyMetrics(num_bits=16, bootstrap_samples=10)
    mask = torch.from_numpy(np.where(positive, ANOMALY, 0))
    metric.update(torch.from_numpy(scores.astype(np.float32)), mask, image_ids=[image_id(n) for n in names])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = metric.compute()
    return dict(metric.image_summary()), {key: values[key] for key in CI_KEYS}


def test_paired_differences_flag_a_stronger_score_and_not_independent_noise() -> None:
    count, pixels, repeats = 50, (12, 16), 6
    null_flags, stronger_flags = [], []
    for repeat in range(repeats):
        rng = np.random.default_rng(100 + repeat)
        positive = rng.random((count, *pixels)) < rng.uniform(0.02, 0.2, (count, 1, 1))
        signal = rng.normal(size=positive.shape) + rng.normal(0, 0.5, (count, 1, 1)) + 1.2 * positive
        names = [f"t5/{i}" for i in range(count)]
        methods = {  # the same method twice with independent noise, and a clearly stronger score
            "method": signal + 0.3 * rng.normal(size=signal.shape),
            "method again": signal + 0.3 * rng.normal(size=signal.shape),
            "stronger": signal + 0.3 * rng.normal(size=signal.shape) + 0.8 * positive,
        }
        summaries, values = {}, {}
        for name, scores in methods.items():  # each method sees the images in its own order
            perm = rng.permutation(count)
            summaries[name], values[name] = _method_summary(scores[perm], positive[perm], [names[i] for i in perm])
        result = paired_comparison(summaries, values, samples=300, seed=repeat, keys=CI_KEYS)
        pairs = {(p["a"], p["b"]): p["metrics"] for p in result["pairs"]}
        assert result["num_images"] == count and len(pairs) == 3
        for key in CI_KEYS:
            null, stronger = pairs[("method", "method again")][key], pairs[("method", "stronger")][key]
            assert null["ci"][0] <= null["difference"] <= null["ci"][1]
            null_flags.append(null["excludes_zero"])
            stronger_flags.append(stronger["excludes_zero"])
            assert (stronger["difference"] > 0) == key.startswith("fpr95"), key
            assert result["best"][key]["method"] == "stronger", key
    # 5% of the null pairs flagged in expectation (seeded: this draw flags the fraction below)
    assert np.mean(null_flags) <= 0.1, np.mean(null_flags)
    assert all(stronger_flags)


def test_paired_differences_need_the_same_named_images() -> None:
    rng = np.random.default_rng(12)
    positive = rng.random((6, 8, 8)) < 0.2
    scores = rng.normal(size=positive.shape) + positive
    first = _method_summary(scores, positive, [f"a{i}" for i in range(6)])
    other = _method_summary(scores, positive, [f"b{i}" for i in range(6)])
    twice = _method_summary(scores, positive, ["a0", *(f"a{i}" for i in range(5))])
    with pytest.raises(ValueError, match="not scored on the same test images"):
        paired_comparison({"x": first[0], "y": other[0]}, {"x": first[1], "y": other[1]}, 20, 0, keys=CI_KEYS)
    with pytest.raises(ValueError, match="several images with the same name"):
        paired_comparison({"x": first[0], "y": twice[0]}, {"x": first[1], "y": twice[1]}, 20, 0, keys=CI_KEYS)

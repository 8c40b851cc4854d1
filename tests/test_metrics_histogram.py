"""The adaptive histogram's pieces: layouts, exact re-binning, planning, coarse statistics, error bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from callbacks.metrics.functional import binary_metrics_from_counts, binned_error_bounds, float_to_key
from callbacks.metrics.functional.histogram import (
    ADAPTIVE_LOW_BITS,
    NUM_COARSE,
    CoarseStats,
    adaptive_layout,
    bin_key_ranges,
    coarse_stats,
    coverage,
    flat_index,
    merge_coarse_stats,
    move_coarse_bins,
    plan_layout,
    rebin_counts,
    score_order,
    sorted_coarse_stats,
    sorted_runs,
    trailing_zeros,
)


def _keys(rng: np.random.Generator, n: int) -> np.ndarray:
    """int32 keys of scores spread over many magnitudes and both signs, some ties."""
    values = rng.normal(size=n) * 10.0 ** rng.uniform(-8, 8, n)
    values[: n // 10] = np.round(values[: n // 10])
    return float_to_key(torch.from_numpy(values.astype(np.float32))).numpy()


def _stats(keys: np.ndarray) -> CoarseStats:
    ordered = np.sort(keys)
    return sorted_coarse_stats([ordered], [sorted_runs(ordered)])


def test_coarse_stats_numpy_and_torch_agree_with_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    keys = _keys(rng, 20000)
    keys[:50] = keys[0] + np.arange(50) * 8192  # a half-precision-like lattice in one coarse bin
    stats = _stats(keys)
    u = keys.astype(np.int64) + (1 << 31)
    coarse, low = u >> 16, u & 0xFFFF
    np.testing.assert_array_equal(stats.count, np.bincount(coarse, minlength=NUM_COARSE))
    for g in np.unique(coarse)[:200]:
        lows = low[coarse == g]
        assert stats.low_min[g] == lows.min() and stats.low_max[g] == lows.max()
        spread = np.bitwise_or.reduce(lows ^ lows.min())
        expected = ADAPTIVE_LOW_BITS if spread == 0 else int(np.log2(spread & -spread))
        assert stats.align[g] == expected
    direct = coarse_stats(torch.from_numpy(keys), torch.ones(keys.size, dtype=torch.bool))
    for a, b in zip(direct, stats, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)
    # Merging the statistics of two halves gives the statistics of the whole.
    halves = merge_coarse_stats(_stats(keys[::2]), _stats(keys[1::2]))
    for a, b in zip(halves, stats, strict=True):
        np.testing.assert_array_equal(a, b)
    assert trailing_zeros(np.array([0, 1, 8192, 0xFFFF + 1 + 4])).tolist() == [16, 0, 13, 2]


def test_plans_cover_every_key_and_rebinning_is_exact() -> None:
    """Stream batches, plan after each, move counts as planned: equals binning everything directly."""
    rng = np.random.default_rng(1)
    budget = 1 << 17
    shift = np.full(NUM_COARSE, -1, dtype=np.int64)
    offset = size = base = np.zeros(NUM_COARSE, dtype=np.int64)
    used, level = 0, 0.0
    counts = torch.zeros(budget, dtype=torch.int64)
    stats = _stats(np.zeros(0, dtype=np.int32))
    seen = []
    compacted = moved = 0
    for step in range(12):
        batch = _keys(rng, 4000) if step % 3 else (rng.integers(-(2**20), 2**20, 4000)).astype(np.int32)
        seen.append(batch)
        stats = merge_coarse_stats(stats, _stats(batch))
        plan = plan_layout(shift, offset, size, base, used, stats, budget, level)
        old = adaptive_layout(shift, offset, size, base)
        if plan is not None:
            new = adaptive_layout(plan.shift, plan.offset, plan.size, plan.base)
            assert plan.used <= budget and int(new.size.sum()) <= plan.used
            assert np.all(plan.shift[shift >= 0] >= shift[shift >= 0])  # never refined
            if plan.compacted:
                counts = rebin_counts(counts, old, new)
                compacted += 1
            else:
                move_coarse_bins(counts, old, new, torch.from_numpy(np.flatnonzero(plan.moved)))
                moved += int(plan.moved.any())
            shift, offset, size, base, used, level = (*plan[:4], plan.used, plan.level)
        layout = adaptive_layout(shift, offset, size, base)
        # Every key seen lies inside its coarse bin's sub-bins.
        u = batch.astype(np.int64) + (1 << 31)
        g, low = u >> 16, u & 0xFFFF
        assert np.all(shift[g] >= 0)
        assert np.all((low >> shift[g]) >= offset[g]) and np.all((low >> shift[g]) < offset[g] + size[g])
        counts += torch.bincount(flat_index(torch.from_numpy(batch), layout), minlength=budget)[:budget]
    everything = np.concatenate(seen)
    assert torch.equal(counts, torch.bincount(flat_index(torch.from_numpy(everything), layout), minlength=budget))
    assert compacted >= 1 and moved >= 1  # both paths were taken
    # Bins in score order hold increasing, disjoint key ranges.
    order = score_order(layout)
    first, last = bin_key_ranges(layout, order)
    assert torch.all(first <= last) and torch.all(first[1:] > last[:-1])


def test_plan_gives_sparse_coarse_bins_full_resolution_and_respects_the_budget() -> None:
    keys = np.array([0, 5, 900, 70000, 70001, 2**20], dtype=np.int32)  # three coarse bins, few keys
    stats = _stats(keys)
    empty = np.zeros(NUM_COARSE, dtype=np.int64)
    plan = plan_layout(np.full(NUM_COARSE, -1), empty, empty, empty, 0, stats, 1 << 16, 0.0)
    assert plan is not None and not plan.compacted
    touched = np.flatnonzero(stats.count)
    assert np.all(plan.shift[touched] == 0)  # full resolution: a few hundred sub-bins cover them
    assert plan.size[touched].tolist() == [901, 2, 1]
    offset, size = coverage(stats.low_min, stats.low_max, np.zeros(NUM_COARSE, dtype=np.int64))
    np.testing.assert_array_equal(plan.offset[touched], offset[touched])
    # Nothing new: no plan. Many wide coarse bins on a small budget: compacted within share * budget.
    assert plan_layout(*plan[:4], plan.used, stats, 1 << 16, plan.level) is None
    wide = _stats(_keys(np.random.default_rng(2), 50000))
    plan = plan_layout(np.full(NUM_COARSE, -1), empty, empty, empty, 0, wide, 1 << 16, 0.0)
    assert plan.used <= (1 << 16) and np.all(plan.shift[wide.count > 0] >= 0)
    # A lattice seen often enough caps the resolution: 8 half-precision-like values, 1000 pixels each.
    lattice = np.repeat(np.arange(8, dtype=np.int32) * 8192, 1000)
    plan = plan_layout(np.full(NUM_COARSE, -1), empty, empty, empty, 0, _stats(lattice), 1 << 16, 0.0)
    g = np.flatnonzero(plan.size)
    assert plan.shift[g].tolist() == [13] and plan.size[g].tolist() == [8]


def _sklearn(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return average_precision_score(labels, scores), roc_auc_score(labels, scores), fpr[np.argmax(tpr >= 0.95)]


def test_binned_error_bounds_contain_every_order_inside_the_bins() -> None:
    """Bins of a few pixels each; every within-bin arrangement (orders and ties) stays within the bounds."""
    rng = np.random.default_rng(3)
    for _ in range(60):
        bins = int(rng.integers(1, 5))
        neg = rng.integers(0, 4, bins)
        pos = rng.integers(0, 4, bins)
        if pos.sum() == 0 or neg.sum() == 0:
            continue
        exact = rng.random(bins) < 0.3
        binned = binary_metrics_from_counts(torch.from_numpy(neg), torch.from_numpy(pos))
        bounds = binned_error_bounds(torch.from_numpy(neg), torch.from_numpy(pos), torch.from_numpy(exact))
        for _ in range(40):
            scores, labels = [], []
            for b in range(bins):
                labels_b = np.array([0] * neg[b] + [1] * pos[b])
                # Inside an inexact bin: random distinct or tied sub-scores; an exact bin is one tie.
                inner = np.zeros(labels_b.size) if exact[b] else rng.integers(0, 3, labels_b.size) / 4.0
                scores.append(b + inner)
                labels.append(labels_b)
            values = _sklearn(np.concatenate(scores), np.concatenate(labels))
            for key, value in zip(("aupr", "auroc", "fpr95"), values, strict=True):
                assert abs(value - float(binned[key])) <= float(bounds[key]) + 1e-12, key
    # The AP extremes are attained: all positives of a bin tied above its negatives, or below them distinct.
    neg, pos = torch.tensor([3, 0]), torch.tensor([2, 1])
    bounds = binned_error_bounds(neg, pos, torch.tensor([False, True]))
    binned = binary_metrics_from_counts(neg, pos)
    best = _sklearn(np.array([0.0, 0.0, 0.0, 0.5, 0.5, 1.0]), np.array([0, 0, 0, 1, 1, 1]))[0]
    assert best - float(binned["aupr"]) <= float(bounds["aupr"]) + 1e-12
    assert float(bounds["auroc"]) == pytest.approx(3 * 2 / (2 * 3 * 3))


def test_binned_error_bounds_are_zero_for_exact_bins_and_nan_when_undefined() -> None:
    neg, pos = torch.tensor([3, 1, 0]), torch.tensor([0, 1, 2])
    zero = binned_error_bounds(neg, pos, torch.ones(3, dtype=torch.bool))
    assert all(float(v) == 0.0 for v in zero.values())
    assert all(
        np.isnan(float(v))
        for v in binned_error_bounds(neg, torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.bool)).values()
    )
    # AP bound of a bin of positives only: their ties change AP, so it is not zero.
    alone = binned_error_bounds(torch.tensor([2, 0]), torch.tensor([0, 3]), torch.tensor([True, False]))
    assert float(alone["aupr"]) == 0.0 and float(alone["auroc"]) == 0.0  # no negative above or inside
    mixed = binned_error_bounds(torch.tensor([0, 2]), torch.tensor([3, 0]), torch.tensor([True, False]))
    assert float(mixed["aupr"]) == 0.0  # negatives alone in a bin do not move AP
    behind = binned_error_bounds(torch.tensor([1, 2]), torch.tensor([3, 1]), torch.tensor([False, True]))
    assert float(behind["aupr"]) > 0.0  # positives with a negative above them: their ties matter


@pytest.mark.parametrize("shape", [(1,), (2, 3)])
def test_rebin_counts_shapes_and_identity(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(4)
    keys = _keys(rng, 3000)
    stats = _stats(keys)
    empty = np.zeros(NUM_COARSE, dtype=np.int64)
    plan = plan_layout(np.full(NUM_COARSE, -1), empty, empty, empty, 0, stats, 1 << 18, 0.0)
    layout = adaptive_layout(plan.shift, plan.offset, plan.size, plan.base)
    counts = torch.from_numpy(rng.integers(0, 5, (*shape, 1 << 18)))
    counts[..., plan.used :] = 0
    assert torch.equal(rebin_counts(counts, layout, layout), counts)

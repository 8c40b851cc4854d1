"""FRE math against independent float64 NumPy references (lightning_modules/fre.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lightning_modules import fre

K, C = 4, 12


# --------------------------------------------------------------------------- references
def make_features(seed: int, batch: int = 3, h: int = 9, w: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent anisotropic Gaussian features [B, C, h, w] and labels with ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (batch, h, w), generator=g)
    labels[:, 0, :3] = 255  # ignore index
    labels[:, -1, :2] = -1  # negative = skip
    mixing = torch.randn(K, C, C, generator=g) * torch.linspace(0.2, 2.0, C)[None, :, None]
    offsets = 3.0 * torch.randn(K, C, generator=g)
    z = torch.randn(batch, h, w, C, generator=g)
    cls = labels.clamp(0, K - 1)
    x = torch.einsum("bhwc,bhwcd->bhwd", z, mixing[cls]) + offsets[cls]
    return x.permute(0, 3, 1, 2).contiguous(), labels


def pixels_np(features: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double().numpy()
    return x, labels.reshape(-1).numpy()


def numpy_pca(x: np.ndarray, explained_variance: float, n_components: int | None):
    """Mean, projector onto the principal subspace and rank, from the centred data directly."""
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / len(x)  # population covariance
    evals, evecs = np.linalg.eigh(cov)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    if n_components is not None:
        rank = n_components
    else:
        ratio = np.cumsum(evals) / evals.sum()
        rank = int(np.searchsorted(ratio, explained_variance) + 1)  # first index with ratio >= ev
    basis = evecs[:, :rank]
    return mean, basis @ basis.T, rank


def numpy_fre(x: np.ndarray, mean: np.ndarray, projector: np.ndarray) -> np.ndarray:
    """|| (I - P)(x - mu) || for rows x, with the projector written out."""
    residual = (x - mean) @ (np.eye(len(mean)) - projector).T
    return np.sqrt((residual**2).sum(1))


def accumulate(features, labels, num_classes=K):
    c = features.shape[1]
    sums = torch.zeros(num_classes, c, dtype=torch.float64)
    outer = torch.zeros(num_classes, c, c, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    fre.accumulate_class_moments(features, labels, num_classes, sums, outer, counts)
    return sums, outer, counts


def projectors(bases: torch.Tensor) -> np.ndarray:
    b = bases.numpy()
    return np.einsum("kcr,kdr->kcd", b, b)


# --------------------------------------------------------------------------- moments
def test_moments_match_numpy_and_skip_ignored_pixels():
    features, labels = make_features(0)
    sums, outer, counts = accumulate(features, labels)
    x, y = pixels_np(features, labels)
    for k in range(K):
        xk = x[y == k]
        assert counts[k].item() == len(xk)
        np.testing.assert_allclose(sums[k].numpy(), xk.sum(0), rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(outer[k].numpy(), xk.T @ xk, rtol=1e-12, atol=1e-9)
    assert counts.sum().item() == ((y >= 0) & (y < K)).sum()

    # Flat [N, C] input gives the same moments as the image layout.
    flat = accumulate(features.permute(0, 2, 3, 1).reshape(-1, C), labels.reshape(-1))
    for a, b in zip(flat, (sums, outer, counts), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-11)


def test_moments_with_many_blocks_per_class_and_unbalanced_classes():
    # Enough pixels that every class spans several packed blocks, one class dominating.
    g = torch.Generator().manual_seed(15)
    labels = torch.multinomial(torch.tensor([0.7, 0.2, 0.09, 0.01]), 6000, replacement=True, generator=g)
    features = torch.randn(6000, C, generator=g, dtype=torch.float64) + labels[:, None]
    sums, outer, counts = accumulate(features, labels)
    x, y = features.numpy(), labels.numpy()
    for k in range(K):
        xk = x[y == k]
        assert counts[k].item() == len(xk)
        np.testing.assert_allclose(outer[k].numpy(), xk.T @ xk, rtol=1e-12, atol=1e-9)


def test_moments_from_bfloat16_features_are_exact_in_double():
    features, labels = make_features(1)
    half = features.to(torch.bfloat16)
    sums, outer, _ = accumulate(half, labels)
    x, y = pixels_np(half.float(), labels)  # bf16 values are exact in float64
    np.testing.assert_allclose(outer[2].numpy(), x[y == 2].T @ x[y == 2], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(sums[2].numpy(), x[y == 2].sum(0), rtol=1e-12, atol=1e-10)


def test_streaming_over_batches_equals_one_pass():
    parts = [make_features(seed, batch=b) for seed, b in ((10, 1), (11, 3), (12, 2), (13, 1))]
    one_pass = accumulate(torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts]))
    streamed = [torch.zeros_like(t) for t in one_pass]
    for f, y in parts:
        fre.accumulate_class_moments(f, y, K, *streamed)
    for a, b in zip(streamed, one_pass, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
    fit_a = fre.fit_subspaces(*streamed, explained_variance=0.9, min_pixels=2)
    fit_b = fre.fit_subspaces(*one_pass, explained_variance=0.9, min_pixels=2)
    assert torch.equal(fit_a[2], fit_b[2])
    torch.testing.assert_close(fit_a[0], fit_b[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(projectors(fit_a[1]), projectors(fit_b[1]), atol=1e-9)


def test_moment_inputs_are_validated():
    features, labels = make_features(2)
    sums, outer, counts = accumulate(features, labels)
    with pytest.raises(ValueError, match="do not match features"):
        fre.accumulate_class_moments(features, labels[:, :-1], K, sums, outer, counts)
    with pytest.raises(TypeError, match="float64"):
        fre.accumulate_class_moments(features, labels, K, sums.float(), outer, counts)


# --------------------------------------------------------------------------- fitting
@pytest.mark.parametrize(
    ("explained_variance", "n_components"), [(0.5, None), (0.9, None), (0.99, None), (0.9, 1), (0.9, 5)]
)
def test_fit_matches_numpy_pca(explained_variance, n_components):
    features, labels = make_features(3, batch=6)
    moments = accumulate(features, labels)
    means, bases, ranks = fre.fit_subspaces(
        *moments, explained_variance=explained_variance, n_components=n_components, min_pixels=2
    )
    x, y = pixels_np(features, labels)
    assert means.dtype == bases.dtype == torch.float64
    assert bases.shape == (K, C, int(ranks.max()))
    for k in range(K):
        mean, projector, rank = numpy_pca(x[y == k], explained_variance, n_components)
        assert ranks[k].item() == rank
        np.testing.assert_allclose(means[k].numpy(), mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(projectors(bases)[k], projector, atol=1e-9)
        # Orthonormal leading columns, zero padding after the class's rank.
        used = bases[k, :, :rank]
        torch.testing.assert_close(used.T @ used, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.all(bases[k, :, rank:] == 0)


def test_global_fit_matches_numpy_pca_of_pooled_pixels():
    features, labels = make_features(4, batch=5)
    means, bases, ranks = fre.fit_subspaces(*accumulate(features, labels), explained_variance=0.8, mode="global")
    x, y = pixels_np(features, labels)
    mean, projector, rank = numpy_pca(x[(y >= 0) & (y < K)], 0.8, None)
    assert means.shape == (1, C) and ranks.tolist() == [rank]
    np.testing.assert_allclose(means[0].numpy(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(projectors(bases)[0], projector, atol=1e-9)


def test_constant_features_give_rank_zero_and_distance_to_mean():
    x = torch.full((50, C), 2.0, dtype=torch.float64)
    means, bases, ranks = fre.fit_subspaces(*accumulate(x, torch.zeros(50, dtype=torch.long), 1), mode="global")
    assert ranks.tolist() == [0] and bases.shape == (1, C, 0)
    probe = torch.randn(7, C, dtype=torch.float64)
    expected = (probe - 2.0).norm(dim=1)
    torch.testing.assert_close(fre.reconstruction_error(probe, means, bases, mode="global"), expected)


def test_fit_arguments_are_validated():
    moments = accumulate(*make_features(5))
    with pytest.raises(ValueError, match="explained_variance"):
        fre.fit_subspaces(*moments, explained_variance=1.5)
    with pytest.raises(ValueError, match="mode"):
        fre.fit_subspaces(*moments, mode="predicted")
    with pytest.raises(ValueError, match="no pixels"):
        fre.fit_subspaces(*(torch.zeros_like(t) for t in moments))


# --------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def fitted():
    features, labels = make_features(6, batch=6)
    moments = accumulate(features, labels)
    per_class = fre.fit_subspaces(*moments, explained_variance=0.8, min_pixels=2)
    pooled = fre.fit_subspaces(*moments, explained_variance=0.8, mode="global")
    probe, _ = make_features(7, batch=2)
    probe = probe + 0.5 * torch.randn(probe.shape, generator=torch.Generator().manual_seed(0))
    predicted = torch.randint(0, K, (2, probe.shape[2], probe.shape[3]), generator=torch.Generator().manual_seed(1))
    return per_class, pooled, probe, predicted


def reference_scores(per_class, pooled, probe, predicted) -> dict[str, np.ndarray]:
    x, cls = pixels_np(probe, predicted)
    means, bases, _ = per_class
    per_k = np.stack([numpy_fre(x, means[k].numpy(), projectors(bases)[k]) for k in range(K)], 1)
    g_mean, g_bases, _ = pooled
    return {
        "predicted": per_k[np.arange(len(x)), cls],
        "min": per_k.min(1),
        "global": numpy_fre(x, g_mean[0].numpy(), projectors(g_bases)[0]),
        "all": per_k,
    }


def score(per_class, pooled, probe, predicted, mode, **kwargs):
    means, bases, _ = pooled if mode == "global" else per_class
    return fre.reconstruction_error(probe, means, bases, predicted, mode=mode, **kwargs)


@pytest.mark.parametrize("mode", fre.SCORING_MODES)
def test_reconstruction_error_matches_numpy(fitted, mode):
    per_class, pooled, probe, predicted = fitted
    expected = reference_scores(*fitted)[mode]
    # float64 features: the same formula to round-off.
    got64 = score(per_class, pooled, probe.double(), predicted, mode)
    assert got64.shape == (2, probe.shape[2], probe.shape[3]) and got64.dtype == torch.float64
    np.testing.assert_allclose(got64.reshape(-1).numpy(), expected, rtol=1e-9, atol=1e-9)
    # float32 features: float32 accuracy relative to the feature scale.
    got32 = score(per_class, pooled, probe, predicted, mode)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.reshape(-1).numpy(), expected, rtol=1e-4, atol=1e-4)
    # Tiny chunks give the same scores as the default chunking.
    torch.testing.assert_close(score(per_class, pooled, probe, predicted, mode, chunk_size=7), got32)


@pytest.mark.parametrize("mode", fre.SCORING_MODES)
def test_bfloat16_features_are_upcast_and_autocast_is_ignored(fitted, mode):
    per_class, pooled, probe, predicted = fitted
    half = probe.to(torch.bfloat16)
    expected = reference_scores(per_class, pooled, half.float(), predicted)[mode]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = score(per_class, pooled, half, predicted, mode)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.reshape(-1).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_class_errors_and_modes_are_consistent(fitted):
    per_class, pooled, probe, predicted = fitted
    means, bases, _ = per_class
    all_errors = fre.class_reconstruction_errors(probe.double(), means, bases)
    assert all_errors.shape == (2, K, probe.shape[2], probe.shape[3])
    expected = reference_scores(*fitted)["all"]
    np.testing.assert_allclose(all_errors.permute(0, 2, 3, 1).reshape(-1, K).numpy(), expected, rtol=1e-9)
    # Predicted mode with the argmin class is the min mode.
    best = all_errors.argmin(1)
    torch.testing.assert_close(
        fre.reconstruction_error(probe, means, bases, best, mode="predicted"),
        fre.reconstruction_error(probe, means, bases, mode="min"),
        rtol=1e-5,
        atol=1e-5,
    )


def test_predicted_mode_with_many_blocks_per_class(fitted):
    per_class, _, _, _ = fitted
    means, bases, _ = per_class
    g = torch.Generator().manual_seed(16)
    cls = torch.multinomial(torch.tensor([0.6, 0.3, 0.08, 0.02]), 5000, replacement=True, generator=g)
    probe = torch.randn(5000, C, generator=g, dtype=torch.float64) * 2
    expected = fre.class_reconstruction_errors(probe, means, bases)[torch.arange(5000), cls]
    got = fre.reconstruction_error(probe, means, bases, cls, mode="predicted")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fre.reconstruction_error(probe, means, bases, cls, chunk_size=999), got)


def test_scoring_arguments_are_validated(fitted):
    per_class, _, probe, predicted = fitted
    means, bases, _ = per_class
    with pytest.raises(ValueError, match="class_index"):
        fre.reconstruction_error(probe, means, bases, None, mode="predicted")
    with pytest.raises(ValueError, match="K = 1"):
        fre.reconstruction_error(probe, means, bases, mode="global")
    with pytest.raises(ValueError, match="mode"):
        fre.reconstruction_error(probe, means, bases, predicted, mode="mean")


def test_low_rank_classes_score_low_and_off_subspace_features_score_high():
    g = torch.Generator().manual_seed(8)
    dim, rank, n, noise = 32, 4, 400, 1e-3
    frames = torch.linalg.qr(torch.randn(K, dim, rank, generator=g, dtype=torch.float64))[0]
    offsets = 2.0 * torch.randn(K, dim, generator=g, dtype=torch.float64)

    def in_distribution(count):
        cls = torch.randint(0, K, (count,), generator=g)
        z = torch.randn(count, rank, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.5, 2.0, 1.5])
        x = offsets[cls] + torch.einsum("ncr,nr->nc", frames[cls], z)
        return (x + noise * torch.randn(count, dim, generator=g, dtype=torch.float64)).float(), cls

    train_x, train_y = in_distribution(n * K)
    moments = accumulate(train_x, train_y)
    per_class = fre.fit_subspaces(*moments, explained_variance=0.999)
    pooled = fre.fit_subspaces(*moments, explained_variance=0.999, mode="global")
    assert per_class[2].tolist() == [rank] * K

    test_x, test_y = in_distribution(500)
    anomalies = (offsets.mean(0) + 3.0 * torch.randn(500, dim, generator=g, dtype=torch.float64)).float()
    for mode, (means, bases, _) in (("predicted", per_class), ("min", per_class), ("global", pooled)):
        inlier = fre.reconstruction_error(test_x, means, bases, test_y, mode=mode)
        outlier = fre.reconstruction_error(anomalies, means, bases, torch.zeros(500, dtype=torch.long), mode)
        if mode != "global":
            assert inlier.max() < 20 * noise * dim**0.5  # noise level, not the signal's scale (~5)
        assert outlier.median() > 5.0
        scores = torch.cat([inlier, outlier]).numpy()
        truth = np.r_[np.zeros(len(inlier)), np.ones(len(outlier))]
        assert roc_auc_score(truth, scores) > 0.99, mode


# --------------------------------------------------------------------------- subsampling
def test_subsample_is_seeded_capped_and_skips_ignored():
    _, labels = make_features(9, batch=4)
    quota = torch.tensor([5, 0, 1000, 17])
    draw = lambda seed: fre.sample_class_pixels(labels, quota, K, torch.Generator().manual_seed(seed))  # noqa: E731
    mask = draw(0)
    assert mask.shape == labels.shape and mask.dtype == torch.bool
    assert torch.equal(mask, draw(0))
    assert not torch.equal(mask, draw(1))
    valid = (labels >= 0) & (labels < K)
    assert not mask[~valid].any()
    available = torch.bincount(labels[valid], minlength=K)
    taken = torch.bincount(labels[mask], minlength=K)
    assert taken.tolist() == torch.minimum(available, quota).tolist()
    # An int quota applies to every class.
    int_mask = fre.sample_class_pixels(labels, 3, K, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[int_mask], minlength=K).tolist() == [3] * K


def test_subsample_is_uniform_within_a_class():
    labels = torch.tensor([0] * 10 + [1] * 4 + [255] * 3)
    quota = torch.tensor([3, 2])
    g = torch.Generator().manual_seed(0)
    draws = 3000
    hits = torch.stack([fre.sample_class_pixels(labels, quota, 2, g) for _ in range(draws)]).double().mean(0)
    # Every pixel of class k is kept with probability quota_k / n_k (binomial s.d. <= 0.01 here).
    np.testing.assert_allclose(hits[:10].numpy(), 0.3, atol=0.04)
    np.testing.assert_allclose(hits[10:14].numpy(), 0.5, atol=0.04)
    assert hits[14:].sum() == 0


@pytest.mark.parametrize("share", [True, False])
def test_global_budget_over_a_pass(share):
    batches = [make_features(20 + i, batch=1)[1] for i in range(6)]
    budget = torch.tensor([40.0, 40.0, 5.0, 1000.0], dtype=torch.float64)
    counts = torch.zeros(K, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    per_batch = []
    for i, labels in enumerate(batches):
        quota = fre.batch_quota(budget - counts, len(batches) - i if share else None)
        mask = fre.sample_class_pixels(labels, quota, K, g)
        kept = labels.masked_fill(~mask, -1)
        taken = torch.bincount(kept[kept >= 0], minlength=K)
        per_batch.append(taken)
        counts += taken  # what accumulate_class_moments adds to its counts
    available = sum(torch.bincount(y[(y >= 0) & (y < K)], minlength=K) for y in batches)
    # Every class is present in every batch with more pixels than its share: the budget is met
    # exactly (or all pixels are taken when the budget exceeds what exists), never exceeded.
    assert counts.tolist() == torch.minimum(available.double(), budget).tolist()
    if share:  # the sample is spread over the pass, not front-loaded
        assert all(t[0] > 0 for t in per_batch)
    else:
        assert per_batch[-1][0] == 0


def test_batch_quota_never_exceeds_remaining():
    remaining = torch.tensor([0.0, 1.0, 7.0, 10.0, -3.0])
    for left in (1, 2, 3, 100):
        quota = fre.batch_quota(remaining, left)
        assert torch.all(quota <= remaining.clamp(min=0)) and torch.all(quota >= 0)
    assert fre.batch_quota(remaining, 3).tolist() == [0, 1, 3, 4, 0]
    assert fre.batch_quota(remaining).tolist() == [0, 1, 7, 10, 0]


# --------------------------------------------------------------------------- under-sampled classes
def test_undersampled_class_warns_and_falls_back_to_global():
    features, labels = make_features(11, batch=4)
    # Keep only 3 pixels of class 2 and none of class 3.
    idx = (labels == 2).nonzero()
    labels[labels == 2] = 255
    labels[tuple(idx[:3].T)] = 2
    labels[labels == 3] = 255
    moments = accumulate(features, labels)
    names = ["a", "b", "narrow", "empty"]
    with pytest.warns(fre.FREFitWarning, match=r"class 2 \(narrow\): 3 px.*class 3 \(empty\): 0 px"):
        means, bases, ranks = fre.fit_subspaces(*moments, n_components=5, class_names=names)
    g_means, g_bases, g_ranks = fre.fit_subspaces(*moments, n_components=5, mode="global")
    for k in (2, 3):
        torch.testing.assert_close(means[k], g_means[0])
        np.testing.assert_allclose(projectors(bases)[k], projectors(g_bases)[0], atol=1e-12)
        assert ranks[k] == g_ranks[0]
    assert fre.undersampled_classes(moments[2], 5, C).tolist() == [False, False, True, True]
    # Well-sampled classes keep their own subspace.
    x, y = pixels_np(features, labels)
    np.testing.assert_allclose(means[0].numpy(), x[y == 0].mean(0), rtol=1e-12)
    probe, _ = make_features(12, batch=1)
    cls = torch.full((1, probe.shape[2], probe.shape[3]), 3)
    for mode in ("predicted", "min"):
        assert torch.isfinite(fre.reconstruction_error(probe, means, bases, cls, mode=mode)).all()


def test_explained_variance_rule_requires_a_full_rank_sample_by_default():
    features, labels = make_features(13, batch=1)  # ~25 pixels per class, C = 12
    moments = accumulate(features, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fre.fit_subspaces(*moments)  # 25 >= C + 1: no warning
    moments[2][1] = 5.0  # pretend class 1 has 5 pixels (< C + 1)
    with pytest.warns(fre.FREFitWarning, match="class 1: 5 px"):
        fre.fit_subspaces(*moments)


# --------------------------------------------------------------------------- standardization
def test_error_statistics_and_standardization_match_numpy():
    g = torch.Generator().manual_seed(14)
    errors = torch.rand(3, 8, 9, generator=g) * 4
    labels = torch.randint(0, K, (3, 8, 9), generator=g)
    labels[0, :2] = 255
    sums, sq, counts = (torch.zeros(K, dtype=torch.float64) for _ in range(3))
    # Two streamed halves.
    fre.accumulate_error_moments(errors[:1], labels[:1], K, sums, sq, counts)
    fre.accumulate_error_moments(errors[1:], labels[1:], K, sums, sq, counts)
    mean, std = fre.error_statistics(sums, sq, counts)
    e, y = errors.reshape(-1).double().numpy(), labels.reshape(-1).numpy()
    for k in range(K):
        np.testing.assert_allclose(mean[k].item(), e[y == k].mean(), rtol=1e-12)
        np.testing.assert_allclose(std[k].item(), e[y == k].std(), rtol=1e-9)  # population std

    cls = labels.clamp(0, K - 1)
    z = fre.standardize_errors(errors, mean, std, cls)
    expected = (e - mean.numpy()[cls.reshape(-1)]) / std.numpy()[cls.reshape(-1)]
    np.testing.assert_allclose(z.reshape(-1).numpy(), expected, rtol=1e-5, atol=1e-5)
    per_class = torch.rand(2, K, 5, 6, generator=g)
    z_all = fre.standardize_errors(per_class, mean, std)
    for k in range(K):
        torch.testing.assert_close(z_all[:, k], ((per_class[:, k] - mean[k]) / std[k]).float())


def test_error_statistics_fall_back_for_empty_classes():
    sums = torch.tensor([2.0, 0.0, 5.0], dtype=torch.float64)
    sq = torch.tensor([3.0, 0.0, 13.0], dtype=torch.float64)
    counts = torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64)
    with pytest.warns(fre.FREFitWarning, match="class 1: 0"):
        mean, std = fre.error_statistics(sums, sq, counts)
    assert mean[1].item() == pytest.approx(7.0 / 4.0)
    assert std[1].item() == pytest.approx((16.0 / 4.0 - (7.0 / 4.0) ** 2) ** 0.5)


def test_resize_labels_takes_the_centre_of_each_cell():
    labels = torch.randint(0, 256, (2, 72, 128))  # a 720x1280 frame at 1/10, features at 1/4 of that
    small = fre.resize_labels(labels, (18, 32))
    assert small.dtype == labels.dtype
    assert torch.equal(small, labels[:, 2::4, 2::4])
    assert fre.resize_labels(labels, tuple(labels.shape[-2:])) is labels

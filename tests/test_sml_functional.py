"""Standardized Max Logits and baselines against float64 references written from the definitions.

Every reference below loops over pixels in plain Python/NumPy (slow but plainly right) and
shares no code with ``lightning_modules/sml.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lightning_modules.scoring.baselines import baseline_scores, energy_score
from lightning_modules.sml import (
    dilated_smoothing,
    entropy_score,
    max_logit_score,
    msp_score,
    prediction_boundaries,
    sml_accumulate,
    sml_anomaly_score,
    sml_statistics,
    standardized_max_logit,
    suppress_boundaries,
)

RTOL, ATOL = 1e-5, 1e-6
CROSS = [(-1, 0), (1, 0), (0, -1), (0, 1), (0, 0)]
SQUARE = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]


# ----------------------------------------------------------------------------- data
def blocky_logits(seed: int, batch: int = 2, classes: int = 5, height: int = 20, width: int = 27) -> np.ndarray:
    """float32 logits whose argmax is a piecewise-constant map (rectangles, some on the image
    border, plus isolated pixels), with noisy max logits."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, size=(batch, 1, 1)) * np.ones((batch, height, width), dtype=np.int64)
    for b in range(batch):
        for _ in range(7):
            h0, w0 = rng.integers(-3, height), rng.integers(-3, width)
            dh, dw = rng.integers(3, 11), rng.integers(3, 13)
            label[b, max(h0, 0) : h0 + dh, max(w0, 0) : w0 + dw] = rng.integers(0, classes)
    speckle = rng.random((batch, height, width)) < 0.03
    label[speckle] = rng.integers(0, classes, size=int(speckle.sum()))
    logits = rng.normal(0.0, 1.0, size=(batch, classes, height, width))
    logits += 4.0 * (np.arange(classes)[None, :, None, None] == label[:, None])
    return logits.astype(np.float32)


def random_stats(classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(3.0, 0.5, size=classes), rng.uniform(0.5, 2.0, size=classes)


# ----------------------------------------------------------------------------- references
def ref_sml(logits: np.ndarray, means: np.ndarray, stds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    batch, _, height, width = logits.shape
    sml = np.zeros((batch, height, width))
    pred = np.zeros((batch, height, width), dtype=np.int64)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                v = logits[b, :, i, j].astype(np.float64)
                c = int(np.argmax(v))
                pred[b, i, j] = c
                sml[b, i, j] = (v[c] - means[c]) / stds[c]
    return sml, pred


def ref_boundaries(pred: np.ndarray, border_value: float | None = None) -> np.ndarray:
    """Dilation by the 3x3 cross != erosion by the 3x3 square, on one [H, W] map."""
    height, width = pred.shape
    out = np.zeros((height, width), dtype=bool)
    for i in range(height):
        for j in range(width):
            dil = max(pred[i + di, j + dj] for di, dj in CROSS if 0 <= i + di < height and 0 <= j + dj < width)
            vals = []
            for di, dj in SQUARE:
                if 0 <= i + di < height and 0 <= j + dj < width:
                    vals.append(float(pred[i + di, j + dj]))
                elif border_value is not None:
                    vals.append(border_value)
            out[i, j] = dil != min(vals)
    return out


def ref_expand(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by the L1 ball (diamond) of the given radius."""
    height, width = mask.shape
    out = np.zeros_like(mask)
    for i in range(height):
        for j in range(width):
            out[i, j] = any(
                mask[i + di, j + dj]
                for di in range(-radius, radius + 1)
                for dj in range(-radius, radius + 1)
                if abs(di) + abs(dj) <= radius and 0 <= i + di < height and 0 <= j + dj < width
            )
    return out


def ref_suppress(
    sml: np.ndarray, pred: np.ndarray, width: int, iterations: int, border_value: float | None = None
) -> np.ndarray:
    """Boundary suppression on one [H, W] map, straight from the description."""
    height, wid = sml.shape
    boundary = ref_boundaries(pred, border_value)
    out = sml.astype(np.float64).copy()
    step = width // iterations
    for it in range(iterations):
        radius = 0 if it == iterations - 1 else width - it * step - 1
        band = ref_expand(boundary, radius)
        new = out.copy()
        for i in range(height):
            for j in range(wid):
                if not band[i, j]:
                    continue
                # replication padding: out-of-image neighbours are clamped copies
                neighbours = [(min(max(i + di, 0), height - 1), min(max(j + dj, 0), wid - 1)) for di, dj in SQUARE]
                vals = [out[p, q] for p, q in neighbours if not band[p, q]]
                if vals:
                    new[i, j] = sum(vals) / len(vals)
        out = new
    return out


def ref_smooth(x: np.ndarray, kernel_size: int = 7, dilation: int = 6, sigma: float = 1.0) -> np.ndarray:
    """2-D dilated Gaussian convolution with replication padding on one [H, W] map."""
    height, width = x.shape
    c = (kernel_size - 1) / 2
    g = np.array(
        [
            [np.exp(-((a - c) ** 2 + (b - c) ** 2) / (2 * sigma**2)) for b in range(kernel_size)]
            for a in range(kernel_size)
        ]
    )
    g /= g.sum()
    out = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            acc = 0.0
            for a in range(kernel_size):
                for b in range(kernel_size):
                    p = min(max(i + int(dilation * (a - c)), 0), height - 1)
                    q = min(max(j + int(dilation * (b - c)), 0), width - 1)
                    acc += g[a, b] * x[p, q]
            out[i, j] = acc
    return out


def ref_score(
    logits: np.ndarray,
    means: np.ndarray,
    stds: np.ndarray,
    width: int,
    iterations: int,
    suppression: bool,
    smoothing: bool,
    border_value: float | None = None,
) -> np.ndarray:
    sml, pred = ref_sml(logits, means, stds)
    out = []
    for b in range(sml.shape[0]):
        x = sml[b]
        if suppression:
            x = ref_suppress(x, pred[b], width, iterations, border_value)
        if smoothing:
            x = ref_smooth(x)
        out.append(-x)
    return np.stack(out)


def to_t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


# ----------------------------------------------------------------------------- SML pipeline
def test_standardized_max_logit_matches_reference() -> None:
    logits = blocky_logits(0)
    means, stds = random_stats(logits.shape[1])
    sml, pred = standardized_max_logit(to_t(logits), to_t(means), to_t(stds))
    ref, ref_pred = ref_sml(logits, means, stds)
    assert sml.dtype == torch.float32 and pred.dtype == torch.int64
    np.testing.assert_array_equal(pred.numpy(), ref_pred)
    np.testing.assert_allclose(sml.numpy(), ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("suppression", "smoothing"), [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize(("width", "iterations"), [(4, 4), (2, 2), (6, 3)])
def test_sml_anomaly_score_matches_reference(suppression: bool, smoothing: bool, width: int, iterations: int) -> None:
    logits = blocky_logits(width * 10 + iterations)
    means, stds = random_stats(logits.shape[1], seed=width)
    score = sml_anomaly_score(
        to_t(logits),
        to_t(means),
        to_t(stds),
        boundary_width=width,
        boundary_iterations=iterations,
        boundary_suppression=suppression,
        dilated_smoothing=smoothing,
    )
    ref = ref_score(logits, means, stds, width, iterations, suppression, smoothing)
    assert score.shape == logits[:, 0].shape and score.dtype == torch.float32
    np.testing.assert_allclose(score.numpy(), ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("width", "iterations"), [(4, 4), (2, 2), (6, 3)])
def test_suppression_is_not_vacuous(width: int, iterations: int) -> None:
    """The test maps must have band pixels that change and interior pixels that do not."""
    logits = blocky_logits(width * 10 + iterations)
    means, stds = random_stats(logits.shape[1], seed=width)
    sml, pred = ref_sml(logits, means, stds)
    for b in range(sml.shape[0]):
        out = ref_suppress(sml[b], pred[b], width, iterations)
        changed = out != sml[b]
        assert changed.mean() > 0.2 and (~changed).mean() > 0.05
    # boundaries reach every side of the image somewhere in the batch
    boundary = np.stack([ref_boundaries(p) for p in pred])
    assert boundary[:, 0].any() and boundary[:, -1].any() and boundary[:, :, 0].any() and boundary[:, :, -1].any()


def test_official_border_quirk_matches_reference() -> None:
    """``erosion_border_value=1.0`` reproduces the kornia version pinned by the official code."""
    logits = blocky_logits(7)
    means, stds = random_stats(logits.shape[1], seed=7)
    score = sml_anomaly_score(to_t(logits), to_t(means), to_t(stds), erosion_border_value=1.0)
    ref = ref_score(logits, means, stds, 4, 4, True, True, border_value=1.0)
    np.testing.assert_allclose(score.numpy(), ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("border_value", [None, 1.0])
def test_prediction_boundaries_match_reference(border_value: float | None) -> None:
    rng = np.random.default_rng(3)
    pred = np.repeat(np.repeat(rng.integers(0, 4, size=(2, 5, 6)), 3, axis=1), 2, axis=2)
    pred[:, 4, 7] = 3
    got = prediction_boundaries(to_t(pred), erosion_border_value=border_value).numpy()
    ref = np.stack([ref_boundaries(p, border_value) for p in pred])
    np.testing.assert_array_equal(got, ref)
    if border_value == 1.0:
        # every image-border pixel of class >= 2 is a boundary under the official quirk
        edge = np.zeros(pred.shape[1:], dtype=bool)
        edge[[0, -1], :] = edge[:, [0, -1]] = True
        assert got[:, edge][pred[:, edge] >= 2].all()


def test_boundary_definition_is_cross_dilation_vs_square_erosion() -> None:
    """A diagonal neighbour makes a boundary only when its class index is lower."""
    lower = torch.tensor([[[1, 1, 1], [1, 1, 1], [1, 1, 0]]])
    higher = torch.tensor([[[1, 1, 1], [1, 1, 1], [1, 1, 2]]])
    assert bool(prediction_boundaries(lower)[0, 1, 1])
    assert not bool(prediction_boundaries(higher)[0, 1, 1])
    uniform = torch.full((1, 4, 5), 3)
    assert not prediction_boundaries(uniform).any()


def test_dilated_smoothing_matches_reference_and_other_sizes() -> None:
    x = np.random.default_rng(5).normal(size=(2, 9, 23)).astype(np.float32)
    got = dilated_smoothing(to_t(x))
    np.testing.assert_allclose(got.numpy(), np.stack([ref_smooth(v) for v in x]), rtol=RTOL, atol=ATOL)
    got = dilated_smoothing(to_t(x), kernel_size=5, dilation=2, sigma=1.5)
    ref = np.stack([ref_smooth(v, kernel_size=5, dilation=2, sigma=1.5) for v in x])
    np.testing.assert_allclose(got.numpy(), ref, rtol=RTOL, atol=ATOL)
    # a constant map stays constant (kernel sums to 1)
    np.testing.assert_allclose(dilated_smoothing(torch.full((1, 6, 8), 2.5)).numpy(), 2.5, rtol=RTOL)


def test_half_precision_logits_are_upcast() -> None:
    logits = blocky_logits(11)
    means, stds = random_stats(logits.shape[1], seed=11)
    for dtype in (torch.bfloat16, torch.float16):
        low = to_t(logits).to(dtype)
        score = sml_anomaly_score(low, to_t(means), to_t(stds))
        assert score.dtype == torch.float32
        ref = ref_score(low.float().numpy(), means, stds, 4, 4, True, True)
        np.testing.assert_allclose(score.numpy(), ref, rtol=RTOL, atol=ATOL)
        for fn in (msp_score, max_logit_score, entropy_score):
            assert fn(low).dtype == torch.float32
            np.testing.assert_allclose(fn(low).numpy(), fn(low.float()).numpy(), rtol=RTOL, atol=ATOL)


def test_invalid_arguments_raise_clear_errors() -> None:
    logits = to_t(blocky_logits(1, height=6, width=7))
    means, stds = random_stats(5)
    with pytest.raises(ValueError, match="multiple of boundary_iterations"):
        sml_anomaly_score(logits, to_t(means), to_t(stds), boundary_width=5, boundary_iterations=2)
    with pytest.raises(ValueError, match=r"shape \[5\]"):
        standardized_max_logit(logits, to_t(means[:4]), to_t(stds[:4]))
    with pytest.raises(ValueError, match="odd"):
        dilated_smoothing(logits[:, 0], kernel_size=4)
    with pytest.raises(ValueError, match=r"\[B, K, H, W\]"):
        msp_score(logits[0])
    # zero iterations: suppression is the identity
    sml = logits[:, 0]
    assert torch.equal(suppress_boundaries(sml, logits.argmax(1), 0, 0), sml)


# ----------------------------------------------------------------------------- statistics
def ref_statistics(batches: list[np.ndarray], valids: list[np.ndarray] | None, classes: int):
    collected: list[list[float]] = [[] for _ in range(classes)]
    for n, logits in enumerate(batches):
        batch, _, height, width = logits.shape
        for b in range(batch):
            for i in range(height):
                for j in range(width):
                    if valids is not None and not valids[n][b, i, j]:
                        continue
                    v = logits[b, :, i, j].astype(np.float64)
                    collected[int(np.argmax(v))].append(float(v.max()))
    return collected


def accumulate(batches, valids=None, counts_dtype=torch.float64):
    classes = batches[0].shape[1]
    sums = torch.zeros(classes, dtype=torch.float64)
    sq_sums = torch.zeros(classes, dtype=torch.float64)
    counts = torch.zeros(classes, dtype=counts_dtype)
    for n, logits in enumerate(batches):
        valid = None if valids is None else to_t(valids[n])
        sml_accumulate(to_t(logits), sums, sq_sums, counts, valid=valid)
    return sums, sq_sums, counts


def statistics_batches() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    batches = []
    for _ in range(3):
        logits = rng.normal(size=(2, 6, 7, 9)).astype(np.float32) * 2.0
        logits[:, 4] = -20.0  # class 4 never predicted
        batches.append(logits)
    return batches


@pytest.mark.parametrize("counts_dtype", [torch.float64, torch.int64])
def test_statistics_match_direct_float64_computation(counts_dtype: torch.dtype) -> None:
    batches = statistics_batches()
    with pytest.warns(UserWarning, match=r"class\(es\) \[4\] were never predicted"):
        means, stds = sml_statistics(*accumulate(batches, counts_dtype=counts_dtype))
    collected = ref_statistics(batches, None, 6)
    for c in range(6):
        if c == 4:
            assert not collected[c]
            assert means[c].item() == 0.0 and stds[c].item() == 1.0
            continue
        assert len(collected[c]) > 5
        np.testing.assert_allclose(means[c].item(), np.mean(collected[c]), rtol=1e-12)
        # sample (N - 1) standard deviation, as torch.var in the official statistics script
        np.testing.assert_allclose(stds[c].item(), np.std(collected[c], ddof=1), rtol=1e-10)
    assert means.dtype == torch.float64 and stds.dtype == torch.float64


def test_statistics_streamed_equal_one_pass_and_respect_valid_mask() -> None:
    batches = statistics_batches()
    streamed = accumulate(batches)
    whole = accumulate([np.concatenate(batches, axis=0)])
    for a, b in zip(streamed, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    rng = np.random.default_rng(9)
    valids = [rng.random((2, 7, 9)) < 0.6 for _ in batches]
    sums, sq_sums, counts = accumulate(batches, valids)
    collected = ref_statistics(batches, valids, 6)
    np.testing.assert_array_equal(counts.numpy(), [len(v) for v in collected])
    np.testing.assert_allclose(sums.numpy(), [sum(v) for v in collected], rtol=1e-12)
    np.testing.assert_allclose(sq_sums.numpy(), [sum(x * x for x in v) for v in collected], rtol=1e-12)


def test_statistics_guard_single_pixel_and_constant_classes() -> None:
    # class 0: three pixels of max logit 2.0 (constant); class 1: one pixel 2.5; class 2: 3, 3, 4
    values = [[2.0, 2.0, 2.0], [2.5], [3.0, 3.0, 4.0]]
    sums = torch.tensor([sum(v) for v in values], dtype=torch.float64)
    sq_sums = torch.tensor([sum(x * x for x in v) for v in values], dtype=torch.float64)
    counts = torch.tensor([len(v) for v in values], dtype=torch.int64)
    with pytest.warns(UserWarning, match=r"class\(es\) \[0, 1\] have fewer than 2 pixels or constant"):
        means, stds = sml_statistics(sums, sq_sums, counts)
    np.testing.assert_allclose(means.numpy(), [np.mean(v) for v in values], rtol=1e-12)
    np.testing.assert_allclose(stds.numpy(), [1.0, 1.0, np.std(values[2], ddof=1)], rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sml_statistics(sums[2:], sq_sums[2:], counts[2:])  # a healthy class warns nothing


def test_statistics_from_half_precision_logits() -> None:
    logits = statistics_batches()[0]
    low = to_t(logits).to(torch.bfloat16)
    sums, sq_sums, counts = accumulate([low.float().numpy()])
    s2 = torch.zeros(6, dtype=torch.float64)
    q2 = torch.zeros(6, dtype=torch.float64)
    n2 = torch.zeros(6, dtype=torch.int64)
    sml_accumulate(low, s2, q2, n2)
    torch.testing.assert_close(s2, sums)
    torch.testing.assert_close(q2, sq_sums)
    np.testing.assert_array_equal(n2.numpy(), counts.numpy())
    with pytest.raises(TypeError, match="float64"):
        sml_accumulate(low, s2.float(), q2, n2)


# ----------------------------------------------------------------------------- baselines
def test_baselines_match_numpy_formulas() -> None:
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(2, 6, 5, 7)) * 3.0).astype(np.float32)
    logits[0, 2, 0, 0] = 25.0  # a confident pixel: 1 - p_max ~ 1e-9, below float32 resolution of 1
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    msp_ref = 1.0 - p.max(axis=1)
    entropy_ref = -(p * np.log(p)).sum(axis=1)
    msp, entropy = msp_score(to_t(logits)).numpy(), entropy_score(to_t(logits)).numpy()
    np.testing.assert_allclose(msp, msp_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(max_logit_score(to_t(logits)).numpy(), -x.max(axis=1), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(entropy, entropy_ref, rtol=RTOL, atol=ATOL)
    # relative precision survives at the confident pixel (float64 reference is good to ~1e-7 there)
    assert msp_ref[0, 0, 0] < 1e-7
    np.testing.assert_allclose(msp[0, 0, 0], msp_ref[0, 0, 0], rtol=RTOL)
    np.testing.assert_allclose(entropy[0, 0, 0], entropy_ref[0, 0, 0], rtol=RTOL)


def ref_energy(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``-T log sum_k exp(l_k / T)`` in float64, straight from the definition (shifted by the max)."""
    x = logits.astype(np.float64) / temperature
    top = x.max(axis=1)
    return -temperature * (top + np.log(np.exp(x - top[:, None]).sum(axis=1)))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 1000.0])
def test_energy_matches_float64_formula(temperature: float) -> None:
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=(2, 6, 5, 7)) * 3.0).astype(np.float32)
    logits[0, :, 0, 1] = 4.0  # a tie between every class: E = -(4 + T log 6)
    logits[0, 3, 0, 2], logits[0, :3, 0, 2] = 40.0, 39.0  # a near tie
    logits[1, :, 1, 1] = rng.normal(size=6) * 1e4  # large magnitude
    logits[1, :, 2, 2] = rng.normal(size=6) * 1e4 - 3e4
    logits[1, :, 3, 3] = 0.0
    logits[1, 0, 3, 3] = 1e-6  # the max logit near 0 with a confident softmax
    logits[1, 1:, 4, 4], logits[1, 0, 4, 4] = -30.0, 0.0  # E = -log(1 + 5 e^-30): needs log1p
    energy = energy_score(to_t(logits), temperature)
    assert energy.dtype == torch.float32 and energy.shape == (2, 5, 7)
    ref = ref_energy(logits, temperature)
    # At [1, 4, 4] E ~ -T 5 e^(-30/T): log(1 + tiny) loses it even in float64, so that pixel is
    # checked against its closed form instead.
    general = np.ones(ref.shape, dtype=bool)
    general[1, 4, 4] = False
    np.testing.assert_allclose(energy.numpy()[general], ref[general], rtol=RTOL, atol=0)
    np.testing.assert_allclose(energy[0, 0, 1].item(), -(4.0 + temperature * np.log(6.0)), rtol=1e-6)
    closed_form = -temperature * np.log1p(5 * np.exp(-30.0 / temperature))
    np.testing.assert_allclose(energy[1, 4, 4].item(), closed_form, rtol=1e-6)
    # higher = more anomalous: the same logit pattern at a larger magnitude (more confident) scores lower
    weak = np.array([1.0, 0.0, -1.0], dtype=np.float32).reshape(1, 3, 1, 1)
    assert energy_score(to_t(weak), temperature) > energy_score(to_t(5 * weak), temperature)


def test_energy_extremes_small_temperature_and_half_precision() -> None:
    # logits near float32's range and T << 1: dividing the logits by T first would overflow
    logits = np.array([3e38, -3e38, 1e38], dtype=np.float32).reshape(1, 3, 1, 1)
    energy = energy_score(to_t(logits), 1e-3)
    assert torch.isfinite(energy).all() and energy.item() == pytest.approx(-3e38, rel=1e-6)
    # T -> 0 tends to -max logit, T large to -T log K - mean logit
    small = to_t(np.array([1.0, 2.0, 3.0], dtype=np.float32).reshape(1, 3, 1, 1))
    assert energy_score(small, 1e-4).item() == pytest.approx(-3.0, abs=1e-6)
    assert energy_score(small, 1e6).item() == pytest.approx(-1e6 * np.log(3.0) - 2.0, rel=1e-6)
    low = to_t(blocky_logits(12)).to(torch.bfloat16)
    for temperature in (1.0, 0.3):
        out = energy_score(low, temperature)
        assert out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), ref_energy(low.float().numpy(), temperature), rtol=RTOL, atol=ATOL)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="temperature"):
            energy_score(small, bad)


def test_baseline_scores_report_energy_at_the_temperature() -> None:
    logits = to_t(blocky_logits(13))
    scores = baseline_scores(logits)
    assert list(scores) == ["msp", "maxlogit", "entropy", "energy"]
    assert torch.equal(scores["energy"], energy_score(logits))
    assert torch.equal(baseline_scores(logits, 2.5)["energy"], energy_score(logits, 2.5))

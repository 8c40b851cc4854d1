"""Entropy-maximisation outlier exposure: the loss against float64 transcriptions, and the module.

Two independent references: the paper's loss written as a loop over pixels (per-pixel convex
combination of the known-class cross-entropy and the cross-entropy to the uniform distribution),
and the official code's formulation (soft targets ``(1 - lambda) one_hot`` on known pixels,
``lambda / K`` on every class of an outlier pixel, zero on void; the mean over all pixels *and*
classes), which differs from ours by a per-batch constant that the test states.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.labels import ANOMALY_INDEX, IGNORE_INDEX
from lightning_modules.entropy_oe import EntropyOESegmenter, entropy_maximisation_loss
from lightning_modules.scoring.baselines import entropy_score

B, K, H, W = 2, 5, 6, 7


def logits_and_target(seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float64 logits and labels with known, outlier (13) and void (255) pixels."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, K, H, W, generator=g, dtype=torch.float64)
    kind = torch.randint(0, 5, (B, H, W), generator=g)
    target = torch.randint(0, K, (B, H, W), generator=g)
    target = torch.where(kind == 3, torch.full_like(target, ANOMALY_INDEX), target)
    target = torch.where(kind == 4, torch.full_like(target, IGNORE_INDEX), target)
    return logits, target


def paper_loss(logits: np.ndarray, target: np.ndarray, lam: float, weight: np.ndarray | None = None) -> float:
    """(1 - lam) (-log p_y) on known pixels, lam (-1/K sum_k log p_k) on outliers, weighted mean."""
    total = count = 0.0
    for b in range(logits.shape[0]):
        for i in range(logits.shape[2]):
            for j in range(logits.shape[3]):
                z = logits[b, :, i, j]
                log_p = z - (z.max() + math.log(sum(math.exp(v - z.max()) for v in z)))
                y = int(target[b, i, j])
                if y < logits.shape[1]:
                    w = 1.0 if weight is None else float(weight[y])
                    total += w * (1 - lam) * -log_p[y]
                    count += w
                elif y == ANOMALY_INDEX:
                    total += lam * -log_p.mean()
                    count += 1.0
    return total / count


def official_code_loss(logits: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """The official code's soft-target cross-entropy: mean over all pixels and classes."""
    num_classes = logits.shape[1]
    soft = torch.zeros_like(logits)
    for c in range(num_classes):
        soft[:, c] = (target == c).to(logits.dtype) * (1 - lam)
    soft += (target == ANOMALY_INDEX).to(logits.dtype).unsqueeze(1) * (lam / num_classes)
    return (soft * -F.log_softmax(logits, dim=1)).mean()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9, 1.0])
def test_loss_matches_the_papers_formula(seed: int, lam: float) -> None:
    logits, target = logits_and_target(seed)
    loss, _, _ = entropy_maximisation_loss(logits, target, lam)
    assert loss.item() == pytest.approx(paper_loss(logits.numpy(), target.numpy(), lam), rel=1e-12)


def test_loss_is_the_official_codes_up_to_its_normaliser() -> None:
    logits, target = logits_and_target(7)
    lam = 0.9
    counted = int(((target < K) | (target == ANOMALY_INDEX)).sum())
    official = official_code_loss(logits, target, lam)
    loss, _, _ = entropy_maximisation_loss(logits, target, lam)
    # The official mean also divides by the void pixels and by K: L_official = L * counted / (N K).
    assert (official * target.numel() * K / counted).item() == pytest.approx(loss.item(), rel=1e-12)


def test_class_weights_without_outliers_are_weighted_cross_entropy() -> None:
    logits, target = logits_and_target(3)
    target = torch.where(target == ANOMALY_INDEX, torch.full_like(target, IGNORE_INDEX), target)
    weight = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25], dtype=torch.float64)
    loss, known_ce, outlier_ce = entropy_maximisation_loss(logits, target, 0.0, weight=weight)
    reference = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    assert known_ce.item() == pytest.approx(reference.item(), rel=1e-12)
    assert outlier_ce.item() == 0.0  # no outlier pixel: 0, not NaN
    weighted = paper_loss(logits.numpy(), target.numpy(), 0.3, weight.numpy())
    assert entropy_maximisation_loss(logits, target, 0.3, weight=weight)[0].item() == pytest.approx(weighted, rel=1e-12)


def test_outlier_term_is_smallest_at_the_uniform_softmax_where_entropy_is_largest() -> None:
    logits, _ = logits_and_target(1)
    outlier = torch.full((B, H, W), ANOMALY_INDEX)
    logits.requires_grad_(True)
    _, _, l_out = entropy_maximisation_loss(logits, outlier, 1.0)
    reference = torch.logsumexp(logits, 1) - logits.mean(1)  # = KL(u || p) + log K per pixel
    assert l_out.item() == pytest.approx(reference.mean().item(), rel=1e-12)
    loss, _, _ = entropy_maximisation_loss(logits, outlier, 1.0)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = (torch.softmax(logits, 1) - 1.0 / K) / (B * H * W)  # d/dz of logsumexp(z) - mean(z)
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-10, atol=1e-14)
    uniform = torch.zeros(B, K, H, W, dtype=torch.float64)
    at_uniform = entropy_maximisation_loss(uniform, outlier, 1.0)[0]
    assert at_uniform.item() == pytest.approx(math.log(K), rel=1e-12)
    assert entropy_score(uniform).max().item() == pytest.approx(math.log(K), rel=1e-6)


def test_only_void_gives_zero_with_a_graph_and_bf16_is_computed_in_float32() -> None:
    logits = torch.randn(1, K, 2, 2, requires_grad=True)
    loss, known_ce, outlier_ce = entropy_maximisation_loss(logits, torch.full((1, 2, 2), IGNORE_INDEX), 0.9)
    assert loss.item() == 0.0 and known_ce.item() == 0.0 and outlier_ce.item() == 0.0
    loss.backward()  # a graph, so DDP and mixed batches do not fail
    half = torch.randn(1, K, 3, 3).bfloat16()
    target = torch.tensor([[[0, 1, 13], [13, 2, 255], [4, 13, 3]]])
    assert entropy_maximisation_loss(half, target)[0].dtype == torch.float32


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_bad_outlier_weight_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="outlier_weight"):
        entropy_maximisation_loss(torch.zeros(1, K, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long), bad)
    with pytest.raises(ValueError, match="model.outlier_weight"):
        EntropyOESegmenter(num_classes=K, encoder_name="resnet18", encoder_weights=None, outlier_weight=bad)


def test_entropy_is_the_primary_score_beside_the_other_baselines() -> None:
    model = EntropyOESegmenter(num_classes=K, encoder_name="resnet18", encoder_weights=None).eval()
    with torch.no_grad():
        output = model.segment(torch.randn(1, 3, 64, 64))
    assert list(output.scores) == ["entropy", "msp", "maxlogit", "energy"]
    torch.testing.assert_close(output.scores["entropy"], entropy_score(output.logits))


def test_fit_without_pasted_outliers_is_refused() -> None:
    from types import SimpleNamespace

    model = EntropyOESegmenter(num_classes=K, encoder_name="resnet18", encoder_weights=None)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(injection=None))
    with pytest.raises(ValueError, match="data.injection"):
        model.setup("fit")
    model.setup("test")  # scoring needs no outliers

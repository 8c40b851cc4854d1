"""DMLNet: its math against direct float64 NumPy transcriptions of the equations, and the module.

The references loop over pixels and classes on purpose: they are the definitions (the fusion is
written the way the reference evaluation ``eval_ood_traditional.py`` computes it, one image at
a time with NumPy), independent of the vectorized implementation they check.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.labels import ANOMALY_INDEX, IGNORE_INDEX
from lightning_modules.dmlnet import (
    DMLNetSegmenter,
    PrototypeHead,
    dce_loss,
    distance_logits,
    dmlnet_loss,
    dmlnet_scores,
    eds_score,
    fixed_prototypes,
    fused_score,
    minmax_per_image,
    mmsp_score,
    nearest_prototype,
    squared_distances,
    variance_loss,
)

B, K, H, W = 2, 5, 6, 7
F64 = torch.float64


def embedding_and_target(seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random embeddings ``[B, K, H, W]`` (float64) and labels with known, anomaly and ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    embedding = scale * torch.randn(B, K, H, W, generator=g, dtype=F64)
    target = torch.randint(0, K, (B, H, W), generator=g)
    r = torch.rand(B, H, W, generator=g)
    target[r < 0.1] = ANOMALY_INDEX
    target[(r >= 0.1) & (r < 0.2)] = IGNORE_INDEX
    return embedding, target


def ref_distances(embedding: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """d[b, k, i, j] = sum_d (f_d - m_kd)^2, one pixel and one class at a time."""
    b_, _, h_, w_ = embedding.shape
    out = np.zeros((b_, prototypes.shape[0], h_, w_))
    for b in range(b_):
        for i in range(h_):
            for j in range(w_):
                for k in range(prototypes.shape[0]):
                    out[b, k, i, j] = np.sum((embedding[b, :, i, j] - prototypes[k]) ** 2)
    return out


def ref_softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


# ------------------------------------------------------------------------------------------ math
def test_fixed_prototypes_are_scaled_one_hot_vectors() -> None:
    np.testing.assert_array_equal(fixed_prototypes(4, 3.0).numpy(), 3.0 * np.eye(4))
    with pytest.raises(ValueError, match="magnitude"):
        fixed_prototypes(4, 0.0)


@pytest.mark.parametrize("prototypes", ["fixed", "random"])
def test_squared_distances_equal_the_definition(prototypes: str) -> None:
    embedding, _ = embedding_and_target(0)
    protos = fixed_prototypes(K, 3.0, F64) if prototypes == "fixed" else torch.randn(K, K, dtype=F64)
    got = squared_distances(embedding, protos)
    assert got.dtype == F64 and got.shape == (B, K, H, W)
    np.testing.assert_allclose(got.numpy(), ref_distances(embedding.numpy(), protos.numpy()), rtol=1e-12, atol=1e-12)


def test_squared_distances_are_float32_and_nonnegative_under_bf16_autocast() -> None:
    protos = fixed_prototypes(K, 3.0)
    embedding = protos[torch.arange(H * W) % K].T.reshape(1, K, H, W).clone()  # every pixel on a prototype
    embedding[..., 0, 0] += 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = squared_distances(embedding.bfloat16(), protos)
    assert got.dtype == torch.float32 and bool((got >= 0).all())
    assert float(got.amin(dim=1).max()) < 1e-3  # each pixel is (nearly) on its prototype


def test_closed_set_prediction_is_the_nearest_prototype() -> None:
    embedding, _ = embedding_and_target(1)
    d = squared_distances(embedding, fixed_prototypes(K, 3.0, F64))
    ref = ref_distances(embedding.numpy(), 3.0 * np.eye(K)).argmin(axis=1)
    np.testing.assert_array_equal(nearest_prototype(d).numpy(), ref)
    np.testing.assert_array_equal(distance_logits(d, 0.5).argmax(dim=1).numpy(), ref)


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_dce_and_variance_loss_equal_the_definitions(gamma: float) -> None:
    embedding, target = embedding_and_target(2)
    d = squared_distances(embedding, fixed_prototypes(K, 3.0, F64))
    dn, t = d.numpy(), target.numpy()
    nll, own, weighted, wsum = [], [], [], 0.0
    weights = np.linspace(0.5, 2.0, K)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                y = t[b, i, j]
                if not 0 <= y < K:
                    continue
                p = ref_softmax(-gamma * dn[b, :, i, j])
                nll.append(-np.log(p[y]))
                own.append(dn[b, y, i, j])
                weighted.append(weights[y] * -np.log(p[y]))
                wsum += weights[y]
    np.testing.assert_allclose(float(dce_loss(d, target, gamma)), np.mean(nll), rtol=1e-12)
    np.testing.assert_allclose(float(variance_loss(d, target)), np.mean(own), rtol=1e-12)
    np.testing.assert_allclose(
        float(dce_loss(d, target, gamma, torch.tensor(weights))), np.sum(weighted) / wsum, rtol=1e-12
    )
    total, dce, vl = dmlnet_loss(d, target, gamma, variance_weight=0.01)
    np.testing.assert_allclose(float(total), np.mean(nll) + 0.01 * np.mean(own), rtol=1e-12)
    # the same as PyTorch's cross-entropy with the unknown pixels ignored
    torch_ce = torch.nn.functional.cross_entropy(
        -gamma * d, torch.where((target >= 0) & (target < K), target, IGNORE_INDEX), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(dce, torch_ce)


def test_with_one_hot_prototypes_dce_is_cross_entropy_on_scaled_embeddings() -> None:
    # -||f - T e_k||^2 = 2T f_k - ||f||^2 - T^2: the last two terms do not depend on k, so the
    # softmax (DCE, MMSP, entropy) only sees 2T f; EDS and VL see the norm it drops.
    embedding, target = embedding_and_target(7)
    d = squared_distances(embedding, fixed_prototypes(K, 3.0, F64))
    logits = 2 * 3.0 * embedding
    known = torch.where((target >= 0) & (target < K), target, IGNORE_INDEX)
    ce = torch.nn.functional.cross_entropy(logits, known, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(dce_loss(d, target), ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mmsp_score(d), 1 - logits.softmax(dim=1).amax(dim=1), rtol=1e-9, atol=1e-12)


def test_losses_without_known_pixels_are_zero_with_a_graph() -> None:
    embedding, _ = embedding_and_target(3)
    embedding.requires_grad_(True)
    d = squared_distances(embedding, fixed_prototypes(K, 3.0, F64))
    target = torch.full((B, H, W), IGNORE_INDEX)
    target[0, 0, 0] = ANOMALY_INDEX
    total, dce, vl = dmlnet_loss(d, target)
    assert [float(x.detach()) for x in (total, dce, vl)] == [0.0, 0.0, 0.0]
    total.backward()
    assert embedding.grad is not None and float(embedding.grad.abs().sum()) == 0.0


def test_mmsp_and_eds_equal_the_definitions() -> None:
    embedding, _ = embedding_and_target(4)
    protos = 3.0 * np.eye(K)
    d = squared_distances(embedding, torch.tensor(protos))
    dn = ref_distances(embedding.numpy(), protos)
    mmsp = np.zeros((B, H, W))
    eds = np.zeros((B, H, W))
    for b in range(B):
        for i in range(H):
            for j in range(W):
                mmsp[b, i, j] = ref_softmax(-0.7 * dn[b, :, i, j]).max()
                eds[b, i, j] = sum(dn[b, k, i, j] for k in range(K))
    np.testing.assert_allclose(mmsp_score(d, 0.7).numpy(), 1.0 - mmsp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(eds_score(d).numpy(), -eds, rtol=1e-12)
    # EDS = K ||f - m_bar||^2 + sum_k ||m_k - m_bar||^2: the distance from the prototypes' centre
    f = embedding.numpy()
    centre = protos.mean(axis=0)
    spread = np.sum((protos - centre) ** 2)
    from_centre = K * np.sum((f - centre[None, :, None, None]) ** 2, axis=1) + spread
    np.testing.assert_allclose(eds, from_centre, rtol=1e-12)


def test_mmsp_keeps_confident_pixels_apart() -> None:
    # Pixels sitting on a prototype have softmax(-d) within 1e-9 of 1: 1 - MMSP must not round to 0.
    d = torch.tensor([[[[0.0]], [[25.0]], [[25.0]]], [[[0.0]], [[30.0]], [[30.0]]]], dtype=torch.float32)
    score = mmsp_score(d)
    assert float(score[0]) > float(score[1]) > 0.0


def ref_fusion(dn: np.ndarray, gamma: float, clip: float, thre: float, lamda: float) -> np.ndarray:
    """The reference evaluation's fusion, one image at a time (``eval_ood_traditional.py``, ``dissum``)."""
    out = np.zeros((dn.shape[0], *dn.shape[2:]))
    for b in range(dn.shape[0]):
        dis_sum = dn[b].sum(axis=0)  # = -sum of the logits -d
        dis_sum = np.minimum(dis_sum, clip)
        dis_sum = (dis_sum - dis_sum.min()) / (dis_sum.max() - dis_sum.min())
        prob = np.zeros(dis_sum.shape)
        for i in range(dn.shape[2]):
            for j in range(dn.shape[3]):
                prob[i, j] = ref_softmax(-gamma * dn[b, :, i, j]).max()
        prob = (prob - prob.min()) / (prob.max() - prob.min())
        coefficient = 1.0 / (1.0 + np.exp(lamda * (dis_sum - thre)))
        conf = coefficient * dis_sum + (1.0 - coefficient) * prob
        out[b] = 1.0 - conf  # anomaly score: low confidence = anomalous
    return out


@pytest.mark.parametrize("clip", [400.0, 60.0])
def test_fusion_equals_the_reference_evaluation(clip: float) -> None:
    embedding, _ = embedding_and_target(5)
    d = squared_distances(embedding, fixed_prototypes(K, 3.0, F64))
    ref = ref_fusion(d.numpy(), 1.0, clip, 0.2, 50.0)
    if clip < 400:
        assert float(d.sum(dim=1).max()) > clip  # the clip is exercised
    got = fused_score(d, 1.0, clip, 0.2, 50.0)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)
    assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0


def test_fusion_trusts_eds_where_it_is_low_and_mmsp_elsewhere() -> None:
    # Column 0: at the prototypes' centre (lowest EDS); column 1: half-way between two prototypes
    # (high EDS, MMSP 0.5); column 2: on a prototype (highest EDS and MMSP).
    protos = fixed_prototypes(3, 3.0, F64)
    pixels = torch.stack([protos.mean(dim=0), (protos[0] + protos[1]) / 2, protos[2]], dim=1)  # [D, 3]
    d = squared_distances(pixels.view(1, 3, 1, 3), protos)
    score = fused_score(d, clip=None).squeeze()
    assert float(score[0]) > float(score[1]) > float(score[2])
    assert float(score[0]) == pytest.approx(1.0, abs=1e-6)  # EDS-normalized 0, gate 1
    assert float(score[2]) == pytest.approx(0.0, abs=1e-6)


def test_minmax_of_a_constant_image_is_zero_not_nan() -> None:
    x = torch.stack([torch.full((3, 4), 2.5), torch.arange(12.0).view(3, 4)])
    got = minmax_per_image(x)
    assert bool(torch.isfinite(got).all()) and float(got[0].abs().max()) == 0.0
    np.testing.assert_allclose(got[1].numpy(), np.arange(12.0).reshape(3, 4) / 11.0, rtol=1e-6)


def test_scores_are_named_and_float32_under_half_input() -> None:
    embedding, _ = embedding_and_target(6)
    d = squared_distances(embedding.float(), fixed_prototypes(K)).bfloat16()
    scores = dmlnet_scores(d)
    assert list(scores) == ["dmlnet", "mmsp", "eds"]
    for name, score in scores.items():
        assert score.dtype == torch.float32 and score.shape == (B, H, W), name
        assert bool(torch.isfinite(score).all()), name


def test_prototype_head_is_a_checkpointed_buffer_not_a_parameter() -> None:
    head = PrototypeHead(4, 2.0)
    assert list(head.parameters()) == []
    np.testing.assert_array_equal(head.state_dict()["prototypes"].numpy(), 2.0 * np.eye(4))


# ------------------------------------------------------------------------------------------ module
def tiny(**kwargs) -> DMLNetSegmenter:
    torch.manual_seed(0)
    return DMLNetSegmenter(num_classes=K, encoder_name="resnet18", encoder_weights=None, **kwargs)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, K, (2, 32, 48), generator=gen)
    mask[:, -2:] = IGNORE_INDEX
    return {"image": torch.randn(2, 3, 32, 48, generator=gen), "mask": mask}


def test_training_step_gives_a_finite_loss_with_gradients() -> None:
    model = tiny()
    model.train()
    loss = model.training_step(batch(), 0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.net.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert float(model.net.model.encoder.conv1.weight.grad.abs().sum()) > 0


def test_training_step_under_bf16_autocast_is_finite() -> None:
    model = tiny()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step(batch(1), 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_segment_gives_every_score_at_the_image_size() -> None:
    model = tiny().eval()
    image = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        out = model.segment(image)
        distances = model.distances(image)
    assert out.logits.shape == (2, K, 50, 70)
    assert list(out.scores) == ["dmlnet", "mmsp", "eds", "maxlogit", "entropy", "energy"]
    for name, score in out.scores.items():
        assert score.shape == (2, 50, 70) and bool(torch.isfinite(score).all()), name
    # the logits are the negative distances: their argmax is the nearest prototype
    assert torch.equal(out.logits.argmax(dim=1), distances.argmin(dim=1))
    assert not model.needs_posthoc


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="model.gamma"):
        tiny(gamma=0.0)
    with pytest.raises(ValueError, match="model.variance_weight"):
        tiny(variance_weight=-1.0)


def test_checkpoint_round_trip_keeps_weights_prototypes_and_scores(tmp_path: Path) -> None:
    model = tiny(prototype_magnitude=2.0, fusion_threshold=0.3).eval()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "dmlnet.ckpt")
    again = DMLNetSegmenter.load_from_checkpoint(tmp_path / "dmlnet.ckpt", weights_only=True).eval()
    assert again.hparams.fusion_threshold == 0.3
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    np.testing.assert_array_equal(again.head.prototypes.numpy(), 2.0 * np.eye(K))
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one, two = model.segment(image), again.segment(image)
    for name in one.scores:
        assert torch.equal(one.scores[name], two.scores[name]), name

"""The dual-decoder math against direct float64 NumPy computations written from the formulas.

Every reference below loops over pixels and classes on purpose: it is the definition, written
independently of the vectorized implementation it checks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.labels import ANOMALY_INDEX, IGNORE_INDEX
from lightning_modules.dual_decoder import (
    DualDecoderNet,
    accumulate_embedding_sums,
    accumulate_semantic_stats,
    contrastive_anomaly_score,
    contrastive_prototype_loss,
    dual_decoder_anomaly_score,
    finalize_semantic_stats,
    objectosphere_loss,
    semantic_anomaly_score,
    semantic_feature_loss,
    update_prototypes,
)

B, K, D, H, W = 2, 4, 4, 6, 7
F64 = torch.float64


def make_batch(seed: int, batch: int = B, boost: float = 3.0) -> dict[str, torch.Tensor]:
    """Random logits/embeddings with known, anomaly and ignore pixels; ~60% of known pixels are
    made true positives by boosting their target logit."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, K, (batch, H, W), generator=g)
    r = torch.rand(batch, H, W, generator=g)
    target[r < 0.15] = ANOMALY_INDEX
    target[(r >= 0.15) & (r < 0.25)] = IGNORE_INDEX
    logits = torch.randn(batch, K, H, W, generator=g, dtype=F64)
    tp = (torch.rand(batch, H, W, generator=g) < 0.6) & (target < K)
    onehot = F.one_hot(target.clamp(max=K - 1), K).permute(0, 3, 1, 2).to(F64)
    logits = logits + boost * onehot * tp.unsqueeze(1)
    embedding = torch.randn(batch, D, H, W, generator=g, dtype=F64)
    return {"target": target, "logits": logits, "embedding": embedding}


def make_stats(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, K, generator=g, dtype=F64)
    stds = 0.5 + torch.rand(K, K, generator=g, dtype=F64)
    return means, stds


def pixels(batch: dict[str, torch.Tensor]):
    """Yield (label, logit vector, embedding vector) for every pixel, as NumPy float64."""
    t = batch["target"].numpy()
    lg = batch["logits"].numpy()
    em = batch["embedding"].numpy()
    for b in range(t.shape[0]):
        for i in range(t.shape[1]):
            for j in range(t.shape[2]):
                yield int(t[b, i, j]), lg[b, :, i, j], em[b, :, i, j], b


# ------------------------------------------------------------------------------ NumPy references
def ref_feature_loss(batch, means, stds, valid=None, tp_only=True) -> float:
    mu, sd = means.numpy(), stds.numpy()
    terms = []
    for label, f, _, _ in pixels(batch):
        if not 0 <= label < K:
            continue
        if tp_only and int(np.argmax(f)) != label:
            continue
        if valid is not None and not valid[label]:
            continue
        terms.append(np.mean(((f - mu[label]) / sd[label]) ** 2))
    return float(np.mean(terms)) if terms else 0.0


def ref_objectosphere(batch, xi, unknown_weight) -> float:
    known, unknown = [], []
    for label, _, e, _ in pixels(batch):
        n = float(np.sum(e**2))
        if label == ANOMALY_INDEX:
            unknown.append(n)
        elif label != IGNORE_INDEX:
            known.append(max(xi - n, 0.0))
    k = np.mean(known) if known else 0.0
    u = np.mean(unknown) if unknown else 0.0
    return float(k + unknown_weight * u)


def ref_contrastive(batch, prototypes, tau, per_image=False) -> float:
    protos = prototypes.numpy()
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for label, _, e, b in pixels(batch):
        if 0 <= label < K:
            groups.setdefault((b if per_image else 0, label), []).append(e / np.linalg.norm(e))
    init = [c for c in range(K) if np.any(protos[c] != 0)]
    losses = []
    for (_, c), units in groups.items():
        if c not in init:
            continue
        q = np.mean(units, axis=0)
        logit = {j: q @ (protos[j] / np.linalg.norm(protos[j])) / tau for j in init}
        losses.append(-(logit[c] - np.log(sum(np.exp(v) for v in logit.values()))))
    return float(np.mean(losses)) if losses else 0.0


def ref_semantic_stats(batches):
    """Per-class mean and population std over true-positive logit vectors of all batches."""
    feats: dict[int, list[np.ndarray]] = {k: [] for k in range(K)}
    for batch in batches:
        for label, f, _, _ in pixels(batch):
            if 0 <= label < K and int(np.argmax(f)) == label:
                feats[label].append(f)
    return {k: np.array(v) for k, v in feats.items()}


def ref_score(batch, means, stds, xi, valid=None) -> np.ndarray:
    mu, sd = means.numpy(), stds.numpy()
    out = np.zeros((B, H, W))
    t = batch["target"].numpy()
    for b in range(t.shape[0]):
        for i in range(H):
            for j in range(W):
                f = batch["logits"].numpy()[b, :, i, j]
                e = batch["embedding"].numpy()[b, :, i, j]
                best = 0.0
                for k in range(K):
                    if valid is not None and not valid[k]:
                        continue
                    best = max(best, np.exp(-0.5 * np.sum((f - mu[k]) ** 2 / sd[k] ** 2)))
                s_sem = 1.0 - best
                s_con = max(0.0, 1.0 - np.sum(e**2) / xi)
                out[b, i, j] = 0.5 * (s_sem + s_con)
    return out


# ----------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("tp_only", [True, False])
def test_semantic_feature_loss_matches_definition(tp_only: bool) -> None:
    batch = make_batch(0)
    means, stds = make_stats(1)
    got = semantic_feature_loss(batch["logits"], batch["target"], means, stds, true_positives_only=tp_only)
    assert got.dtype == F64
    assert got.item() == pytest.approx(ref_feature_loss(batch, means, stds, tp_only=tp_only), rel=1e-12)


def test_semantic_feature_loss_class_valid_and_empty() -> None:
    batch = make_batch(2)
    means, stds = make_stats(3)
    valid = torch.tensor([True, False, True, False])
    got = semantic_feature_loss(batch["logits"], batch["target"], means, stds, class_valid=valid)
    want = ref_feature_loss(batch, means, stds, valid=valid.tolist())
    assert got.item() == pytest.approx(want, rel=1e-12)
    # No class with statistics (epoch 0): exactly zero, still differentiable.
    logits = batch["logits"].clone().requires_grad_(True)
    zero = semantic_feature_loss(logits, batch["target"], means, stds, class_valid=torch.zeros(K, dtype=bool))
    assert zero.item() == 0.0
    zero.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("xi, unknown_weight", [(1.0, 10.0), (4.0, 1.0)])
def test_objectosphere_loss_matches_definition(xi: float, unknown_weight: float) -> None:
    batch = make_batch(4)
    got = objectosphere_loss(batch["embedding"], batch["target"], xi=xi, unknown_weight=unknown_weight)
    assert got.item() == pytest.approx(ref_objectosphere(batch, xi, unknown_weight), rel=1e-12)


def test_objectosphere_loss_without_anomalies_is_known_term_only() -> None:
    batch = make_batch(5)
    batch["target"][batch["target"] == ANOMALY_INDEX] = 0
    got = objectosphere_loss(batch["embedding"], batch["target"], xi=3.0)
    assert got.item() == pytest.approx(ref_objectosphere(batch, 3.0, 10.0), rel=1e-12)
    assert got.item() > 0


@pytest.mark.parametrize("per_image", [False, True])
def test_contrastive_prototype_loss_matches_definition(per_image: bool) -> None:
    batch = make_batch(6)
    prototypes = torch.randn(K, D, generator=torch.Generator().manual_seed(7), dtype=F64)
    for tau in (0.1, 0.5):
        got = contrastive_prototype_loss(
            batch["embedding"], batch["target"], prototypes, temperature=tau, per_image=per_image
        )
        want = ref_contrastive(batch, prototypes, tau, per_image=per_image)
        assert got.item() == pytest.approx(want, rel=1e-10)


def test_contrastive_prototype_loss_uninitialized_prototypes() -> None:
    batch = make_batch(8)
    prototypes = torch.randn(K, D, generator=torch.Generator().manual_seed(9), dtype=F64)
    prototypes[2] = 0.0
    got = contrastive_prototype_loss(batch["embedding"], batch["target"], prototypes)
    assert got.item() == pytest.approx(ref_contrastive(batch, prototypes, 0.1), rel=1e-10)
    # No prototype at all (epoch 0): exactly zero, gradient zero and finite.
    emb = batch["embedding"].clone().requires_grad_(True)
    zero = contrastive_prototype_loss(emb, batch["target"], torch.zeros(K, D, dtype=F64))
    assert zero.item() == 0.0
    zero.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_losses_gradients_match_finite_differences() -> None:
    batch = make_batch(10)
    means, stds = make_stats(11)
    prototypes = torch.randn(K, D, generator=torch.Generator().manual_seed(12), dtype=F64)
    logits = batch["logits"].clone().requires_grad_(True)
    emb = batch["embedding"].clone().requires_grad_(True)
    target = batch["target"]
    assert torch.autograd.gradcheck(lambda x: semantic_feature_loss(x, target, means, stds), (logits,))
    assert torch.autograd.gradcheck(lambda x: objectosphere_loss(x, target, xi=1.5), (emb,))
    assert torch.autograd.gradcheck(lambda x: contrastive_prototype_loss(x, target, prototypes, per_image=True), (emb,))


def test_network_losses_backpropagate_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    net = DualDecoderNet(num_classes=K, embedding_dim=D + 2)
    image = torch.randn(2, 3, 64, 64)
    g = torch.Generator().manual_seed(1)
    mask = torch.randint(0, K, (2, 64, 64), generator=g)
    mask_clean = mask.clone()
    mask[:, 20:30, 20:34] = ANOMALY_INDEX  # a pasted object
    mask[:, :3] = IGNORE_INDEX
    mask_clean[mask == ANOMALY_INDEX] = IGNORE_INDEX  # anomaly pixels ignored by the CE
    means, stds = torch.randn(K, K), 0.5 + torch.rand(K, K)
    prototypes = torch.randn(K, D + 2)
    class_weights = torch.tensor([1.0, 2.0, 0.5, 1.5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, embedding = net(image)
        # The body runs in bf16, the 1x1 heads in float32 (lightning_modules.precision).
        assert logits.dtype == torch.float32 and embedding.dtype == torch.float32
        ce = F.cross_entropy(logits.float(), mask_clean, weight=class_weights, ignore_index=IGNORE_INDEX)
        feat = semantic_feature_loss(logits, mask, means, stds, true_positives_only=False)
        obj = objectosphere_loss(embedding, mask)
        con = contrastive_prototype_loss(embedding, mask, prototypes)
        total = 0.9 * ce + 0.1 * feat + 0.5 * obj + 0.5 * con
    for term in (feat, obj, con, total):
        assert term.dtype == torch.float32 and torch.isfinite(term) and term.item() > 0
    total.backward()
    for name, module in [
        ("encoder", net.encoder),
        ("semantic_decoder", net.semantic_decoder),
        ("contrastive_decoder", net.contrastive_decoder),
        ("semantic_head", net.semantic_head),
        ("contrastive_head", net.contrastive_head),
    ]:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads, name
        assert all(torch.isfinite(gr).all() for gr in grads), name
        assert any(gr.abs().sum() > 0 for gr in grads), name


# ------------------------------------------------------------------------------ epoch statistics
def _accumulate(batches, stream: bool):
    sums, sq, counts = torch.zeros(K, K, dtype=F64), torch.zeros(K, K, dtype=F64), torch.zeros(K, dtype=F64)
    if stream:
        for batch in batches:
            sums, sq, counts = accumulate_semantic_stats(batch["logits"], batch["target"], sums, sq, counts)
    else:
        logits = torch.cat([b["logits"] for b in batches])
        target = torch.cat([b["target"] for b in batches])
        sums, sq, counts = accumulate_semantic_stats(logits, target, sums, sq, counts)
    return sums, sq, counts


def test_semantic_stats_match_numpy_and_stream() -> None:
    batches = [make_batch(20 + s) for s in range(3)]
    # Class 3 never a true positive, so it must keep the previous statistics.
    for batch in batches:
        batch["logits"][:, 3] -= 100.0
    ref = ref_semantic_stats(batches)
    assert len(ref[3]) == 0 and all(len(ref[k]) > 1 for k in range(3))

    streamed = _accumulate(batches, stream=True)
    one_pass = _accumulate(batches, stream=False)
    for a, b in zip(streamed, one_pass, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    sums, sq, counts = streamed
    assert sums.dtype == F64 and sq.dtype == F64 and counts.dtype == F64
    np.testing.assert_array_equal(counts.numpy(), [len(ref[k]) for k in range(K)])

    prev_means, prev_stds = torch.full((K, K), 7.0), torch.full((K, K), 3.0)
    means, stds = finalize_semantic_stats(sums, sq, counts, prev_means, prev_stds, eps=1e-4)
    assert means.dtype == torch.float32 and stds.dtype == torch.float32
    for k in range(3):
        np.testing.assert_allclose(means[k].numpy(), ref[k].mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(stds[k].numpy(), np.maximum(ref[k].std(axis=0, ddof=0), 1e-4), rtol=1e-5)
    torch.testing.assert_close(means[3], prev_means[3])
    torch.testing.assert_close(stds[3], prev_stds[3])


def test_finalize_semantic_stats_std_floor() -> None:
    # One pixel per class: zero variance, so every std is the floor.
    logits = torch.eye(K, dtype=F64).view(1, K, K, 1).expand(1, K, K, 1) * 5.0
    target = torch.arange(K).view(1, K, 1)
    zeros = torch.zeros(K, K, dtype=F64)
    sums, sq, counts = accumulate_semantic_stats(logits, target, zeros, zeros, torch.zeros(K, dtype=F64))
    means, stds = finalize_semantic_stats(sums, sq, counts, zeros, zeros, eps=0.25)
    torch.testing.assert_close(means, 5.0 * torch.eye(K, dtype=F64))
    torch.testing.assert_close(stds, torch.full((K, K), 0.25, dtype=F64))


def test_accumulate_does_not_modify_inputs() -> None:
    batch = make_batch(30)
    sums, sq, counts = torch.zeros(K, K, dtype=F64), torch.zeros(K, K, dtype=F64), torch.zeros(K, dtype=F64)
    accumulate_semantic_stats(batch["logits"], batch["target"], sums, sq, counts)
    esums, ecounts = torch.zeros(K, D, dtype=F64), torch.zeros(K, dtype=F64)
    accumulate_embedding_sums(batch["embedding"], batch["target"], esums, ecounts)
    for t in (sums, sq, counts, esums, ecounts):
        assert not t.any()


@pytest.mark.parametrize("normalize", [True, False])
def test_embedding_sums_match_numpy_and_stream(normalize: bool) -> None:
    batches = [make_batch(40 + s) for s in range(3)]
    want_sums, want_counts = np.zeros((K, D)), np.zeros(K)
    for batch in batches:
        for label, _, e, _ in pixels(batch):
            if 0 <= label < K:
                want_sums[label] += e / np.linalg.norm(e) if normalize else e
                want_counts[label] += 1
    sums, counts = torch.zeros(K, D, dtype=F64), torch.zeros(K, dtype=F64)
    for batch in batches:
        sums, counts = accumulate_embedding_sums(batch["embedding"], batch["target"], sums, counts, normalize)
    np.testing.assert_allclose(sums.numpy(), want_sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(counts.numpy(), want_counts)
    one_sums, one_counts = accumulate_embedding_sums(
        torch.cat([b["embedding"] for b in batches]),
        torch.cat([b["target"] for b in batches]),
        torch.zeros(K, D, dtype=F64),
        torch.zeros(K, dtype=F64),
        normalize,
    )
    torch.testing.assert_close(one_sums, sums, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one_counts, counts)


def test_update_prototypes_ema_init_and_missing_class() -> None:
    g = torch.Generator().manual_seed(50)
    prev = torch.randn(K, D, generator=g)
    prev[1] = 0.0  # never initialized
    sums = torch.randn(K, D, generator=g, dtype=F64)
    counts = torch.tensor([4.0, 2.0, 0.0, 5.0], dtype=F64)
    m = 0.75
    new = update_prototypes(prev, sums, counts, momentum=m)
    assert new.dtype == prev.dtype
    p, s, c = prev.double().numpy(), sums.numpy(), counts.numpy()
    want = np.empty((K, D))
    for k in range(K):
        if c[k] == 0:
            want[k] = p[k]
        elif not np.any(p[k] != 0):
            want[k] = s[k] / c[k]
        else:
            want[k] = m * p[k] + (1 - m) * s[k] / c[k]
    np.testing.assert_allclose(new.double().numpy(), want, rtol=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        update_prototypes(prev, sums, counts, momentum=1.0)


# ------------------------------------------------------------------------------------------ score
@pytest.mark.parametrize("valid", [None, [True, False, True, True]])
def test_anomaly_score_matches_definition(valid) -> None:
    batch = make_batch(60, boost=1.0)
    means, stds = make_stats(61)
    # Put some pixels near a class mean so that s_sem spans (0, 1), not just ~1.
    batch["logits"][0, :, 0, :] = means[2].view(K, 1) + 0.3 * batch["logits"][0, :, 0, :]
    batch["embedding"] *= 0.5
    class_valid = None if valid is None else torch.tensor(valid)
    got = dual_decoder_anomaly_score(batch["logits"], batch["embedding"], means, stds, xi=1.5, class_valid=class_valid)
    want = ref_score(batch, means, stds, 1.5, valid)  # the paper's (s_sem + s_con) / 2
    assert got.shape == (B, H, W)
    # Reported as -log(1 - score): an increasing map of the paper's score.
    np.testing.assert_allclose(got.numpy(), -np.log1p(-want), rtol=1e-10, atol=1e-12)
    assert want.min() < 0.4 and want.max() > 0.6  # the check covers a real range
    assert np.array_equal(np.argsort(got.numpy(), axis=None), np.argsort(want, axis=None))
    # The two parts separately.
    s_con = contrastive_anomaly_score(batch["embedding"], xi=1.5)
    s_sem = semantic_anomaly_score(batch["logits"], means, stds, class_valid)
    torch.testing.assert_close(-torch.log1p(-0.5 * (s_sem + s_con)), got)
    assert (s_con >= 0).all() and (s_con <= 1).all() and (s_sem >= 0).all() and (s_sem <= 1).all()


def test_anomaly_score_does_not_saturate_in_float32() -> None:
    """Far from every class mean and at the origin of the embedding, the paper's float32 score is
    1.0 for every distance above 34.7 (all tied); the reported score keeps their order."""
    means, stds = torch.zeros(K, K), torch.ones(K, K)
    distances = torch.tensor([30.0, 36.0, 40.0, 60.0, 100.0, 200.0, 400.0, 1000.0])
    # Logit vectors at squared distance d from every class mean (0): sqrt(d) on one dimension.
    logits = torch.zeros(1, K, 1, distances.numel())
    logits[0, 0, 0] = distances.sqrt()
    embedding = torch.zeros(1, D, 1, distances.numel())
    paper = 0.5 * (semantic_anomaly_score(logits, means, stds) + contrastive_anomaly_score(embedding))
    assert paper.dtype == torch.float32 and (paper[0, 0, 1:] == 1.0).all()  # the tie this avoids
    got = dual_decoder_anomaly_score(logits, embedding, means, stds)[0, 0]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got.diff() > 0).all()
    torch.testing.assert_close(got, distances / 2 + math.log(2.0))  # exp(-d/2)/2 -> d/2 + log 2


def test_anomaly_score_upcasts_bfloat16() -> None:
    batch = make_batch(62)
    means, stds = make_stats(63)
    logits, emb = batch["logits"].to(torch.bfloat16), batch["embedding"].to(torch.bfloat16)
    got = dual_decoder_anomaly_score(logits, emb, means, stds)
    assert got.dtype == torch.float32
    want = dual_decoder_anomaly_score(logits.double(), emb.double(), means, stds)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
def test_network_output_shapes(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = DualDecoderNet(num_classes=13).eval()
    assert net.size_divisor == 16 and net.embedding_dim == 13
    with torch.no_grad():
        logits, embedding = net(torch.randn(1, 3, *size))
    assert logits.shape == (1, 13, *size) and embedding.shape == (1, 13, *size)
    assert torch.isfinite(logits).all() and torch.isfinite(embedding).all()


def test_network_padding_crops_back_the_padded_forward() -> None:
    """A 70x90 forward equals the top-left crop of the forward on the replicate-padded 80x96."""
    torch.manual_seed(0)
    net = DualDecoderNet(num_classes=K, embedding_dim=3).eval()
    image = torch.randn(1, 3, 70, 90)
    padded = F.pad(image, (0, 6, 0, 10), mode="replicate")
    with torch.no_grad():
        logits, emb = net(image)
        logits_p, emb_p = net(padded)
    assert emb.shape == (1, 3, 70, 90)
    torch.testing.assert_close(logits, logits_p[..., :70, :90])
    torch.testing.assert_close(emb, emb_p[..., :70, :90])


def test_network_rejects_bad_input() -> None:
    net = DualDecoderNet(num_classes=K)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        net(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="output_stride"):
        DualDecoderNet(encoder_output_stride=32)

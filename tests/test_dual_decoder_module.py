"""DualDecoderSegmenter: epoch statistics, checkpoint round trip mid-epoch, bf16 training step."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from lightning_modules.dual_decoder import DualDecoderSegmenter

K = 4


def tiny(**kwargs) -> DualDecoderSegmenter:
    torch.manual_seed(0)
    kwargs.setdefault("min_statistics_pixels", 5)
    return DualDecoderSegmenter(num_classes=K, encoder_name="resnet18", encoder_weights=None, **kwargs)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, K, (2, 32, 48), generator=gen)
    mask = clean.clone()
    mask[:, 4:10, 4:12] = 13  # pasted outlier
    mask[:, -2:] = 255
    return {"image": torch.randn(2, 3, 32, 48, generator=gen), "mask": mask, "mask_clean": clean}


def run_steps(model: DualDecoderSegmenter, seeds: list[int]) -> None:
    model.train()
    for seed in seeds:
        loss = model.training_step(batch(seed), 0)
        assert torch.isfinite(loss)
        loss.backward()


def test_epoch_statistics_equal_float64_formulas() -> None:
    model = tiny(std_floor=0.05, prototype_momentum=0.8)
    sums = torch.randn(K, K, dtype=torch.float64)
    counts = torch.tensor([10.0, 3.0, 0.0, 7.0], dtype=torch.float64)  # class 1 below the 5-pixel minimum
    sq = sums.square() / counts.clamp(min=1)[:, None] + torch.rand(K, K, dtype=torch.float64) * counts[:, None]
    model.sem_sums.copy_(sums)
    model.sem_sq_sums.copy_(sq)
    model.sem_counts.copy_(counts)
    emb = torch.randn(K, K, dtype=torch.float64)
    model.emb_sums.copy_(emb)
    model.emb_counts.copy_(torch.tensor([4.0, 0.0, 2.0, 1.0], dtype=torch.float64))
    model.update_epoch_statistics()

    n = counts.numpy()[:, None]
    mean = sums.numpy() / np.maximum(n, 1)
    std = np.maximum(np.sqrt(np.maximum(sq.numpy() / np.maximum(n, 1) - mean**2, 0)), 0.05)
    enough = counts.numpy() >= 5
    np.testing.assert_allclose(model.class_means.numpy()[enough], mean[enough], rtol=1e-12)
    np.testing.assert_allclose(model.class_stds.numpy()[enough], std[enough], rtol=1e-12)
    np.testing.assert_array_equal(model.class_means.numpy()[~enough], 0.0)  # previous values kept
    np.testing.assert_array_equal(model.class_stds.numpy()[~enough], 1.0)
    assert model.class_valid.tolist() == enough.tolist()
    # first epoch: prototypes become the mean embedding of classes that had pixels
    proto_counts = np.array([4.0, 0.0, 2.0, 1.0])[:, None]
    expected_protos = np.where(proto_counts > 0, emb.numpy() / np.maximum(proto_counts, 1), 0.0)
    np.testing.assert_allclose(model.prototypes.numpy(), expected_protos, rtol=1e-12)
    assert float(model.sem_counts.sum()) == 0 and float(model.emb_counts.sum()) == 0


def test_accumulators_match_the_functional_computation() -> None:
    from lightning_modules.dual_decoder import accumulate_semantic_stats

    model = tiny()
    model.eval()  # no dropout, so the forward pass can be repeated
    b = batch(1)
    with torch.no_grad():
        logits, _ = model(b["image"])
    target = torch.where(b["mask"] == 13, torch.full_like(b["mask"], 255), b["mask_clean"])
    zeros = (
        torch.zeros(K, K, dtype=torch.float64),
        torch.zeros(K, K, dtype=torch.float64),
        torch.zeros(K, dtype=torch.float64),
    )
    sums, sq, counts = accumulate_semantic_stats(logits, target, *zeros)
    model.training_step(b, 0)
    torch.testing.assert_close(model.sem_sums, sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.sem_counts, counts)
    assert float(model.emb_counts.sum()) == float((target < K).sum())


def test_checkpoint_mid_epoch_restores_statistics_and_accumulators(tmp_path: Path) -> None:
    model = tiny()
    run_steps(model, [0, 1])
    model.update_epoch_statistics()  # epoch 0 ends: statistics exist
    run_steps(model, [2])  # epoch 1 in progress: accumulators partially filled
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    restored = DualDecoderSegmenter.load_from_checkpoint(path, weights_only=True)
    for name in ("class_means", "class_stds", "class_valid", "prototypes", "sem_sums", "sem_counts", "emb_sums"):
        torch.testing.assert_close(getattr(restored, name), getattr(model, name), msg=name)
    assert bool(model.class_valid.any())
    # finishing the epoch from the restored accumulators gives the same statistics
    model.update_epoch_statistics()
    restored.update_epoch_statistics()
    torch.testing.assert_close(restored.class_means, model.class_means)
    torch.testing.assert_close(restored.prototypes, model.prototypes)


def test_training_step_is_finite_under_bf16_autocast() -> None:
    model = tiny()
    run_steps(model, [0])
    model.update_epoch_statistics()  # so the feature and contrastive terms are active
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step(batch(3), 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_segment_reports_own_score_sml_and_baselines() -> None:
    from lightning_modules.dual_decoder import dual_decoder_anomaly_score

    model = tiny()
    run_steps(model, [0])
    model.update_epoch_statistics()
    model.eval()
    image = batch(4)["image"]
    with torch.no_grad():
        out = model.segment(image)
        logits, embedding = model(image)
    assert list(out.scores) == ["dual_decoder", "sml", "msp", "maxlogit", "entropy", "energy"]
    expected = dual_decoder_anomaly_score(
        logits, embedding, model.class_means.float(), model.class_stds.float(), 1.0, model.class_valid
    )
    torch.testing.assert_close(out.scores["dual_decoder"], expected)


def _save(model: L.LightningModule, path: Path) -> Path:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def test_init_checkpoint_from_a_segmenter_reproduces_its_logits(tmp_path: Path) -> None:
    """Started from a DeepLabV3+ segmenter, the semantic branch is that segmenter (same logits in
    eval mode), the contrastive decoder starts from the same decoder weights, and its head is new."""
    from lightning_modules.segmenter import DeepLabV3PlusSegmenter

    torch.manual_seed(1)
    segmenter = DeepLabV3PlusSegmenter(num_classes=K, encoder_name="resnet18", encoder_weights=None)
    run = batch(5)
    segmenter.train()
    with torch.no_grad():  # move the BatchNorm running statistics away from their defaults
        segmenter(run["image"])
    path = _save(segmenter, tmp_path / "segmenter.ckpt")

    model = tiny(init_checkpoint=str(path))
    fresh = tiny()
    segmenter.eval(), model.eval()
    with torch.no_grad():
        features, _ = segmenter.forward_features(run["image"])
        expected = segmenter.net.model.segmentation_head[0](features)  # before smp's x4 upsampling
        net = model.net
        semantic = net.semantic_head(net.semantic_decoder(net.encoder(run["image"])))
        _, embedding = model(run["image"])
    # The two upsample differently (smp's head: align_corners=True), so compare at 1/4 resolution.
    torch.testing.assert_close(semantic, expected, rtol=1e-5, atol=1e-5)
    for name, value in model.net.semantic_decoder.state_dict().items():
        assert torch.equal(model.net.contrastive_decoder.state_dict()[name], value), name
    assert torch.equal(model.net.contrastive_head.weight, fresh.net.contrastive_head.weight)
    assert embedding.shape == (2, K, 32, 48)


def test_init_checkpoint_from_a_dual_decoder_copies_the_network(tmp_path: Path) -> None:
    source = tiny()
    run_steps(source, [0])
    path = _save(source, tmp_path / "dual.ckpt")
    torch.manual_seed(7)
    model = DualDecoderSegmenter(
        num_classes=K, encoder_name="resnet18", encoder_weights=None, init_checkpoint=str(path)
    )
    for name, value in source.net.state_dict().items():
        assert torch.equal(model.net.state_dict()[name], value), name
    assert not bool(model.class_valid.any())  # statistics are not taken over


def test_init_checkpoint_of_another_shape_fails_naming_the_file(tmp_path: Path) -> None:
    import pytest

    from lightning_modules.checkpoints import CheckpointError
    from lightning_modules.segmenter import DeepLabV3PlusSegmenter

    other = DeepLabV3PlusSegmenter(num_classes=K + 1, encoder_name="resnet18", encoder_weights=None)
    path = _save(other, tmp_path / "five_classes.ckpt")
    with pytest.raises(CheckpointError, match="five_classes.ckpt' does not match"):
        tiny(init_checkpoint=str(path))

"""SMLSegmenter: post-hoc statistics (streaming, DDP, checkpoint) and the segmenter plumbing."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightning_modules.base import class_weights_from_frequencies
from lightning_modules.checkpoints import CheckpointError
from lightning_modules.segmenter import (
    DeepLabV3PlusSegmenter,
    PretrainedWeightsError,
    build_encoder,
)
from lightning_modules.sml import SMLSegmenter
from tests.helpers import run_in_process_group

NUM_CLASSES = 5


def tiny_sml(seed: int = 0, **kwargs) -> SMLSegmenter:
    torch.manual_seed(seed)
    kwargs.setdefault("sml", {"boundary_width": 2, "boundary_iterations": 2})
    return SMLSegmenter(num_classes=NUM_CLASSES, encoder_name="resnet18", encoder_weights=None, **kwargs)


def batches(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randn(2, 3, 32, 48, generator=gen), "mask": torch.randint(0, NUM_CLASSES, (2, 32, 48))}
        for _ in range(n)
    ]


def direct_statistics(model: SMLSegmenter, data: list[dict[str, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b["image"]) for b in data]).double().numpy()
    max_logit = logits.max(axis=1).ravel()
    pred = logits.argmax(axis=1).ravel()
    means = np.zeros(NUM_CLASSES)
    stds = np.ones(NUM_CLASSES)
    for c in range(NUM_CLASSES):
        values = max_logit[pred == c]
        if values.size > 1:
            means[c], stds[c] = values.mean(), values.std(ddof=1)
    return means, stds


def test_statistics_equal_direct_float64_computation() -> None:
    model = tiny_sml()
    data = batches(3)
    model.fit_posthoc(data)
    means, stds = direct_statistics(model, data)
    predicted = model.sml.counts.numpy() > 1
    assert predicted.sum() >= 2, "random network predicts too few classes to test anything"
    np.testing.assert_allclose(model.sml.means.numpy()[predicted], means[predicted], rtol=1e-6)
    np.testing.assert_allclose(model.sml.stds.numpy()[predicted], stds[predicted], rtol=1e-6)
    assert model.sml.counts.sum() == 3 * 2 * 32 * 48
    assert bool(model.posthoc_fitted)
    # a pass in one batch gives the same float64 sums as three batches
    single = tiny_sml()
    single.fit_posthoc([{"image": torch.cat([b["image"] for b in data])}])
    torch.testing.assert_close(single.sml.sums, model.sml.sums, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(single.sml.stds, model.sml.stds, rtol=1e-9, atol=1e-12)


def test_sml_score_uses_fitted_statistics() -> None:
    from lightning_modules.sml import sml_anomaly_score

    model = tiny_sml()
    model.fit_posthoc(batches(2))
    model.eval()  # ASPP dropout would make two forward passes differ
    image = batches(1, seed=7)[0]["image"]
    with torch.no_grad():
        out = model.segment(image)
        expected = sml_anomaly_score(
            model(image), model.sml.means.float(), model.sml.stds.float(), boundary_width=2, boundary_iterations=2
        )
    assert list(out.scores) == ["sml", "msp", "maxlogit", "entropy", "energy"]
    torch.testing.assert_close(out.scores["sml"], expected)


def test_checkpoint_round_trip_restores_statistics(tmp_path: Path) -> None:
    model = tiny_sml()
    model.fit_posthoc(batches(2))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "sml.ckpt"
    trainer.save_checkpoint(path)
    restored = SMLSegmenter.load_from_checkpoint(path, weights_only=True)
    for name in ("sml.means", "sml.stds", "sml.counts", "posthoc_fitted"):
        torch.testing.assert_close(restored.get_buffer(name), model.get_buffer(name))
    assert restored.hparams.sml["boundary_width"] == 2


def _ddp_worker(rank: int, world_size: int, out_dir: str) -> None:
    model = tiny_sml()
    shard = batches(4)[rank::world_size]
    model.fit_posthoc(shard)
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("sml.")}, Path(out_dir) / f"rank{rank}.pt")


def test_statistics_under_two_ddp_processes_equal_one_process(tmp_path: Path) -> None:
    run_in_process_group(_ddp_worker, 2, str(tmp_path))
    single = tiny_sml()
    single.fit_posthoc(batches(4))
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(state["sml.counts"], single.sml.counts, rtol=0, atol=0)
        torch.testing.assert_close(state["sml.sums"], single.sml.sums, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(state["sml.stds"], single.sml.stds, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- segmenter plumbing
def test_any_input_size_gives_full_resolution_outputs() -> None:
    model = tiny_sml().eval()
    with torch.no_grad():
        out = model.segment(torch.randn(1, 3, 37, 53))
    assert out.logits.shape == (1, NUM_CLASSES, 37, 53)
    assert all(s.shape == (1, 37, 53) for s in out.scores.values())


def test_init_checkpoint_copies_network_and_rejects_other_files(tmp_path: Path) -> None:
    source = DeepLabV3PlusSegmenter(num_classes=NUM_CLASSES, encoder_name="resnet18", encoder_weights=None)
    path = tmp_path / "segmenter.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    wrapped = tiny_sml(seed=5, init_checkpoint=str(path))
    for (name, a), b in zip(source.net.state_dict().items(), wrapped.net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)

    torch.save({"state_dict": {"other.weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="no DeepLabV3\\+ segmenter weights"):
        tiny_sml(init_checkpoint=str(tmp_path / "other.ckpt"))
    with pytest.raises(CheckpointError, match="does not match this segmenter"):
        SMLSegmenter(num_classes=3, encoder_name="resnet18", encoder_weights=None, init_checkpoint=str(path))
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt' cannot be loaded"):
        tiny_sml(init_checkpoint=str(tmp_path / "bad.ckpt"))


def test_pretrained_weights_offline_gives_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # The hub reads both variables when it is imported (another test may have imported it): without
    # these, it would try the network and wait for its timeouts.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(PretrainedWeightsError, match="huggingface-cli download .*encoder_weights: null"):
        build_encoder("resnet18", "imagenet")


def test_pretrained_weights_from_local_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = build_encoder("resnet18", None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = DeepLabV3PlusSegmenter(num_classes=NUM_CLASSES, encoder_name="resnet18", encoder_weights=str(path))
    for a, b in zip(reference.state_dict().values(), model.net.model.encoder.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_encoder("resnet18", str(tmp_path / "missing.pth"))


def test_class_weights() -> None:
    counts = torch.tensor([100.0, 10.0, 0.0, 1.0])
    p = counts / counts.sum()
    enet = class_weights_from_frequencies(counts, "enet")
    expected = torch.where(counts > 0, 1 / torch.log(1.02 + p), torch.zeros(4))
    torch.testing.assert_close(enet, expected.float())
    inv = class_weights_from_frequencies(counts, "inverse_sqrt")
    assert inv[2] == 0 and inv[3] > inv[1] > inv[0]
    with pytest.raises(ValueError, match="unknown class weighting"):
        class_weights_from_frequencies(counts, "bogus")

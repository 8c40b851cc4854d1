"""Each method learns something real on the synthetic dataset (short CPU runs through main.py).

One segmenter is trained and scored by SML, then wrapped by FRE without retraining (as the
README describes); the dual decoder is fine-tuned from that segmenter on procedurally pasted
outliers (as `compare` does). The bars sit above chance (mIoU 1/13, AUPR = the anomaly pixel
fraction, AUROC 0.5) with a margin below what the runs on these 64 tiny images measured with one
thread, as the test workers run (CPU training is not bitwise reproducible across thread counts):
20 + 10 epochs, NHWC, validation at the last epoch only: SML mIoU 0.40, AUPR 5.0x the fraction,
AUROC 0.855; FRE on that segmenter 4.5x, 0.790 (its 1/4-resolution features are only 16x28
here); dual decoder mIoU 0.38, 3.3x, 0.817. (Before, 30 + 12 epochs without NHWC: SML 0.46 /
3.7-4.6x / 0.83-0.85, dual decoder 0.41 / 4.0x / 0.82-0.84; 20 + 8 left the dual decoder at AUROC
0.731 with one thread.) The full-size figures are in the README's results section.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import main
from callbacks.metrics.functional import anomaly_metrics
from datamodules.streethazards import StreetHazardsDataset, list_split
from datamodules.synthetic import write_synthetic_streethazards
from lightning_modules.base import AnomalySegmentationModule
from tests.helpers import cli_args

EPOCHS = 20
DUAL_DECODER_EPOCHS = 10

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "streethazards"
    write_synthetic_streethazards(path, 64, 4, 16, image_size=(64, 112), seed=11)
    return path


def args(root: Path, out: Path, method: str) -> list[str]:
    return [
        *cli_args(
            root, out, method, name=method, image_size=(64, 112), batch_size=8, eval_batch_size=None, encoder="resnet18"
        ),  # the bars were measured with the demo's encoder
        "--trainer.limit_val_batches=1.0",
        f"--trainer.max_epochs={EPOCHS}",
        # Validation at the last epoch only (the scored checkpoint is last.ckpt, as in compare).
        f"--trainer.check_val_every_n_epoch={EPOCHS}",
        "--heatmaps.every_n_batches=1000",
    ]


def metrics(out: Path, method: str) -> dict:
    return json.loads((out / method / "run" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def trained_sml(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main.main(["fit", *args(root, out, "sml")]) == 0
    assert main.main(["test", *args(root, out, "sml"), "--ckpt_path=last"]) == 0
    return out


def test_sml_learns_and_detects_anomalies(trained_sml: Path) -> None:
    result = metrics(trained_sml, "sml")
    fraction = result["anomaly_fraction"]
    print("sml", result["miou"], result["scores"]["sml"]["aupr"] / fraction, result["scores"]["sml"]["auroc"])
    assert result["miou"] > 0.35, result["miou"]
    assert result["scores"]["sml"]["aupr"] > 2.5 * fraction, (result["scores"]["sml"], fraction)
    assert result["scores"]["sml"]["auroc"] > 0.77


def test_fre_on_the_same_segmenter(root: Path, trained_sml: Path) -> None:
    checkpoint = trained_sml / "sml" / "run" / "checkpoints" / "last.ckpt"
    out = trained_sml
    assert main.main(["test", *args(root, out, "fre"), f"--model.init_args.init_checkpoint={checkpoint}"]) == 0
    result = metrics(out, "fre")
    sml = metrics(out, "sml")
    print("fre", result["scores"]["fre"]["aupr"] / result["anomaly_fraction"], result["scores"]["fre"]["auroc"])
    assert result["miou"] == pytest.approx(sml["miou"], abs=1e-9), "FRE must score the very same network"
    assert result["scores"]["fre"]["aupr"] > 1.8 * result["anomaly_fraction"], result["scores"]["fre"]
    assert result["scores"]["fre"]["auroc"] > 0.68


def test_dual_decoder_learns_and_detects_anomalies(root: Path, trained_sml: Path, tmp_path: Path) -> None:
    """Fine-tuned from the SML segmenter, as `compare` does (its init_from)."""
    checkpoint = trained_sml / "sml" / "run" / "checkpoints" / "last.ckpt"
    fit = [
        *args(root, tmp_path, "dual_decoder"),
        f"--trainer.max_epochs={DUAL_DECODER_EPOCHS}",
        f"--trainer.check_val_every_n_epoch={DUAL_DECODER_EPOCHS}",
    ]
    assert main.main(["fit", *fit, f"--model.init_args.init_checkpoint={checkpoint}"]) == 0
    assert main.main(["test", *args(root, tmp_path, "dual_decoder"), "--ckpt_path=last"]) == 0
    result = metrics(tmp_path, "dual_decoder")
    scores = result["scores"]["dual_decoder"]
    print("dual_decoder", result["miou"], scores["aupr"] / result["anomaly_fraction"], scores["auroc"])
    assert result["miou"] > 0.32, result["miou"]
    assert result["scores"]["dual_decoder"]["aupr"] > 2.5 * result["anomaly_fraction"], result["scores"]
    assert result["scores"]["dual_decoder"]["auroc"] > 0.75
    assert "sml" in result["scores"]


# --------------------------------------------------------------------------------------- mixed precision
def _batches(root: Path, split: str) -> list[dict[str, torch.Tensor]]:
    dataset = StreetHazardsDataset(list_split(root, split), image_size=(64, 112), anomaly_to_ignore=split == "train")
    return list(DataLoader(dataset, batch_size=16))


def _dual_decoder(checkpoint: Path, train: list[dict[str, torch.Tensor]]) -> AnomalySegmentationModule:
    """A dual decoder started from the segmenter (no training), with the epoch statistics and the
    SML statistics of the training images."""
    from lightning_modules.dual_decoder import (
        DualDecoderSegmenter,
        accumulate_embedding_sums,
        accumulate_semantic_stats,
    )

    torch.manual_seed(0)
    model = DualDecoderSegmenter(encoder_name="resnet18", encoder_weights=None, init_checkpoint=str(checkpoint)).eval()
    semantic = (model.sem_sums, model.sem_sq_sums, model.sem_counts)
    with torch.no_grad():
        for batch in train:
            logits, embedding = model(batch["image"])
            for buffer, value in zip(
                semantic, accumulate_semantic_stats(logits, batch["mask"], *semantic), strict=True
            ):
                buffer.copy_(value)
            sums, counts = accumulate_embedding_sums(embedding, batch["mask"], model.emb_sums, model.emb_counts)
            model.emb_sums.copy_(sums)
            model.emb_counts.copy_(counts)
        model.update_epoch_statistics()
    model.fit_posthoc(train)
    return model


@pytest.fixture(scope="module")
def scored(root: Path, trained_sml: Path) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The trained segmenter's checkpoint scored as SML, as FRE and as a dual decoder started from it,
    in float32 and under CPU bf16 autocast (how ``precision: bf16-mixed`` runs the forward pass):
    every score of every method, as (float32, bf16) pairs, and the test labels under ``_mask``."""
    from lightning_modules.fre import FRESegmenter
    from lightning_modules.sml import SMLSegmenter

    checkpoint = trained_sml / "sml" / "run" / "checkpoints" / "last.ckpt"
    train = _batches(root, "train")
    (test,) = _batches(root, "test")
    models: dict[str, AnomalySegmentationModule] = {
        "sml": SMLSegmenter.load_from_checkpoint(checkpoint, weights_only=True),
        "fre": FRESegmenter(encoder_name="resnet18", encoder_weights=None, init_checkpoint=str(checkpoint)),
        "dual_decoder": _dual_decoder(checkpoint, train),
    }
    models["fre"].fit_posthoc(train)
    # NHWC: CPU bf16 convolutions are several times faster in it (and it is what the GPU configs use).
    image = test["image"].contiguous(memory_format=torch.channels_last)
    results: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, model in models.items():
        model.eval().to(memory_format=torch.channels_last)
        with torch.no_grad():
            fp32 = model.segment(image)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = model.segment(image)
        assert bf16.logits.dtype == torch.float32, name
        results[name] = {score: (fp32.scores[score], bf16.scores[score]) for score in fp32.scores}
    return {**results, "_mask": test["mask"]}


@pytest.mark.parametrize("method", ["sml", "fre", "dual_decoder"])
def test_every_score_under_bf16_autocast_matches_float32_to_1e_3(method: str, scored: dict) -> None:
    """The networks' bodies run in bf16, their output heads in float32 (``lightning_modules.precision``),
    the dual decoder's score in the log domain and FRE without TF32: AUROC and AUPR of every score
    within 1e-3 of float32 (measured: at most 5.4e-4 on a 12-epoch segmenter)."""
    mask = scored["_mask"]
    for score, (fp32, bf16) in scored[method].items():
        assert bf16.dtype == torch.float32, score
        exact, mixed = anomaly_metrics(fp32, mask), anomaly_metrics(bf16, mask)
        for key in ("auroc", "aupr"):
            print(f"{method} {score} {key}: float32 {exact[key]:.6f}, bf16 autocast {mixed[key]:.6f}")
            assert abs(exact[key] - mixed[key]) <= 1e-3, (score, key, exact[key], mixed[key])


def test_maxlogit_keeps_its_resolution_under_bf16(scored: dict) -> None:
    """With the 1x1 head in bf16, MaxLogit had a few hundred distinct values per image."""
    fp32, bf16 = scored["sml"]["maxlogit"]
    distinct = {name: int(torch.unique(values).numel()) for name, values in (("float32", fp32), ("bf16", bf16))}
    print(f"MaxLogit: distinct values among {fp32.numel()} test pixels: {distinct}")
    assert fp32.numel() > 110_000 and distinct["bf16"] > 100_000

"""Long evaluations stream in flat memory."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_modules.base import AnomalySegmentationModule, MethodOutput

# --------------------------------------------------------------------------------------- 5. long runs
HEIGHT, WIDTH = 720, 1280


class _Frames(Dataset):
    """Full-resolution frames from 8 label maps: classes 0/1, anomaly squares, ignored rows."""

    def __init__(self, count: int) -> None:
        self.count = count
        rows, cols = torch.arange(HEIGHT)[:, None], torch.arange(WIDTH)[None, :]
        self.masks = []
        for k in range(8):
            mask = ((rows // 48 + cols // 64 + k) % 2).long()
            mask[:16] = 255
            top, left = 40 + 70 * k, 60 + 140 * k
            mask[top : top + 90, left : left + 120] = 13
            self.masks.append(mask)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = torch.full((3, HEIGHT, WIDTH), (index % 97) / 97.0)
        return {"image": image, "mask": self.masks[index % 8]}


class _StandIn(AnomalySegmentationModule):
    """The method contract with ready-made outputs instead of a network: 2 classes, one score."""

    method_name = "stand_in"

    def __init__(self) -> None:
        super().__init__(num_classes=2)
        self.field = torch.rand(HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))

    def segment(self, image: torch.Tensor) -> MethodOutput:
        # Channels-last logits, as a model with channels_last: true returns them (an argmax over
        # NCHW logits alone costs ~80 ms per frame on CPU).
        logits = torch.zeros(image.shape[0], HEIGHT, WIDTH, 2).permute(0, 3, 1, 2)
        logits[:, 1] = self.field
        return MethodOutput(logits, {"score": self.field + image[:, 0]})


class _RssProbe(L.Callback):
    """Resident memory after every test batch, and the bytes the heatmap logger holds (for the report)."""

    def __init__(self, heatmaps: Any) -> None:
        self.heatmaps = heatmaps
        self.samples: list[tuple[int, int, int]] = []
        self.images = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def held_by_heatmaps(self) -> int:
        # Captured images wait on the host for the epoch's threshold (panel 5).
        captures = [c for pending in self.heatmaps._pending.values() for c in pending]
        return sum(c.nbytes for c in captures)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self.images += batch["mask"].shape[0]
        self.samples.append((self.images, self.rss(), self.held_by_heatmaps()))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_full_resolution_images_stream_through_evaluation_in_flat_memory(tmp_path: Path) -> None:
    """250 frames at 720x1280 (``STREAMING_FRAMES=1500`` for the whole StreetHazards test split's
    size, 1.4e9 pixels) through AnomalyEvaluation and AnomalyHeatmapLogger (2 images of every
    5th batch, so that its cap of 16 captured images per split is reached at batch 35, frame
    140): after the first 100 images, the
    process's resident memory may not grow by more than 150 MB in all, heatmap captures included.
    The cheap path: 2 classes, one score, no per-class false-positive histogram (~0.13 s per frame
    on CPU), ready-made outputs; batches of 4."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks.evaluation import AnomalyEvaluation
    from callbacks.visualization import AnomalyHeatmapLogger

    count, heatmaps = int(os.environ.get("STREAMING_FRAMES", 250)), AnomalyHeatmapLogger(every_n_batches=5)
    assert count >= 200, "the heatmap cap is reached at frame 140; memory is compared after that"
    probe = _RssProbe(heatmaps)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path), name="stream", version="run"),
        callbacks=[AnomalyEvaluation(output_dir=str(tmp_path), per_class_false_positives=False), heatmaps, probe],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    dataset = _Frames(count)
    start = time.perf_counter()
    trainer.test(_StandIn(), dataloaders=DataLoader(dataset, batch_size=4), verbose=False)
    elapsed = time.perf_counter() - start

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    valid = sum(int((dataset.masks[i % 8] != 255).sum()) for i in range(count))
    anomalous = sum(int((dataset.masks[i % 8] == 13).sum()) for i in range(count))
    assert metrics["num_images"] == count
    assert (metrics["num_valid_pixels"], metrics["num_anomaly_pixels"]) == (valid, anomalous)
    assert 0.0 < metrics["aupr"] < 1.0 and math.isfinite(metrics["auroc"])

    samples = np.array(probe.samples, dtype=np.int64)
    seen, rss, held = samples[:, 0], samples[:, 1], samples[:, 2]
    window = (seen >= 80) & (seen <= 120)
    baseline = rss[window].max()
    growth = rss[seen > 120].max() - baseline
    # At the end: the cap's 16 images (of the 26 that 13 logged batches offer), 9 bytes per pixel.
    assert held[-1] == heatmaps.max_captures * 360 * 640 * 9
    print(
        f"{count} frames in {elapsed:.0f} s ({1e3 * elapsed / count:.0f} ms/frame); RSS at 100 frames "
        f"{baseline / 2**20:.0f} MiB, at the end {rss[-1] / 2**20:.0f} MiB, peak after 100 frames "
        f"{rss[seen > 120].max() / 2**20:.0f} MiB: growth {growth / 2**20:.0f} MiB in all, of which heatmap "
        f"captures held at the end {held[-1] / 2**20:.1f} MiB ({heatmaps.max_captures} images, "
        f"{held[-1] / heatmaps.max_captures / 2**20:.2f} MiB each)"
    )
    assert growth < 150 * 2**20

    # The probe sees memory that is really held: 256 MiB touched show up.
    before = _RssProbe.rss()
    block = torch.ones(256 * 2**20 // 4)
    assert _RssProbe.rss() - before > 200 * 2**20
    del block

"""AnomalyMetrics and SegmentationMetrics under DDP: 2 gloo processes equal one process on all data."""

from __future__ import annotations

import datetime
import math
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from callbacks.metrics import AnomalyMetrics, SegmentationMetrics

WORLD, ANOMALY, IGNORE, NUM_CLASSES = 2, 13, 255, 13
# Small histogram: the ranks' key ranges then lead to different layouts, so the re-binning that
# precedes the sum is exercised.
NUM_BITS = 12


def make_shards() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per rank (scores, mask, predictions); rank 0's scores span a far narrower range."""
    rng = np.random.default_rng(0)
    shards = []
    for rank, scale in enumerate((1e-3, 1e4)):
        positive = rng.random((3, 48, 64)) < 0.08
        positive[rank] = False  # one image without anomalies per rank
        scores = ((rng.normal(size=positive.shape) + 1.5 * positive) * scale).astype(np.float32)
        mask = np.where(positive, ANOMALY, rng.integers(0, NUM_CLASSES, positive.shape))
        mask[rng.random(positive.shape) < 0.05] = IGNORE
        preds = np.where(rng.random(mask.shape) < 0.7, np.clip(mask, 0, NUM_CLASSES - 1), 3)
        shards.append((torch.from_numpy(scores), torch.from_numpy(mask), torch.from_numpy(preds)))
    return shards


def accumulate(shards) -> tuple[AnomalyMetrics, SegmentationMetrics]:
    anomaly = AnomalyMetrics(num_bits=NUM_BITS)
    segmentation = SegmentationMetrics(NUM_CLASSES)
    for scores, mask, preds in shards:
        for part in range(0, scores.shape[0], 2):  # several updates per rank
            anomaly.update(scores[part : part + 2], mask[part : part + 2])
            segmentation.update(preds[part : part + 2], mask[part : part + 2])
    return anomaly, segmentation


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        anomaly, segmentation = accumulate([make_shards()[rank]])
        local_counts = anomaly.counts.clone()
        result = anomaly.compute()  # torchmetrics syncs, computes, restores the local state
        restored = torch.equal(anomaly.counts, local_counts)
        curves = anomaly.curves(max_points=50)  # a collective as well
        anomaly.sync()
        synced = {"counts": anomaly.counts.clone(), "key_min": int(anomaly.key_min), "key_max": int(anomaly.key_max)}
        anomaly.unsync()
        torch.save(
            {
                "result": result,
                "restored": restored,
                "curves": curves,
                "synced": synced,
                "segmentation": segmentation.compute(),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def test_two_processes_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single_anomaly, single_segmentation = accumulate(make_shards())
    expected = single_anomaly.compute()
    expected_curves = single_anomaly.curves(max_points=50)
    expected_segmentation = single_segmentation.compute()
    assert expected["num_images_per_image"] == 4

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["restored"], "compute() must leave the local state in place"
        assert torch.equal(got["synced"]["counts"], single_anomaly.counts)
        assert got["synced"]["key_min"] == int(single_anomaly.key_min)
        assert got["synced"]["key_max"] == int(single_anomaly.key_max)
        assert got["result"].keys() == expected.keys()
        for key, value in expected.items():
            assert _same(got["result"][key], value), (rank, key, got["result"][key], value)
        for key, value in expected_curves.items():
            np.testing.assert_array_equal(got["curves"][key], value)
        assert got["segmentation"]["confusion_matrix"] == expected_segmentation["confusion_matrix"]
        assert _same(got["segmentation"]["miou"], expected_segmentation["miou"])

"""AnomalyMetrics and SegmentationMetrics under DDP: 2 gloo processes against one process on all data.

Both metrics bootstrap their intervals over the images (named by id): the per-image means and mIoU
get the same intervals on 2 processes as on 1, bit for bit; the pooled ones too whenever the pooled
values are equal, and within the pooled error bounds otherwise.

Two data sets: one whose coarse bins all fit at full float32 resolution (then the merged
histogram equals the single-process one bin for bin, and every result is identical), and one that
needs a small budget re-allocated (then the layouts may differ, and both results hold the exact
values within their bounds).
"""

from __future__ import annotations

import datetime
import math
import socket
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_metrics_reference import score_ordered_counts, sklearn_metrics

from callbacks.metrics import AnomalyMetrics, SegmentationMetrics

WORLD, ANOMALY, IGNORE, NUM_CLASSES = 2, 13, 255, 13
IMAGES_PER_RANK, BOOTSTRAP = 3, {"bootstrap_samples": 200, "bootstrap_seed": 5}
# "narrow": ~26 coarse bins, all at full resolution in the default budget. "wide": the ranks'
# scores span 1e-3 and 1e4, and 2**16 sub-bins force both processes to merge bins.
SETTINGS = {"narrow": ((1.0, 1.1), None), "wide": ((1e-3, 1e4), 16)}


def make_shards(kind: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per rank (scores, mask, predictions)."""
    rng = np.random.default_rng(0)
    shards = []
    for rank in range(WORLD):
        positive = rng.random((IMAGES_PER_RANK, 48, 64)) < 0.08
        positive[rank] = False  # one image without anomalies per rank
        if kind == "narrow":
            low = 1.0 + 0.1 * rank
            scores = rng.uniform(low, low + 0.1, positive.shape) + 0.02 * positive
        else:
            scores = (rng.normal(size=positive.shape) + 1.5 * positive) * SETTINGS["wide"][0][rank]
        mask = np.where(positive, ANOMALY, rng.integers(0, NUM_CLASSES, positive.shape))
        mask[rng.random(positive.shape) < 0.05] = IGNORE
        preds = np.where(rng.random(mask.shape) < 0.7, np.clip(mask, 0, NUM_CLASSES - 1), 3)
        shards.append((torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(mask), torch.from_numpy(preds)))
    return shards


def accumulate(kind: str, shards, first_rank: int = 0) -> tuple[AnomalyMetrics, SegmentationMetrics]:
    num_bits = SETTINGS[kind][1]
    anomaly = AnomalyMetrics(**({"num_bits": num_bits} if num_bits else {}), **BOOTSTRAP)
    segmentation = SegmentationMetrics(NUM_CLASSES, **BOOTSTRAP)
    for rank, (scores, mask, preds) in enumerate(shards, start=first_rank):
        for part in range(0, scores.shape[0], 2):  # several updates per rank
            ids = [100 + rank * IMAGES_PER_RANK + i for i in range(part, min(part + 2, scores.shape[0]))]
            anomaly.update(scores[part : part + 2], mask[part : part + 2], image_ids=ids)
            segmentation.update(preds[part : part + 2], mask[part : part + 2], image_ids=ids)
    return anomaly, segmentation


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked process must not use the parent's OpenMP pool
    warnings.filterwarnings("ignore", message=".*leaves error bounds above")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        saved = {}
        for kind in SETTINGS:
            anomaly, segmentation = accumulate(kind, [make_shards(kind)[rank]], first_rank=rank)
            local = {name: _copy(getattr(anomaly, name)) for name in anomaly._defaults}
            result = anomaly.compute()  # torchmetrics syncs, computes, restores the local state
            restored = all(_equal(getattr(anomaly, name), value) for name, value in local.items())
            curves = anomaly.curves(max_points=50)  # a collective as well
            anomaly.sync()
            synced = {"counts": score_ordered_counts(anomaly).clone(), "coarse_count": anomaly.coarse_count.clone()}
            anomaly.unsync()
            saved[kind] = {
                "result": result,
                "restored": restored,
                "curves": curves,
                "synced": synced,
                "segmentation": segmentation.compute(),
            }
        torch.save(saved, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _copy(state):
    return [t.clone() for t in state] if isinstance(state, list) else state.clone()


def _equal(state, other) -> bool:
    if isinstance(state, list):  # the per-image states: one tensor per update (NaN: images without anomalies)
        return isinstance(other, list) and len(state) == len(other) and all(map(_equal, state, other))
    if state.is_floating_point():
        return state.shape == other.shape and bool(((state == other) | (state.isnan() & other.isnan())).all())
    return torch.equal(state, other)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a, b) -> bool:
    if isinstance(a, tuple):  # a bootstrap interval
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def test_two_processes_equal_one_process(tmp_path: Path) -> None:
    # Forked (not spawned) processes: no second import of torch and the project.
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for kind in SETTINGS:
        shards = make_shards(kind)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*leaves error bounds above")
            single_anomaly, single_segmentation = accumulate(kind, shards)
            expected = single_anomaly.compute()
            expected_curves = single_anomaly.curves(max_points=50)
        expected_segmentation = single_segmentation.compute()
        assert expected["num_images_per_image"] == 4
        scores = torch.cat([s for s, _, _ in shards]).numpy()
        mask = torch.cat([m for _, m, _ in shards]).numpy()
        valid = mask != IGNORE
        exact = sklearn_metrics(scores[valid], mask[valid] == ANOMALY)

        for got in (saved[kind] for saved in ranks):
            assert got["restored"], "compute() must leave the local state in place"
            assert got["result"].keys() == expected.keys()
            assert torch.equal(got["synced"]["coarse_count"], single_anomaly.coarse_count)
            assert torch.equal(got["synced"]["counts"].sum(1), single_anomaly.counts.sum(1))
            for key in ("aupr", "auroc", "fpr95"):  # the merged histogram holds the exact value
                error = abs(got["result"][key] - exact[key])
                assert error <= got["result"][f"{key}_error_bound"] + 1e-12, (kind, key, error)
            if kind == "narrow":  # everything at full resolution: the same histogram, bin for bin
                assert torch.equal(got["synced"]["counts"], score_ordered_counts(single_anomaly))
                for key, value in expected.items():
                    assert _same(got["result"][key], value), (kind, key, got["result"][key], value)
                for key in ("aupr_ci", "auroc_ci", "fpr95_ci", "aupr_per_image_ci", "fpr95_per_image_ci"):
                    assert got["result"][key] == expected[key], key  # bit for bit
                for key, value in expected_curves.items():
                    np.testing.assert_array_equal(got["curves"][key], value)
                assert got["result"]["aupr_error_bound"] == 0.0
            else:  # merged layouts may differ from the single process's: both within their bounds
                for key in ("aupr", "auroc", "fpr95"):
                    gap = abs(got["result"][key] - expected[key])
                    assert gap <= got["result"][f"{key}_error_bound"] + expected[f"{key}_error_bound"] + 1e-12
                for key in ("aupr_per_image", "auroc_per_image", "fpr95_per_image", "num_valid_pixels"):
                    assert _same(got["result"][key], expected[key]), (kind, key)
                    if key.endswith("_per_image"):  # resampled from the same per-image values
                        assert got["result"][key + "_ci"] == expected[key + "_ci"], (kind, key)
                for key in ("aupr", "auroc", "fpr95"):  # moved onto pooled values that agree within bounds
                    bound = got["result"][f"{key}_error_bound"] + expected[f"{key}_error_bound"] + 1e-12
                    for a, b in zip(got["result"][f"{key}_ci"], expected[f"{key}_ci"], strict=True):
                        assert abs(a - b) <= bound, (kind, key)
            assert got["segmentation"]["confusion_matrix"] == expected_segmentation["confusion_matrix"]
            assert got["segmentation"]["miou_ci"] == expected_segmentation["miou_ci"]
            assert _same(got["segmentation"]["miou"], expected_segmentation["miou"])
        # Every rank ends with the same numbers and curves.
        assert ranks[0][kind]["result"] == ranks[1][kind]["result"] or all(
            _same(ranks[0][kind]["result"][k], ranks[1][kind]["result"][k]) for k in expected
        )
        for key in ranks[0][kind]["curves"]:
            np.testing.assert_array_equal(ranks[0][kind]["curves"][key], ranks[1][kind]["curves"][key])

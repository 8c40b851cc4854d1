"""FRE moments under DDP: shards accumulated on 2 processes and all-reduced equal a 1-process fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lightning_modules import fre
from tests.helpers import run_in_process_group

K, C, WORLD = 5, 16, 2


def make_data(seed: int = 0, batches: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        labels = torch.randint(0, K, (2, 10, 12), generator=g)
        labels[:, :2, :2] = 255
        scale = torch.linspace(0.1, 3.0, C)[None, :, None, None]
        shift = labels.clamp(max=K - 1)[:, None].float()
        features = torch.randn(2, C, 10, 12, generator=g) * scale + shift
        out.append((features, labels))
    return out


def moments_of(batches) -> list[torch.Tensor]:
    acc = [
        torch.zeros(K, C, dtype=torch.float64),
        torch.zeros(K, C, C, dtype=torch.float64),
        torch.zeros(K, dtype=torch.float64),
    ]
    for features, labels in batches:
        fre.accumulate_class_moments(features, labels, K, *acc)
    return acc


def fit_both(moments) -> dict[str, torch.Tensor]:
    means, bases, ranks = fre.fit_subspaces(*moments, explained_variance=0.9)
    g_means, g_bases, g_ranks = fre.fit_subspaces(*moments, explained_variance=0.9, mode="global")
    return {
        "means": means,
        "projectors": bases @ bases.transpose(1, 2),
        "ranks": ranks,
        "g_means": g_means,
        "g_projectors": g_bases @ g_bases.transpose(1, 2),
        "g_ranks": g_ranks,
    }


def _worker(rank: int, world: int, out_dir: str) -> None:
    shard = make_data()[rank::world]  # disjoint shards, like a DistributedSampler
    moments = moments_of(shard)
    for t in moments:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    torch.save(fit_both(moments), Path(out_dir) / f"rank{rank}.pt")


def test_all_reduced_moments_fit_like_one_process(tmp_path):
    run_in_process_group(_worker, WORLD, str(tmp_path))
    single = fit_both(moments_of(make_data()))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key in ("ranks", "g_ranks"):
            assert torch.equal(got[key], single[key]), key
        for key in ("means", "projectors", "g_means", "g_projectors"):
            np.testing.assert_allclose(got[key].numpy(), single[key].numpy(), rtol=0, atol=1e-10, err_msg=key)

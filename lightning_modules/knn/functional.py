"""Dense k-nearest-neighbour anomaly scores (after Galesso, Argus, Brox, ICCV workshops 2023): pure tensor math.

A pixel's score is how far its feature lies from the features of training pixels: the mean (or
the largest) of its ``k`` smallest Euclidean distances to the rows of a memory bank. The bank is
a seeded subsample of training pixels whose choice depends only on each image's identity and
pixel labels, never on the order in which images arrive or on how they are split between
processes (see :func:`select_rows`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.precision import full_precision_matmul

__all__ = [
    "REDUCTIONS",
    "class_ranks",
    "image_seed",
    "knn_score_map",
    "nearest_distances",
    "pixel_priorities",
    "prune_rows",
    "reduce_distances",
    "resize_labels_nearest",
    "select_rows",
]

REDUCTIONS = ("mean", "kth")


# ----------------------------------------------------------------------------- search
def nearest_distances(queries: Tensor, bank: Tensor, k: int, chunk_size: int = 2048) -> Tensor:
    """Euclidean distances ``[N, k]`` (ascending) from each query row to its ``k`` nearest bank rows.

    Args:
        queries: ``[N, C]`` floating rows; half precision is upcast to float32.
        bank: ``[M, C]`` rows with ``M >= k``, same device.
        k: number of neighbours.
        chunk_size: queries per block; a block holds a ``[chunk_size, M]`` distance matrix.

    An exact (brute-force) search: ``|q - b|^2 = |q|^2 + |b|^2 - 2 q.b`` with one ``addmm`` per
    block; ``|q|^2`` is constant along a row, so it is only added to the ``k`` selected values.
    In float32 the expansion carries an absolute error of about ``1e-7 (|q|^2 + |b|^2)`` on the
    squared distance (float64 inputs stay float64): negligible for the scores, which measure
    distances far above it, and the reason tests compare distances with a tolerance. Recomputing
    the selected distances from ``q - b`` would remove it but costs as much as the product.
    """
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        shapes = f"{tuple(queries.shape)}, {tuple(bank.shape)}"
        raise ValueError(f"queries [N, C] and bank [M, C] must be 2-D with the same C, got {shapes}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if bank.shape[0] < k:
        raise ValueError(f"the memory bank has {bank.shape[0]} rows, fewer than k = {k}")
    dtype = torch.promote_types(torch.promote_types(queries.dtype, bank.dtype), torch.float32)
    queries, bank = queries.to(dtype), bank.to(dtype)
    bank_sq = (bank * bank).sum(dim=1)
    bank_t = bank.t()
    out = [queries.new_zeros((0, k))]
    # Full float32 products (no TF32, no autocast): the expansion subtracts large terms.
    with torch.autocast(device_type=queries.device.type, enabled=False), full_precision_matmul():
        for start in range(0, queries.shape[0], chunk_size):
            block = queries[start : start + chunk_size]
            partial = torch.addmm(bank_sq, block, bank_t, alpha=-2.0)
            nearest = partial.topk(k, dim=1, largest=False, sorted=True).values
            out.append((nearest + (block * block).sum(dim=1, keepdim=True)).clamp_min_(0.0).sqrt_())
    return torch.cat(out)


def reduce_distances(distances: Tensor, reduction: str = "mean") -> Tensor:
    """``[N, k] -> [N]``: the mean of the ``k`` distances (the official code's default) or the k-th."""
    if reduction == "mean":
        return distances.mean(dim=1)
    if reduction == "kth":
        return distances[:, -1]
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got '{reduction}'")


def knn_score_map(
    features: Tensor,
    bank: Tensor,
    k: int,
    reduction: str = "mean",
    normalize: bool = False,
    chunk_size: int = 2048,
) -> Tensor:
    """Anomaly score ``[B, h, w]`` of feature maps ``[B, C, h, w]`` against a bank ``[M, C]``.

    With ``normalize`` the features are L2-normalised per pixel first (the bank must have been
    built the same way). Higher = farther from the training pixels = more anomalous.
    """
    if features.ndim != 4:
        raise ValueError(f"features must have shape [B, C, h, w], got {tuple(features.shape)}")
    b, c, h, w = features.shape
    rows = features.permute(0, 2, 3, 1).reshape(-1, c)
    if normalize:
        rows = F.normalize(rows.float(), dim=1)
    distances = nearest_distances(rows, bank, k, chunk_size)
    return reduce_distances(distances, reduction).reshape(b, h, w)


# ----------------------------------------------------------------------------- subsampling
def image_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one image, a function of the run's ``seed`` and the image's ``key`` only.

    ``key`` is the image's name (or a digest of its content): hashed with BLAKE2 because Python's
    ``hash`` of a string changes between processes.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    state = np.random.SeedSequence([int(seed) & (2**64 - 1), *words]).generate_state(2, dtype=np.uint32)
    return int(state[0]) | (int(state[1]) & 0x7FFFFFFF) << 32


def pixel_priorities(num_pixels: int, seed: int) -> Tensor:
    """``[num_pixels]`` float64 uniform priorities drawn from a CPU generator seeded with ``seed``.

    Rows with the smallest priorities are kept; float64 makes ties (which would let the row order
    decide) practically impossible.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_pixels, generator=generator, dtype=torch.float64)


def class_ranks(priorities: Tensor, labels: Tensor | None) -> Tensor:
    """Each row's rank (0-based) by priority among the rows of its class (of all rows without labels)."""
    order = priorities.argsort(stable=True)
    ranks = torch.empty_like(order)
    if labels is None:
        ranks[order] = torch.arange(order.numel(), device=order.device)
        return ranks
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("class_ranks: labels must be >= 0 (drop invalid rows first)")
    by_class = order[labels[order].argsort(stable=True)]  # grouped by class, by priority within a class
    counts = torch.bincount(labels, minlength=1)
    starts = counts.cumsum(0) - counts
    positions = torch.arange(by_class.numel(), device=order.device)
    ranks[by_class] = positions - starts[labels[by_class]]
    return ranks


def select_rows(priorities: Tensor, labels: Tensor | None, count: int) -> Tensor:
    """Indices of the ``count`` rows to keep, ordered by (class rank, priority).

    Without labels: the ``count`` smallest priorities, a uniform random subset. With labels:
    classes take turns, each giving its next row by priority (so every class present gets an
    equal share, and a class with fewer rows leaves its share to the others). The result depends
    only on the set of ``(priority, label)`` pairs, not on their order: selecting from the union
    of two processes' rows gives the same rows as one process holding them all.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    ranks = class_ranks(priorities, labels)
    order = priorities.argsort(stable=True)
    order = order[ranks[order].argsort(stable=True)]
    return order[:count]


def prune_rows(priorities: Tensor, labels: Tensor | None, count: int) -> Tensor:
    """Boolean mask of the rows that can still be among ``select_rows(..., count)`` of any superset.

    A row whose rank within its class (or overall, without labels) is ``>= count`` is preceded
    by ``count`` rows in every superset, so dropping it while accumulating never changes the
    final selection and bounds the memory the accumulator needs.
    """
    return class_ranks(priorities, labels) < count


def resize_labels_nearest(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Labels ``[B, H, W]`` at feature resolution ``size``: the label at each feature cell's centre."""
    if labels.ndim != 3:
        raise ValueError(f"labels must have shape [B, H, W], got {tuple(labels.shape)}")
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    # ``nearest-exact`` samples the cell centre; plain ``nearest`` (the official code's) its top-left
    # corner, which at 1/4 or 1/16 resolution reads the label a few pixels off. Labels <= 255 are exact in float32.
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")
    return resized[:, 0].to(labels.dtype)

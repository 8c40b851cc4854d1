"""Exact integer counting of indexed pixels into a flat histogram, on CPU and CUDA.

>>> import torch
>>> counts = torch.zeros(4, dtype=torch.int64)
>>> accumulate_counts(counts, torch.tensor([0, 2, 2, 3]), torch.tensor([True, True, True, False]))
>>> counts.tolist()
[1, 0, 2, 0]
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from callbacks.metrics.functional import _backend

__all__ = ["accumulate_counts"]


def accumulate_counts(
    counts: Tensor,
    index: Tensor,
    include: Tensor,
    method: Literal["auto", "scatter", "bincount", "sort"] = "auto",
) -> None:
    """In place: ``counts[index[i]] += 1`` for every ``i`` with ``include[i]``. Exact integer counts.

    Args:
        counts: 1-D int64 tensor of length ``M``.
        index: int64 tensor, values in ``[0, M)`` where ``include`` is set (anything elsewhere).
        include: bool tensor of the same shape as ``index``.
        method: ``"scatter"``: ``scatter_add_`` into ``counts`` (no temporary of size ``M``;
            integer atomics on CUDA, so order-independent). ``"bincount"``: ``torch.bincount``
            plus an add (CPU only in ``"auto"``: on CUDA it synchronises to size its output).
            ``"sort"``: sort the indices and read run lengths off with ``searchsorted``,
            O(N log N + M) time and O(N + M) memory, deterministic by construction.
            ``"auto"``: ``"sort"`` on CUDA when ``torch.use_deterministic_algorithms`` is on (so
            torch never swaps in a deterministic ``scatter_add_``/``index_add``/``bincount``
            fallback), else ``"bincount"`` on CPU when ``M`` does not exceed the number of
            indices, else ``"scatter"``; CPU tensors take the CUDA choice when
            ``_backend.NUMPY_ON_CPU`` is off (the CUDA code run on CPU).
    """
    index = index.reshape(-1)
    include = include.reshape(-1)
    if method == "auto":
        if counts.is_cuda or not _backend.numpy_on_cpu(counts):  # the CUDA path (also on CPU when asked)
            method = "sort" if torch.are_deterministic_algorithms_enabled() else "scatter"
        else:
            method = "bincount" if counts.numel() <= index.numel() else "scatter"
    if method == "bincount":
        num_bins = counts.numel()
        # Excluded entries go to one extra bin that is dropped.
        binned = torch.bincount(torch.where(include, index, num_bins), minlength=num_bins + 1)
        counts += binned[:num_bins]
    elif method == "scatter":
        # Excluded entries add zero at a harmless in-range position.
        if _backend.numpy_on_cpu(counts):
            keep = include.numpy()
            safe_index = torch.from_numpy(np.where(keep, index.numpy(), 0))
            weight = torch.from_numpy(keep.astype(np.int64))
        else:
            safe_index = torch.where(include, index, torch.zeros_like(index))
            weight = include.to(counts.dtype)
        counts.scatter_add_(0, safe_index, weight)
    elif method == "sort":
        num_bins = counts.numel()
        # Excluded entries sort past the last bin and are never counted.
        ordered = torch.sort(torch.where(include, index, torch.full_like(index, num_bins))).values
        edges = torch.arange(num_bins + 1, device=counts.device, dtype=ordered.dtype)
        counts += torch.searchsorted(ordered, edges).diff()
    else:
        raise ValueError(f"unknown method {method!r}")

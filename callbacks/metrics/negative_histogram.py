"""Per-class histogram of the scores of negative pixels, for the false-positive breakdown at a threshold."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from callbacks.metrics.functional import (
    BinLayout,
    accumulate_counts,
    bin_index,
    bin_layout,
    bin_lower_edge,
    flat_index,
    float_to_key,
    layout_tensors,
    range_layout,
    rebin_tensors,
)
from callbacks.metrics.packed_sync import PackedSyncMetric

__all__ = ["NegativeScoreHistogram"]

# Key range of a histogram that has seen nothing: an empty interval.
_EMPTY_KEY_MIN = 1 << 31
_EMPTY_KEY_MAX = -(1 << 31) - 1


class NegativeScoreHistogram(PackedSyncMetric):
    """Counts of negative pixels per grouping, per class and per score bin: ``[G, K, 2**num_bits]``.

    A *grouping* assigns each pixel a class: e.g. its ground-truth class (G=0) and the class the
    closed-set head predicts for it (G=1). Reading the counts at and above the bin of a
    threshold gives the false positives at that threshold, split by class.

    Binning is the range layout of :mod:`callbacks.metrics.functional.histogram`: scores become
    order-preserving float32 keys and ``bin = (key >> shift) - offset``, with the finest ``shift``
    that fits the key range seen so far into ``2**num_bits`` bins; when the range grows, aligned
    bins merge exactly (``rebin_counts``, shared with ``AnomalyMetrics``). Unlike ``AnomalyMetrics``'
    adaptive layout, this one is computed from device tensors alone, so ``update`` never
    synchronises with the host. A bin spans at most a fraction ``2**(shift - 23)`` of its values' magnitude
    (``2**-(num_bits - 9)`` when the scores span the whole float range, 1/128 at 16 bits).
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    counts: Tensor
    key_min: Tensor
    key_max: Tensor

    def __init__(self, num_classes: int, num_groupings: int = 2, num_bits: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 4 <= num_bits <= 24:
            raise ValueError(f"num_bits must be in 4..24, got {num_bits}")
        self.num_classes = int(num_classes)
        self.num_groupings = int(num_groupings)
        self.num_bits = int(num_bits)
        self.num_bins = 1 << self.num_bits
        rows = self.num_groupings * self.num_classes
        self.add_state("counts", torch.zeros(rows, self.num_bins, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("key_min", torch.tensor(_EMPTY_KEY_MIN, dtype=torch.int64), dist_reduce_fx="min")
        self.add_state("key_max", torch.tensor(_EMPTY_KEY_MAX, dtype=torch.int64), dist_reduce_fx="max")

    def _widen(self, new_min: Tensor, new_max: Tensor) -> tuple[Tensor, Tensor]:
        """Re-bin the counts to the range widened to ``[new_min, new_max]``; returns the new layout."""
        old_shift, old_offset = layout_tensors(self.key_min, self.key_max, self.num_bits)
        lo, hi = torch.minimum(self.key_min, new_min), torch.maximum(self.key_max, new_max)
        shift, offset = layout_tensors(lo, hi, self.num_bits)
        self.counts = rebin_tensors(self.counts, old_shift, old_offset, shift, offset)
        self.key_min, self.key_max = lo, hi
        return shift, offset

    def update(self, scores: Tensor, classes: Tensor, include: Tensor) -> None:  # type: ignore[override]
        """``scores`` float ``[...]``; ``classes`` long ``[G, ...]`` in ``0..K-1`` where ``include``."""
        if classes.shape[0] != self.num_groupings or classes.shape[1:] != scores.shape:
            raise ValueError(
                f"classes must be [{self.num_groupings}, *scores.shape], got {tuple(classes.shape)} "
                f"for scores {tuple(scores.shape)}"
            )
        keys = float_to_key(scores.detach()).long()
        batch_min = torch.where(include, keys, _EMPTY_KEY_MIN).amin()
        batch_max = torch.where(include, keys, _EMPTY_KEY_MAX).amax()
        shift, offset = self._widen(batch_min, batch_max)
        bins = flat_index(keys, range_layout(shift, offset, self.num_bits))
        rows = torch.arange(self.num_groupings, device=keys.device).view(-1, *([1] * keys.dim()))
        index = (rows * self.num_classes + classes.long()) * self.num_bins + bins
        accumulate_counts(self.counts.view(-1), index, include.expand_as(index))

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        # merge_state(): both histograms must be in the union layout before they are summed.
        incoming = dict(incoming_state)
        lo = torch.minimum(self.key_min, incoming["key_min"])
        hi = torch.maximum(self.key_max, incoming["key_max"])
        shift, offset = layout_tensors(lo, hi, self.num_bits)
        theirs = layout_tensors(incoming["key_min"], incoming["key_max"], self.num_bits)
        incoming["counts"] = rebin_tensors(incoming["counts"], *theirs, shift, offset)
        self._widen(lo, hi)
        super()._reduce_states(incoming)

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any | None = None) -> None:
        # Ranks agree on the global key range and re-bin to it (exact) before the counts are
        # summed; torchmetrics cached the local state before this call and restores it on unsync.
        group = process_group or self.process_group
        ranges = torch.stack(dist_sync_fn(torch.stack([self.key_min, self.key_max]), group=group))
        self._widen(ranges[:, 0].min(), ranges[:, 1].max())
        super()._sync_dist(dist_sync_fn, process_group=process_group)

    def compute(self) -> dict[str, Any]:
        """``counts`` ``[G, K, nbins]`` and the layout ``shift``/``offset`` (``None`` before any pixel)."""
        key_min, key_max = int(self.key_min), int(self.key_max)
        layout = bin_layout(key_min, key_max, self.num_bits) if key_min <= key_max else None
        return {
            "counts": self.counts.view(self.num_groupings, self.num_classes, self.num_bins),
            # Plain ints: torchmetrics post-processes compute() results and rejects frozen dataclasses.
            "shift": layout.shift if layout is not None else None,
            "offset": layout.offset if layout is not None else None,
        }

    def layout(self, histogram: Mapping[str, Any]) -> BinLayout | None:
        """The ``BinLayout`` of a ``compute()`` result."""
        if histogram["shift"] is None:
            return None
        return BinLayout(shift=histogram["shift"], offset=histogram["offset"], num_bins=self.num_bins)

    @staticmethod
    def threshold_bin(threshold: float, layout: BinLayout) -> tuple[int, float]:
        """Bin holding ``threshold`` and the threshold that flagging bins ``>= b`` amounts to.

        Flagging bins ``>= b`` flags exactly the pixels with ``score >= edge``, where
        ``edge <= threshold`` is the lower edge of bin ``b``; it equals ``threshold`` when the
        threshold lies on a bin boundary. A threshold below the histogram's range flags every
        pixel (``b = 0``, ``edge = threshold``); one above it flags none (``edge = inf``).
        """
        key = float_to_key(torch.tensor([threshold], dtype=torch.float32)).long()
        index = int(bin_index(key, layout)[0])
        if index <= 0:
            return 0, float(threshold) if index < 0 else float(bin_lower_edge(torch.tensor([0]), layout)[0])
        if index >= layout.num_bins:
            return layout.num_bins, math.inf
        return index, float(bin_lower_edge(torch.tensor([index]), layout)[0])

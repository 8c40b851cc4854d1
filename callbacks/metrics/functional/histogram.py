"""The adaptive score histogram: layout, bin index, exact re-binning and the allocation policy.

This is the one histogram implementation behind every binned metric of the package.

Keys and coarse bins
    Scores become order-preserving int32 keys (:mod:`.keys`); ``u = key + 2**31`` puts them in
    ``[0, 2**32)`` in the same order. A layout cuts that range into *coarse bins* of
    ``2**low_bits`` consecutive keys (aligned, data-independent, the same in every process):
    coarse bin ``g = u >> low_bits``, position inside it ``low = u % 2**low_bits``.

Sub-bins
    Coarse bin ``g`` holds ``size[g]`` *sub-bins* of ``2**shift[g]`` consecutive keys each (aligned
    at multiples of their width), the first one at unit ``offset[g]`` (a unit is ``low >>
    shift[g]``); they sit at flat positions ``base[g] .. base[g] + size[g] - 1`` of the counts. A
    key's flat bin is therefore ``base[g] - offset[g] + (low >> shift[g])`` (``flat_index``).
    Counts move to any layout that is coarser or equal in every coarse bin and covers the keys
    seen, exactly: each old sub-bin lies inside one new sub-bin (``rebin_counts``).

Two layouts are built from this:

- *range layout* (``BinLayout``, ``bin_layout``, ``layout_tensors``): one coarse bin spanning all
  keys (``low_bits = 32``) with ``2**num_bits`` sub-bins whose width is the smallest that fits the
  key range seen. Computable on the device without a host synchronisation, its histogram depends
  only on the data's key range; its worst-case relative bin width is ``2**-(num_bits - 9)``.
  Used by :class:`~callbacks.metrics.NegativeScoreHistogram`.
- *adaptive two-level layout* (``adaptive_layout``, ``plan_layout``): coarse bins of
  ``2**16`` keys (1/128 of a binade: relative width below ``2**-7``), each with sub-bins of
  ``2**shift[g]`` keys, ``shift[g]`` in 0..16, covering the keys it has seen; ``shift[g] = 0`` is
  full float32 resolution (every sub-bin a single float: exact ties). The shifts are chosen on the
  host from the pixels counted in each coarse bin, so dense regions of the score axis get fine
  bins wherever they are; a coarse bin's shift never decreases (counts only merge), and a bin
  that is new or whose keys outgrow its sub-bins is placed anew after the used positions until
  the budget is full and everything is re-allocated and compacted. Used by
  :class:`~callbacks.metrics.AnomalyMetrics`.

>>> import torch
>>> layout = bin_layout(0, 1000, num_bits=8)
>>> layout.shift, layout.offset
(2, 0)
>>> bin_index(torch.tensor([0, 3, 4, 1000]), layout).tolist()
[0, 0, 1, 250]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from callbacks.metrics.functional.keys import KEY_NEG_INF, KEY_POS_INF, key_to_float

__all__ = [
    "ADAPTIVE_LOW_BITS",
    "KEY_OFFSET",
    "NUM_COARSE",
    "BinLayout",
    "CoarseStats",
    "HistogramLayout",
    "adaptive_layout",
    "adaptive_tables",
    "AdaptivePlan",
    "bin_index",
    "bin_key_ranges",
    "bin_layout",
    "bin_lower_edge",
    "SortedRuns",
    "coarse_stats",
    "coverage",
    "count_sorted",
    "empty_coarse_stats",
    "merge_coarse_stats",
    "occupied_bins",
    "move_coarse_bins",
    "plan_layout",
    "sorted_coarse_stats",
    "sorted_runs",
    "trailing_zeros",
    "fixed_layout",
    "flat_index",
    "layout_tensors",
    "rebin_counts",
    "range_layout",
    "rebin_tensors",
    "score_order",
]

#: ``u = key + KEY_OFFSET`` maps keys to ``[0, 2**32)`` in the same order.
KEY_OFFSET: int = 1 << 31
#: Coarse bins of the adaptive layout span ``2**ADAPTIVE_LOW_BITS`` keys.
ADAPTIVE_LOW_BITS: int = 16
#: Number of coarse bins of the adaptive layout.
NUM_COARSE: int = 1 << (32 - ADAPTIVE_LOW_BITS)

_LOW_MASK = (1 << ADAPTIVE_LOW_BITS) - 1


class HistogramLayout(NamedTuple):
    """Where keys land: coarse bin ``g = u >> low_bits``, flat bin ``base[g] - offset[g] + (low >> shift[g])``.

    All tensors are int64 ``[G]`` on one device (``G = 2**(32 - low_bits)``); coarse bins with
    ``size[g] == 0`` have no sub-bins (their ``shift`` is -1 by convention).
    """

    low_bits: int
    shift: Tensor
    offset: Tensor
    size: Tensor
    base: Tensor

    def to(self, device: torch.device | str) -> HistogramLayout:
        """The same layout with its tensors on ``device``."""
        return HistogramLayout(self.low_bits, *(t.to(device) for t in self[1:]))


# ------------------------------------------------------------------------------------------------
# Indexing and re-binning (any layout)
# ------------------------------------------------------------------------------------------------
def flat_index(keys: Tensor, layout: HistogramLayout) -> Tensor:
    """Flat bin of each key (int64, same shape). Every key must lie in a coarse bin with sub-bins.

    >>> layout = bin_layout(-8, 7, num_bits=2).as_histogram_layout()
    >>> flat_index(torch.tensor([-8, -5, -4, 7]), layout).tolist()
    [0, 0, 1, 3]
    """
    u = keys.long() + KEY_OFFSET
    coarse = u >> layout.low_bits
    low = u & ((1 << layout.low_bits) - 1)
    start = layout.base - layout.offset
    shift = layout.shift.clamp_min(0)
    if layout.shift.numel() == 1:  # one coarse bin: no gathers needed
        return start + (low >> shift)
    return start[coarse] + (low >> shift[coarse])


def rebin_counts(
    counts: Tensor,
    old: HistogramLayout | BinLayout,
    new: HistogramLayout | BinLayout,
    num_bins: int | None = None,
    old_blocks: np.ndarray | None = None,
) -> Tensor:
    """Move ``[..., M]`` counts from layout ``old`` to layout ``new`` (``[..., num_bins]``, default ``M``).

    ``old_blocks``: for an adaptive ``old`` layout, its coarse bins with sub-bins in storage order
    (:func:`storage_blocks` of host copies), when the caller has them on the host: then every flat
    position is mapped (a fixed amount of work) and nothing waits for the device; without them
    only the non-empty positions are, found with one host synchronisation.

    Exact and on the counts' device without a host synchronisation: old sub-bin ``j`` of coarse
    bin ``g`` starts at ``low = (offset + j) << shift`` and goes to the new sub-bin holding that
    key; ``new`` must be coarser or equal in every coarse bin (``new.shift[g] >= old.shift[g]``)
    and cover every old sub-bin that holds counts, so each old sub-bin lies inside one new one.
    Counts are summed with ``index_add_`` (integer sums: deterministic on every device).
    """
    if isinstance(old, BinLayout) or isinstance(new, BinLayout):
        if isinstance(old, BinLayout) and isinstance(new, BinLayout):
            if new.shift < old.shift:
                raise ValueError("the new layout must not be finer than the old one")
            if new == old:
                return counts
        old = old.as_histogram_layout(counts.device) if isinstance(old, BinLayout) else old
        new = new.as_histogram_layout(counts.device) if isinstance(new, BinLayout) else new
    device = counts.device
    num_old = counts.shape[-1]
    num_new = num_old if num_bins is None else int(num_bins)
    old = old.to(device)
    new = new.to(device)
    if old.size.numel() == 1:
        # One coarse bin (range layouts, updated on the device every batch): fixed-size work on all
        # positions, no host synchronisation.
        position = torch.arange(num_old, device=device)
        coarse = torch.zeros_like(position)
        values = counts
    elif old_blocks is not None:
        # Adaptive layouts with their blocks known on the host: every position (empty ones, and
        # freed or unused space, add zero).
        position = torch.arange(num_old, device=device)
        coarse = _coarse_of_positions(old, position, num_old, torch.from_numpy(old_blocks).to(device))
        values = counts
    else:
        # Adaptive layouts (re-binned on the host's decision): only the non-empty positions.
        position = torch.nonzero(counts.reshape(-1, num_old).sum(0)).squeeze(1)
        coarse = _coarse_of_positions(old, position, num_old)
        values = counts.index_select(-1, position)
    j = position - old.base[coarse]
    inside = (j >= 0) & (j < old.size[coarse])
    low_start = (old.offset[coarse] + j) << old.shift[coarse].clamp_min(0)
    target = new.base[coarse] + (low_start >> new.shift[coarse].clamp_min(0)) - new.offset[coarse]
    # Positions outside any sub-bin, or mapped outside the new layout, must be empty: dropped
    # (their counts zeroed and sent to position 0, which avoids a copy of the whole state).
    inside &= (target >= 0) & (target < num_new)
    target = torch.where(inside, target, torch.zeros_like(target))
    out = counts.new_zeros(*counts.shape[:-1], num_new)
    out.index_add_(out.dim() - 1, target, torch.where(inside, values, torch.zeros_like(values)))
    return out


def storage_blocks(size: np.ndarray, base: np.ndarray) -> np.ndarray:
    """The coarse bins with sub-bins in storage order (by ``base``), from host copies of a layout."""
    has = np.flatnonzero(np.asarray(size) > 0)
    return has[np.argsort(np.asarray(base)[has], kind="stable")]


def _coarse_of_positions(
    layout: HistogramLayout, position: Tensor, num_positions: int, blocks: Tensor | None = None
) -> Tensor:
    """Coarse bin owning each flat position (positions outside every bin: the block before them).

    ``blocks``: the coarse bins with sub-bins in storage order, if known (else found on the device,
    which waits for it)."""
    # Mark each block's start with the step in coarse index from the block before it (blocks in
    # storage order) and sum the marks up: one pass, no search per position.
    if blocks is None:
        has = torch.nonzero(layout.size > 0).squeeze(1)
        blocks = has[torch.argsort(layout.base[has])]
    marks = torch.zeros(num_positions, dtype=torch.int64, device=position.device)
    marks[layout.base[blocks]] = torch.diff(blocks, prepend=blocks.new_zeros(1))
    return torch.cumsum(marks, 0)[position]


def score_order(layout: HistogramLayout) -> Tensor:
    """Flat positions of all sub-bins in increasing score order (int64, on the layout's device)."""
    size = layout.size
    total = int(size.sum())
    coarse = torch.repeat_interleave(torch.arange(size.numel(), device=size.device), size, output_size=total)
    first = torch.cumsum(size, 0) - size  # score-order position of each coarse bin's first sub-bin
    return layout.base[coarse] + torch.arange(total, device=size.device) - first[coarse]


def occupied_bins(counts: Tensor, layout: HistogramLayout) -> tuple[Tensor, Tensor]:
    """Flat positions of the non-empty bins of ``counts`` (``[..., M]``) in score order, and their coarse bins.

    Each coarse bin's sub-bins are contiguous in storage, in score order; only the coarse bins may be
    stored out of order (bins placed after the used positions), so whole runs are reordered.
    """
    total = counts.reshape(-1, counts.shape[-1]).sum(0)
    position = torch.nonzero(total).squeeze(1)
    if layout.size.numel() == 1:
        return position, torch.zeros_like(position)
    coarse = _coarse_of_positions(layout, position, counts.shape[-1])
    if position.numel() == 0:
        return position, coarse
    change = torch.ones_like(position, dtype=torch.bool)
    change[1:] = coarse[1:] != coarse[:-1]
    run_start = torch.nonzero(change).squeeze(1)
    run_length = torch.diff(run_start, append=run_start.new_tensor([position.numel()]))
    run_order = torch.argsort(coarse[run_start])
    length = run_length[run_order]
    shift = run_start[run_order] - (torch.cumsum(length, 0) - length)
    perm = torch.repeat_interleave(shift, length, output_size=position.numel()) + torch.arange(
        position.numel(), device=position.device
    )
    return position[perm], coarse[perm]


def bin_key_ranges(layout: HistogramLayout, flat_bins: Tensor) -> tuple[Tensor, Tensor]:
    """Smallest and largest key (int64) of each flat bin, clamped to the ordered floats' keys."""
    size = layout.size
    if size.numel() == 1:
        coarse = torch.zeros_like(flat_bins)
    else:
        base = torch.where(size > 0, layout.base, torch.full_like(layout.base, 1 << 62))
        order = torch.argsort(base)
        coarse = order[(torch.searchsorted(base[order].contiguous(), flat_bins, right=True) - 1).clamp_min(0)]
    shift = layout.shift[coarse].clamp_min(0)
    unit = layout.offset[coarse] + flat_bins - layout.base[coarse]
    first = (coarse << layout.low_bits) + (unit << shift) - KEY_OFFSET
    last = first + (1 << shift) - 1
    return first.clamp(KEY_NEG_INF, KEY_POS_INF), last.clamp(KEY_NEG_INF, KEY_POS_INF)


# ------------------------------------------------------------------------------------------------
# Range layout: one coarse bin, the finest sub-bins that fit the key range (device, no host sync)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BinLayout:
    """A range layout in key units: ``bin = (key >> shift) - offset``, ``num_bins`` bins."""

    shift: int
    offset: int
    num_bins: int

    @property
    def max_relative_width(self) -> float:
        """Upper bound on a bin's width relative to the magnitude of the normal floats in it."""
        return 2.0 ** (self.shift - 23)

    def as_histogram_layout(self, device: torch.device | str | None = None) -> HistogramLayout:
        """The same layout as a one-coarse-bin ``HistogramLayout`` (offsets in ``u`` units)."""
        return range_layout(
            torch.tensor([self.shift], device=device),
            torch.tensor([self.offset], device=device),
            self.num_bins.bit_length() - 1,
        )


def range_layout(shift: Tensor, key_offset: Tensor, num_bits: int) -> HistogramLayout:
    """The range layout ``bin = (key >> shift) - key_offset`` (0-d tensors, e.g. from ``layout_tensors``)."""
    # (u >> s) - offset_u == (key >> s) - key_offset for s <= 31: u = key + 2**31 adds 2**(31 - s) units.
    shift = shift.reshape(1).long()
    offset = key_offset.reshape(1).long() + (KEY_OFFSET >> shift)
    return HistogramLayout(
        low_bits=32,
        shift=shift,
        offset=offset,
        size=torch.full_like(shift, 1 << num_bits),
        base=torch.zeros_like(shift),
    )


def layout_tensors(key_min: Tensor, key_max: Tensor, num_bits: int) -> tuple[Tensor, Tensor]:
    """``(shift, offset)`` of the finest range layout fitting ``[key_min, key_max]`` into ``2**num_bits`` bins.

    Works on int64 tensors of any shape (one layout per element) on their device, without a host
    synchronisation. ``shift`` is the smallest ``s`` with ``(key_max >> s) - (key_min >> s) <
    2**num_bits`` (arithmetic shifts: floor division by ``2**s``); the condition is monotone in
    ``s``, so counting the shifts that fail gives it. It never decreases when the key range
    widens, which makes re-binning a pure merge of aligned bins. An empty range (``key_min >
    key_max``) gets shift 0.
    """
    shifts = torch.arange(41, device=key_min.device, dtype=torch.int64).view(-1, *([1] * key_min.dim()))
    fails = ((key_max >> shifts) - (key_min >> shifts)) >= (1 << num_bits)
    shift = fails.sum(0)
    return shift, key_min >> shift


def bin_layout(key_min: int, key_max: int, num_bits: int) -> BinLayout:
    """The finest range layout that puts every key in ``[key_min, key_max]`` into ``2**num_bits`` bins."""
    if key_min > key_max:
        raise ValueError(f"empty key range [{key_min}, {key_max}]")
    shift, offset = layout_tensors(torch.tensor(key_min), torch.tensor(key_max), num_bits)
    return BinLayout(shift=int(shift), offset=int(offset), num_bins=1 << num_bits)


def fixed_layout(num_bits: int) -> BinLayout:
    """The data-independent range layout over all int32 keys (``shift = 32 - num_bits``)."""
    return BinLayout(shift=32 - num_bits, offset=-(1 << (num_bits - 1)), num_bins=1 << num_bits)


def bin_index(keys: Tensor, layout: BinLayout) -> Tensor:
    """Bin of each key in a range layout (int64; in ``[0, num_bins)`` for keys inside its range)."""
    return flat_index(keys, layout.as_histogram_layout(keys.device))


def bin_lower_edge(bins: Tensor, layout: BinLayout | HistogramLayout) -> Tensor:
    """Smallest float32 value that falls into each bin (clamped to -inf/+inf).

    Predicting "anomaly" for ``score >= bin_lower_edge(b)`` selects exactly the pixels counted in
    the bins above or at ``b`` in score order, so this edge is the decision threshold that
    reproduces a binned operating point.
    """
    if isinstance(layout, BinLayout):
        keys = (bins.long() + layout.offset) << layout.shift
        return key_to_float(keys.clamp(KEY_NEG_INF, KEY_POS_INF))
    return key_to_float(bin_key_ranges(layout, bins.long())[0])


def rebin_tensors(
    counts: Tensor, old_shift: Tensor, old_offset: Tensor, new_shift: Tensor, new_offset: Tensor
) -> Tensor:
    """``rebin_counts`` between two range layouts given as 0-d int64 tensors (key units), ``[..., nbins]``.

    No host synchronisation: for device-resident layouts such as ``NegativeScoreHistogram``'s.
    """
    num_bits = counts.shape[-1].bit_length() - 1
    old = range_layout(old_shift, old_offset, num_bits)
    new = range_layout(new_shift, new_offset, num_bits)
    return rebin_counts(counts, old, new)


# ------------------------------------------------------------------------------------------------
# Adaptive two-level layout
# ------------------------------------------------------------------------------------------------
def adaptive_layout(
    shift: Tensor | np.ndarray, offset: Tensor | np.ndarray, size: Tensor | np.ndarray, base: Tensor | np.ndarray
) -> HistogramLayout:
    """The two-level layout from its per-coarse-bin arrays (int64 ``[65536]``, coarse bins in score order).

    Coarse bin ``g`` holds ``size[g]`` sub-bins of ``2**shift[g]`` keys starting at unit ``offset[g]``
    (``shift`` -1 and ``size`` 0 where it has none), stored from flat position ``base[g]`` on.
    """
    shift = torch.as_tensor(shift, dtype=torch.int64)
    device = shift.device
    as_tensor = lambda values: torch.as_tensor(values, dtype=torch.int64).to(device)  # noqa: E731
    return HistogramLayout(ADAPTIVE_LOW_BITS, shift, as_tensor(offset), as_tensor(size), as_tensor(base))


def adaptive_tables(shift: np.ndarray, offset: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per coarse bin (score order): flat start ``base - offset`` and shift, for the NumPy fast path."""
    start = np.asarray(base, dtype=np.int64) - np.asarray(offset, dtype=np.int64)
    return start, np.maximum(np.asarray(shift, dtype=np.int64), 0)


def move_coarse_bins(
    counts: Tensor, old: HistogramLayout, new: HistogramLayout, coarse: Tensor, total: int | None = None
) -> None:
    """In place: move the sub-bins of the coarse bins ``coarse`` from ``old`` to ``new`` (exact).

    Same mapping as ``rebin_counts``, for a few coarse bins: their old sub-bins are read, zeroed,
    and added at their new place, which must not overlap the old sub-bins of any moved bin.
    ``total``: the number of old sub-bins of those coarse bins, when the caller knows it on the
    host; then nothing here waits for the device (every sub-bin moves, empty ones too), otherwise
    it is read from the device and only the non-empty sub-bins move.
    """
    if coarse.numel() == 0:
        return
    old, new = old.to(counts.device), new.to(counts.device)
    coarse = coarse.to(counts.device)
    sizes = old.size[coarse]
    which = torch.repeat_interleave(coarse, sizes, output_size=total)
    j = torch.arange(which.numel(), device=counts.device) - torch.repeat_interleave(
        torch.cumsum(sizes, 0) - sizes, sizes, output_size=total
    )
    source = old.base[which] + j
    values = counts.index_select(-1, source)
    if total is None:
        occupied = torch.nonzero(values.reshape(-1, source.numel()).sum(0)).squeeze(1)  # only these need moving
        which, j, source, values = which[occupied], j[occupied], source[occupied], values.index_select(-1, occupied)
    low_start = (old.offset[which] + j) << old.shift[which].clamp_min(0)
    unit = (low_start >> new.shift[which].clamp_min(0)) - new.offset[which]
    target = new.base[which] + unit
    if total is not None:
        # Empty sub-bins may lie outside the keys seen, hence outside the new sub-bins: they add
        # zero at their coarse bin's first new position instead.
        inside = (unit >= 0) & (unit < new.size[which])
        target = torch.where(inside, target, new.base[which])
        values = torch.where(inside, values, torch.zeros_like(values))
    counts.index_fill_(-1, source, 0)
    counts.index_add_(counts.dim() - 1, target, values)


def trailing_zeros(values: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Trailing zero bits of 16-bit values (int64 NumPy array or tensor), 16 for 0."""
    values = values & _LOW_MASK
    if isinstance(values, np.ndarray):
        lowest = values & -values
        with np.errstate(divide="ignore"):
            return np.where(values == 0, ADAPTIVE_LOW_BITS, np.log2(np.maximum(lowest, 1)).astype(np.int64))
    lowest = values & -values
    return torch.where(values == 0, ADAPTIVE_LOW_BITS, torch.log2(lowest.clamp_min(1).double()).long())


class CoarseStats(NamedTuple):
    """Per coarse bin of the adaptive layout (score order, ``[65536]``): what a set of keys put there.

    ``align`` is the largest ``t`` (0..16) such that every ``low`` seen is congruent to
    ``low_min`` modulo ``2**t``: the keys then lie on a lattice of step ``2**t`` (half-precision
    scores: ``t = 13``; a single distinct key: 16), so sub-bins ``2**t`` wide hold one key each.
    """

    count: np.ndarray | Tensor  # int64 pixels
    low_min: np.ndarray | Tensor  # int64 smallest ``low`` seen (65536 where none)
    low_max: np.ndarray | Tensor  # int64 largest ``low`` seen (-1 where none)
    align: np.ndarray | Tensor  # int64 lattice step exponent of the ``low`` seen (16 where none)


def empty_coarse_stats() -> CoarseStats:
    """``CoarseStats`` of nothing (NumPy), to accumulate into with ``add_sorted_runs``."""
    return CoarseStats(
        np.zeros(NUM_COARSE, dtype=np.int64),
        np.full(NUM_COARSE, 1 << ADAPTIVE_LOW_BITS, dtype=np.int64),
        np.full(NUM_COARSE, -1, dtype=np.int64),
        np.full(NUM_COARSE, ADAPTIVE_LOW_BITS, dtype=np.int64),
    )


def merge_coarse_stats(first: CoarseStats, second: CoarseStats) -> CoarseStats:
    """The ``CoarseStats`` of the union of two key sets (NumPy arrays or tensors, elementwise)."""
    lib = np if isinstance(first.count, np.ndarray) else torch
    both = (first.low_max >= 0) & (second.low_max >= 0)
    # Both lattices hold, and their reference points must agree modulo the step too.
    cross = lib.where(both, trailing_zeros(first.low_min ^ second.low_min), ADAPTIVE_LOW_BITS)
    return CoarseStats(
        count=first.count + second.count,
        low_min=lib.minimum(first.low_min, second.low_min),
        low_max=lib.maximum(first.low_max, second.low_max),
        align=lib.minimum(lib.minimum(first.align, second.align), cross),
    )


class SortedRuns(NamedTuple):
    """Maximal runs of one coarse bin in an ascending 1-D key array."""

    starts: np.ndarray  # int64 first index of each run
    lengths: np.ndarray  # int64
    coarse: np.ndarray  # int64 coarse bin (score order)


def sorted_runs(keys: np.ndarray) -> SortedRuns:
    """Runs of equal coarse bin in ascending int32 ``keys``: one comparison per key, no gathers."""
    if keys.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return SortedRuns(empty, empty, empty)
    coarse = keys >> ADAPTIVE_LOW_BITS
    starts = np.flatnonzero(coarse[1:] != coarse[:-1]) + 1
    starts = np.concatenate([np.zeros(1, dtype=np.int64), starts])
    lengths = np.diff(np.append(starts, keys.size))
    return SortedRuns(starts, lengths, coarse[starts].astype(np.int64) + (KEY_OFFSET >> ADAPTIVE_LOW_BITS))


def sorted_coarse_stats(rows: list[np.ndarray], runs: list[SortedRuns]) -> CoarseStats:
    """``CoarseStats`` of several ascending int32 key arrays, given their ``sorted_runs`` (NumPy)."""
    stats = empty_coarse_stats()
    firsts = []
    for keys, row_runs in zip(rows, runs, strict=True):
        if row_runs.starts.size == 0:
            firsts.append(np.zeros(0, dtype=np.int64))
            continue
        first = keys[row_runs.starts].astype(np.int64) & _LOW_MASK
        firsts.append(first)
        np.add.at(stats.count, row_runs.coarse, row_runs.lengths)
        np.minimum.at(stats.low_min, row_runs.coarse, first)
        np.maximum.at(
            stats.low_max, row_runs.coarse, keys[row_runs.starts + row_runs.lengths - 1].astype(np.int64) & _LOW_MASK
        )
    for keys, row_runs, first in zip(rows, runs, firsts, strict=True):
        if row_runs.starts.size == 0:
            continue
        # Lattice of a sorted run: every key congruent to the first modulo 2**t iff every
        # difference of neighbours is a multiple of 2**t. Differences across runs are zeroed.
        steps = np.zeros(keys.size, dtype=np.int32)
        np.subtract(keys[1:], keys[:-1], out=steps[:-1])
        steps[row_runs.starts[1:] - 1] = 0
        within = trailing_zeros(np.bitwise_or.reduceat(steps, row_runs.starts).astype(np.int64))
        anchor = trailing_zeros(first ^ stats.low_min[row_runs.coarse])
        np.minimum.at(stats.align, row_runs.coarse, np.minimum(within, anchor))
    return stats


def count_sorted(counts: np.ndarray, keys: np.ndarray, runs: SortedRuns, start: np.ndarray, shift: np.ndarray) -> None:
    """``counts[flat_index(key)] += 1`` for ascending int32 ``keys`` (NumPy, in place).

    Every coarse bin of ``runs`` must have sub-bins. Within a run the start and shift are
    constant, so they are repeated per run instead of gathered per key, and the indices come out
    sorted, which keeps ``np.add.at`` cache-friendly.
    """
    if keys.size == 0:
        return
    index = np.repeat(start[runs.coarse], runs.lengths)
    index += (keys & _LOW_MASK) >> np.repeat(shift[runs.coarse], runs.lengths)
    np.add.at(counts, index, 1)


def coarse_stats(keys: Tensor, include: Tensor) -> CoarseStats:
    """``CoarseStats`` of the keys where ``include`` (torch, any device, no host synchronisation)."""
    u = keys.reshape(-1).long() + KEY_OFFSET
    include = include.reshape(-1)
    coarse = torch.where(include, u >> ADAPTIVE_LOW_BITS, torch.full_like(u, NUM_COARSE))
    low = u & _LOW_MASK
    count = torch.zeros(NUM_COARSE + 1, dtype=torch.int64, device=u.device)
    count.scatter_add_(0, coarse, torch.ones_like(coarse))
    low_min = torch.full((NUM_COARSE + 1,), 1 << ADAPTIVE_LOW_BITS, dtype=torch.int64, device=u.device)
    low_min.scatter_reduce_(0, coarse, low, "amin")
    low_max = torch.full((NUM_COARSE + 1,), -1, dtype=torch.int64, device=u.device)
    low_max.scatter_reduce_(0, coarse, low, "amax")
    align = torch.full((NUM_COARSE + 1,), ADAPTIVE_LOW_BITS, dtype=torch.int64, device=u.device)
    align.scatter_reduce_(0, coarse, trailing_zeros(low ^ low_min[coarse]), "amin")
    return CoarseStats(count[:NUM_COARSE], low_min[:NUM_COARSE], low_max[:NUM_COARSE], align[:NUM_COARSE])


def coverage(low_min: np.ndarray, low_max: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First unit and number of sub-bins at ``shift`` that cover ``[low_min, low_max]`` (0 sub-bins if empty)."""
    shift = np.maximum(shift, 0)
    offset = np.where(low_max >= 0, low_min >> shift, 0)
    size = np.where(low_max >= 0, (np.maximum(low_max, 0) >> shift) - offset + 1, 0)
    return offset.astype(np.int64), size.astype(np.int64)


class AdaptivePlan(NamedTuple):
    """A new adaptive layout (NumPy, per coarse bin) and how to get the counts there."""

    shift: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    base: np.ndarray
    used: int  # flat positions taken, freed ones included, until the next compaction
    level: float
    compacted: bool  # every bin placed anew in score order: re-bin all counts
    moved: np.ndarray  # bool: coarse bins that had sub-bins and are placed anew (when not compacted)


def plan_layout(
    shift: np.ndarray,
    offset: np.ndarray,
    size: np.ndarray,
    base: np.ndarray,
    used: int,
    stats: CoarseStats,
    budget: int,
    level: float,
    share: float = 0.5,
    force: bool = False,
) -> AdaptivePlan | None:
    """Give sub-bins to the coarse bins whose keys the layout does not cover yet (NumPy, on the host).

    Args:
        shift, offset, size, base: the current layout (``shift`` -1 where a coarse bin has none).
        used: flat positions taken so far (sub-bins, and space freed by moved bins).
        stats: per coarse bin, every key seen so far, the new ones included.
        budget: flat positions available (``2**num_bits``).
        level: the water level of the last allocation (0 before the first).
        share: new or grown coarse bins may take up to this fraction of the free positions, and a
            re-allocation fills this fraction of the budget, so that bins reached later (the tails
            of a distribution, a score range that moves) still find room.
        force: re-allocate and compact even if everything is covered (merging layouts).

    Returns:
        ``None`` if every key seen is covered, else the new layout. A coarse bin wants about
        ``weight / level`` sub-bins: ``s = 16 - floor(log2(weight / level))`` clipped to 0..16 and
        to at least its lattice exponent (``CoarseStats.align``, once it holds 16 pixels per lattice
        point: finer bins would only separate keys that never occur), and never below its current
        shift (counts cannot be split). Its sub-bins cover the keys seen, ``[low_min, low_max]``
        at that width, so a sparse coarse bin gets full resolution cheaply. Bins that are new or
        whose keys outgrew their sub-bins are placed after the used positions, at the finest
        common level at which they take at most ``share`` of the free positions (or ``level`` if
        coarser and still fitting); other bins stay where they are. If they do not fit, the
        smallest level with at most ``share * budget`` sub-bins in all is chosen for every bin and
        the layout is compacted in score order.

    The weight of a coarse bin is ``m * sqrt(1/2 + N / (R + m))`` (``m`` its pixels, ``N`` all
    pixels, ``R`` the pixels scoring above it): splitting it into ``k`` equal sub-bins leaves an
    AUROC bound of about ``m**2 / (2 N**2 k)`` and an AP bound of about ``m**2 / (N (R + m) k)``
    (see ``curves.binned_error_bounds``); ``k`` proportional to the square root of their sum
    minimises the total for a fixed number of sub-bins, and the top of the ranking, where AP is
    sensitive, gets finer bins.
    """
    shift = np.asarray(shift, dtype=np.int64)
    has = shift >= 0
    seen = stats.low_max >= 0
    safe_shift = np.maximum(shift, 0)
    outgrown = has & ((stats.low_min < (offset << safe_shift)) | (stats.low_max > ((offset + size) << safe_shift) - 1))
    moving = outgrown | (seen & ~has)
    if not force and not moving.any():
        return None

    # Only the coarse bins that hold keys or sub-bins take part (a few thousand of 65536): their
    # values, in score order; the others have no pixels and keep no sub-bins.
    active = np.flatnonzero(seen | has)
    mass = stats.count[active].astype(np.float64)
    total_mass = mass.sum()
    above = total_mass - np.cumsum(mass)  # pixels in higher coarse bins
    with np.errstate(divide="ignore", invalid="ignore"):
        log2_weight = np.where(
            mass > 0, np.log2(mass * np.sqrt(0.5 + total_mass / np.maximum(above + mass, 1.0))), -np.inf
        )
    max_sub = 1 << ADAPTIVE_LOW_BITS
    # A lattice seen on a few pixels says little (one pixel is a lattice of any step).
    floor = np.where(mass >= 16.0 * (max_sub >> stats.align[active]), stats.align[active], 0)
    lower = np.maximum(np.where(has[active], shift[active], 0), floor)
    low_min, low_max = stats.low_min[active], stats.low_max[active]
    finite = log2_weight[np.isfinite(log2_weight)]
    coarsest = (finite.max() if finite.size else 0.0) + 1.0  # every bin at shift 16 from here on
    finest = (finite.min() if finite.size else 0.0) - ADAPTIVE_LOW_BITS - 1.0  # every bin at its lower shift

    def shifts_of(log2_level: float, weight: np.ndarray, low: np.ndarray) -> np.ndarray:
        # weight is finite or -inf (no pixels) and the level finite: clip maps -inf to 0 sub-bins' exponent
        exponent = np.clip(np.floor(weight - log2_level), 0, ADAPTIVE_LOW_BITS)  # log2 of the sub-bins wanted
        return np.maximum(low, ADAPTIVE_LOW_BITS - exponent.astype(np.int64))

    def shifts_at(log2_level: float, where: np.ndarray) -> np.ndarray:
        """Sub-bin width exponents of the active bins ``where`` at a log2 level."""
        return shifts_of(log2_level, log2_weight[where], lower[where])

    def finest_level(where: np.ndarray, target: float, low_end: float) -> float:
        """Smallest log2 level (>= low_end) at which the bins ``where`` take at most ``target`` sub-bins."""
        # The bisection counts sub-bins ~60 times: on the bins ``where``, gathered once.
        weight, low, first, last = log2_weight[where], lower[where], low_min[where], low_max[where]

        def sub_bins(log2_level: float) -> int:
            return int(coverage(first, last, shifts_of(log2_level, weight, low))[1].sum())

        high_end = coarsest
        if sub_bins(low_end) <= target:
            return low_end
        for _ in range(60):
            middle = 0.5 * (low_end + high_end)
            if sub_bins(middle) <= target:
                high_end = middle
            else:
                low_end = middle
        return high_end

    log2_level = np.log2(level) if level > 0 else coarsest
    if not force:
        free = budget - used
        moving_active = moving[active]
        log2_new = min(finest_level(moving_active, share * free, finest), log2_level)
        new_shift = shifts_at(log2_new, moving_active)
        new_offset, new_size = coverage(stats.low_min[moving], stats.low_max[moving], new_shift)
        if new_size.sum() <= free:
            shift, offset, size, base = shift.copy(), np.array(offset), np.array(size), np.array(base)
            shift[moving], offset[moving], size[moving] = new_shift, new_offset, new_size
            base[moving] = used + np.cumsum(new_size) - new_size
            return AdaptivePlan(
                shift,
                offset,
                size,
                base,
                used + int(new_size.sum()),
                level if level > 0 else float(2.0**log2_new),
                compacted=False,
                moved=outgrown,
            )

    every = np.ones(active.size, dtype=bool)  # every active bin is wanted (seen | has)
    # Merged layouts that fit keep every bin at its finest.
    if force and int(coverage(low_min, low_max, shifts_at(finest, every))[1].sum()) <= budget:
        log2_fill = finest
    else:
        target = max(share * budget, float(active.size))
        log2_fill = finest_level(every, target, finest if level <= 0 else max(finest, log2_level))
    shift = np.full_like(shift, -1)
    shift[active] = shifts_at(log2_fill, every)
    offset, size = coverage(stats.low_min, stats.low_max, shift)
    size[shift < 0] = 0
    base = (np.cumsum(size) - size).astype(np.int64)
    return AdaptivePlan(shift, offset, size, base, int(size.sum()), float(2.0**log2_fill), compacted=True, moved=has)

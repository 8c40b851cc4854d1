"""The adaptive score histogram: where a key lands, and how counts move when the layout widens.

Keys (see :mod:`.keys`) are binned with ``bin = (key >> shift) - offset``: a bin holds ``2**shift``
consecutive float32 values, aligned at multiples of ``2**shift`` in key space. ``shift`` is the
smallest value for which the key range seen so far fits into ``num_bins = 2**num_bits`` bins
(``bin_layout``), so narrowly distributed scores are binned at full float32 resolution and
scores that span the whole float range get ``shift = 32 - num_bits``. When the range grows,
aligned groups of bins merge exactly (``rebin_counts``); the final histogram therefore depends
only on the overall key range, not on the order in which data arrived.

Resolution: a bin spans ``2**shift`` units in the last place, so for normal floats its width is
at most ``2**(shift - 23)`` times the magnitude of the values in it. In the worst case
(``shift = 32 - num_bits``) that is a relative width of ``2**-(num_bits - 9)``; for
``num_bits = 22`` it is ``2**-13 ~= 1.2e-4``. Scores inside one bin are treated as tied.

The layout is computed by one implementation, ``layout_tensors``/``rebin_tensors``, which works on
device tensors without a host synchronisation; ``bin_layout``/``rebin_counts`` are its Python-int
front ends.

>>> layout = bin_layout(0, 1000, num_bits=8)
>>> layout.shift, layout.offset
(2, 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from callbacks.metrics.functional import _backend
from callbacks.metrics.functional.keys import KEY_NEG_INF, KEY_POS_INF, float_to_key, key_to_float

__all__ = [
    "BinLayout",
    "LabelledKeys",
    "bin_index",
    "bin_layout",
    "bin_lower_edge",
    "fixed_layout",
    "labelled_bin_index",
    "labelled_keys",
    "layout_tensors",
    "rebin_counts",
    "rebin_tensors",
]

_INT32_MAX = (1 << 31) - 1
_INT32_MIN = -(1 << 31)


@dataclass(frozen=True)
class BinLayout:
    """Where keys land in the histogram: ``bin = (key >> shift) - offset``."""

    shift: int
    offset: int
    num_bins: int

    @property
    def max_relative_width(self) -> float:
        """Upper bound on a bin's width relative to the magnitude of the normal floats in it."""
        return 2.0 ** (self.shift - 23)


def layout_tensors(key_min: Tensor, key_max: Tensor, num_bits: int) -> tuple[Tensor, Tensor]:
    """``(shift, offset)`` of the finest layout fitting ``[key_min, key_max]`` into ``2**num_bits`` bins.

    Works on int64 tensors of any shape (one layout per element) on their device, without a host
    synchronisation. ``shift`` is the smallest ``s`` with ``(key_max >> s) - (key_min >> s) <
    2**num_bits`` (arithmetic shifts, i.e. floor division by ``2**s``); the condition is monotone in
    ``s``, so counting the shifts that fail gives it. It is non-decreasing when the key range
    widens, which makes re-binning a pure merge of aligned bins. An empty range (``key_min >
    key_max``) gets shift 0.
    """
    shifts = torch.arange(41, device=key_min.device, dtype=torch.int64).view(-1, *([1] * key_min.dim()))
    fails = ((key_max >> shifts) - (key_min >> shifts)) >= (1 << num_bits)
    shift = fails.sum(0)
    return shift, key_min >> shift


def bin_layout(key_min: int, key_max: int, num_bits: int) -> BinLayout:
    """The finest layout that puts every key in ``[key_min, key_max]`` into ``2**num_bits`` bins.

    Python-int front end of ``layout_tensors``.
    """
    if key_min > key_max:
        raise ValueError(f"empty key range [{key_min}, {key_max}]")
    shift, offset = layout_tensors(torch.tensor(key_min), torch.tensor(key_max), num_bits)
    return BinLayout(shift=int(shift), offset=int(offset), num_bins=1 << num_bits)


def fixed_layout(num_bits: int) -> BinLayout:
    """The data-independent layout over all float32 keys (``shift = 32 - num_bits``).

    Every layout ``bin_layout`` returns for the same ``num_bits`` refines this one (its bins lie
    inside these), so it suits side histograms that must be built before the data range is known.
    """
    return BinLayout(shift=32 - num_bits, offset=-(1 << (num_bits - 1)), num_bins=1 << num_bits)


def bin_index(keys: Tensor, layout: BinLayout) -> Tensor:
    """Histogram bin of each key (int64, in ``[0, num_bins)`` for keys inside the layout's range)."""
    return ((keys >> layout.shift) - layout.offset).long()


def bin_lower_edge(bins: Tensor, layout: BinLayout) -> Tensor:
    """Smallest float32 value that falls into each bin (clamped to -inf/+inf).

    Predicting "anomaly" for ``score >= bin_lower_edge(b)`` selects exactly the pixels counted in
    bins ``>= b``, so this edge is the decision threshold that reproduces a binned operating point.
    """
    keys = (bins.long() + layout.offset) << layout.shift
    return key_to_float(keys.clamp(KEY_NEG_INF, KEY_POS_INF))


def rebin_tensors(
    counts: Tensor, old_shift: Tensor, old_offset: Tensor, new_shift: Tensor, new_offset: Tensor
) -> Tensor:
    """Move ``[..., nbins]`` counts from layout ``(old_shift, old_offset)`` to ``(new_shift, new_offset)``.

    Exact, on the counts' device and without a host synchronisation (the layouts are 0-d int64
    tensors). The new layout must cover the old one (``new_shift >= old_shift`` and every counted
    key inside its range), so old bin ``i`` lies in new bin ``((old_offset + i) >> merge) -
    new_offset``; new bin ``j`` therefore collects the old bins in ``[((new_offset + j) << merge) -
    old_offset, ((new_offset + j + 1) << merge) - old_offset)``, read off a cumulative sum
    (deterministic, no scatter). An identical layout reproduces every bin.
    """
    num_bins = counts.shape[-1]
    merge = new_shift - old_shift
    j = torch.arange(num_bins + 1, device=counts.device, dtype=torch.int64)
    bounds = (((new_offset + j) << merge) - old_offset).clamp(0, num_bins)
    cumulative = F.pad(counts.cumsum(-1), (1, 0))
    at_bounds = cumulative.index_select(-1, bounds)
    return at_bounds[..., 1:] - at_bounds[..., :-1]


def rebin_counts(counts: Tensor, old: BinLayout, new: BinLayout) -> Tensor:
    """``rebin_tensors`` for layouts given as ``BinLayout`` (``[..., old.num_bins]`` counts).

    Raises ``ValueError`` when ``new`` is finer than ``old`` (counts cannot be split).
    """
    if new.shift < old.shift:
        raise ValueError("the new layout must not be finer than the old one")
    if new.num_bins != old.num_bins:
        raise ValueError("both layouts must have the same number of bins")
    if new == old:
        return counts
    as_tensor = lambda value: torch.tensor(value, dtype=torch.int64, device=counts.device)  # noqa: E731
    return rebin_tensors(
        counts, as_tensor(old.shift), as_tensor(old.offset), as_tensor(new.shift), as_tensor(new.offset)
    )


class LabelledKeys(NamedTuple):
    """A batch prepared for counting: keys, labels and the key range of the valid pixels."""

    keys: Tensor  # int32 [B, N], see float_to_key
    positive: Tensor  # bool [B, N], anomaly pixels
    valid: Tensor  # bool [B, N], pixels that are not ignored
    key_range: Tensor  # int64 [2]: min and max key over valid pixels; (2**31 - 1, -2**31) if none


def labelled_keys(scores: Tensor, mask: Tensor, anomaly_index: int, ignore_index: int) -> LabelledKeys:
    """Keys of ``scores`` and the positive/valid masks of ``mask`` (any matching shapes).

    Runs in NumPy for CPU tensors (several times faster than torch's CPU kernels) and with torch
    ops elsewhere, without host synchronisation; both give identical results.
    """
    keys = float_to_key(scores)
    if _backend.numpy_on_cpu(keys):
        labels = mask.numpy()
        valid = labels != ignore_index
        key_array = keys.numpy()
        lowest = key_array.min(where=valid, initial=_INT32_MAX)
        highest = key_array.max(where=valid, initial=_INT32_MIN)
        return LabelledKeys(
            keys=keys,
            positive=torch.from_numpy(labels == anomaly_index),
            valid=torch.from_numpy(valid),
            key_range=torch.tensor([int(lowest), int(highest)], dtype=torch.int64),
        )
    valid = mask != ignore_index
    key_range = torch.stack(
        [torch.where(valid, keys, _INT32_MAX).amin(), torch.where(valid, keys, _INT32_MIN).amax()]
    ).long()
    return LabelledKeys(keys=keys, positive=mask == anomaly_index, valid=valid, key_range=key_range)


def labelled_bin_index(keys: Tensor, positive: Tensor, layout: BinLayout) -> Tensor:
    """Flat index into ``counts[2, num_bins]``: ``bin_index(keys) + num_bins * positive`` (int64).

    Keys outside the layout (ignored pixels) give indices outside ``[0, 2 * num_bins)``.
    """
    num_bits = layout.num_bins.bit_length() - 1
    if _backend.numpy_on_cpu(keys):
        index = keys.numpy() >> layout.shift
        index -= layout.offset
        index |= positive.numpy().astype(np.int32) << num_bits
        return torch.from_numpy(index.astype(np.int64))
    return (((keys >> layout.shift) - layout.offset) | (positive.int() << num_bits)).long()

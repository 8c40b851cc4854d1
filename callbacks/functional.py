"""Pure tensor functions behind the streaming anomaly and segmentation metrics.

Everything here is stateless and works on CPU and CUDA tensors alike, so each piece can be
tested against scikit-learn or a direct NumPy computation without Lightning.

Order-preserving keys
    A float32 score is mapped to a signed 32-bit integer *key* through its bit pattern so that
    ``a < b  <=>  key(a) < key(b)`` for all non-NaN floats, ``-0.0`` and ``+0.0`` share one key
    and ``-inf``/``+inf`` are the smallest/largest keys (``float_to_key``). For non-negative
    floats the key is the bit pattern itself; for negative floats the 31 magnitude bits are
    inverted, which reverses their order and puts them below zero.

Adaptive binning
    The pooled histogram bins keys with ``bin = (key >> shift) - offset``: a bin holds ``2**shift``
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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "KEY_NEG_INF",
    "KEY_POS_INF",
    "BinLayout",
    "LabelledKeys",
    "PerImageMetrics",
    "accumulate_counts",
    "bin_index",
    "bin_layout",
    "bin_lower_edge",
    "binary_metrics_from_counts",
    "confusion_matrix_index",
    "cumulative_counts",
    "fixed_layout",
    "float_to_key",
    "iou_from_confusion_matrix",
    "key_to_float",
    "labelled_bin_index",
    "labelled_keys",
    "per_image_metrics",
    "per_image_metrics_from_keys",
    "rebin_counts",
    "select_curve_points",
]

# Keys of -inf and +inf: every non-NaN float32 has a key in [KEY_NEG_INF, KEY_POS_INF].
KEY_POS_INF: int = 0x7F800000
KEY_NEG_INF: int = -KEY_POS_INF - 1

_INT32_MAX = (1 << 31) - 1
_INT32_MIN = -(1 << 31)

# CPU tensors go through NumPy in the hot paths: its integer kernels and SIMD sort are several
# times faster than torch's CPU kernels. Setting this to False runs the torch code (the one used
# on CUDA) on CPU too, which the tests use to check that both paths agree.
NUMPY_ON_CPU = True


def _numpy_on_cpu(tensor: Tensor) -> bool:
    return NUMPY_ON_CPU and tensor.device.type == "cpu"


# Sort key that lies below every packed (key << 1 | label) value; marks ignored pixels.
_EXCLUDED = -(1 << 40)

# Rows processed together by ``per_image_metrics`` are capped at this many pixels, which bounds
# its temporary memory (about a dozen int64/float64 arrays of this size) independently of batch size.
PER_IMAGE_CHUNK_PIXELS = 1 << 21


# ------------------------------------------------------------------------------------------------
# Order-preserving float32 <-> integer keys
# ------------------------------------------------------------------------------------------------
def float_to_key(scores: Tensor) -> Tensor:
    """Map float scores to int32 keys with the same order (see the module docstring).

    Args:
        scores: float tensor of any shape; other float dtypes are converted to float32 first
            (bf16/fp16 exactly, float64 by rounding).

    Returns:
        int32 tensor of the same shape. Non-NaN values map into ``[KEY_NEG_INF, KEY_POS_INF]``;
        NaNs map outside that interval (positive NaNs above, negative NaNs below).
    """
    scores = scores.detach().to(torch.float32).contiguous()
    if _numpy_on_cpu(scores):
        # NumPy's integer kernels are several times faster than torch's on CPU; same arithmetic.
        return torch.from_numpy(_float_to_key_array(scores.numpy()))
    return _float_to_key_array(scores)


def _float_to_key_array(scores: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """``float_to_key`` on a float32 NumPy array or torch tensor (same operators for both)."""
    bits = scores.view(np.int32) if isinstance(scores, np.ndarray) else scores.view(torch.int32)
    # Negative floats: keep the sign bit, invert the magnitude so larger magnitudes sort lower.
    # (bits >> 31) is -1 for negative floats and 0 otherwise (arithmetic shift).
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    # -0.0 maps to -1 (the only float that does); merge it with +0.0 so the two compare equal.
    key += key == -1
    return key


def key_to_float(keys: Tensor) -> Tensor:
    """Inverse of ``float_to_key``: int keys (int32 or int64 within int32 range) to float32."""
    keys = keys.to(torch.int32)
    bits = torch.where(keys < 0, keys ^ 0x7FFFFFFF, keys)
    return bits.contiguous().view(torch.float32)


# ------------------------------------------------------------------------------------------------
# Adaptive histogram layout
# ------------------------------------------------------------------------------------------------
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


def bin_layout(key_min: int, key_max: int, num_bits: int) -> BinLayout:
    """The finest layout that puts every key in ``[key_min, key_max]`` into ``2**num_bits`` bins.

    ``shift`` is the smallest non-negative integer with
    ``(key_max >> shift) - (key_min >> shift) < 2**num_bits`` (arithmetic shifts, i.e. floor
    division by ``2**shift``); it is non-decreasing when the key range widens, which makes
    re-binning a pure merge of aligned bins.
    """
    if key_min > key_max:
        raise ValueError(f"empty key range [{key_min}, {key_max}]")
    num_bins = 1 << num_bits
    shift = 0
    while (key_max >> shift) - (key_min >> shift) >= num_bins:
        shift += 1
    return BinLayout(shift=shift, offset=key_min >> shift, num_bins=num_bins)


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


def rebin_counts(counts: Tensor, old: BinLayout, new: BinLayout) -> Tensor:
    """Move histogram counts from layout ``old`` to a layout ``new`` that covers the counted keys.

    Exact: ``new.shift >= old.shift`` and bins are aligned at multiples of ``2**shift`` in key
    space, so each old bin lies entirely inside one new bin; groups of ``2**(new.shift -
    old.shift)`` aligned old bins are summed (no scatter, deterministic on every device). Bins
    outside the new layout must be empty, which holds when ``new`` comes from ``bin_layout`` on a
    key range containing every counted key.

    Args:
        counts: ``[..., old.num_bins]`` integer counts.
    Returns:
        ``[..., new.num_bins]`` counts.
    """
    if new.shift < old.shift:
        raise ValueError("the new layout must not be finer than the old one")
    if new == old:
        return counts
    group = 1 << (new.shift - old.shift)
    out = counts.new_zeros(*counts.shape[:-1], new.num_bins)
    if group == 1:  # same bin width, the range only moved: shift the counts over
        start = old.offset - new.offset
        span = min(old.num_bins, new.num_bins - start)
        out[..., start : start + span] = counts[..., :span]
        return out
    # Old bin i holds keys with (key >> old.shift) == old.offset + i; new bins gather aligned runs
    # of `group` such values. Pad in front so that old bin 0 sits at its place inside its run.
    lead = old.offset % group
    length = -(-(lead + old.num_bins) // group) * group
    padded = counts.new_zeros(*counts.shape[:-1], length)
    padded[..., lead : lead + old.num_bins] = counts
    merged = padded.view(*counts.shape[:-1], -1, group).sum(-1)
    # merged[..., g] holds the keys with (key >> new.shift) == (old.offset - lead) // group + g.
    start = (old.offset - lead) // group - new.offset
    span = min(merged.shape[-1], new.num_bins - start)
    out[..., start : start + span] = merged[..., :span]
    return out


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
    if _numpy_on_cpu(keys):
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
    if _numpy_on_cpu(keys):
        index = keys.numpy() >> layout.shift
        index -= layout.offset
        index |= positive.numpy().astype(np.int32) << num_bits
        return torch.from_numpy(index.astype(np.int64))
    return (((keys >> layout.shift) - layout.offset) | (positive.int() << num_bits)).long()


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
            indices, else ``"scatter"``.
    """
    index = index.reshape(-1)
    include = include.reshape(-1)
    if method == "auto":
        if counts.is_cuda:
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
        if _numpy_on_cpu(counts):
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


# ------------------------------------------------------------------------------------------------
# Metrics from (binned) counts
# ------------------------------------------------------------------------------------------------
def cumulative_counts(neg_counts: Tensor, pos_counts: Tensor) -> tuple[Tensor, Tensor]:
    """True and false positives when predicting "anomaly" for every bin at or above each bin.

    Bins are in increasing score order; ``tp[b] = sum(pos_counts[b:])``, ``fp[b] = sum(neg_counts[b:])``.
    """
    tp = pos_counts.flip(-1).cumsum(-1).flip(-1)
    fp = neg_counts.flip(-1).cumsum(-1).flip(-1)
    return tp, fp


def binary_metrics_from_counts(neg_counts: Tensor, pos_counts: Tensor) -> dict[str, Tensor]:
    """AP, AUROC and FPR at 95% TPR from per-bin counts, treating each bin as one tied score.

    Definitions (``b`` runs over bins from the highest score down, ``TP_b``/``FP_b`` count the
    pixels at or above bin ``b``, ``P``/``N`` the positives/negatives):

    - ``aupr`` = sum_b (R_b - R_{b-1}) * P_b with recall ``R_b = TP_b / P`` and precision
      ``P_b = TP_b / (TP_b + FP_b)`` (scikit-learn's ``average_precision_score``);
    - ``auroc`` = trapezoidal area under the ROC curve through the bin operating points, i.e.
      ``P(s_pos > s_neg) + 0.5 P(s_pos == s_neg)`` with ties meaning "same bin";
    - ``fpr95`` = ``FP_b / N`` at the first bin (scanning from high to low score) where
      ``TP_b >= 0.95 P``; ``index95`` is that bin. The comparison is done in integers
      (``100 TP >= 95 P``), which is exactly what the float comparison ``TP/P >= 0.95`` decides.

    Args:
        neg_counts, pos_counts: 1-D integer tensors of equal length.

    Returns:
        float64 scalar tensors ``aupr``, ``auroc``, ``fpr95`` (NaN where undefined: no positives,
        or for ``auroc``/``fpr95`` no negatives; ``aupr`` is 1 without negatives, as in
        scikit-learn), int64 ``index95`` (-1 without positives), and int64 ``num_pos``/``num_neg``.
    """
    if neg_counts.numel() == 0:  # an empty bin changes nothing and keeps the indexing below valid
        neg_counts, pos_counts = neg_counts.new_zeros(1), pos_counts.new_zeros(1)
    tp, fp = cumulative_counts(neg_counts.long(), pos_counts.long())
    num_pos, num_neg = tp[0], fp[0]
    pos_f, tp_f, fp_f = pos_counts.double(), tp.double(), fp.double()
    p_f, n_f = num_pos.double(), num_neg.double()
    nan = torch.full_like(p_f, float("nan"))

    precision = tp_f / (tp_f + fp_f).clamp_min(1.0)
    aupr = torch.where(num_pos > 0, (pos_f * precision).sum() / p_f.clamp_min(1.0), nan)
    # Pairs (pos, neg): the negative in bin b is beaten by the positives above b and ties with
    # those in b, so it contributes TP_above + 0.5 pos_b = TP_b - 0.5 pos_b.
    pairs = (neg_counts.double() * (tp_f - 0.5 * pos_f)).sum()
    both = (num_pos > 0) & (num_neg > 0)
    auroc = torch.where(both, pairs / (p_f * n_f).clamp_min(1.0), nan)
    # tp is non-increasing in b, so the bins reaching 95% TPR form a prefix.
    reach = 100 * tp >= 95 * num_pos
    index95 = torch.where(num_pos > 0, reach.sum() - 1, torch.full_like(num_pos, -1))
    fp95 = fp.gather(0, index95.clamp_min(0).reshape(1))[0].double()
    fpr95 = torch.where(both, fp95 / n_f.clamp_min(1.0), nan)
    return {
        "aupr": aupr,
        "auroc": auroc,
        "fpr95": fpr95,
        "index95": index95,
        "num_pos": num_pos,
        "num_neg": num_neg,
    }


def select_curve_points(tpr: Tensor, fpr: Tensor, max_points: int) -> Tensor:
    """Indices of at most ``max_points`` curve points, spread evenly along TPR and along FPR.

    ``tpr`` and ``fpr`` are non-decreasing (operating points from high to low threshold). Half
    the budget goes to the first point reaching each of evenly spaced TPR levels, half to FPR
    levels, so both the ROC curve (x = FPR) and the PR curve (x = recall = TPR) keep their
    shape; the first and last points are always kept.
    """
    num = tpr.numel()
    if num <= max_points:
        return torch.arange(num, device=tpr.device)
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    per_axis = max(max_points // 2, 1)
    levels = torch.linspace(0.0, 1.0, per_axis, device=tpr.device, dtype=tpr.dtype)
    picks = torch.cat(
        [
            torch.searchsorted(tpr.contiguous(), levels),
            torch.searchsorted(fpr.contiguous(), levels),
            torch.tensor([0, num - 1], device=tpr.device),
        ]
    )
    picks = torch.unique(picks.clamp(0, num - 1))
    if picks.numel() > max_points:  # only when max_points is odd and every pick is distinct
        keep = torch.linspace(0, picks.numel() - 1, max_points, device=tpr.device).round().long()
        picks = picks[keep]
    return picks


# ------------------------------------------------------------------------------------------------
# Exact per-image metrics
# ------------------------------------------------------------------------------------------------
class PerImageMetrics(NamedTuple):
    """Per-image results, each ``[B]``; values are NaN where ``usable`` is False."""

    aupr: Tensor  # float64
    auroc: Tensor  # float64
    fpr95: Tensor  # float64
    usable: Tensor  # bool: the image has at least one positive and one negative valid pixel


def _sort_rows(values: Tensor) -> Tensor:
    """Ascending sort of each row (values only)."""
    if _numpy_on_cpu(values):
        # NumPy's SIMD integer sort (x86-simd-sort) is several times faster than torch's CPU sort.
        return torch.from_numpy(np.sort(values.numpy(), axis=-1))
    return torch.sort(values, dim=-1).values


def per_image_metrics(
    scores: Tensor,
    positive: Tensor,
    valid: Tensor,
    chunk_pixels: int = PER_IMAGE_CHUNK_PIXELS,
    implementation: Literal["auto", "numpy", "torch"] = "auto",
) -> PerImageMetrics:
    """Exact AP, AUROC and FPR95 of every image on its own, with scikit-learn's tie handling.

    Each row is sorted on its device; equal scores form one threshold (a "group"), as in
    ``sklearn.metrics.precision_recall_curve``/``roc_curve``. With ``TP_g``/``FP_g`` the positives/
    negatives scoring ``>=`` group ``g``'s score:

    - ``aupr`` = (1/P) * sum over positive pixels of ``TP_g / (TP_g + FP_g)`` of their group,
      which equals sum_g (R_g - R_{g-1}) * P_g;
    - ``auroc`` = ``(U_lt + 0.5 U_eq) / (P N)`` with ``U_lt``/``U_eq`` the (positive, negative)
      pairs where the negative scores lower/equal, computed as ``(P N + U_lt - U_gt) / (2 P N)``
      in exact integer arithmetic;
    - ``fpr95`` = ``FP_g / N`` of the highest-scoring group with ``TP_g >= 0.95 P``.

    Note: the original StreetHazards code takes the FPR at the point whose recall is *closest*
    to 0.95 (``argmin |recall - 0.95|``), which may lie just below 0.95; this function uses the
    first point reaching it (scikit-learn ``roc_curve`` convention), like the pooled metric.

    Args:
        scores: ``[B, N]`` float scores (converted to float32), higher = more anomalous. Must not
            contain NaN where ``valid``.
        positive: ``[B, N]`` bool, anomaly pixels.
        valid: ``[B, N]`` bool, pixels that take part (ignored pixels are False).
        chunk_pixels: rows are processed in groups of at most this many pixels (at least one row)
            to bound temporary memory.
        implementation: see ``per_image_metrics_from_keys``.
    """
    return per_image_metrics_from_keys(float_to_key(scores), positive, valid, chunk_pixels, implementation)


def per_image_metrics_from_keys(
    keys: Tensor,
    positive: Tensor,
    valid: Tensor,
    chunk_pixels: int = PER_IMAGE_CHUNK_PIXELS,
    implementation: Literal["auto", "numpy", "torch"] = "auto",
) -> PerImageMetrics:
    """``per_image_metrics`` on scores already mapped by ``float_to_key`` (``[B, N]`` int32).

    ``implementation``: ``"torch"`` runs on the tensors' device with fixed-shape operations only
    (no host synchronisation, suits CUDA); ``"numpy"`` (CPU tensors) sorts with NumPy's SIMD sort
    and then works on the positive pixels only, several times faster on CPU. ``"auto"`` picks
    ``"numpy"`` for CPU tensors. Both give identical results.
    """
    if keys.ndim != 2 or positive.shape != keys.shape or valid.shape != keys.shape:
        raise ValueError(
            f"expected [B, N] scores, positive and valid of one shape, got {tuple(keys.shape)}, "
            f"{tuple(positive.shape)}, {tuple(valid.shape)}"
        )
    if implementation == "auto":
        implementation = "numpy" if _numpy_on_cpu(keys) else "torch"
    chunk = {"numpy": _per_image_chunk_numpy, "torch": _per_image_chunk}[implementation]
    rows_per_chunk = max(1, chunk_pixels // max(keys.shape[1], 1))
    parts = [
        chunk(
            keys[i : i + rows_per_chunk],
            positive[i : i + rows_per_chunk],
            valid[i : i + rows_per_chunk],
        )
        for i in range(0, keys.shape[0], rows_per_chunk)
    ]
    if not parts:
        empty = torch.empty(0, dtype=torch.float64, device=keys.device)
        return PerImageMetrics(empty, empty, empty, torch.empty(0, dtype=torch.bool, device=keys.device))
    return PerImageMetrics(*(torch.cat(field) for field in zip(*parts, strict=True)))


def _per_image_chunk(keys: Tensor, positive: Tensor, valid: Tensor) -> PerImageMetrics:
    rows, length = keys.shape
    device = keys.device
    positive = positive & valid
    # Pack (key, label) into one sortable int64 so that a values-only sort suffices: equal scores
    # stay adjacent (their order inside a tie group is irrelevant below), ignored pixels go first.
    packed = (keys.long() << 1) | positive.long()
    packed = _sort_rows(torch.where(valid, packed, torch.full_like(packed, _EXCLUDED)))

    is_valid = packed != _EXCLUDED
    is_pos = is_valid & ((packed & 1) == 1)
    is_neg = is_valid & ~is_pos
    cum_pos = is_pos.cumsum(-1)
    cum_neg = is_neg.cumsum(-1)
    num_pos = cum_pos[:, -1:]
    num_neg = cum_neg[:, -1:]

    key = packed >> 1
    group_start = torch.ones_like(is_valid)
    group_start[:, 1:] = key[:, 1:] != key[:, :-1]
    # Index of the first element of each element's tie group (starts increase along the row).
    position = torch.arange(length, device=device).expand(rows, length)
    start = torch.cummax(torch.where(group_start, position, 0), dim=-1).values
    # Positives / negatives scoring strictly below the element's group.
    pos_below = (cum_pos - is_pos.long()).gather(-1, start)
    neg_below = (cum_neg - is_neg.long()).gather(-1, start)
    tp = num_pos - pos_below  # scoring >= the group's score
    fp = num_neg - neg_below

    p = num_pos.squeeze(-1)
    n = num_neg.squeeze(-1)
    precision = tp.double() / (tp + fp).clamp_min(1).double()
    aupr = torch.where(is_pos, precision, 0.0).sum(-1) / p.clamp_min(1).double()
    # U_lt: for each positive, negatives strictly below; U_gt: for each negative, positives
    # strictly below (the pairs the negative wins). Both exact in int64.
    u_lt = torch.where(is_pos, neg_below, 0).sum(-1)
    u_gt = torch.where(is_neg, pos_below, 0).sum(-1)
    auroc = (p * n + u_lt - u_gt).double() / (2 * p * n).clamp_min(1).double()
    reaches = is_valid & (100 * tp >= 95 * num_pos)
    fp95 = torch.where(reaches, fp, num_neg).amin(-1)
    fpr95 = fp95.double() / n.clamp_min(1).double()

    usable = (p > 0) & (n > 0)
    nan = torch.full_like(aupr, float("nan"))
    return PerImageMetrics(
        aupr=torch.where(usable, aupr, nan),
        auroc=torch.where(usable, auroc, nan),
        fpr95=torch.where(usable, fpr95, nan),
        usable=usable,
    )


def _per_image_chunk_numpy(keys: Tensor, positive: Tensor, valid: Tensor) -> PerImageMetrics:
    """CPU version of ``_per_image_chunk``: one global sort, then work on positives only."""
    rows, length = keys.shape
    valid_np = valid.numpy()
    positive_np = positive.numpy() & valid_np
    # Row r's packed values live in [r * 2**34 - 2**33, r * 2**34 + 2**32), so one sort of the
    # flattened batch sorts every row and keeps rows apart. Packed = (key << 1 | is_positive):
    # inside a tie group negatives precede positives; excluded pixels sit below their row.
    row_base = (np.arange(rows, dtype=np.int64) << 34)[:, None]
    packed = (keys.numpy().astype(np.int64) << 1) | positive_np
    packed += row_base
    np.copyto(packed, np.broadcast_to(row_base - (1 << 33), packed.shape), where=~valid_np)
    flat = np.sort(packed, axis=None)
    del packed

    num_excluded = length - valid_np.sum(axis=1)
    num_pos = positive_np.sum(axis=1)
    num_neg = length - num_excluded - num_pos
    first_pos = np.cumsum(num_pos) - num_pos  # index of each row's first positive in pos_at
    pos_at = np.flatnonzero(flat & 1)  # positions of the positives, ascending (excluded are even)
    row = pos_at // length
    first_valid = row * length + num_excluded[row]
    rank = np.arange(pos_at.size) - first_pos[row]  # positives before this one in its row
    # First element of the positive's tie group: the first value >= (key << 1 | 0) in its row.
    group_start = np.searchsorted(flat, flat[pos_at] - 1, side="left")
    pos_below = np.searchsorted(pos_at, group_start, side="left") - first_pos[row]
    neg_below = (group_start - first_valid) - pos_below
    # Tied negatives precede the positive, so those up to it are exactly the ones scoring <= it.
    neg_at_or_below = (pos_at - first_valid) - rank
    tp = num_pos[row] - pos_below
    fp = num_neg[row] - neg_below

    usable = (num_pos > 0) & (num_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        aupr = np.bincount(row, weights=tp / (tp + fp), minlength=rows) / num_pos
        # Pairs with the negative strictly below + at-or-below = 2 * (U_lt + U_eq / 2).
        pairs = np.bincount(row, weights=neg_below + neg_at_or_below, minlength=rows)
        auroc = pairs / (2.0 * num_pos * num_neg)
        # The first threshold reaching 95% TPR is the group of the ceil(0.95 P)-th highest positive.
        needed = (95 * num_pos + 99) // 100
        target = np.clip(first_pos + num_pos - needed, 0, max(pos_at.size - 1, 0))
        fp95 = fp[target] if pos_at.size else np.zeros(rows, dtype=np.int64)
        fpr95 = fp95 / num_neg
    nan = np.full(rows, np.nan)
    return PerImageMetrics(
        aupr=torch.from_numpy(np.where(usable, aupr, nan)),
        auroc=torch.from_numpy(np.where(usable, auroc, nan)),
        fpr95=torch.from_numpy(np.where(usable, fpr95, nan)),
        usable=torch.from_numpy(usable),
    )


# ------------------------------------------------------------------------------------------------
# Closed-set segmentation
# ------------------------------------------------------------------------------------------------
def confusion_matrix_index(preds: Tensor, target: Tensor, num_classes: int, excluded: Tensor) -> tuple[Tensor, Tensor]:
    """Flat confusion-matrix cell of every pixel, for ``accumulate_counts``.

    Cell ``target * K + pred`` for pixels with both values in ``[0, K)``; pixels that are not
    ``excluded`` but have a label or prediction outside ``[0, K)`` go to the overflow cell
    ``K * K`` so that the caller can report them.

    Returns:
        ``(index, include)``: int64 cells and a bool mask (False for excluded pixels).
    """
    preds = preds.long().reshape(-1)
    target = target.long().reshape(-1)
    include = ~excluded.reshape(-1)
    in_range = (target >= 0) & (target < num_classes) & (preds >= 0) & (preds < num_classes)
    overflow = torch.full_like(target, num_classes * num_classes)
    return torch.where(in_range, target * num_classes + preds, overflow), include


def iou_from_confusion_matrix(confmat: Tensor) -> dict[str, Tensor]:
    """Per-class IoU, mean IoU and pixel accuracy from a ``[K, K]`` matrix (rows = label).

    ``iou_c = C_cc / (sum_j C_cj + sum_i C_ic - C_cc)``; NaN for classes absent from both labels
    and predictions, which the mean skips. ``pixel_accuracy = trace(C) / sum(C)``.
    """
    confmat = confmat.double()
    true_pos = confmat.diagonal()
    union = confmat.sum(0) + confmat.sum(1) - true_pos
    iou = torch.where(union > 0, true_pos / union.clamp_min(1.0), torch.full_like(union, float("nan")))
    total = confmat.sum()
    pixel_accuracy = torch.where(total > 0, true_pos.sum() / total.clamp_min(1.0), float("nan"))
    return {"iou": iou, "miou": torch.nanmean(iou), "pixel_accuracy": pixel_accuracy}

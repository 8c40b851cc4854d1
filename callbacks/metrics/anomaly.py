"""Streaming anomaly metrics (AUPR, AUROC, FPR95) in the pooled and per-image protocols.

A ``torchmetrics.Metric`` with a fixed-size integer state: it runs on the device that produced
the outputs, sums across processes under DDP and never keeps pixels. The math lives in
:mod:`callbacks.metrics.functional`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn
from torchmetrics.utilities.distributed import gather_all_tensors

from callbacks.metrics.functional import (
    KEY_NEG_INF,
    KEY_POS_INF,
    BinLayout,
    accumulate_counts,
    bin_layout,
    bin_lower_edge,
    binary_metrics_from_counts,
    labelled_bin_index,
    labelled_keys,
    per_image_metrics_from_keys,
    rebin_counts,
    select_curve_points,
)
from datamodules.labels import ANOMALY_INDEX, IGNORE_INDEX

__all__ = ["AnomalyMetrics"]

# Key-range states of a metric that has seen no valid pixel: an empty interval.
_EMPTY_KEY_MIN = 1 << 31
_EMPTY_KEY_MAX = -(1 << 31) - 1


def _as_images(scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Validate ``scores``/``mask`` and flatten them to ``[B, H*W]``."""
    if not isinstance(scores, Tensor) or not isinstance(mask, Tensor):
        raise TypeError("scores and mask must be torch tensors")
    if scores.shape != mask.shape:
        raise ValueError(
            f"scores and mask must have the same shape [B, H, W], got {tuple(scores.shape)} and {tuple(mask.shape)}"
        )
    if scores.ndim == 2:  # a single image
        scores, mask = scores.unsqueeze(0), mask.unsqueeze(0)
    if scores.ndim != 3:
        raise ValueError(f"expected scores of shape [B, H, W] (or [H, W]), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"anomaly scores must be a floating-point tensor, got {scores.dtype}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"mask must be an integer tensor of class indices, got {mask.dtype}")
    batch = scores.shape[0]
    return scores.detach().reshape(batch, -1), mask.reshape(batch, -1)


class AnomalyMetrics(Metric):
    """Pixel-level anomaly metrics over a whole split, in both published protocols.

    ``update(scores, mask)`` takes anomaly scores ``[B, H, W]`` (any float dtype; higher = more
    anomalous, ranked as they are: no sigmoid or rescaling) and labels ``[B, H, W]``: pixels
    labelled ``anomaly_index`` are positives, ``ignore_index`` pixels are skipped, every other
    pixel is a negative. ``compute()`` returns Python floats:

    - pooled over all valid pixels: ``aupr`` (average precision,
      ``sum_n (R_n - R_{n-1}) P_n`` as in ``sklearn.metrics.average_precision_score``),
      ``auroc``, ``fpr95`` (FPR at the first threshold, scanning from high to low score, whose
      TPR reaches 0.95) and ``threshold95`` (that threshold: flagging ``score >= threshold95``
      gives exactly ``fpr95`` and a TPR >= 0.95 on the accumulated data; it is the lower edge of
      a histogram bin, i.e. a float32 value <= the lowest score flagged);
    - the StreetHazards reference protocol: ``aupr_per_image``, ``auroc_per_image``,
      ``fpr95_per_image``, the mean over images with at least one anomaly and one normal valid
      pixel, each computed exactly from that image alone; ``num_images_per_image`` such images;
    - ``anomaly_fraction`` (positives / valid pixels) and ``num_valid_pixels``.

    Undefined values (no positives, no negatives, nothing seen) are NaN with a warning.

    Pooled metrics come from a histogram, exact up to the bin resolution. Scores are converted
    to float32 (bf16/fp16 exactly) and mapped to order-preserving 32-bit keys
    (:func:`~callbacks.metrics.functional.float_to_key`); ``counts[label, bin]`` counts negatives and
    positives per bin with ``bin = (key >> shift) - offset``. ``shift`` is the smallest value that
    fits the key range seen so far into ``2**num_bits`` bins; when the range grows, aligned bins
    merge exactly, so the result does not depend on the order of updates or on how data is
    split across processes. Scores inside one bin count as tied, exactly as scikit-learn treats
    equal scores, so merging distinct scores in a bin is the only source of error:

    - a bin spans ``2**shift`` consecutive float32 values, i.e. at most a fraction
      ``2**(shift - 23)`` of their magnitude, and ``shift <= 32 - num_bits``: relative precision
      ``2**-(num_bits - 9)`` in the worst case (scores spanning the whole float range; with the
      default ``num_bits=22``, ``2**-13 ~= 1.2e-4``), full float32 precision (exact results) when
      the scores span at most ``2**num_bits`` float32 values, and in between otherwise (e.g. all
      scores in [0.5, 1) at ``num_bits=22``: bins of 2 float32 values);
    - the AUROC error is at most ``sum_b pos_b neg_b / (2 P N)``;
    - measured on the distributions of ``tests/test_metrics.py`` (normal at several scales and
      offsets, MSP-like, logit-like, log-uniform magnitudes from 1e-30 to 1e30 of both signs,
      heavy ties; 1.8e6 pixels, 2% and 20% anomalies), the default is within 3.1e-5 of
      scikit-learn for AUPR, 3e-7 for AUROC and 1.1e-5 for FPR95 (exact for N(1e3, 1e-2) and ties).

    State: ``2 * 2**num_bits`` int64 counts (64 MiB at the default ``num_bits=22``,
    ``2**(num_bits + 4)`` bytes in general) plus six scalars (48 bytes), independent of the
    number of pixels; counts are int64, so 1.4 billion pixels (or 2**63) fit. Re-binning when the
    score range widens (in practice during the first few batches) briefly needs about three
    more copies of the counts. Under DDP, ranks first agree on the key range, re-bin to it, and
    then sum their counts (torchmetrics gathers ``world_size`` copies to do so).

    Per-image values are computed inside ``update`` for every image of the batch: the image's
    valid pixels are sorted on their device and ties are grouped as scikit-learn does, so the
    per-image numbers are exact; only their sums and the image count are kept.

    ``update`` synchronises with the host once (a single ``tolist()`` of four integers, the key
    range of the batch and of the state): to choose the bin layout before counting and to raise
    on NaN scores, whose keys lie outside the range of ordered floats. Nothing else leaves the
    device. On CPU the hot loops run in NumPy (see ``callbacks.metrics.functional.NUMPY_ON_CPU``).
    Under ``torch.use_deterministic_algorithms(True)`` on CUDA the histogram is filled by sorting
    the bin indices (O(N) memory), never by torch's deterministic ``bincount``/``index_add``
    fallbacks; all counts are integers, so results are bitwise identical in both modes.

    Args:
        anomaly_index: label of anomaly (positive) pixels.
        ignore_index: label of pixels to skip.
        num_bits: ``log2`` of the number of bins (8..28); resolution and state size as above.
        kwargs: passed to ``torchmetrics.Metric``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    counts: Tensor
    key_min: Tensor
    key_max: Tensor
    image_aupr_sum: Tensor
    image_auroc_sum: Tensor
    image_fpr95_sum: Tensor
    image_count: Tensor

    def __init__(
        self,
        anomaly_index: int = ANOMALY_INDEX,
        ignore_index: int = IGNORE_INDEX,
        num_bits: int = 22,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if anomaly_index == ignore_index:
            raise ValueError(f"anomaly_index and ignore_index must differ, both are {anomaly_index}")
        if not 8 <= num_bits <= 28:
            raise ValueError(f"num_bits must be in 8..28, got {num_bits}")
        self.anomaly_index = int(anomaly_index)
        self.ignore_index = int(ignore_index)
        self.num_bits = int(num_bits)
        self.num_bins = 1 << self.num_bits
        # counts[0] negatives, counts[1] positives, per bin in increasing score order.
        self.add_state("counts", torch.zeros(2, self.num_bins, dtype=torch.int64), dist_reduce_fx="sum")
        # torchmetrics keeps a copy of every state's default for reset(): here a second 64 MiB of
        # zeros. A stride-0 view of one zero stands in for it (reset() clones it into a dense tensor).
        self._defaults["counts"] = torch.zeros(1, dtype=torch.int64).expand(2, self.num_bins)
        # Range of the keys seen; it determines the bin layout (see _sync_dist).
        self.add_state("key_min", torch.tensor(_EMPTY_KEY_MIN, dtype=torch.int64), dist_reduce_fx="min")
        self.add_state("key_max", torch.tensor(_EMPTY_KEY_MAX, dtype=torch.int64), dist_reduce_fx="max")
        for name in ("image_aupr_sum", "image_auroc_sum", "image_fpr95_sum"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("image_count", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    # ------------------------------------------------------------------ layout helpers
    def _layout_for(self, key_min: int, key_max: int) -> BinLayout | None:
        return bin_layout(key_min, key_max, self.num_bits) if key_min <= key_max else None

    @property
    def layout(self) -> BinLayout | None:
        """The current (local) bin layout, or ``None`` before any valid pixel. Reads the device."""
        return self._layout_for(int(self.key_min), int(self.key_max))

    def _rebinned(self, counts: Tensor, old_range: tuple[int, int], new_range: tuple[int, int]) -> Tensor:
        old = self._layout_for(*old_range)
        new = self._layout_for(*new_range)
        if old is None or new is None:  # nothing counted yet: all zeros in any layout
            return counts
        return rebin_counts(counts, old, new)

    def _widen_range(self, old_range: tuple[int, int], new_min: int, new_max: int) -> BinLayout:
        """Extend the key range ``old_range`` (the states' values) by ``[new_min, new_max]``, re-binning."""
        lo, hi = min(old_range[0], new_min), max(old_range[1], new_max)
        if (lo, hi) != old_range:
            self.counts = self._rebinned(self.counts, old_range, (lo, hi))
            self.key_min = torch.full_like(self.key_min, lo)
            self.key_max = torch.full_like(self.key_max, hi)
        layout = self._layout_for(lo, hi)
        assert layout is not None
        return layout

    # ------------------------------------------------------------------ torchmetrics hooks
    def update(self, scores: Tensor, mask: Tensor) -> None:  # type: ignore[override]
        """Accumulate a batch: ``scores`` float ``[B, H, W]``, ``mask`` integer ``[B, H, W]``."""
        scores, mask = _as_images(scores, mask)
        if scores.numel() == 0:
            return
        keys, positive, valid, key_range = labelled_keys(scores, mask, self.anomaly_index, self.ignore_index)
        # The only host synchronisation: the data range decides the layout, and NaN keys lie
        # outside [KEY_NEG_INF, KEY_POS_INF], so the range also tells whether there is a NaN.
        batch_min, batch_max, state_min, state_max = torch.cat(
            [key_range.to(self.key_min.device), self.key_min.view(1), self.key_max.view(1)]
        ).tolist()
        if batch_min < KEY_NEG_INF or batch_max > KEY_POS_INF:
            num_nan = int((torch.isnan(scores) & valid).sum())
            raise ValueError(
                f"anomaly scores contain {num_nan} NaN values at non-ignored pixels (batch of shape "
                f"{tuple(scores.shape)}); NaN cannot be ranked, so the histogram was left untouched. "
                "Check the score computation for 0/0, log(0) or overflow in half precision."
            )
        if batch_min > batch_max:  # every pixel ignored
            return
        layout = self._widen_range((state_min, state_max), batch_min, batch_max)

        index = labelled_bin_index(keys, positive, layout)
        accumulate_counts(self.counts.view(-1), index, valid)

        per_image = per_image_metrics_from_keys(keys, positive, valid)
        usable = per_image.usable
        self.image_aupr_sum += torch.where(usable, per_image.aupr, 0.0).sum()
        self.image_auroc_sum += torch.where(usable, per_image.auroc, 0.0).sum()
        self.image_fpr95_sum += torch.where(usable, per_image.fpr95, 0.0).sum()
        self.image_count += usable.sum()

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        # Used by forward() and merge_state(): bring both histograms to the union layout first.
        incoming = dict(incoming_state)
        own_range = (int(self.key_min), int(self.key_max))
        other_range = (int(incoming["key_min"]), int(incoming["key_max"]))
        union = (min(own_range[0], other_range[0]), max(own_range[1], other_range[1]))
        self.counts = self._rebinned(self.counts, own_range, union)
        incoming["counts"] = self._rebinned(incoming["counts"], other_range, union)
        super()._reduce_states(incoming)

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any | None = None) -> None:
        # Counts can only be summed in a common layout: agree on the global key range, re-bin the
        # local histogram to it (exact), then let torchmetrics sum counts and min/max the range.
        # torchmetrics cached the local state before this call and restores it on unsync.
        group = process_group or self.process_group
        ranges = torch.stack(dist_sync_fn(torch.stack([self.key_min, self.key_max]), group=group))
        global_min, global_max = int(ranges[:, 0].min()), int(ranges[:, 1].max())
        local_range = (int(self.key_min), int(self.key_max))
        self.counts = self._rebinned(self.counts, local_range, (global_min, global_max))
        self.key_min = torch.full_like(self.key_min, global_min)
        self.key_max = torch.full_like(self.key_max, global_max)
        super()._sync_dist(dist_sync_fn, process_group=process_group)

    def compute(self) -> dict[str, float]:
        """All metrics as Python floats (see the class docstring)."""
        counts = self.counts
        # Empty bins change no metric; dropping them first keeps compute() cheap.
        occupied = torch.nonzero(counts.sum(0)).squeeze(1)
        pooled = binary_metrics_from_counts(counts[0, occupied], counts[1, occupied])
        layout = self.layout
        if layout is not None and int(pooled["index95"]) >= 0:
            threshold = bin_lower_edge(occupied[pooled["index95"]], layout).double()
        else:
            threshold = torch.tensor(float("nan"), dtype=torch.float64, device=counts.device)
        images = self.image_count.double()
        values = torch.stack(
            [
                pooled["aupr"],
                pooled["auroc"],
                pooled["fpr95"],
                threshold,
                self.image_aupr_sum / images,
                self.image_auroc_sum / images,
                self.image_fpr95_sum / images,
                images,
                pooled["num_pos"].double(),
                pooled["num_neg"].double(),
            ]
        ).tolist()
        aupr, auroc, fpr95, threshold95, aupr_img, auroc_img, fpr95_img, n_img, n_pos, n_neg = values
        n_valid = n_pos + n_neg
        name = type(self).__name__
        if n_valid == 0:
            rank_zero_warn(f"{name}.compute(): no valid pixels were seen; every metric is NaN.", UserWarning)
        elif n_pos == 0:
            rank_zero_warn(
                f"{name}.compute(): no anomaly pixels (label {self.anomaly_index}) among {int(n_valid)} valid "
                "pixels; aupr, auroc, fpr95 and threshold95 are undefined (NaN).",
                UserWarning,
            )
        elif n_neg == 0:
            rank_zero_warn(
                f"{name}.compute(): every valid pixel is an anomaly; auroc and fpr95 are undefined (NaN) "
                "and aupr is 1 by definition.",
                UserWarning,
            )
        if n_valid > 0 and n_img == 0:
            rank_zero_warn(
                f"{name}.compute(): no image contains both anomaly and normal pixels; the per-image "
                "metrics are undefined (NaN).",
                UserWarning,
            )
        nan = float("nan")
        return {
            "aupr": aupr,
            "auroc": auroc,
            "fpr95": fpr95,
            "threshold95": threshold95,
            "aupr_per_image": aupr_img if n_img else nan,
            "auroc_per_image": auroc_img if n_img else nan,
            "fpr95_per_image": fpr95_img if n_img else nan,
            "num_images_per_image": n_img,
            "anomaly_fraction": n_pos / n_valid if n_valid else nan,
            "num_valid_pixels": n_valid,
        }

    # ------------------------------------------------------------------ curves
    @contextmanager
    def _global_state(self):  # type: ignore[no-untyped-def]
        """Within the block the states hold the counts of all processes (a collective under DDP)."""
        already_synced = self._is_synced  # e.g. inside compute(): leave the outer sync alone
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=not already_synced,
            should_unsync=not already_synced,
            distributed_available=self.distributed_available_fn,
        ):
            yield

    def _operating_points(self) -> dict[str, Tensor] | None:
        """Cumulative counts at every non-empty bin, from the highest score down (host tensors)."""
        with self._global_state():
            counts = self.counts.detach().cpu()
            layout = self.layout
        if layout is None:
            return None
        bins = torch.nonzero(counts.sum(0)).squeeze(1).flip(0)
        tp = counts[1, bins].cumsum(0)
        fp = counts[0, bins].cumsum(0)
        return {"bins": bins, "tp": tp, "fp": fp, "thresholds": bin_lower_edge(bins, layout).double()}

    def _checked_points(self, caller: str) -> dict[str, Tensor] | None:
        points = self._operating_points()
        if points is None or points["tp"][-1] == 0 or points["fp"][-1] == 0:
            rank_zero_warn(
                f"{type(self).__name__}.{caller}(): the curves need both anomaly and normal pixels; "
                "returning empty arrays.",
                UserWarning,
            )
            return None
        return points

    def curves(self, max_points: int = 1000) -> dict[str, np.ndarray]:
        """ROC and PR curves of the pooled scores, downsampled for plotting.

        Returns float64 arrays of equal length (at most ``max_points``): ``thresholds``
        (decreasing; a pixel is flagged when ``score >= threshold``), ``tpr``, ``fpr``,
        ``precision``, ``recall`` (= ``tpr``). The first point is the empty prediction
        (threshold ``+inf``, TPR = FPR = recall = 0, precision 1 by scikit-learn's convention);
        the others are histogram bin edges, kept evenly spread along TPR and along FPR. Empty
        arrays (with a warning) without both anomaly and normal pixels. Under DDP this is a
        collective: call it on every process.
        """
        if max_points < 3:
            raise ValueError("max_points must be at least 3")
        names = ("thresholds", "tpr", "fpr", "precision", "recall")
        points = self._checked_points("curves")
        if points is None:
            return {name: np.zeros(0) for name in names}
        tp, fp = points["tp"].double(), points["fp"].double()
        tpr, fpr = tp / tp[-1], fp / fp[-1]
        keep = select_curve_points(tpr, fpr, max_points - 1)
        start = torch.tensor([0.0], dtype=torch.float64)
        curve = {
            "thresholds": torch.cat([torch.tensor([float("inf")], dtype=torch.float64), points["thresholds"][keep]]),
            "tpr": torch.cat([start, tpr[keep]]),
            "fpr": torch.cat([start, fpr[keep]]),
            "precision": torch.cat([start + 1.0, (tp / (tp + fp))[keep]]),
            "recall": torch.cat([start, tpr[keep]]),
        }
        return {name: curve[name].numpy() for name in names}

    def pr_curve_counts(self, num_thresholds: int = 127) -> dict[str, Any]:
        """Raw cumulative counts for ``SummaryWriter.add_pr_curve_raw``.

        Returns exactly that method's keyword arguments, so
        ``writer.add_pr_curve_raw(tag, global_step=step, **metric.pr_curve_counts())`` logs the
        PR curve: ``true_positive_counts``, ``false_positive_counts``, ``true_negative_counts``,
        ``false_negative_counts``, ``precision``, ``recall`` (float64 arrays) and
        ``num_thresholds`` (their length, at most 127, TensorBoard's limit). Entries are in
        increasing threshold order as TensorBoard expects (entry 0 flags the most pixels); each is
        an operating point "flag ``score >= t``" at a histogram bin edge ``t``, with points spread
        evenly along recall and along FPR (``curves()`` gives the thresholds themselves). Empty
        arrays (with a warning) without both anomaly and normal pixels. Under DDP this is a
        collective.
        """
        num_thresholds = min(int(num_thresholds), 127)
        if num_thresholds < 2:
            raise ValueError("num_thresholds must be at least 2")
        names = (
            "true_positive_counts",
            "false_positive_counts",
            "true_negative_counts",
            "false_negative_counts",
            "precision",
            "recall",
        )
        points = self._checked_points("pr_curve_counts")
        if points is None:
            return {**{name: np.zeros(0) for name in names}, "num_thresholds": 0}
        tp, fp = points["tp"].double(), points["fp"].double()
        num_pos, num_neg = tp[-1], fp[-1]
        keep = select_curve_points(tp / num_pos, fp / num_neg, num_thresholds).flip(0)
        tp, fp = tp[keep], fp[keep]
        arrays = {
            "true_positive_counts": tp,
            "false_positive_counts": fp,
            "true_negative_counts": num_neg - fp,
            "false_negative_counts": num_pos - tp,
            "precision": tp / (tp + fp),
            "recall": tp / num_pos,
        }
        return {**{name: arrays[name].numpy() for name in names}, "num_thresholds": int(keep.numel())}

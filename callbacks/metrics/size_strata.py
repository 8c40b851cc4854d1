"""Anomaly components stratified by area: how many, how many found, and pixel recall per size bin."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from callbacks.metrics.functional.components import image_component_table, label_anomalies
from callbacks.metrics.functional.operating_points import check_thresholds
from callbacks.metrics.packed_sync import PackedSyncMetric

__all__ = ["SizeStrataMetrics", "check_size_bins", "size_bin_of"]

#: Default bin edges as fractions of the image area: 0.05%, 0.2%, 0.8%, 3.2% (461, 1843, 7373 and
#: 29491 pixels at 720x1280; 29, 115, 461 and 1843 at the demo's 180x320).
DEFAULT_SIZE_BINS: tuple[float, ...] = (0.0005, 0.002, 0.008, 0.032)


def check_size_bins(edges: Sequence[float]) -> tuple[float, ...]:
    """``edges`` as a tuple of floats in (0, 1), strictly increasing; ``ValueError`` otherwise."""
    try:
        values = tuple(float(e) for e in edges)
    except (TypeError, ValueError):
        raise ValueError(f"size_bins must be a list of numbers, got {edges!r}") from None
    if not values:
        raise ValueError("size_bins must hold at least one edge")
    if not all(math.isfinite(v) and 0.0 < v < 1.0 for v in values):
        raise ValueError(f"size_bins are fractions of the image area in (0, 1), got {list(values)}")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"size_bins must be strictly increasing, got {list(values)}")
    return values


def size_bin_of(areas: np.ndarray, edges_px: np.ndarray) -> np.ndarray:
    """Bin index of each area: bin ``i`` holds ``edges[i-1] <= area < edges[i]`` (``len(edges) + 1`` bins)."""
    return np.searchsorted(edges_px, areas, side="right")


class SizeStrataMetrics(PackedSyncMetric):
    """Per size bin of anomaly components: count, found at each threshold, pixel recall at each threshold.

    Components are the 8-connected anomaly regions of each image with no size filter (the view
    exists to show whether small ones are missed); a component is *found* at a threshold when its
    sIoU (SegmentMeIfYouCan's adjusted IoU, :mod:`callbacks.metrics.functional.components`) with
    the predictions ``score >= threshold`` is at least ``found_siou``. Area bins are fixed in
    pixels from ``edges`` (fractions of the image area) at the first update.

    Args:
        thresholds: score thresholds (flag ``score >= threshold``).
        edges: bin edges as fractions of the image area, increasing (see :data:`DEFAULT_SIZE_BINS`).
        found_siou: sIoU at which a component counts as found.

    Example:
        >>> metric = SizeStrataMetrics([0.5], edges=[0.05])
        >>> labels = torch.zeros(1, 10, 10, dtype=torch.long); labels[0, 0:2, 0:2] = 13; labels[0, 5:9, 5:9] = 13
        >>> scores = torch.zeros(1, 10, 10); scores[0, 5:9, 5:9] = 1.0
        >>> metric.update(scores, labels)
        >>> [(b["components"], b["found"][0], b["pixel_tpr"][0]) for b in metric.compute()["bins"]]
        [(1, 0, 0.0), (1, 1, 1.0)]
    """

    full_state_update = False

    def __init__(
        self,
        thresholds: Sequence[float],
        edges: Sequence[float] = DEFAULT_SIZE_BINS,
        found_siou: float = 0.5,
        anomaly_index: int = 13,
        ignore_index: int = 255,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.thresholds = check_thresholds(thresholds)
        self.edges = check_size_bins(edges)
        self.found_siou = float(found_siou)
        self.anomaly_index, self.ignore_index = int(anomaly_index), int(ignore_index)
        self.image_size: tuple[int, int] | None = None
        num_t, num_b = len(self.thresholds), len(self.edges) + 1
        self.add_state("components", torch.zeros(num_b, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("pixels", torch.zeros(num_b, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("found", torch.zeros(num_t, num_b, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("flagged_pixels", torch.zeros(num_t, num_b, dtype=torch.int64), dist_reduce_fx="sum")

    def edges_in_pixels(self, height: int, width: int) -> np.ndarray:
        """The bin edges in pixels at an evaluation resolution of ``height x width``."""
        return np.asarray(self.edges) * height * width

    def update(self, scores: Tensor, mask: Tensor) -> None:  # type: ignore[override]
        """Accumulate ``scores`` ``[B, H, W]`` with labels ``mask`` (one host transfer)."""
        self.update_host(scores.detach().float().cpu().numpy(), mask.detach().cpu().numpy())

    def update_host(
        self, scores: np.ndarray, labels: np.ndarray, tables: Sequence[Sequence[Any]] | None = None
    ) -> None:
        """:meth:`update` on host arrays; ``tables[i][t]``: image ``i``'s components at threshold ``t``
        when the caller already has them (:func:`image_component_table` without size filters)."""
        if scores.shape != labels.shape or scores.ndim != 3:
            raise ValueError(f"expected [B, H, W] scores and labels of one shape, got {scores.shape}, {labels.shape}")
        height, width = scores.shape[1:]
        edges_px = self.edges_in_pixels(height, width)
        num_b = len(self.edges) + 1
        components = np.zeros(num_b, np.int64)
        pixels = np.zeros(num_b, np.int64)
        found = np.zeros((len(self.thresholds), num_b), np.int64)
        flagged = np.zeros((len(self.thresholds), num_b), np.int64)
        for i in range(scores.shape[0]):
            per_threshold = tables[i] if tables is not None else self.component_tables(scores[i], labels[i])
            if not per_threshold or per_threshold[0].truth_ids.size == 0:
                continue
            first = per_threshold[0]
            bins = size_bin_of(first.truth_sizes, edges_px)
            np.add.at(components, bins, 1)
            np.add.at(pixels, bins, first.truth_sizes)
            truth_bin = np.zeros(int(first.truth.max()) + 1, np.int64)
            truth_bin[first.truth_ids] = bins
            anomaly = first.truth > 0
            pixel_bins = truth_bin[first.truth[anomaly]]
            for t, (threshold, table) in enumerate(zip(self.thresholds, per_threshold, strict=True)):
                np.add.at(found[t], bins, table.siou >= self.found_siou)
                hit = scores[i][anomaly] >= threshold
                flagged[t] += np.bincount(pixel_bins[hit], minlength=num_b)
        device = self.components.device
        self.components += torch.from_numpy(components).to(device)
        self.pixels += torch.from_numpy(pixels).to(device)
        self.found += torch.from_numpy(found).to(device)
        self.flagged_pixels += torch.from_numpy(flagged).to(device)
        self.image_size = (height, width)

    def component_tables(self, scores: np.ndarray, labels: np.ndarray) -> list[Any]:
        """One image's components at every threshold, without size filters (``score >= t``)."""
        truth = label_anomalies(labels, self.anomaly_index)
        return [
            image_component_table(
                scores,
                labels,
                float(np.nextafter(np.float32(t), np.float32(-np.inf))),  # ">= t" as the benchmark's ">"
                self.anomaly_index,
                self.ignore_index,
                min_prediction_size=0,
                min_anomaly_size=0,
                truth=truth,
            )
            for t in self.thresholds
        ]

    def compute(self) -> dict[str, Any]:
        components, pixels = self.components.cpu().numpy(), self.pixels.cpu().numpy()
        found, flagged = self.found.cpu().numpy(), self.flagged_pixels.cpu().numpy()
        lows = (0.0, *self.edges)
        highs = (*self.edges, math.inf)
        bins = []
        for b in range(len(lows)):
            bins.append(
                {
                    "area_fraction": [lows[b], highs[b]],
                    "components": int(components[b]),
                    "pixels": int(pixels[b]),
                    "found": [int(found[t, b]) for t in range(len(self.thresholds))],
                    "component_recall": [
                        float(found[t, b] / components[b]) if components[b] else math.nan
                        for t in range(len(self.thresholds))
                    ],
                    "pixel_tpr": [
                        float(flagged[t, b] / pixels[b]) if pixels[b] else math.nan for t in range(len(self.thresholds))
                    ],
                }
            )
        return {"thresholds": list(self.thresholds), "found_siou": self.found_siou, "bins": bins}

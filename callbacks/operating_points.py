"""Operating points fixed before the test split, and what a method does at them.

:class:`OperatingPointEvaluation` is the part of :class:`~callbacks.evaluation.AnomalyEvaluation`
that explains behaviour at a threshold:

1. **Calibration** (before the first test batch is scored): the method scores the *calibration
   split* (validation images with pasted outliers, :meth:`StreetHazardsDataModule.calibration_dataloader`)
   through its own ``test_step`` (test-time augmentation included); the primary score's pooled
   histogram gives the threshold of 95% TPR (``tpr95``) and of the best pixel F1 (``best_f1``),
   and a grid of thresholds at evenly spaced calibration recalls for the oracle below. Nothing
   of the test split is used.
2. **Test**: at each of those thresholds, exact pixel TPR/FPR/precision/F1
   (:class:`~callbacks.metrics.ThresholdCounts`) and SegmentMeIfYouCan's component metrics
   (:class:`~callbacks.metrics.ComponentMetrics`); per size bin of anomaly components, their
   count, the share found and the pixel TPR at both operating thresholds
   (:class:`~callbacks.metrics.SizeStrataMetrics`) and the AUPR of that bin's pixels against all
   negatives; a failure gallery (the images with the largest false-positive area and the largest
   missed components at the primary operating point).
3. The **oracle**: among the evaluated thresholds, the one with the best component ``F1_mean`` on
   the test split, labelled as such (SegmentMeIfYouCan reports its component metrics at a threshold
   chosen on the evaluated data; here it is picked from a grid of thresholds fixed beforehand, so
   it needs no second pass).

Memory: integer counts, one small histogram per size bin, and at most ``2 * gallery_size`` image
crops on the host; no score maps are kept.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from callbacks.metrics import AnomalyMetrics, ComponentMetrics, SizeStrataMetrics, ThresholdCounts
from callbacks.metrics.functional.operating_points import best_f1_threshold, threshold_at_recall
from callbacks.metrics.size_strata import DEFAULT_SIZE_BINS, check_size_bins, size_bin_of
from callbacks.rendering import denormalize, resize_nearest

__all__ = ["OPERATING_POINTS", "GalleryEntry", "OperatingPointEvaluation"]

#: The operating points chosen on the calibration split.
OPERATING_POINTS: tuple[str, ...] = ("tpr95", "best_f1")
#: SegmentMeIfYouCan's component size filters (anomaly track), in pixels at 720x1280 (StreetHazards'
#: resolution); scaled by area to the evaluation resolution when not given.
BENCHMARK_MIN_PREDICTION_SIZE, BENCHMARK_MIN_ANOMALY_SIZE, BENCHMARK_AREA = 500, 100, 720 * 1280
#: AUPR per size bin: a small histogram each (2**(bits + 4) bytes: 1 MiB).
_STRATUM_BITS = 16
#: Anomaly scores held per process before they are counted into the size bins' histograms: anomaly
#: pixels are few, and one histogram update per bin and batch cost more than the counting (4 MiB).
_POSITIVES_BUFFERED = 1 << 20
#: Longest side of a gallery panel, in pixels.
_GALLERY_PANEL = 320


@dataclass(order=True)
class GalleryEntry:
    """One failure kept for the gallery: an image (``false_positives``) or a crop around a missed component."""

    value: int  # false-positive pixels, or the missed component's area
    order: int  # insertion order: ties keep the first seen
    kind: str = field(compare=False)
    name: str = field(compare=False)
    rgb: np.ndarray = field(compare=False, repr=False)  # [h, w, 3] uint8
    mask: np.ndarray = field(compare=False, repr=False)  # [h, w] uint8 labels
    score: np.ndarray = field(compare=False, repr=False)  # [h, w] float32


class OperatingPointEvaluation:
    """Thresholds from the calibration split; components, pixel rates, size strata and a gallery on test.

    Args:
        oracle_thresholds: thresholds at evenly spaced calibration recalls (10%..99%) evaluated
            besides the two operating points, among which the oracle is picked.
        min_prediction_size, min_anomaly_size: SegmentMeIfYouCan's size filters in pixels at the
            evaluation resolution; ``None`` scales its 500 and 100 (at 720x1280) by image area.
        size_bins: edges of the size bins as fractions of the image area, increasing.
        gallery_size: failures of each kind kept for the gallery.
        primary: the operating point of the gallery (``tpr95`` or ``best_f1``).
        num_bits: histogram resolution of the calibration split's metric.
    """

    def __init__(
        self,
        oracle_thresholds: int = 8,
        min_prediction_size: int | None = None,
        min_anomaly_size: int | None = None,
        size_bins: Sequence[float] = DEFAULT_SIZE_BINS,
        gallery_size: int = 4,
        primary: str = "tpr95",
        num_bits: int = 22,
        anomaly_index: int = 13,
        ignore_index: int = 255,
    ) -> None:
        if isinstance(oracle_thresholds, bool) or not isinstance(oracle_thresholds, int) or oracle_thresholds < 0:
            raise ValueError(f"oracle_thresholds must be an integer >= 0, got {oracle_thresholds!r}")
        for name, value in (("min_prediction_size", min_prediction_size), ("min_anomaly_size", min_anomaly_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be null or an integer >= 0, got {value!r}")
        if isinstance(gallery_size, bool) or not isinstance(gallery_size, int) or gallery_size < 1:
            raise ValueError(f"gallery_size must be an integer >= 1, got {gallery_size!r}")
        if primary not in OPERATING_POINTS:
            raise ValueError(f"operating point must be one of {list(OPERATING_POINTS)}, got {primary!r}")
        self.oracle_thresholds = oracle_thresholds
        self.min_prediction_size, self.min_anomaly_size = min_prediction_size, min_anomaly_size
        self.size_bins = check_size_bins(size_bins)
        self.gallery_size = gallery_size
        self.primary = primary
        self.num_bits = num_bits
        self.anomaly_index, self.ignore_index = anomaly_index, ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget the thresholds and the test state (a new test run calibrates again)."""
        self.calibration: dict[str, Any] | None = None
        self.thresholds: dict[str, float] = {}
        self._grid: list[float] = []
        self._components: ComponentMetrics | None = None
        self._pixels: ThresholdCounts | None = None
        self._strata: SizeStrataMetrics | None = None
        # AUPR per size bin: one histogram of the negatives, one of each bin's positives (merged at the end).
        self._stratum_negatives: AnomalyMetrics | None = None
        self._stratum_positives: list[AnomalyMetrics] = []
        self._positives_buffer: list[list[np.ndarray]] = []
        self._gallery: dict[str, list[GalleryEntry]] = {"false_positives": [], "missed": []}
        self._order = itertools.count()
        self._sizes: tuple[int, int] = (0, 0)
        self.gallery: list[GalleryEntry] = []

    @property
    def ready(self) -> bool:
        """Whether calibration fixed finite thresholds (test metrics are then computed)."""
        return bool(self.thresholds) and all(math.isfinite(t) for t in self.thresholds.values())

    # ------------------------------------------------------------------ calibration
    @torch.inference_mode()
    def calibrate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score the calibration split and fix the thresholds (a collective under DDP)."""
        self.reset()
        datamodule = getattr(trainer, "datamodule", None)
        loader = datamodule.calibration_dataloader() if hasattr(datamodule, "calibration_dataloader") else None
        if loader is None:
            rank_zero_info(
                "AnomalyEvaluation: no calibration split (data.calibration is null, or the datamodule has no "
                "calibration_dataloader); component metrics, operating points and size strata are skipped"
            )
            return
        metric = AnomalyMetrics(self.anomaly_index, self.ignore_index, num_bits=self.num_bits).to(pl_module.device)
        images = 0
        was_training = pl_module.training
        pl_module.eval()
        try:
            for batch_idx, batch in enumerate(loader):
                batch = trainer.strategy.batch_to_device(batch)
                with trainer.precision_plugin.test_step_context():
                    outputs = pl_module.test_step(batch, batch_idx)
                score = next(iter(outputs["scores"].values()))
                mask = batch["mask"]
                if score.shape[-2:] != mask.shape[-2:]:
                    score = F.interpolate(score[:, None].float(), size=mask.shape[-2:], mode="bilinear")[:, 0]
                metric.update(score.float(), mask)
                images += int(mask.shape[0])
        finally:
            pl_module.train(was_training)
        points = metric.operating_points()  # every rank, in this order: collectives
        values = metric.compute()
        card = datamodule.calibration_card() if hasattr(datamodule, "calibration_card") else None
        self.calibration = {
            "split": card,
            "anomaly_fraction": values["anomaly_fraction"],
            "aupr": values["aupr"],
            "auroc": values["auroc"],
        }
        if points is None or int(points["tp"][-1]) == 0:
            rank_zero_warn("AnomalyEvaluation: the calibration split has no anomaly pixels; no operating points")
            return
        tp, fp, thresholds = points["tp"], points["fp"], points["thresholds"]
        self.thresholds = {
            "tpr95": threshold_at_recall(tp, fp, thresholds, 0.95),
            "best_f1": best_f1_threshold(tp, fp, thresholds)[0],
        }
        recalls = np.linspace(0.1, 0.99, self.oracle_thresholds) if self.oracle_thresholds else []
        grid = {threshold_at_recall(tp, fp, thresholds, float(r)) for r in recalls}
        self._grid = sorted(grid - set(self.thresholds.values()), reverse=True)
        self.calibration["num_images_per_process"] = images
        self.calibration["operating_points"] = {
            name: self._calibration_rates(tp, fp, thresholds, t) for name, t in self.thresholds.items()
        }

    @staticmethod
    def _calibration_rates(tp: Tensor, fp: Tensor, thresholds: Tensor, threshold: float) -> dict[str, float]:
        index = int(torch.nonzero(thresholds >= threshold).flatten()[-1])
        positives, negatives = float(tp[-1]), float(fp[-1])
        t, f = float(tp[index]), float(fp[index])
        return {
            "threshold": threshold,
            "tpr": t / positives,
            "fpr": f / negatives if negatives else math.nan,
            "precision": t / (t + f) if t + f else math.nan,
            "f1": 2 * t / (t + f + positives),
        }

    # ------------------------------------------------------------------ test
    @property
    def evaluated_thresholds(self) -> list[float]:
        """The operating thresholds (in :data:`OPERATING_POINTS` order), then the oracle grid."""
        return [self.thresholds[name] for name in OPERATING_POINTS] + self._grid

    def _create(self, height: int, width: int, device: torch.device) -> None:
        area = height * width / BENCHMARK_AREA
        min_prediction = self.min_prediction_size
        min_anomaly = self.min_anomaly_size
        if min_prediction is None:
            min_prediction = max(1, round(BENCHMARK_MIN_PREDICTION_SIZE * area))
        if min_anomaly is None:
            min_anomaly = max(1, round(BENCHMARK_MIN_ANOMALY_SIZE * area))
        thresholds = self.evaluated_thresholds
        # The benchmark flags "score > t"; the next float32 below t makes that "score >= t", the
        # rule of every other threshold here.
        strict = [float(np.nextafter(np.float32(t), np.float32(-np.inf))) for t in thresholds]
        self._components = ComponentMetrics(
            strict, min_prediction, min_anomaly, anomaly_index=self.anomaly_index, ignore_index=self.ignore_index
        ).to(device)
        self._pixels = ThresholdCounts(thresholds, self.anomaly_index, self.ignore_index).to(device)
        operating = [self.thresholds[name] for name in OPERATING_POINTS]
        self._strata = SizeStrataMetrics(operating, self.size_bins, 0.5, self.anomaly_index, self.ignore_index).to(
            device
        )
        self._stratum_negatives = self._stratum_metric(device)
        self._stratum_positives = [self._stratum_metric(device) for _ in range(len(self.size_bins) + 1)]
        self._positives_buffer = [[] for _ in self._stratum_positives]
        self._sizes = (min_prediction, min_anomaly)

    def _count_positives(self, device: torch.device) -> None:
        """Count the buffered positive scores into their size bins' histograms (one wait for all)."""
        updates = []
        for metric, buffer in zip(self._stratum_positives, self._positives_buffer, strict=True):
            if buffer:
                values = torch.from_numpy(np.concatenate(buffer)).to(device).view(1, -1)
                updates.append((metric, values, torch.full_like(values, self.anomaly_index, dtype=torch.long)))
                buffer.clear()
        AnomalyMetrics.update_many(updates)

    def _stratum_metric(self, device: torch.device) -> AnomalyMetrics:
        return AnomalyMetrics(self.anomaly_index, self.ignore_index, num_bits=_STRATUM_BITS).to(device)

    def update(
        self, score: Tensor, mask: Tensor, images: Tensor | None = None, names: Sequence[str] | None = None
    ) -> None:
        """Accumulate one test batch: the primary score ``[B, H, W]`` at label resolution, labels, inputs."""
        if not self.ready:
            return
        if self._components is None:
            self._create(int(mask.shape[-2]), int(mask.shape[-1]), score.device)
        assert self._components is not None and self._pixels is not None and self._strata is not None
        self._pixels.update(score, mask)
        # The one copy to the host of this batch: connected components run there (scipy).
        host_scores = score.detach().float().cpu().numpy()
        host_labels = mask.detach().cpu().numpy()
        self._components.update_host(host_scores, host_labels)
        operating = [self.thresholds[name] for name in OPERATING_POINTS]
        tables = [self._strata.component_tables(s, m) for s, m in zip(host_scores, host_labels, strict=True)]
        self._strata.update_host(host_scores, host_labels, tables)

        # Each anomaly pixel's size bin, for the per-bin AUPR (other bins' pixels are left out).
        height, width = host_labels.shape[1:]
        edges_px = self._strata.edges_in_pixels(height, width)
        bin_map = np.full(host_labels.shape, -1, np.int64)
        for i, per_threshold in enumerate(tables):
            first = per_threshold[0]
            if first.truth_ids.size:
                lookup = np.full(int(first.truth.max()) + 1, -1, np.int64)
                lookup[first.truth_ids] = size_bin_of(first.truth_sizes, edges_px)
                bin_map[i] = lookup[first.truth]
        assert self._stratum_negatives is not None
        anomaly = mask == self.anomaly_index
        self._stratum_negatives.update(score, torch.where(anomaly, self.ignore_index, mask))
        # Each bin's positive scores, selected on the host, counted when enough have gathered.
        host_anomaly = host_labels == self.anomaly_index
        host_bins, host_positive = bin_map[host_anomaly], host_scores[host_anomaly]
        for b, buffer in enumerate(self._positives_buffer):
            selected = host_positive[host_bins == b]
            if selected.size:
                buffer.append(selected)
        if sum(part.size for buffer in self._positives_buffer for part in buffer) >= _POSITIVES_BUFFERED:
            self._count_positives(score.device)

        primary = operating[OPERATING_POINTS.index(self.primary)]
        table_index = OPERATING_POINTS.index(self.primary)
        rgb = None
        for i in range(host_scores.shape[0]):
            name = str(names[i]) if names is not None and i < len(names) else f"image{next(self._order)}"
            labels = host_labels[i]
            known = (labels != self.anomaly_index) & (labels != self.ignore_index)
            false_positives = int(((host_scores[i] >= primary) & known).sum())
            table = tables[i][table_index]
            missed = table.siou < 0.5
            candidates: list[tuple[str, int, tuple[slice, slice] | None]] = []
            if false_positives:
                candidates.append(("false_positives", false_positives, None))
            if missed.any():
                k = int(np.argmax(np.where(missed, table.truth_sizes, -1)))
                candidates.append(
                    ("missed", int(table.truth_sizes[k]), _crop_around(table.truth == table.truth_ids[k]))
                )
            for kind, value, crop in candidates:
                heap = self._gallery[kind]
                if len(heap) >= self.gallery_size and value <= heap[0].value:
                    continue
                if rgb is None and images is not None:
                    rgb = (
                        (denormalize(images.detach()) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                    )
                region = crop or (slice(None), slice(None))
                image = rgb[i] if rgb is not None else np.zeros((*labels.shape, 3), np.uint8)
                if image.shape[:2] != labels.shape:
                    image = _resize_rgb(image, labels.shape)
                entry = GalleryEntry(
                    value, next(self._order), kind, name,
                    _shrink(image[region]), _shrink(labels[region].astype(np.uint8)), _shrink(host_scores[i][region]),
                )  # fmt: skip
                if len(heap) < self.gallery_size:
                    heapq.heappush(heap, entry)
                else:
                    heapq.heapreplace(heap, entry)

    def compute(self, trainer: L.Trainer) -> dict[str, Any]:
        """The results (a collective under DDP; every process returns them and holds :attr:`gallery`)."""
        if not self.ready:
            return {"calibration": self.calibration, "thresholds": None}
        if self._components is None:  # this process saw no test batch: join the collectives with empty states
            self._create(1, 1, trainer.lightning_module.device)
        assert self._components is not None and self._pixels is not None and self._strata is not None
        components = self._components.compute()
        pixels = self._pixels.compute()
        strata = self._strata.compute()
        assert self._stratum_negatives is not None
        self._count_positives(self._stratum_negatives.device)
        stratum_aupr = []
        for positives in self._stratum_positives:
            merged = self._stratum_metric(self._stratum_negatives.device)
            merged.merge_state(self._stratum_negatives)
            merged.merge_state(positives)
            stratum_aupr.append(merged.compute())
        self.gallery = self._gather_gallery(trainer)

        names = [*OPERATING_POINTS, *(f"grid{k}" for k in range(len(self._grid)))]
        rows = {
            name: {"threshold": t, "pixels": pixel, "components": comp}
            for name, t, pixel, comp in zip(names, self.evaluated_thresholds, pixels, components, strict=True)
        }
        for row in rows.values():
            row["components"]["threshold"] = row["threshold"]
        f1 = [row["components"]["F1_mean"] for row in rows.values()]
        finite = [k for k, v in enumerate(f1) if math.isfinite(v)]
        oracle_name = names[max(finite, key=lambda k: f1[k])] if finite else None
        for bin_result, metric in zip(strata["bins"], stratum_aupr, strict=True):
            bin_result["aupr"] = metric["aupr"]
            bin_result["auroc"] = metric["auroc"]
        strata["operating_points"] = list(OPERATING_POINTS)
        min_prediction, min_anomaly = self._sizes
        return {
            "calibration": self.calibration,
            "thresholds": dict(self.thresholds),
            "operating_points": {name: rows[name] for name in OPERATING_POINTS},
            "oracle": {
                **(rows[oracle_name] if oracle_name is not None else {}),
                "selected_from": oracle_name,
                "rule": (
                    f"best component F1_mean on the test split among the {len(rows)} thresholds evaluated (the two "
                    f"operating points and {len(self._grid)} at calibration recalls 10%..99%): an oracle"
                ),
            },
            "grid": {name: rows[name] for name in names[len(OPERATING_POINTS) :]},
            "component_settings": {
                "connectivity": 8,
                "min_prediction_size": min_prediction,
                "min_anomaly_size": min_anomaly,
                "siou_thresholds": list(self._components.siou_thresholds),
                "flag": "score >= threshold",
            },
            "size_strata": strata,
            "gallery": [
                {"kind": entry.kind, "name": entry.name, "pixels": entry.value, "operating_point": self.primary}
                for entry in self.gallery
            ],
        }

    def _gather_gallery(self, trainer: L.Trainer) -> list[GalleryEntry]:
        local = [entry for heap in self._gallery.values() for entry in heap]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, local)
            local = [entry for part in gathered for entry in part]
        result = []
        for kind in ("false_positives", "missed"):
            entries = sorted((e for e in local if e.kind == kind), key=lambda e: (-e.value, e.name))
            result.extend(entries[: self.gallery_size])
        return result


def _crop_around(component: np.ndarray, margin: float = 1.0, minimum: int = 32) -> tuple[slice, slice]:
    """A window around a component's bounding box, ``margin`` times its size on each side."""
    rows, cols = np.nonzero(component)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    pad_r = max(int((bottom - top) * margin), (minimum - (bottom - top)) // 2, 0)
    pad_c = max(int((right - left) * margin), (minimum - (right - left)) // 2, 0)
    height, width = component.shape
    return slice(max(0, top - pad_r), min(height, bottom + pad_r)), slice(
        max(0, left - pad_c), min(width, right + pad_c)
    )


def _shrink(array: np.ndarray) -> np.ndarray:
    """Nearest-neighbour downscale so that the longest side is at most the gallery panel size."""
    height, width = array.shape[:2]
    scale = _GALLERY_PANEL / max(height, width)
    if scale >= 1.0:
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(resize_nearest(array, max(1, round(height * scale)), max(1, round(width * scale))))


def _resize_rgb(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=tuple(shape), mode="bilinear", align_corners=False)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()

"""Closed-set segmentation quality (mIoU, per-class IoU, pixel accuracy) from a confusion matrix.

>>> import torch
>>> metric = SegmentationMetrics(num_classes=2)
>>> metric.update(torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[0, 1], [0, 1]]]))
>>> round(metric.compute()["miou"], 4)
0.5833
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities import rank_zero_warn
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from callbacks.metrics.functional import accumulate_counts, confusion_matrix_index, iou_from_confusion_matrix
from callbacks.metrics.functional._memory import fix_mmap_threshold
from callbacks.metrics.functional.bootstrap import (
    as_image_ids,
    canonical_order,
    check_bootstrap_samples,
    check_bootstrap_seed,
    miou_replicates,
    percentile_interval,
    resample_weights,
)
from callbacks.metrics.packed_sync import PackedSyncMetric
from datamodules.labels import ANOMALY_INDEX, IGNORE_INDEX

__all__ = ["SegmentationMetrics"]


class SegmentationMetrics(PackedSyncMetric):
    """Closed-set segmentation quality from a confusion matrix over the known classes.

    ``update(preds_or_logits, target)``: logits ``[B, K, H, W]`` (argmax over ``K``) or class
    predictions ``[B, H, W]``, and labels ``[B, H, W]``. Pixels labelled ``ignore_index`` or
    ``anomaly_index`` are excluded. ``compute()`` returns ``miou`` (mean over classes present in
    labels or predictions), ``iou`` (K floats; NaN for a class absent from both, excluded from the
    mean), ``pixel_accuracy`` and ``confusion_matrix`` (K x K nested list of ints, rows = label,
    columns = prediction).

    State: ``K * K + 1`` int64 counts, summed across processes; the extra cell counts evaluated
    pixels whose label or prediction lies outside ``0..K-1``, which ``compute()`` reports as an
    error (checking in ``update`` would synchronise the GPU every batch). Counting uses
    ``bincount`` on CPU and, on CUDA, ``scatter_add_`` (integer atomics), or a sort when
    deterministic algorithms are enabled: no torch fallback that scales with pixels x bins.

    With ``bootstrap_samples=B > 0``, ``compute()`` also returns ``miou_ci`` = ``(low, high)``,
    the 95% percentile interval of mIoU over ``B`` resamples of the images with replacement
    (seeded by ``bootstrap_seed``), from one ``K x K`` confusion matrix kept per image (int64,
    1.3 KiB per image at K = 13; put in the order of ``update(..., image_ids=...)``, then of their
    content, so the interval does not depend on the number of processes). Fewer than two images
    give NaN with a warning.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    confmat: Tensor

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        anomaly_index: int = ANOMALY_INDEX,
        bootstrap_samples: int = 0,
        bootstrap_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.anomaly_index = int(anomaly_index)
        self.bootstrap_samples = check_bootstrap_samples(bootstrap_samples)
        if self.bootstrap_samples:
            fix_mmap_threshold()  # per-image summaries between batch-sized transients
        self.bootstrap_seed = check_bootstrap_seed(bootstrap_seed)
        self._image_summary: dict[str, Any] | None = None
        self.add_state("confmat", torch.zeros(self.num_classes**2 + 1, dtype=torch.int64), dist_reduce_fx="sum")
        if self.bootstrap_samples:
            # Per image (per batch): its id and its confusion matrix with the overflow cell.
            self.add_state("image_ids", [], dist_reduce_fx="cat")
            self.add_state("image_confmat", [], dist_reduce_fx="cat")

    @property
    def confusion_matrix(self) -> Tensor:
        """The (local) ``[K, K]`` int64 confusion matrix, rows = label, columns = prediction."""
        return self.confmat[:-1].view(self.num_classes, self.num_classes)

    def update(self, preds_or_logits: Tensor, target: Tensor, image_ids: Any = None) -> None:  # type: ignore[override]
        """Accumulate a batch of logits ``[B, K, H, W]`` or predictions ``[B, H, W]``.

        ``image_ids``: one integer per image, used by the bootstrap only.
        """
        preds = preds_or_logits.detach()
        if preds.ndim == target.ndim + 1:
            if preds.shape[1] != self.num_classes:
                raise ValueError(f"logits have {preds.shape[1]} channels but num_classes is {self.num_classes}")
            if preds.shape[:1] + preds.shape[2:] != target.shape:
                raise ValueError(
                    f"logits {tuple(preds.shape)} do not match target {tuple(target.shape)} "
                    "(expected [B, K, H, W] and [B, H, W])"
                )
            preds = preds.argmax(dim=1)
        elif preds.shape != target.shape:
            raise ValueError(
                f"expected logits [B, K, H, W] or predictions [B, H, W] matching target "
                f"{tuple(target.shape)}, got {tuple(preds.shape)}"
            )
        elif preds.is_floating_point():
            raise TypeError(
                f"predictions of the same shape as the target must be integer class indices, got {preds.dtype}"
            )
        if target.is_floating_point():
            raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
        excluded = (target == self.ignore_index) | (target == self.anomaly_index)
        index, include = confusion_matrix_index(preds, target, self.num_classes, excluded)
        if not self.bootstrap_samples:
            accumulate_counts(self.confmat, index, include)
            return
        # Per image, each counted on its own: a batch-wide index of image offsets would be a
        # transient as large as the batch's pixels in int64, which the allocator kept (RSS grew by
        # ~8 MB per 720x1280 image).
        batch = target.shape[0] if target.ndim == 3 else 1
        cells = self.confmat.numel()
        ids = as_image_ids(image_ids, batch, self.confmat.device)
        per_image = torch.zeros(batch, cells, dtype=torch.int64, device=self.confmat.device)
        rows = zip(per_image, index.reshape(batch, -1), include.reshape(batch, -1), strict=True)
        for row, image_index, image_include in rows:
            accumulate_counts(row, image_index, image_include)
        self.confmat += per_image.sum(0)
        self.image_ids.append(ids)
        self.image_confmat.append(per_image)

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any | None = None) -> None:
        if self.bootstrap_samples:  # one tensor of the right kind per process, even without images
            self.image_ids = [self._image_state("image_ids")]
            self.image_confmat = [self._image_state("image_confmat")]
        super()._sync_dist(dist_sync_fn, process_group=process_group)

    def _image_state(self, name: str) -> Tensor:
        value = getattr(self, name)
        if isinstance(value, Tensor):
            return value
        if value:
            return dim_zero_cat(value)
        shape = () if name == "image_ids" else (self.confmat.numel(),)
        return torch.zeros((0, *shape), dtype=torch.int64, device=self.confmat.device)

    def compute(self) -> dict[str, Any]:
        """``miou``, ``iou``, ``pixel_accuracy`` and ``confusion_matrix`` (see the class docstring)."""
        out_of_range = int(self.confmat[-1])
        if out_of_range:
            raise ValueError(
                f"{out_of_range} evaluated pixels had a label or prediction outside 0..{self.num_classes - 1} "
                f"(labels must be class indices, {self.anomaly_index} for anomaly or {self.ignore_index} "
                "for ignore); check num_classes and the label mapping."
            )
        confmat = self.confusion_matrix
        if int(confmat.sum()) == 0:
            rank_zero_warn(f"{type(self).__name__}.compute(): no evaluated pixels; every metric is NaN.", UserWarning)
        result = iou_from_confusion_matrix(confmat)
        values = {
            "miou": float(result["miou"]),
            "iou": result["iou"].tolist(),
            "pixel_accuracy": float(result["pixel_accuracy"]),
            "confusion_matrix": confmat.tolist(),
        }
        if self.bootstrap_samples:
            values["miou_ci"] = self._interval()
        return values

    def image_summary(self) -> dict[str, Any] | None:
        """The per-image confusion matrices the last ``compute()`` resampled, in canonical order (host arrays).

        ``image_id`` ``[N]`` int64 and ``confusion`` ``[N, K, K]`` int64; ``None`` without the
        bootstrap or before ``compute()``. Under DDP every process holds all images.
        """
        return self._image_summary

    def reset(self) -> None:
        super().reset()
        self._image_summary = None

    def _interval(self) -> tuple[float, float]:
        """``miou_ci`` (inside ``compute``, on the synchronised state)."""
        ids = self._image_state("image_ids").cpu().numpy()
        cells = self._image_state("image_confmat").cpu().numpy()
        order = canonical_order(ids, [cells])
        k = self.num_classes
        confusion = cells[order][:, : k * k].reshape(-1, k, k)
        self._image_summary = {"image_id": ids[order], "confusion": confusion}
        if ids.size < 2:
            rank_zero_warn(
                f"{type(self).__name__}.compute(): a bootstrap interval needs at least 2 images, got "
                f"{ids.size}; miou_ci is (nan, nan).",
                UserWarning,
            )
            return (math.nan, math.nan)
        weights = resample_weights(ids.size, self.bootstrap_samples, self.bootstrap_seed)
        return percentile_interval(miou_replicates(weights, confusion))

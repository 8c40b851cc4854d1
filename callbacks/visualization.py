"""Figures: anomaly heatmaps during validation/test; PR/ROC curves, failure gallery and size strata after test.

Every image goes to each configured logger that takes images and, always, to a PNG file under
``<log_dir>/images`` (:mod:`callbacks.image_logging`).

Nothing here touches the GPU on batches it does not log: the decision to log is made from
``batch_idx`` alone, and only the selected images are resized and copied to the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks.evaluation import AnomalyEvaluation, resize_to
from callbacks.image_logging import image_dir, log_image
from callbacks.rendering import (
    apply_colormap,
    colormap_lut,
    curves_figure,
    denormalize,
    figure_to_array,
    gallery_row,
    label_lut,
    make_grid,
    outcome_overlay,
    size_strata_figure,
    stack_rows,
)
from datamodules.labels import ANOMALY_INDEX, PALETTE
from datamodules.streethazards import is_padding

__all__ = [
    "AnomalyHeatmapLogger",
    "apply_colormap",
    "colormap_lut",
    "curves_figure",
    "denormalize",
    "label_lut",
    "make_grid",
    "outcome_overlay",
]

_STAGE_PREFIX = {"validate": "val", "test": "test"}


# --------------------------------------------------------------------------------------- the callback
@dataclass
class _Capture:
    """One logged image, on the host at display size, stored compactly: 9 bytes per pixel."""

    tag: str
    rgb: Tensor  # [h, w, 3] uint8: the input panel, round(255 * image)
    mask: Tensor  # [h, w] uint8: labels clipped to 0..255, as the palette lookup clips them
    pred: Tensor  # [h, w] uint8: closed-set prediction, clipped alike
    score: Tensor  # [h, w] float32: kept exact for the colour map and the threshold comparison
    step: int

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.rgb, self.mask, self.pred, self.score))


class AnomalyHeatmapLogger(L.Callback):
    """Anomaly heatmaps during validation and test, PR/ROC curves after test, into TensorBoard.

    Every ``every_n_batches``-th batch (``batch_idx % every_n_batches == 0``) contributes its
    first ``max_images`` images. Each becomes one grid image, tag
    ``<val|test>/heatmap/<name>`` (``name`` from the batch's ``name`` list, else
    ``b<batch_idx>_<i>``), with the panels

    1. the input image (normalization undone),
    2. the ground truth and 3. the closed-set prediction in the dataset palette,
    4. the primary anomaly score through a perceptual colormap (``colormap``, inferno by default),
    5. the thresholded score at the 95%-TPR threshold: true positives green, false positives red,
       missed anomaly pixels blue.

    Heatmap scale: fixed per method, so that colours are comparable across images and epochs.
    It is set once, from the 1% and 99% quantiles (``quantiles``) of the primary score over the
    images of the first logged batch, and then kept (and checkpointed with the callback state).
    Scores outside the range saturate.

    Panel 5 needs the threshold, which the :class:`AnomalyEvaluation` callback only knows once an
    epoch is over; the selected images are therefore kept on the host and the grids are written
    at the end of the validation/test run, with the threshold of that split's epoch. Without a
    finite threshold (no evaluation callback, or a split without anomalies, like StreetHazards'
    validation split) panel 5 is left out. What is kept is compact and bounded: per image the
    input as uint8 RGB, ground truth and prediction as uint8 labels and the score as float32 (9
    bytes per display pixel, 2.1 MB at 640x360), and at most ``max_captures`` images per split
    and run: once that many are held, later batches are not captured. The grids are the same as
    from full-precision copies (the input panel is rounded to uint8 either way).

    After test, for every score: ``test/pr_curve/<score>`` via ``add_pr_curve_raw`` (the
    TensorBoard PR plugin; its x axis is the index of the operating point, thresholds are raw
    scores) and one figure ``test/curves`` with all PR and ROC curves.

    After test it also draws the evaluation's failure gallery (``test/gallery/false_positives``:
    the images with the largest false-positive area at the operating threshold;
    ``test/gallery/missed``: crops around the largest missed components; each row input, ground
    truth, score, outcome) and the size-strata plot (``test/size_strata``).

    Every image is written as a PNG under ``<log_dir>/images`` and sent to each configured logger
    that takes images (TensorBoard, MLflow, W&B); the PR-curve plugin data and the scale text
    are TensorBoard's only. Rank 0 writes.

    Args:
        every_n_batches: Log from batches whose index is a multiple of this.
        max_images: Images taken from each logged batch.
        max_captures: Images captured per split (each validation run, each test run) at most;
            the default 16 is what a 1500-image test split at batch size 4 gives with the other
            defaults (2 images from each of 8 logged batches).
        panel_width: Panels are downscaled to at most this width (aspect ratio kept).
        colormap: A matplotlib colormap name for the heatmap.
        quantiles: Lower/upper quantile of the first logged scores that fix the colour scale.
        log_curves: Log the PR/ROC curves after test.
    """

    def __init__(
        self,
        every_n_batches: int = 50,
        max_images: int = 2,
        max_captures: int = 16,
        panel_width: int = 640,
        colormap: str = "inferno",
        quantiles: tuple[float, float] = (0.01, 0.99),
        log_curves: bool = True,
    ) -> None:
        super().__init__()
        if every_n_batches < 1 or max_images < 1 or max_captures < 1 or panel_width < 1:
            raise ValueError("every_n_batches, max_images, max_captures and panel_width must be positive")
        if not 0.0 <= quantiles[0] < quantiles[1] <= 1.0:
            raise ValueError(f"quantiles must satisfy 0 <= low < high <= 1, got {quantiles}")
        self.every_n_batches = int(every_n_batches)
        self.max_images = int(max_images)
        self.max_captures = int(max_captures)
        self.panel_width = int(panel_width)
        self.colormap = colormap
        self.quantiles = (float(quantiles[0]), float(quantiles[1]))
        self.log_curves = log_curves
        #: Heatmap colour scale (low, high) per method name; set from the first logged batch.
        self.scales: dict[str, tuple[float, float]] = {}
        self._pending: dict[str, list[_Capture]] = {}
        self._lut: np.ndarray | None = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"scales": {name: list(scale) for name, scale in self.scales.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scales = {name: (float(low), float(high)) for name, (low, high) in state_dict.get("scales", {}).items()}

    # ------------------------------------------------------------------ hooks
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending["validate"] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending["test"] = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._maybe_capture("validate", trainer, pl_module, outputs, batch, batch_idx)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._maybe_capture("test", trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write_heatmaps("validate", trainer, pl_module, image_dir(trainer))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = image_dir(trainer)  # a collective under DDP: every process asks
        self._write_heatmaps("test", trainer, pl_module, directory)
        if self.log_curves:
            self._write_curves(trainer, directory)
        self._write_operating_points(trainer, pl_module, directory)

    # ------------------------------------------------------------------ capture (logged batches only)
    def _maybe_capture(
        self,
        stage: str,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batch_idx % self.every_n_batches or not trainer.is_global_zero:
            return
        if is_padding(batch):  # a placeholder of a process without samples (see datamodules)
            return
        if not isinstance(outputs, Mapping) or not outputs.get("scores"):
            return
        pending = self._pending.setdefault(stage, [])
        count = min(self.max_images, batch["image"].shape[0], self.max_captures - len(pending))
        if count <= 0:
            return
        scores: Mapping[str, Tensor] = outputs["scores"]
        primary = next(iter(scores))
        mask = batch["mask"][:count]
        height, width = mask.shape[-2:]
        size = (max(1, round(height * min(1.0, self.panel_width / width))), min(width, self.panel_width))
        with torch.no_grad():
            image = resize_to(denormalize(batch["image"][:count]), size).clamp(0.0, 1.0)
            # The input panel's uint8 values, rounded half to even as np.round does.
            rgb = (image * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
            # Nearest for labels; bilinear (as in evaluation) for logits and scores.
            small_mask = torch.nn.functional.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0]
            small_mask = small_mask.clamp(0, 255).to(torch.uint8)
            pred = resize_to(outputs["logits"][:count].float(), size).argmax(dim=1).clamp(max=255).to(torch.uint8)
            score = resize_to(scores[primary][:count].float(), size)
        # The one device -> host copy (and GPU synchronisation) of this batch.
        rgb, small_mask, pred, score = (t.cpu() for t in (rgb, small_mask, pred, score))

        method = str(getattr(pl_module, "method_name", type(pl_module).__name__))
        if method not in self.scales:
            self.scales[method] = _quantile_scale(score, self.quantiles)
        names = batch.get("name") if isinstance(batch, Mapping) else None
        for i in range(count):
            label = str(names[i]) if isinstance(names, Sequence) and i < len(names) else f"b{batch_idx:05d}_{i}"
            # Copies, so that no capture keeps a view of a larger tensor alive.
            pending.append(
                _Capture(
                    tag=f"{_STAGE_PREFIX[stage]}/heatmap/{label}",
                    rgb=rgb[i].clone(memory_format=torch.contiguous_format),
                    mask=small_mask[i].clone(),
                    pred=pred[i].clone(),
                    score=score[i].clone(),
                    step=trainer.global_step,
                )
            )

    # ------------------------------------------------------------------ writing
    def _write_heatmaps(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule, directory: Path) -> None:
        captures = self._pending.pop(stage, [])
        if not captures or not trainer.is_global_zero:
            return
        evaluation = _evaluation_callback(trainer)
        threshold = evaluation.threshold95(stage) if evaluation is not None else None
        labels, anomaly_index, ignore_index = _label_colours(trainer, pl_module)
        if self._lut is None:
            self._lut = colormap_lut(self.colormap)
        method = str(getattr(pl_module, "method_name", type(pl_module).__name__))
        low, high = self.scales[method]

        for capture in captures:
            grid = _render(capture, labels, self._lut, (low, high), threshold, anomaly_index, ignore_index)
            log_image(trainer, capture.tag, grid, capture.step, directory)
        writer = _tensorboard(trainer)
        if writer is not None:
            description = f"heatmap scale of {method}: [{low:.6g}, {high:.6g}]"
            if threshold is not None:
                description += f"; 95%-TPR threshold {threshold:.6g}"
            writer.add_text(f"{_STAGE_PREFIX[stage]}/heatmap_scale", description, global_step=captures[0].step)
            writer.flush()

    def _write_curves(self, trainer: L.Trainer, directory: Path) -> None:
        if not trainer.is_global_zero:
            return
        evaluation = _evaluation_callback(trainer)
        if evaluation is None:
            rank_zero_warn("AnomalyHeatmapLogger: PR/ROC curves need the AnomalyEvaluation callback; none found")
            return
        curves = evaluation.curves.get("test", {})
        if not curves:
            return
        step = trainer.global_step
        writer = _tensorboard(trainer)
        if writer is not None:
            for name, curve in curves.items():
                raw = curve.get("pr_curve_raw")
                if raw and raw["num_thresholds"] > 0:
                    # Counts come in increasing threshold order, as the TensorBoard PR plugin expects.
                    writer.add_pr_curve_raw(f"test/pr_curve/{name}", global_step=step, **raw)
            writer.flush()
        metrics = evaluation.results.get("test", {}).get("scores", {})
        log_image(trainer, "test/curves", figure_to_array(curves_figure(curves, metrics)), step, directory)

    def _write_operating_points(self, trainer: L.Trainer, pl_module: L.LightningModule, directory: Path) -> None:
        """The failure gallery and the size-strata plot of the evaluation's operating points."""
        evaluation = _evaluation_callback(trainer)
        if evaluation is None or evaluation.operating_points is None or not trainer.is_global_zero:
            return
        results = evaluation.results.get("test", {}).get("operating_points") or {}
        if not results.get("thresholds"):
            return
        step = trainer.global_step
        operating = evaluation.operating_points
        threshold = results["thresholds"][operating.primary]
        labels, anomaly_index, ignore_index = _label_colours(trainer, pl_module)
        if self._lut is None:
            self._lut = colormap_lut(self.colormap)
        method = str(getattr(pl_module, "method_name", type(pl_module).__name__))
        for kind in ("false_positives", "missed"):
            entries = [entry for entry in operating.gallery if entry.kind == kind]
            if not entries:
                continue
            scale = self.scales.get(method) or _quantile_scale(torch.from_numpy(entries[0].score), self.quantiles)
            rows = [
                gallery_row(entry, labels, self._lut, scale, threshold, anomaly_index, ignore_index)
                for entry in entries
            ]
            title = f"{method}, {kind.replace('_', ' ')} at {operating.primary} {threshold:.4g}"
            title += ": input | truth | score | outcome"
            log_image(trainer, f"test/gallery/{kind}", stack_rows(rows, title), step, directory)
        strata = results.get("size_strata")
        if strata and any(b["components"] for b in strata["bins"]):
            log_image(trainer, "test/size_strata", figure_to_array(size_strata_figure(strata)), step, directory)


# --------------------------------------------------------------------------------------- helpers
def _render(
    capture: _Capture,
    labels: np.ndarray,
    lut: np.ndarray,
    scale: tuple[float, float],
    threshold: float | None,
    anomaly_index: int,
    ignore_index: int,
) -> np.ndarray:
    """The grid image of one capture: 4 panels (2 x 2), or 5 (3 columns) with a threshold."""
    rgb, mask = capture.rgb.numpy(), capture.mask.numpy()
    panels = [rgb, labels[mask], labels[capture.pred.numpy()], apply_colormap(capture.score, *scale, lut)]
    if threshold is not None:
        flagged = capture.score.numpy() >= threshold
        panels.append(outcome_overlay(rgb, flagged, mask, anomaly_index, ignore_index))
    return make_grid(panels, columns=3 if len(panels) > 4 else 2)


def _label_colours(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[np.ndarray, int, int]:
    """The label colour table of the run's class set, and its anomaly and ignore indices."""
    num_classes = int(getattr(pl_module, "num_classes", len(PALETTE) - 1))
    anomaly_index = int(getattr(pl_module, "anomaly_index", ANOMALY_INDEX))
    ignore_index = int(getattr(pl_module, "ignore_index", 255))
    palette = getattr(trainer.datamodule, "palette", None) if trainer.datamodule is not None else None
    return (
        label_lut(palette if palette is not None else PALETTE, num_classes, anomaly_index),
        anomaly_index,
        ignore_index,
    )


def _tensorboard(trainer: L.Trainer) -> Any:
    """The SummaryWriter of the first TensorBoardLogger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _evaluation_callback(trainer: L.Trainer) -> AnomalyEvaluation | None:
    for callback in trainer.callbacks:
        if isinstance(callback, AnomalyEvaluation):
            return callback
    return None


def _quantile_scale(score: Tensor, quantiles: tuple[float, float]) -> tuple[float, float]:
    """``(low, high)`` quantiles of the finite values of ``score``; a unit range when degenerate."""
    values = score.reshape(-1).double()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return 0.0, 1.0
    # torch.quantile accepts at most 2**24 elements; a regular subsample keeps the estimate.
    values = values[:: -(-values.numel() // (1 << 24))]
    low, high = torch.quantile(values, torch.tensor(quantiles, dtype=torch.float64)).tolist()
    if not high > low:  # constant scores: centre a unit range on them
        low, high = low - 0.5, low + 0.5
    return float(low), float(high)

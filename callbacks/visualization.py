"""TensorBoard figures: anomaly heatmaps during validation/test, PR and ROC curves after test.

Nothing here touches the GPU on batches it does not log: the decision to log is made from
``batch_idx`` alone, and only the selected images are resized and copied to the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks.evaluation import AnomalyEvaluation, resize_to
from datamodules.labels import ANOMALY_INDEX, IGNORE_COLOR, IMAGE_MEAN, IMAGE_STD, PALETTE
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

#: Colours of the thresholded overlay: flagged anomaly pixels (true positives), flagged known
#: pixels (false positives), and anomaly pixels left unflagged (misses).
TRUE_POSITIVE_COLOR = (0, 255, 0)
FALSE_POSITIVE_COLOR = (255, 0, 0)
MISSED_COLOR = (0, 128, 255)

_STAGE_PREFIX = {"validate": "val", "test": "test"}


# --------------------------------------------------------------------------------------- pure helpers
def colormap_lut(name: str = "inferno") -> np.ndarray:
    """A matplotlib colormap sampled at 256 levels as a ``[256, 3]`` uint8 lookup table."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return np.round(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint8)


def apply_colormap(score: Tensor, low: float, high: float, lut: np.ndarray) -> np.ndarray:
    """Colour ``score`` ``[H, W]`` with ``lut`` on the fixed scale ``[low, high]``: ``[H, W, 3]`` uint8.

    Values are mapped linearly, ``level = round(255 * clip((s - low) / (high - low), 0, 1))``;
    NaN scores get level 0.
    """
    values = score.detach().float().cpu().numpy()
    span = high - low if high > low else 1.0
    scaled = np.nan_to_num((values - low) / span, nan=0.0, posinf=1.0, neginf=0.0)
    levels = np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.intp)
    return lut[levels]


def label_lut(palette: Sequence[Sequence[int]], num_classes: int, anomaly_index: int = ANOMALY_INDEX) -> np.ndarray:
    """``[256, 3]`` uint8 lookup table for label maps.

    ``palette`` lists the known classes' colours in class order followed by the anomaly colour
    (the datamodule's ``palette``; ``labels.PALETTE`` for the 13-class set, where this equals
    ``labels.colorize``). Every other value (255 = ignore) gets ``IGNORE_COLOR``.
    """
    lut = np.tile(np.asarray(IGNORE_COLOR, dtype=np.uint8), (256, 1))
    colours = np.asarray(palette, dtype=np.uint8)
    lut[:num_classes] = colours[:num_classes]
    if 0 <= anomaly_index < 256 and len(colours) > num_classes:
        lut[anomaly_index] = colours[-1]
    return lut


def denormalize(image: Tensor, mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD) -> Tensor:
    """Undo ImageNet normalization of ``[..., 3, H, W]``: values clipped to ``[0, 1]``."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=image.device).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=image.device).view(3, 1, 1)
    return (image.float() * std_t + mean_t).clamp(0.0, 1.0)


def outcome_overlay(
    rgb: np.ndarray, flagged: np.ndarray, mask: np.ndarray, anomaly_index: int, ignore_index: int, alpha: float = 0.6
) -> np.ndarray:
    """Blend the outcome of a thresholded score over the image ``[H, W, 3]`` uint8.

    True positives (flagged anomaly pixels) green, false positives (flagged known pixels) red,
    misses (unflagged anomaly pixels) blue; ignored pixels and correct rejections stay as they are.
    """
    anomaly = mask == anomaly_index
    known = ~anomaly & (mask != ignore_index)
    out = rgb.astype(np.float32)
    for region, colour in (
        (flagged & anomaly, TRUE_POSITIVE_COLOR),
        (flagged & known, FALSE_POSITIVE_COLOR),
        (~flagged & anomaly, MISSED_COLOR),
    ):
        out[region] = (1.0 - alpha) * out[region] + alpha * np.asarray(colour, dtype=np.float32)
    return np.round(out).astype(np.uint8)


def make_grid(panels: Sequence[np.ndarray], columns: int, padding: int = 4, fill: int = 255) -> np.ndarray:
    """Tile equally sized ``[H, W, 3]`` uint8 panels row by row into one ``[H', W', 3]`` image."""
    height, width = panels[0].shape[:2]
    rows = math.ceil(len(panels) / columns)
    grid = np.full((rows * height + (rows + 1) * padding, columns * width + (columns + 1) * padding, 3), fill, np.uint8)
    for k, panel in enumerate(panels):
        r, c = divmod(k, columns)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[top : top + height, left : left + width] = panel
    return grid


def curves_figure(curves: Mapping[str, Mapping[str, np.ndarray]], metrics: Mapping[str, Mapping[str, float]]):  # type: ignore[no-untyped-def]
    """A matplotlib ``Figure`` with the PR curves (left) and ROC curves (right) of every score.

    ``curves[name]`` holds ``precision``, ``recall``, ``tpr`` and ``fpr`` arrays; the legend shows
    ``metrics[name]["aupr"]``/``["auroc"]``. Built without pyplot, so no GUI backend is involved.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.5), layout="constrained")
    pr_axes, roc_axes = figure.subplots(1, 2)
    for name, curve in curves.items():
        values = metrics.get(name, {})
        pr_axes.plot(curve["recall"], curve["precision"], label=f"{name} (AUPR {values.get('aupr', math.nan):.3f})")
        roc_axes.plot(curve["fpr"], curve["tpr"], label=f"{name} (AUROC {values.get('auroc', math.nan):.3f})")
    roc_axes.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    roc_axes.axhline(0.95, color="0.7", linestyle="--", linewidth=1)
    for axes, (xlabel, ylabel, title) in (
        (pr_axes, ("recall", "precision", "precision-recall")),
        (roc_axes, ("false positive rate", "true positive rate", "ROC")),
    ):
        axes.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.02))
        axes.grid(alpha=0.3)
        axes.legend(loc="lower left" if axes is pr_axes else "lower right", fontsize="small")
    return figure


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

    Only logs when one of the trainer's loggers is a ``TensorBoardLogger``; does nothing otherwise
    and on ranks other than 0.

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
            self._write_heatmaps("validate", trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_heatmaps("test", trainer, pl_module)
        if self.log_curves:
            self._write_curves(trainer)

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
        if batch_idx % self.every_n_batches or not trainer.is_global_zero or _tensorboard(trainer) is None:
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
    def _write_heatmaps(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        captures = self._pending.pop(stage, [])
        writer = _tensorboard(trainer)
        if not captures or writer is None or not trainer.is_global_zero:
            return
        evaluation = _evaluation_callback(trainer)
        threshold = evaluation.threshold95(stage) if evaluation is not None else None
        num_classes = int(getattr(pl_module, "num_classes", len(PALETTE) - 1))
        anomaly_index = int(getattr(pl_module, "anomaly_index", ANOMALY_INDEX))
        ignore_index = int(getattr(pl_module, "ignore_index", 255))
        palette = getattr(trainer.datamodule, "palette", None) if trainer.datamodule is not None else None
        labels = label_lut(palette if palette is not None else PALETTE, num_classes, anomaly_index)
        if self._lut is None:
            self._lut = colormap_lut(self.colormap)
        method = str(getattr(pl_module, "method_name", type(pl_module).__name__))
        low, high = self.scales[method]

        for capture in captures:
            grid = _render(capture, labels, self._lut, (low, high), threshold, anomaly_index, ignore_index)
            writer.add_image(capture.tag, grid, global_step=capture.step, dataformats="HWC")
        description = f"heatmap scale of {method}: [{low:.6g}, {high:.6g}]"
        if threshold is not None:
            description += f"; 95%-TPR threshold {threshold:.6g}"
        writer.add_text(f"{_STAGE_PREFIX[stage]}/heatmap_scale", description, global_step=captures[0].step)
        writer.flush()

    def _write_curves(self, trainer: L.Trainer) -> None:
        writer = _tensorboard(trainer)
        if writer is None or not trainer.is_global_zero:
            return
        evaluation = _evaluation_callback(trainer)
        if evaluation is None:
            rank_zero_warn("AnomalyHeatmapLogger: PR/ROC curves need the AnomalyEvaluation callback; none found")
            return
        curves = evaluation.curves.get("test", {})
        if not curves:
            return
        step = trainer.global_step
        for name, curve in curves.items():
            raw = curve.get("pr_curve_raw")
            if raw and raw["num_thresholds"] > 0:
                # Counts come in increasing threshold order, as the TensorBoard PR plugin expects.
                writer.add_pr_curve_raw(f"test/pr_curve/{name}", global_step=step, **raw)
        metrics = evaluation.results.get("test", {}).get("scores", {})
        writer.add_figure("test/curves", curves_figure(curves, metrics), global_step=step, close=True)
        writer.flush()


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

"""Pure image rendering for figures: colour maps, label palettes, outcome overlays, grids, curves.

No Lightning here: the callbacks that log figures (``callbacks.visualization``) and the failure
gallery of the evaluation import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from datamodules.labels import ANOMALY_INDEX, IGNORE_COLOR, IMAGE_MEAN, IMAGE_STD

__all__ = [
    "FALSE_POSITIVE_COLOR",
    "MISSED_COLOR",
    "TRUE_POSITIVE_COLOR",
    "apply_colormap",
    "colormap_lut",
    "curves_figure",
    "denormalize",
    "figure_to_array",
    "gallery_row",
    "label_lut",
    "make_grid",
    "outcome_overlay",
    "resize_nearest",
    "size_strata_figure",
    "stack_rows",
]

#: Colours of the thresholded overlay: flagged anomaly pixels (true positives), flagged known
#: pixels (false positives), and anomaly pixels left unflagged (misses).
TRUE_POSITIVE_COLOR = (0, 255, 0)
FALSE_POSITIVE_COLOR = (255, 0, 0)
MISSED_COLOR = (0, 128, 255)


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

    figure = Figure(figsize=(10, 4.5))
    figure.subplots_adjust(left=0.06, right=0.99, bottom=0.11, top=0.93, wspace=0.18)
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


def figure_to_array(figure) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Render a matplotlib ``Figure`` (Agg canvas) to an ``[H, W, 3]`` uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of ``[H, W, ...]`` (labels and display panels)."""
    rows = np.minimum((np.arange(height) + 0.5) * array.shape[0] / height, array.shape[0] - 1).astype(np.int64)
    cols = np.minimum((np.arange(width) + 0.5) * array.shape[1] / width, array.shape[1] - 1).astype(np.int64)
    return array[rows][:, cols]


def gallery_row(
    entry,  # type: ignore[no-untyped-def]
    labels: np.ndarray,
    lut: np.ndarray,
    scale: tuple[float, float],
    threshold: float,
    anomaly_index: int = ANOMALY_INDEX,
    ignore_index: int = 255,
) -> np.ndarray:
    """One gallery row: input, ground truth, score heatmap and outcome at ``threshold``, captioned.

    ``entry`` has ``rgb`` ``[h, w, 3]`` uint8, ``mask`` ``[h, w]`` labels, ``score`` ``[h, w]``,
    ``kind``, ``name`` and ``value`` (:class:`callbacks.operating_points.GalleryEntry`).
    """
    flagged = entry.score >= threshold
    panels = [
        entry.rgb,
        labels[entry.mask],
        apply_colormap(torch.from_numpy(entry.score), *scale, lut),
        outcome_overlay(entry.rgb, flagged, entry.mask, anomaly_index, ignore_index),
    ]
    what = "false positives" if entry.kind == "false_positives" else "missed"
    caption = f"{entry.name}: {entry.value} px {what}"
    return np.concatenate([caption_strip(caption, 4 * entry.rgb.shape[1] + 20), make_grid(panels, columns=4)], axis=0)


def caption_strip(text: str, width: int, height: int = 18) -> np.ndarray:
    """A white ``[height, width, 3]`` strip with ``text`` in black (PIL's default font)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (max(width, 1), height), (255, 255, 255))
    ImageDraw.Draw(image).text((4, 3), text, fill=(0, 0, 0))
    return np.asarray(image)


def stack_rows(rows: Sequence[np.ndarray], title: str = "", padding: int = 6, fill: int = 255) -> np.ndarray:
    """Stack ``[h_i, w_i, 3]`` images vertically, left-aligned, padded to the widest, under ``title``."""
    width = max(row.shape[1] for row in rows)
    if title:
        width = max(width, 6 * len(title) + 8)
    parts = [caption_strip(title, width), np.full((padding, width, 3), fill, np.uint8)] if title else []
    for row in rows:
        padded = np.full((row.shape[0], width, 3), fill, np.uint8)
        padded[:, : row.shape[1]] = row
        parts.extend([padded, np.full((padding, width, 3), fill, np.uint8)])
    return np.concatenate(parts[:-1], axis=0)


def size_strata_figure(strata: Mapping[str, object]):  # type: ignore[no-untyped-def]
    """Per size bin: component recall and pixel TPR at each operating point, and AUPR (a ``Figure``)."""
    from matplotlib.figure import Figure

    bins = strata["bins"]  # type: ignore[index]
    names = strata.get("operating_points", [])  # type: ignore[attr-defined]
    labels = [_bin_label(b["area_fraction"]) for b in bins]  # type: ignore[index]
    x = np.arange(len(bins))
    figure = Figure(figsize=(10, 3.8))
    figure.subplots_adjust(left=0.06, right=0.99, bottom=0.17, top=0.92, wspace=0.2)
    recall_axes, aupr_axes = figure.subplots(1, 2)
    width = 0.8 / max(1, 2 * len(names))
    for t, name in enumerate(names):
        recall = [b["component_recall"][t] for b in bins]  # type: ignore[index]
        tpr = [b["pixel_tpr"][t] for b in bins]  # type: ignore[index]
        recall_axes.bar(x + (2 * t - len(names) + 0.5) * width, recall, width, label=f"components found ({name})")
        recall_axes.bar(x + (2 * t - len(names) + 1.5) * width, tpr, width, label=f"pixel TPR ({name})", alpha=0.6)
    counts = [b["components"] for b in bins]  # type: ignore[index]
    recall_axes.set(ylabel="fraction", ylim=(0, 1.05), title="by component area (share of the image)")
    recall_axes.set_xticks(
        x, [f"{label}\n{n} comp." for label, n in zip(labels, counts, strict=True)], fontsize="small"
    )
    recall_axes.legend(fontsize="x-small")
    aupr_axes.bar(x, [b["aupr"] if b["aupr"] is not None else math.nan for b in bins], 0.6)  # type: ignore[index]
    aupr_axes.set(ylabel="AUPR (bin's pixels vs all negatives)", ylim=(0, 1.05), title="AUPR by component area")
    aupr_axes.set_xticks(x, labels, fontsize="small")
    for axes in (recall_axes, aupr_axes):
        axes.grid(alpha=0.3, axis="y")
    return figure


def _bin_label(edges: Sequence[float]) -> str:
    low, high = edges
    if math.isinf(high):
        return f">= {100 * low:.3g}%"
    return f"{100 * low:.3g}-{100 * high:.3g}%"

"""Write anomaly score maps and overlay images for ``predict``, one pair of files per input image.

``python main.py predict --config <method>.yaml --ckpt_path <ckpt> --data.predict_dir <folder>`` runs
a trained method over a folder of images of any size; this callback turns each image's prediction
into

- ``<out>/<name>.npy``: the anomaly score map, float16 ``[H, W]`` at the image's original size
  (higher = more anomalous; read with ``numpy.load``);
- ``<out>/<name>.png``: three panels side by side, each ``H x W``: the input image | the
  closed-set prediction in the dataset palette | the score heatmap blended over the image.

``<name>`` is the image's path relative to ``predict_dir`` without its suffix, so sub-folders of
the input are mirrored in the output. The callback relies only on the method contract
(``AnomalySegmentationModule.predict_step``): ``{"logits": [B, K, h, w], "scores": {name: [B, h, w]},
"name": [...], "original_size": [B, 2]}``; outputs at another resolution than the original image
are resized bilinearly (``align_corners=False``), as in evaluation.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePath
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch import Tensor

from callbacks.evaluation import resize_to
from callbacks.visualization import apply_colormap, colormap_lut, denormalize, label_lut
from datamodules.io import atomic_open
from datamodules.labels import ANOMALY_INDEX, PALETTE
from datamodules.streethazards import is_padding

__all__ = [
    "FLOAT16_MAX",
    "AnomalyPredictionWriter",
    "blend",
    "host_copy",
    "outline",
    "pack_bytes",
    "percentile_range",
    "to_float16",
    "unpack_bytes",
]

#: Largest finite float16 value; larger finite scores are clipped to it when saved.
FLOAT16_MAX: float = float(np.finfo(np.float16).max)  # 65504
#: Colour of the threshold outline: the palette's anomaly colour (cyan), absent from 'inferno'.
OUTLINE_COLOR: tuple[int, int, int] = PALETTE[ANOMALY_INDEX]


# --------------------------------------------------------------------------------------- pure functions
def to_float16(score: np.ndarray) -> tuple[np.ndarray, bool]:
    """``score`` as float16, finite values clipped to ``[-FLOAT16_MAX, FLOAT16_MAX]``.

    A plain cast turns finite scores beyond 65504 (distances, unnormalised energies) into
    infinities; clipping keeps them finite and ordered up to the clip. NaN and +/-inf are kept.
    Returns the array and whether any finite value had to be clipped.
    """
    values = np.asarray(score, dtype=np.float32)
    finite = np.isfinite(values)
    clipped = bool(np.any(np.abs(values[finite]) > FLOAT16_MAX))
    if clipped:
        values = np.where(finite, np.clip(values, -FLOAT16_MAX, FLOAT16_MAX), values)
    return values.astype(np.float16), clipped


def percentile_range(score: np.ndarray, q: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """``(low, high)`` percentiles of the finite values of ``score``: the default heatmap colour scale.

    Percentiles ignore the few most extreme pixels, so one outlier does not wash out the map.
    Without finite values the range is ``(0, 1)``; a constant map gets a unit range centred on
    its value (it is drawn in the middle colour).
    """
    values = np.asarray(score, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, q)
    if not high > low:
        return float(low) - 0.5, float(low) + 0.5
    return float(low), float(high)


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Inner boundary of a boolean region ``[H, W]``: pixels of ``mask`` within ``width`` 4-connected
    steps of a pixel outside it (the image border counts as outside, so regions are closed).

    Equals ``mask & ~binary_erosion(mask, cross, iterations=width, border_value=0)``.
    """
    mask = np.asarray(mask, dtype=bool)
    inner = mask
    for _ in range(max(int(width), 1)):
        # One 4-neighbour erosion step; the False padding makes the image border count as outside.
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def blend(base: np.ndarray, overlay: np.ndarray, alpha: float) -> np.ndarray:
    """``round((1 - alpha) * base + alpha * overlay)`` of two ``[H, W, 3]`` uint8 images, as uint8."""
    mixed = (1.0 - alpha) * base.astype(np.float32) + alpha * overlay.astype(np.float32)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def host_copy(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copy ``tensors`` to the host in a single transfer.

    Every ``.cpu()`` of a device tensor waits for the device; packing the raw bytes of all
    tensors of a batch into one buffer (:func:`pack_bytes`) makes that one wait and one copy per
    batch. Tensors already on the host are returned as they are.
    """
    if all(t.device.type == "cpu" for t in tensors):
        return list(tensors)
    buffer, spans = pack_bytes(tensors)
    return unpack_bytes(buffer.cpu(), tensors, spans)


def pack_bytes(tensors: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
    """The raw bytes of ``tensors`` concatenated into one uint8 tensor, and each one's ``(start, nbytes)``.

    Each tensor's bytes are padded to a multiple of 8 so that views of every dtype stay aligned.
    """
    chunks, spans = [], []
    offset = 0
    for t in tensors:
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % 8
        chunks.append(F.pad(raw, (0, pad)) if pad else raw)
        spans.append((offset, raw.numel()))
        offset += raw.numel() + pad
    device = tensors[0].device if tensors else torch.device("cpu")
    buffer = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8, device=device)
    return buffer, spans


def unpack_bytes(buffer: Tensor, like: Sequence[Tensor], spans: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Inverse of :func:`pack_bytes`: views of ``buffer`` with the dtypes and shapes of ``like``."""
    out = []
    for t, (start, size) in zip(like, spans, strict=True):
        out.append(buffer[start : start + size].view(t.dtype).reshape(t.shape))
    return out


def _safe_relative(name: str) -> PurePath:
    """``name`` as a relative path that stays inside the output folder."""
    path = PurePath(name)
    if not name or path.is_absolute() or ".." in path.parts or path.anchor:
        raise ValueError(f"prediction name '{name}' must be a relative path without '..'")
    return path


def _score_tag(score_name: str) -> str:
    """A score name usable inside a file name (``/`` and the OS separator become ``_``)."""
    return score_name.replace("/", "_").replace(os.sep, "_")


# --------------------------------------------------------------------------------------- the callback
class AnomalyPredictionWriter(BasePredictionWriter):
    """Anomaly score maps (``.npy``) and overlay panels (``.png``) for every predicted image.

    For each image, at its original size (outputs of a resized input are resized back bilinearly):

    - ``<output_dir>/<name>.npy``: float16 ``[H, W]`` map of the written score. float16 keeps about
      3 significant digits (relative error <= 2**-11) and at most 65504 in magnitude: finite scores
      beyond that (unbounded distances can get there) are clipped to +/-65504, with one warning per
      run; NaN and inf are kept.
    - with ``all_scores``: also ``<output_dir>/<name>.<score>.npy`` for every score the method
      returns (its own score first, then baselines such as ``msp``, ``maxlogit``, ``entropy``).
    - with ``overlay``: ``<output_dir>/<name>.png``, ``H x 3W``: input image | closed-set prediction
      (argmax of the resized logits, dataset palette) | the score through ``colormap`` blended over
      the image with weight ``alpha``. With ``threshold``, pixels scoring ``>= threshold`` are
      outlined in cyan on the heatmap panel.

    Heatmap colour scale: ``heatmap_range=(low, high)`` fixes it, so colours mean the same score in
    every image (use it to compare images, e.g. with a threshold from ``test``). By default each
    image gets its own scale, the 1st to 99th percentile of its finite scores: this shows where
    an image's most anomalous regions are, but colours are not comparable across images (an
    image without anomalies still shows a full range of colours). Scores outside the scale
    saturate.

    The input panel is the network input with the normalization undone; when the datamodule
    resized the images (``data.predict_image_size``), it is that input resized back, so it is as
    sharp as what the model saw.

    Files are written atomically (temporary file + rename), sub-folders are created for names
    with ``/``. Under DDP every process writes the images of its own shard (names are unique);
    the device-to-host copy happens once per batch. Encoding and writing run in
    ``write_threads`` background threads (PNG compression takes about as long as a forward pass
    at 720p), so the accelerator keeps working meanwhile; at most ``2 * write_threads`` images
    wait, and an error in a writer thread is raised in the main process at the next batch or
    at the end. At the end one line reports where the files are and how many images were
    written over all processes.

    Args:
        output_dir: Where to write; default ``<trainer.log_dir>/predictions`` (the logger's run
            folder, or ``trainer.default_root_dir`` without a logger).
        score: Which score goes into ``<name>.npy`` and the heatmap; default the method's own
            (the first score it returns).
        all_scores: Also write every score as ``<name>.<score>.npy``.
        overlay: Write the ``.png`` panels.
        heatmap_range: Fixed ``(low, high)`` colour scale; default per image, see above.
        threshold: Outline pixels with ``score >= threshold`` in the heatmap panel.
        colormap: A matplotlib colormap name for the heatmap (perceptually uniform by default).
        alpha: Weight of the heatmap when blended over the image, in ``[0, 1]``.
        write_threads: Background threads that encode and write the files; 0 writes in the
            main process.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        score: str | None = None,
        all_scores: bool = False,
        overlay: bool = True,
        heatmap_range: tuple[float, float] | None = None,
        threshold: float | None = None,
        colormap: str = "inferno",
        alpha: float = 0.6,
        write_threads: int = 2,
    ) -> None:
        super().__init__(write_interval="batch")
        if heatmap_range is not None:
            low, high = (float(v) for v in heatmap_range)
            if not (np.isfinite(low) and np.isfinite(high) and low < high):
                raise ValueError(f"heatmap_range must be finite with low < high, got {heatmap_range}")
            heatmap_range = (low, high)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if write_threads < 0:
            raise ValueError(f"write_threads must be >= 0, got {write_threads}")
        self.output_dir = output_dir
        self.score = score
        self.all_scores = all_scores
        self.overlay = overlay
        self.heatmap_range = heatmap_range
        self.threshold = None if threshold is None else float(threshold)
        self.colormap = colormap
        self.alpha = float(alpha)
        self.write_threads = int(write_threads)
        self._heat_lut = colormap_lut(colormap)  # fails early on an unknown colormap name
        self._palette: Sequence[Sequence[int]] = PALETTE
        #: Folder the files of the current/last run went to (set in ``setup``).
        self.output_path: Path | None = None
        #: Images written by this process in the current/last run.
        self.num_written = 0
        self._names: set[str] = set()
        self._warned_clip = False
        self._warned_duplicate = False
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[None]] = deque()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        # trainer.log_dir broadcasts rank 0's folder: every process must ask, and all get the same.
        if self.output_dir is not None:
            self.output_path = Path(self.output_dir)
        else:
            self.output_path = Path(trainer.log_dir or trainer.default_root_dir) / "predictions"
        datamodule = trainer.datamodule
        palette = getattr(datamodule, "palette", None) if datamodule is not None else None
        self._palette = palette if palette is not None else PALETTE

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.num_written = 0
        self._names = set()
        self._warned_clip = False
        self._warned_duplicate = False
        if self.output_path is None:  # setup() was bypassed (direct hook calls)
            self.setup(trainer, pl_module, "predict")
        self._shutdown()
        if self.write_threads > 0:
            self._pool = ThreadPoolExecutor(self.write_threads, thread_name_prefix="prediction-writer")
        if trainer.predict_loop.return_predictions:
            rank_zero_warn(
                "AnomalyPredictionWriter writes every prediction to disk, but trainer.predict also keeps "
                "all of them (full-resolution logits and scores) in memory; pass return_predictions=False "
                "(`--return_predictions false` on the command line) for large folders."
            )

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._wait(0)
        self._shutdown()
        # One all-reduce per run (every process calls this hook) gives the total over processes.
        count = torch.tensor(self.num_written, dtype=torch.int64, device=pl_module.device)
        total = int(trainer.strategy.reduce(count, reduce_op="sum"))
        kinds = "score maps (.npy) and overlays (.png)" if self.overlay else "score maps (.npy)"
        rank_zero_info(f"AnomalyPredictionWriter: wrote {kinds} for {total} images to {self.output_path}")

    def on_exception(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        exception: BaseException,
    ) -> None:
        self._shutdown(cancel=True)  # queued writes are dropped; the exception propagates

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._shutdown(cancel=True)

    # ------------------------------------------------------------------ one batch
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, Mapping) or "logits" not in prediction or not prediction.get("scores"):
            raise TypeError(
                "AnomalyPredictionWriter expects predict_step to return {'logits': [B, K, h, w], 'scores': "
                "{name: [B, h, w]}, ...} as AnomalySegmentationModule.predict_step does; "
                f"got {type(prediction).__name__}"
            )
        if is_padding(batch):  # a placeholder of a process without images (see datamodules)
            return
        scores: Mapping[str, Tensor] = prediction["scores"]
        primary = self.score if self.score is not None else next(iter(scores))
        if primary not in scores:
            raise ValueError(f"score '{primary}' is not one of this method's scores {list(scores)}")
        written = list(scores) if self.all_scores else [primary]
        logits: Tensor = prediction["logits"]
        image: Tensor | None = batch.get("image") if isinstance(batch, Mapping) else None
        count = logits.shape[0]
        names = self._names_of(prediction, batch, batch_indices, batch_idx, count, trainer.global_rank)
        sizes = self._sizes_of(prediction, image, logits, count)

        # Everything per image is resized and reduced on the device, then copied to the host once.
        with torch.no_grad():
            device_tensors: list[Tensor] = []
            for i, size in enumerate(sizes):
                device_tensors.extend(resize_to(scores[s][i : i + 1].float(), size)[0] for s in written)
                if self.overlay:
                    device_tensors.append(resize_to(logits[i : i + 1], size)[0].argmax(dim=0).to(torch.uint8))
                    if image is not None:
                        rgb = denormalize(resize_to(image[i : i + 1].float(), size)[0])
                        device_tensors.append(rgb.mul(255.0).round_().to(torch.uint8).permute(1, 2, 0))
            host = iter(host_copy(device_tensors))

        labels = label_lut(self._palette, int(logits.shape[1])) if self.overlay else None
        for name, size in zip(names, sizes, strict=True):
            maps = {s: next(host).numpy() for s in written}
            # float16 conversion (and its warning) here, in the main thread; the rest in a writer.
            half = {s: self._float16(values, s, name) for s, values in maps.items()}
            files = {f"{name}.npy": half[primary]}
            if self.all_scores:
                files.update({f"{name}.{_score_tag(s)}.npy": values for s, values in half.items()})
            panel_inputs = None
            if labels is not None:
                pred = next(host).numpy()
                rgb = next(host).numpy() if image is not None else np.full((*size, 3), 128, np.uint8)
                panel_inputs = (rgb, labels[pred], maps[primary])
            self._submit(functools.partial(self._write_image, name, files, panel_inputs))
            self.num_written += 1

    # ------------------------------------------------------------------ writing (possibly in a thread)
    def _write_image(
        self,
        name: str,
        arrays: Mapping[str, np.ndarray],
        panel_inputs: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    ) -> None:
        for file_name, values in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, values)
            with atomic_open(self._path(file_name), "wb") as handle:
                handle.write(buffer.getbuffer())
        if panel_inputs is not None:
            buffer = io.BytesIO()
            # Level 1: several times faster than the default 6 on photos, files barely larger.
            Image.fromarray(self._panel(*panel_inputs)).save(buffer, format="PNG", compress_level=1)
            with atomic_open(self._path(f"{name}.png"), "wb") as handle:
                handle.write(buffer.getbuffer())

    def _panel(self, rgb: np.ndarray, prediction_rgb: np.ndarray, score: np.ndarray) -> np.ndarray:
        """``[H, 3W, 3]`` uint8: image | prediction | heatmap over the image (+ threshold outline)."""
        low, high = self.heatmap_range if self.heatmap_range is not None else percentile_range(score)
        heat = apply_colormap(torch.from_numpy(score), low, high, self._heat_lut)
        overlay = blend(rgb, heat, self.alpha)
        if self.threshold is not None:
            width = max(1, round(min(score.shape) / 360))  # ~2 px at 720p, visible without hiding the map
            overlay[outline(score >= self.threshold, width)] = OUTLINE_COLOR
        return np.concatenate([rgb, prediction_rgb, overlay], axis=1)

    def _submit(self, job: Callable[[], None]) -> None:
        if self._pool is None:
            job()
            return
        self._pending.append(self._pool.submit(job))
        self._wait(2 * self.write_threads)

    def _wait(self, keep: int) -> None:
        """Wait until at most ``keep`` writes are pending; re-raises a writer thread's error."""
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def _shutdown(self, cancel: bool = False) -> None:
        if cancel:
            for future in self._pending:
                future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ------------------------------------------------------------------ helpers
    def _float16(self, score: np.ndarray, score_name: str, image_name: str) -> np.ndarray:
        values, clipped = to_float16(score)
        if clipped and not self._warned_clip:
            self._warned_clip = True
            finite = score[np.isfinite(score)]
            warnings.warn(
                f"AnomalyPredictionWriter: score '{score_name}' of '{image_name}' spans "
                f"[{finite.min():.6g}, {finite.max():.6g}], beyond the float16 range; values are clipped to "
                f"+/-{FLOAT16_MAX:g} in the .npy files (warned once per run)",
                UserWarning,
                stacklevel=3,
            )
        return values

    def _path(self, relative: str) -> Path:
        assert self.output_path is not None
        return self.output_path / _safe_relative(relative)

    def _names_of(
        self,
        prediction: Mapping[str, Any],
        batch: Any,
        batch_indices: Sequence[int] | None,
        batch_idx: int,
        count: int,
        rank: int,
    ) -> list[str]:
        names = prediction.get("name")
        if names is None and isinstance(batch, Mapping):
            names = batch.get("name")
        if isinstance(names, str):
            names = [names]
        if names is not None and len(names) == count:
            result = [str(n) for n in names]
        elif batch_indices is not None and len(batch_indices) == count:
            result = [f"{int(k):06d}" for k in batch_indices]  # dataset indices: unique across processes
        else:
            result = [f"rank{rank}_batch{batch_idx:06d}_{i}" for i in range(count)]
        for name in result:
            _safe_relative(name)
            if name in self._names and not self._warned_duplicate:
                self._warned_duplicate = True
                warnings.warn(
                    f"AnomalyPredictionWriter: the name '{name}' occurs twice (e.g. a.png and a.jpg in one "
                    "folder); the later image overwrites the earlier one's files",
                    UserWarning,
                    stacklevel=2,
                )
            self._names.add(name)
        return result

    @staticmethod
    def _sizes_of(
        prediction: Mapping[str, Any], image: Tensor | None, logits: Tensor, count: int
    ) -> list[tuple[int, int]]:
        """Each image's (H, W): ``original_size`` if given, else the network input's, else the logits'."""
        original = prediction.get("original_size")
        if original is not None:
            values = original.tolist() if isinstance(original, Tensor) else original  # a few ints
            sizes = [(int(h), int(w)) for h, w in values]
            if len(sizes) != count:
                raise ValueError(f"original_size lists {len(sizes)} sizes for a batch of {count} images")
            return sizes
        reference = image if image is not None else logits
        return [(int(reference.shape[-2]), int(reference.shape[-1]))] * count

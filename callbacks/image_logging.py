"""Images for whichever loggers a run has: TensorBoard, MLflow, W&B, and always PNG files.

Every figure the callbacks make goes through :func:`log_image`: it is written as a PNG file in
the run folder (so a CSV-logger run, or one with no logger, has it too) and sent to each
configured Lightning logger that takes images. Loggers without image support are skipped.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from datamodules.io import atomic_write_bytes

__all__ = ["image_dir", "log_image", "png_bytes"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.@=+-]+")


def image_dir(trainer: L.Trainer) -> Path:
    """``<log_dir>/images``: where the PNG copies go. A collective under DDP (``trainer.log_dir``)."""
    return Path(trainer.log_dir or trainer.default_root_dir or ".") / "images"


def png_bytes(image: np.ndarray) -> bytes:
    """``[H, W, 3]`` uint8 as PNG file bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _file_name(tag: str, step: int) -> Path:
    parts = [_UNSAFE.sub("_", part) or "_" for part in tag.split("/")]
    return Path(*parts[:-1], f"{parts[-1]}_step{int(step)}.png")


def log_image(trainer: L.Trainer, tag: str, image: np.ndarray, step: int, directory: Path) -> Path:
    """Write ``image`` (``[H, W, 3]`` uint8) to ``directory/<tag>_step<step>.png`` and to the loggers.

    Loggers: ``TensorBoardLogger`` (``add_image``), ``MLFlowLogger`` (an artifact under
    ``images/``), ``WandbLogger`` (``log_image``); any other logger gets only the PNG file. Call on
    one process (rank 0); ``directory`` comes from :func:`image_dir`, asked on every process.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"log_image expects an [H, W, 3] uint8 array, got {image.dtype} {image.shape}")
    relative = _file_name(tag, step)
    path = atomic_write_bytes(Path(directory) / relative, png_bytes(image))
    for logger in trainer.loggers:
        _send(logger, tag, image, step, relative)
    return path


def _send(logger: Any, tag: str, image: np.ndarray, step: int, relative: Path) -> None:
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, image, artifact_file=str(Path("images") / relative))
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=tag, images=[image])  # at its own step: W&B needs steps that only grow

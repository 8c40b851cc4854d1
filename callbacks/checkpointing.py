"""Checkpoints that survive crashes and load safely.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file, fsyncs it and renames
  it into place, so a process killed mid-write leaves the previous checkpoint intact; it loads
  with ``weights_only=True`` so a checkpoint cannot run code when unpickled.
- :func:`load_checkpoint_file` and :func:`resolve_ckpt_path` turn unreadable, truncated or foreign
  files into one clear :class:`CheckpointError` naming the file; for ``--ckpt_path last`` a corrupt
  ``last.ckpt`` falls back to the newest valid checkpoint beside it, with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from callbacks.io import atomic_torch_save

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, unsafe, or belongs to an incompatible method."""


def load_checkpoint_file(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise CheckpointError(
            f"checkpoint '{path}' cannot be loaded safely ({type(error).__name__}: {first_line}); it is "
            "truncated, corrupt, or holds objects other than tensors and plain data (which could run code "
            "when unpickled)"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint '{path}' is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def load_network_weights(
    net: torch.nn.Module,
    path: str | os.PathLike[str],
    what: str,
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    expected: str = "network",
) -> None:
    """Load a checkpoint's ``net.*`` weights (prefix removed, optionally ``convert``-ed) into ``net``.

    ``what`` names ``net`` in the error raised when the shapes or keys do not match; ``expected``
    names the weights the checkpoint should hold, in the error raised when it holds none.
    """
    state = load_checkpoint_file(path)["state_dict"]
    net_state = {key[len("net.") :]: value for key, value in state.items() if key.startswith("net.")}
    if not net_state:
        raise CheckpointError(f"checkpoint '{path}' holds no {expected} weights ('net.*')")
    if convert is not None:
        net_state = convert(net_state)
    try:
        net.load_state_dict(net_state)
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint '{path}' does not match this {what} (encoder_name / num_classes differ?): "
            f"{str(error).splitlines()[0][:300]}"
        ) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with fsync'd atomic writes and safe, clearly failing loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path) or weights_only is False:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint_file(path, map_location=map_location if map_location is not None else "cpu")


def _loads(path: Path) -> bool:
    try:
        load_checkpoint_file(path)
    except CheckpointError as error:
        log.warning("%s", error)
        return False
    return True


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: Path | None) -> str | None:
    """Validate ``--ckpt_path`` before Lightning touches it.

    A file path must load (:class:`CheckpointError` otherwise). ``last`` resolves to
    ``checkpoint_dir/last.ckpt``; if that file is corrupt, the newest other valid checkpoint in
    the folder is used with a warning; with no checkpoint at all, ``None`` (train from scratch,
    as on the first run of a job that is always started with ``--ckpt_path last``).
    Other values (``best``, ``hpc``, ``None``) are passed through.
    """
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry"):
        return ckpt_path
    if ckpt_path != "last":
        load_checkpoint_file(ckpt_path)
        return ckpt_path
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        log.warning("--ckpt_path last: no checkpoint folder yet (%s); starting from scratch", checkpoint_dir)
        return None
    last = checkpoint_dir / "last.ckpt"
    if last.is_file() and _loads(last):
        return str(last)
    others = sorted(
        (p for p in checkpoint_dir.glob("*.ckpt") if p.name != "last.ckpt"), key=lambda p: p.stat().st_mtime
    )
    for candidate in reversed(others):
        if _loads(candidate):
            if last.exists():
                log.warning("--ckpt_path last: '%s' is unreadable; resuming from '%s' instead", last, candidate)
            return str(candidate)
    if last.exists():
        raise CheckpointError(
            f"--ckpt_path last: '{last}' is unreadable and no other valid checkpoint is in {checkpoint_dir}"
        )
    log.warning("--ckpt_path last: no checkpoint in %s; starting from scratch", checkpoint_dir)
    return None

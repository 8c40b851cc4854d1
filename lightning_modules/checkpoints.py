"""Checkpoints that survive crashes and load safely.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file, fsyncs it and renames
  it into place, so a process killed mid-write leaves the previous checkpoint intact; it loads
  with ``weights_only=True`` so a checkpoint cannot run code when unpickled.
- :func:`load_checkpoint_file` and :func:`resolve_ckpt_path` turn unreadable, truncated or foreign
  files into one clear :class:`CheckpointError` naming the file; for ``--ckpt_path last`` a corrupt
  ``last.ckpt`` falls back to the newest valid checkpoint beside it, with a warning.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from datamodules.io import atomic_torch_save

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, unsafe, or belongs to an incompatible method."""


def load_checkpoint_file(
    path: str | os.PathLike[str], map_location: Any = "cpu", lightning_layout: bool = True
) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``; clear errors for bad files.

    ``lightning_layout=False`` accepts any dict (e.g. the bare weights Lightning's fork/spawn
    launchers pass from rank 0 to the main process after ``fit``)."""
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
    if not isinstance(checkpoint, dict) or (lightning_layout and "state_dict" not in checkpoint):
        raise CheckpointError(f"checkpoint '{path}' is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


_WEIGHTS_FROM_CHECKPOINT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "weights_from_checkpoint", default=None
)


@contextmanager
def initial_weights_from(checkpoint: str | os.PathLike[str]) -> Iterator[None]:
    """Within the block, models built skip their initial weights: pretrained encoder weights are
    not downloaded or read and ``init_checkpoint`` is not loaded, because ``checkpoint``'s state
    replaces them (``test``/``predict``/resumed ``fit`` with ``--ckpt_path``; an offline compute
    node must not need the internet or the training machine's files for them)."""
    token = _WEIGHTS_FROM_CHECKPOINT.set(str(checkpoint))
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT.reset(token)


def initial_weights_replaced_by() -> str | None:
    """The checkpoint whose state will replace a model's initial weights (see :func:`initial_weights_from`)."""
    return _WEIGHTS_FROM_CHECKPOINT.get()


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
        # Users' checkpoints are checked for the Lightning layout before Lightning reads them
        # (resolve_ckpt_path); here Lightning also reads its launchers' bare weights files.
        location = map_location if map_location is not None else "cpu"
        return load_checkpoint_file(path, map_location=location, lightning_layout=False)


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


# --------------------------------------------------------------------------------------- which method wrote it
def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint at ``path``, memory-mapped (tensors are read only when touched).

    ``weights_only=True``; a missing, truncated or unsafe file raises
    :class:`CheckpointError` naming it (the message of
    :func:`load_checkpoint_file`).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        # Not a readable zip checkpoint: a legacy file loads without mmap, anything else gets
        # the usual one-line CheckpointError.
        return load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint '{path}' is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def _written_by(checkpoint: Mapping[str, Any]) -> str:
    """The class path of the module that wrote ``checkpoint`` (LightningCLI records it), or ''."""
    hparams = checkpoint.get("hyper_parameters") or {}
    return str(hparams.get("_class_path", "")) if isinstance(hparams, Mapping) else ""


def _import_class(class_path: str) -> type | None:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except Exception:  # a class that no longer exists only makes the message shorter
        return None


def _same_class(a: str, b: str) -> bool:
    """Whether two class paths name one class (a class is importable from its package and its file)."""
    if a == b:
        return True
    cls = _import_class(a)
    return cls is not None and cls is _import_class(b)


def _describe(class_path: str) -> str:
    """``sml (lightning_modules.sml.SMLSegmenter)`` for a class path."""
    name = getattr(_import_class(class_path), "method_name", class_path.rpartition(".")[2])
    return f"{name} ({class_path})"


def check_checkpoint_class(path: str | os.PathLike[str], class_path: str | None) -> None:
    """Raise :class:`CheckpointError` if the checkpoint at ``path`` was written by a class other than ``class_path``.

    Given ``--ckpt_path <file>``, LightningCLI rebuilds the model from the hyperparameters stored
    in the checkpoint, class included; a config for another method would then silently run the
    checkpoint's method instead (results written under the wrong name). Checkpoints without a
    recorded class (written outside the CLI) pass; :func:`check_checkpoint_matches` still checks
    their tensors.
    """
    checkpoint = read_checkpoint(path)
    written_by = _written_by(checkpoint)
    if not class_path or not written_by or _same_class(written_by, class_path):
        return
    hint = ""
    # Segmenter-based methods (SML, FRE) can score the DeepLabV3+ ('net.*') of another one.
    if hasattr(_import_class(class_path), "load_network_weights") and any(
        key.startswith("net.") for key in checkpoint["state_dict"]
    ):
        hint = (
            "; to score the network it holds with this method, pass it as "
            "--model.init_args.init_checkpoint instead of --ckpt_path"
        )
    raise CheckpointError(
        f"checkpoint '{path}' was written by method {_describe(written_by)}, not {_describe(class_path)}: "
        f"use the config of the method that wrote it{hint}"
    )


def check_checkpoint_matches(path: str | os.PathLike[str], model: torch.nn.Module) -> None:
    """Raise :class:`CheckpointError` unless ``path`` holds a state dict that fits ``model``.

    Lightning restores a checkpoint with a strict ``load_state_dict``; a checkpoint of another
    method or network would end in a long ``RuntimeError`` after the run has been set up. This
    compares the key sets and the parameter shapes (buffers may be resized by the method's own
    loading code, e.g. FRE's subspace bases) first. The file is memory-mapped, so only the
    tensor headers are read.
    """
    checkpoint = read_checkpoint(path)
    class_path = f"{type(model).__module__}.{type(model).__qualname__}"
    written_by = _written_by(checkpoint)
    if written_by and not _same_class(written_by, class_path):
        check_checkpoint_class(path, class_path)
    state = checkpoint["state_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    parameters = dict(model.named_parameters())
    differ = [
        (key, list(state[key].shape), list(p.shape))
        for key, p in parameters.items()
        if key in state and tuple(state[key].shape) != tuple(p.shape)
    ]
    if not (missing or unexpected or differ):
        return
    found = []
    if missing:
        found.append(f"{len(missing)} tensors missing (e.g. '{missing[0]}')")
    if unexpected:
        found.append(f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')")
    if differ:
        key, theirs, ours = differ[0]
        found.append(f"{len(differ)} of another shape (e.g. '{key}': {theirs} in the checkpoint, {ours} here)")
    raise CheckpointError(
        f"checkpoint '{path}' does not fit this {_describe(class_path)} model: {'; '.join(found)}. "
        "Were encoder_name, num_classes (data.ignore_unlabeled) or the method's options different in the run "
        "that wrote it?"
    )


# --------------------------------------------------------------------------------------- older checkpoints
def upgrade_hyperparameters(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters of a checkpoint written by an older version, in today's form.

    Before the method folders, ``SMLSegmenter`` took SML's post-processing options as flat
    arguments (``boundary_width: 2``); they are now one block (``sml: {boundary_width: 2}``)
    shared by every SML score. Class paths of that time (``lightning_modules.sml.SMLSegmenter``)
    still import, so they need no change.
    """
    from lightning_modules.scoring.sml import SMLPostprocessing

    upgraded = dict(hparams)
    flat = [name for name in SMLPostprocessing.__dataclass_fields__ if name in upgraded]
    if flat and "sml" not in upgraded:
        upgraded["sml"] = {name: upgraded.pop(name) for name in flat}
    return upgraded

"""Crash-safe file writers for result files and checkpoints.

Every writer follows the same recipe: write into a fresh temporary file in the destination's
directory (same filesystem, so the final rename is atomic), flush and ``fsync`` it, then
``os.replace`` it over the destination and ``fsync`` the directory so the rename itself is
durable. A reader therefore sees either the old file or the complete new one, never a
partial file; if anything fails before the rename, the temporary file is removed and the old
file is left untouched.

These are local-filesystem guarantees: remote ``fsspec`` URLs (``s3://...``) are not handled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "dumps_json",
    "to_json_compatible",
]

#: Marker that names temporary files, so a crash leaves files that are easy to recognise.
TEMP_SUFFIX = ".tmp"


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows, or a filesystem that does not allow it
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit, atomically move it to ``path``.

    ``mode`` must be a write mode (``"wb"`` or ``"w"``). The parent directory is created if
    missing. The temporary file is created with ``O_EXCL`` and mode ``0o666`` so the final file
    gets the usual umask-derived permissions (``tempfile.mkstemp`` would leave it ``0o600``).
    If the body raises, the temporary file is deleted and ``path`` is not touched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports modes 'wb' and 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``; returns the path."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Atomically replace ``path`` with ``text`` encoded as ``encoding``; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def to_json_compatible(obj: Any) -> Any:
    """Recursively turn ``obj`` into values the standard JSON grammar can hold.

    - NaN and +/-inf become ``None`` (written ``null``): RFC 8259 has no literal for them, and
      Python's ``NaN`` token breaks strict parsers (``jq``, JavaScript). In result files a
      ``null`` metric means "undefined", e.g. AUPR on a split without anomalies.
    - NumPy scalars/arrays and torch tensors become Python numbers/lists.
    - Tuples and sets become lists; paths become strings; mapping keys become strings.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        return to_json_compatible(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_json_compatible(obj.tolist())
    if isinstance(obj, np.generic):
        return to_json_compatible(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(key): to_json_compatible(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_json_compatible(value) for value in obj]
    raise TypeError(f"cannot write an object of type {type(obj).__name__} to JSON: {obj!r}")


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (see ``to_json_compatible``), readable in an editor.

    Objects and nested lists are indented by ``indent``; a list of scalars (a curve, a matrix
    row) stays on one line instead of one line per number. ``indent=None`` gives one line.
    """
    return _format(to_json_compatible(obj), indent, 0)


def _format(value: Any, indent: int | None, level: int) -> str:
    def scalar(item: Any) -> str:
        return json.dumps(item, allow_nan=False, ensure_ascii=False)

    if indent is None:
        return json.dumps(value, allow_nan=False, ensure_ascii=False)
    inner, outer = " " * (indent * (level + 1)), " " * (indent * level)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = (f"{inner}{scalar(key)}: {_format(item, indent, level + 1)}" for key, item in value.items())
        return "{\n" + ",\n".join(items) + f"\n{outer}}}"
    if isinstance(value, list):
        if all(not isinstance(item, (dict, list)) for item in value):
            return "[" + ", ".join(scalar(item) for item in value) + "]"
        return "[\n" + ",\n".join(f"{inner}{_format(item, indent, level + 1)}" for item in value) + f"\n{outer}]"
    return scalar(value)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as strict JSON (``dumps_json``: non-finite floats as ``null``).

    The object is serialised completely before the file is opened, so an unserialisable value
    raises without creating or touching any file.
    """
    return atomic_write_text(path, dumps_json(obj, indent) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, but atomic: an interrupted save never corrupts an existing file.

    Streams straight into the temporary file, so large checkpoints are not held twice in memory.
    """
    with atomic_open(path, "wb") as handle:
        # torch.save wants a seekable binary stream; the BufferedWriter from fdopen is one.
        torch.save(obj, handle)
    return Path(path)

"""Count the host synchronisations of a training step and of an evaluation batch, per method.

A GPU runs ahead of the Python process that queues its kernels; any operation whose result the
host must see (``.item()``, ``.tolist()``, ``bool(tensor)``, a copy to the host, an output whose
size depends on the data such as ``nonzero`` or boolean indexing, CUDA's ``bincount``) makes the
process wait until every kernel queued before it has finished. Inside a training step or an
evaluation update such a wait leaves the GPU idle while the host catches up.

Two ways of counting, one per device:

- **instrumented (any device, CPU included)**: :class:`HostSyncCounter`, a
  ``torch.overrides.TorchFunctionMode``, sees every torch call made from Python and counts the
  ones that synchronise on CUDA (the list is :func:`sync_reason`), by the first caller outside
  torch (a file and line of this project, or of Lightning/torchmetrics). Its limits: it only
  sees calls made from Python (a C++ kernel that synchronises internally is invisible; none of
  the ops used here does); it cannot tell where a tensor would live on a GPU run, so a call on
  a tensor that stays on the host there (a CPU bookkeeping tensor of Lightning, NumPy data) is
  counted too (an over-count, visible by its location); and a device-to-host copy written as
  ``host.copy_(device)`` is not recognised. The metric library's NumPy fast path for CPU tensors
  is switched off while counting (``_backend.NUMPY_ON_CPU = False``), so the code that runs on
  CUDA is the code counted.
- **CUDA** (``--device cuda``): the same counter plus ``torch.cuda.set_sync_debug_mode("warn")``,
  which makes CUDA itself report every synchronising call (its warnings are counted); that
  count is the ground truth on a GPU.

The run is a tiny ``fit`` and ``test`` of each method through the CLI (random weights, the demo
configs, 64x96 images unless told otherwise). A training step is counted from the start of one
training batch to the start of the next (the step, the optimizer, every callback, logging and the
progress bar, and the loading of the next batch), an evaluation batch from the start of one test
batch to the start of the next (the method's ``test_step`` and every callback's batch-end hook).
The first batch of each (lazy initialisation, the metrics' first layout) is reported apart.

    python benchmarks/host_syncs.py --methods sml dual_decoder      # CPU, instrumented
    python benchmarks/host_syncs.py --device cuda                   # on a GPU: also CUDA's own count
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import traceback
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_THIS = str(Path(__file__).resolve())

# Calls that wait for the device when their tensor lives there (their result is read on the host,
# or their output size depends on the data). CUDA's bincount reads the input's maximum to size its
# output, also with ``minlength``. (``.numpy()`` is not listed: on a CUDA tensor it raises, so it
# only ever follows a ``.cpu()``, which is counted.)
_ALWAYS = {
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__complex__",
    "__repr__",
    "__format__",
    "cpu",
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "unique_consecutive",
    "bincount",
    "equal",
    "allclose",
    "is_nonzero",
}
_INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}
#: Outputs that live on the host even when the input lives on the device.
_TO_HOST = {"cpu", "numpy", "tolist", "item"}


def _has_bool_index(index: Any) -> bool:
    if isinstance(index, Tensor):
        return index.dtype == torch.bool
    if isinstance(index, (tuple, list)):
        return any(_has_bool_index(part) for part in index)
    return False


def _to_host_literal(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """``.to("cpu")`` written with the string: a copy to the host (a ``torch.device`` argument is
    taken to be the accelerator, as ``x.to(self.device)`` is)."""
    candidates = [kwargs.get("device"), *args[1:2]]
    return any(isinstance(c, str) and torch.device(c).type == "cpu" for c in candidates)


def sync_reason(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    """Why ``func(*args, **kwargs)`` waits for a CUDA device when its tensors live there, or ``None``."""
    name = getattr(func, "__name__", "")
    if name in _ALWAYS:
        return name
    if name in _INDEXING and len(args) > 1 and _has_bool_index(args[1]):
        return f"{name} with a boolean mask"
    if name == "where" and len(args) + len(kwargs) == 1:
        return "where(condition)"
    if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 4:
        return "repeat_interleave without output_size"
    if name == "to" and _to_host_literal(args, kwargs) and not kwargs.get("non_blocking", False):
        return "to('cpu')"
    if name == "copy_" and len(args) > 1 and not kwargs.get("non_blocking", False):
        return "copy_ to the host"
    return None


def _caller() -> str:
    """``file:line`` of the innermost caller outside torch and this file (relative to the repository),
    prefixed with the torch function it happened in, if any."""
    frame = inspect.currentframe()
    inside = None
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_TORCH_DIR) and inside is None and frame.f_code.co_name != "__torch_function__":
            inside = f"torch/{Path(filename).relative_to(_TORCH_DIR)}:{frame.f_lineno} via "
        elif not filename.startswith(_TORCH_DIR) and filename != _THIS and not filename.startswith("<"):
            path = Path(filename)
            try:
                shown = str(path.resolve().relative_to(REPO))
            except ValueError:
                parts = path.parts
                shown = "/".join(parts[parts.index("site-packages") + 1 :]) if "site-packages" in parts else filename
            return f"{inside or ''}{shown}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class HostSyncCounter(TorchFunctionMode):
    """Counts calls that would synchronise with a CUDA device, by ``(reason, caller)``.

    Which tensors "live on the device" is tracked through the calls (a taint): the module's
    parameters and buffers and each batch are marked (:meth:`mark`); the outputs of any call with
    a marked tensor among its inputs are marked, and so are those of factory calls given a
    ``device`` and of ``.to(<torch.device>)`` (a move to the accelerator); ``.cpu()``,
    ``.numpy()`` and ``.to("cpu")`` give host tensors. A syncing call counts only on a marked
    tensor, so host bookkeeping (the optimizers' step counters, NumPy data) does not.
    Counting happens while :attr:`counting` is true; marking always.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: Counter[tuple[str, str]] = Counter()
        self.counting = True
        # id -> weak reference (tensors compare elementwise, so no WeakSet); entries leave with their tensor.
        self._device: dict[int, weakref.ref[Tensor]] = {}

    def mark(self, tensors: Any) -> None:
        """Mark every tensor in ``tensors`` (a tensor, a module, or a nested collection) as on the device."""
        if isinstance(tensors, torch.nn.Module):
            tensors = [*tensors.parameters(), *tensors.buffers()]
        for leaf in tree_flatten(tensors)[0]:
            if isinstance(leaf, Tensor) and not self.on_device(leaf):
                key = id(leaf)
                self._device[key] = weakref.ref(leaf, lambda _, key=key: self._device.pop(key, None))

    def on_device(self, tensor: Any) -> bool:
        if not isinstance(tensor, Tensor):
            return False
        ref = self._device.get(id(tensor))
        return ref is not None and ref() is tensor

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, Tensor)]
        from_device = any(self.on_device(leaf) for leaf in inputs)
        if self.counting and from_device:
            reason = sync_reason(func, args, kwargs)
            if name == "copy_" and (self.on_device(args[0]) or not self.on_device(args[1])):
                reason = None  # a copy on the device, or from the host
            if reason is not None:
                self.events[(reason, _caller())] += 1
        result = func(*args, **kwargs)
        to_host = name in _TO_HOST or (name == "to" and _to_host_literal(args, kwargs))
        targets = [*args[1:2], kwargs.get("device")]
        to_device = name == "to" and not to_host and any(isinstance(t, torch.device) for t in targets)
        device = kwargs.get("device")
        made_on_device = not inputs and device is not None and not _to_host_literal((None, device), {})
        if not to_host and (from_device or to_device or made_on_device):
            self.mark(result)
        return result

    @property
    def total(self) -> int:
        return sum(self.events.values())


@contextmanager
def torch_code_path() -> Iterator[None]:
    """Run the metric library's torch code (the CUDA path) on CPU tensors too."""
    from callbacks.metrics.functional import _backend

    previous = _backend.NUMPY_ON_CPU
    _backend.NUMPY_ON_CPU = False
    try:
        yield
    finally:
        _backend.NUMPY_ON_CPU = previous


class CountHostSyncs(L.Callback):
    """Counts host synchronisations per training batch and per test batch (start to next start).

    One :class:`HostSyncCounter` is active from ``setup`` to ``teardown`` (so that tensors are
    marked wherever they are made) and counts inside the windows only. ``train`` and ``test`` hold
    one ``Counter`` of ``(reason, caller)`` per batch; on CUDA, ``cuda_train``/``cuda_test`` the
    number of CUDA's own synchronisation warnings per batch.
    """

    def __init__(self) -> None:
        self.train: list[Counter[tuple[str, str]]] = []
        self.test: list[Counter[tuple[str, str]]] = []
        self.cuda_train: list[int] = []
        self.cuda_test: list[int] = []
        self._counter: HostSyncCounter | None = None
        self._stage: str | None = None
        self._caught: tuple[Any, list[Any]] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._counter = HostSyncCounter()
        self._counter.counting = False
        self._counter.__enter__()
        self._counter.mark(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop()
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def _start(self, stage: str, pl_module: L.LightningModule, batch: Any) -> None:
        self._stop()
        counter = self._counter
        if counter is None:
            return
        counter.mark(pl_module)
        counter.mark(batch)
        counter.events = Counter()
        counter.counting = True
        self._stage = stage
        if pl_module.device.type == "cuda":
            manager = warnings.catch_warnings(record=True)
            records = manager.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            self._caught = (manager, records)

    def _stop(self) -> None:
        if self._stage is None or self._counter is None:
            return
        stage, self._stage = self._stage, None
        self._counter.counting = False
        getattr(self, stage).append(self._counter.events)
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            manager, records = self._caught
            self._caught = None
            count = sum("synchroniz" in str(record.message) for record in records)
            manager.__exit__(None, None, None)
            getattr(self, f"cuda_{stage}").append(count)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start("train", pl_module, batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._start("test", pl_module, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop()


def method_args(method: str, root: Path, out: Path, size: tuple[int, int], device: str) -> list[str]:
    """CLI arguments of a tiny run of ``method`` on the data at ``root`` (random weights, no download)."""
    return [
        f"--config={REPO / 'configs' / 'demo.yaml'}",
        f"--config={REPO / 'configs' / 'method' / 'demo' / f'{method}.yaml'}",
        f"--data.root={root}",
        f"--data.image_size=[{size[0]}, {size[1]}]",
        "--data.train_crop_size=null",
        "--data.batch_size=2",
        "--data.eval_batch_size=2",
        "--data.num_workers=0",
        f"--trainer.accelerator={device}",
        f"--trainer.default_root_dir={out}",
        "--trainer.limit_val_batches=0",
        "--trainer.max_epochs=1",
        # The smallest histograms (1 MiB per score): their layouts grow and compact more often than
        # the default's, so the batches where a layout changes are seen in a short run.
        "--evaluation.num_bits=16",
    ]


def count_method(
    method: str, root: Path, out: Path, size: tuple[int, int], device: str, train_batches: int, test_batches: int
) -> CountHostSyncs:
    """Fit ``method`` for ``train_batches`` batches and test it on ``test_batches``, counting syncs."""
    import main

    args = [*method_args(method, root, out, size, device), f"--trainer.limit_train_batches={train_batches}"]
    args.append(f"--trainer.limit_test_batches={test_batches}")
    counter = CountHostSyncs()
    with torch_code_path():
        cli = main.cli_main(args, run=False)
        cli.trainer.callbacks.insert(0, counter)  # first: its windows close before the others' epoch-end hooks
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
    return counter


def summarize(batches: Sequence[Counter[tuple[str, str]]]) -> tuple[int | None, int | None, Counter[tuple[str, str]]]:
    """(syncs of the first batch, most syncs of a later batch, the events of the later batches summed)."""
    if not batches:
        return None, None, Counter()
    later = batches[1:]
    total: Counter[tuple[str, str]] = Counter()
    for events in later:
        total.update(events)
    return sum(batches[0].values()), max((sum(e.values()) for e in later), default=None), total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["sml", "fre", "dual_decoder", "knn", "dmlnet", "entropy_oe"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--train-batches", type=int, default=3)
    parser.add_argument("--test-batches", type=int, default=3)
    parser.add_argument("--data", type=Path, default=None, help="dataset root (default: a tiny synthetic one)")
    parser.add_argument("--verbose", action="store_true", help="list every counted call by location")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    from datamodules.synthetic import write_synthetic_streethazards

    print(f"torch {torch.__version__}, lightning {L.__version__}, device {args.device}")
    print("| method | training step: first / later | evaluation batch: first / later | CUDA's count (train / test) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp) / "data"
        if args.data is None:
            write_synthetic_streethazards(root, 8, 2, 6, image_size=(args.height, args.width), seed=0)
        details = {}
        for method in args.methods:
            try:
                counter = count_method(
                    method, root, Path(tmp) / method, (args.height, args.width), args.device,
                    args.train_batches, args.test_batches,
                )  # fmt: skip
            except Exception:  # report and go on with the next method
                traceback.print_exc()
                continue
            train_first, train_later, train_events = summarize(counter.train)
            test_first, test_later, test_events = summarize(counter.test)
            cuda = "-"
            if counter.cuda_train or counter.cuda_test:
                cuda = f"{max(counter.cuda_train[1:], default=0)} / {max(counter.cuda_test[1:], default=0)}"
            print(f"| {method} | {train_first} / {train_later} | {test_first} / {test_later} | {cuda} |")
            details[method] = (train_events, test_events, len(counter.train) - 1, len(counter.test) - 1)
    if args.verbose:
        for method, (train_events, test_events, train_n, test_n) in details.items():
            parts = (("training step", train_events, train_n), ("evaluation batch", test_events, test_n))
            for what, events, n in parts:
                print(f"\n{method}, {what} (calls per batch, over {n} later batches):")
                for (reason, where), count in sorted(events.items(), key=lambda item: -item[1]):
                    print(f"  {count / max(n, 1):6.1f}  {reason:40s} {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

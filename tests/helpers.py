"""Shared test helpers: the CLI-argument builder, helper callbacks loaded by class path
(``tests.helpers.<Name>``), the 1-vs-2-process DDP harness and small utilities.

Every CLI test drives the real command line (``python main.py ...`` subprocesses, or ``main.main``
in this process) on a tiny synthetic dataset in the released layout: 11 training images (2 steps
of 4 per epoch), 4 validation and 7 test images at 64x96. 11 and 7 are odd on purpose: a
2-process sampler that padded its shards by repeating samples would count one image twice.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Sampler

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 2  # 11 training images, batch 4, last partial batch dropped
#: The encoder of the tests' CLI runs: 1.7M parameters with the DeepLabV3+ head (resnet18: 12.3M),
#: so a checkpoint with its optimizer state is 20 MB instead of 148 MB.
TEST_ENCODER = "timm-mobilenetv3_small_minimal_100"


# --------------------------------------------------------------------------------------- helpers
class NaNInputAt(L.Callback):
    """Test helper (loaded by class path): poison the training batch that makes global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step + 1 == self.step:
            batch["image"].fill_(float("nan"))


class SignalAt(L.Callback):
    """Test helper (loaded by class path): send ``signum`` to this process during the batch of ``step``."""

    def __init__(self, step: int, signum: int, rank: int | None = None) -> None:
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step + 1 == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


class DumpBuffers(L.Callback):
    """Test helper (loaded by class path): save the module's buffers after test, one file per process."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        buffers = {name: value.detach().cpu().clone() for name, value in pl_module.named_buffers()}
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        torch.save(buffers, Path(self.directory) / f"rank{trainer.global_rank}.pt")


class EpochStatistics(L.Callback):
    """Test helper (loaded by class path) for the dual decoder's epoch statistics, one file per process.

    It makes the module seed the global RNG of each training batch from the epoch and the batch's
    sample names (instead of the batch index and rank), so that dropout draws the same masks for the
    same batch in any run, and records the names.
    It records this process's own accumulators at the start of training (restored from a
    checkpoint or zero), after every training batch, and at each epoch end before the module sums
    them across processes (callbacks run first); once the module has turned them into the next
    epoch's statistics, it records those."""

    ACCUMULATORS = ("sem_sums", "sem_sq_sums", "sem_counts", "emb_sums", "emb_counts")
    STATISTICS = ("class_means", "class_stds", "class_valid", "prototypes")

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.names: list[list[list[str]]] = []
        self.restored: dict[str, torch.Tensor] = {}
        self.steps: list[dict[str, torch.Tensor]] = []
        self.accumulators: list[dict[str, torch.Tensor]] = []
        self.statistics: list[dict[str, torch.Tensor]] = []

    def _buffers(self, pl_module: L.LightningModule, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {name: getattr(pl_module, name).detach().cpu().clone() for name in names}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        epoch = trainer.current_epoch
        while len(self.names) <= epoch:
            self.names.append([])
        self.names[epoch].append(list(batch["name"]))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        def seed_by_names(batch: Any, batch_idx: int) -> int:
            return zlib.crc32(json.dumps([pl_module.current_epoch, list(batch["name"])]).encode())

        pl_module.training_batch_seed = seed_by_names

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restored = self._buffers(pl_module, self.ACCUMULATORS)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.steps.append(self._buffers(pl_module, self.ACCUMULATORS))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self.statistics.append(self._buffers(pl_module, self.STATISTICS))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.accumulators.append(self._buffers(pl_module, self.ACCUMULATORS))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.statistics.append(self._buffers(pl_module, self.STATISTICS))
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        record = {"names": self.names, "restored": self.restored, "steps": self.steps}
        record |= {"accumulators": self.accumulators, "statistics": self.statistics}
        torch.save(record, Path(self.directory) / f"rank{trainer.global_rank}.pt")


class _Batches(Sampler[list[int]]):
    """The batches of dataset indices of the trainer's current epoch."""

    def __init__(self, trainer: L.Trainer, batches: list[list[list[int]]]) -> None:
        self.trainer, self.batches = trainer, batches

    def __len__(self) -> int:
        return len(self.batches[0])

    def __iter__(self) -> Any:
        return iter(self.batches[self.trainer.current_epoch])


class ReplayTrainBatches(L.Callback):
    """Test helper (loaded by class path): the training loader yields these batches, given by sample
    name per epoch, in this order. Indices are ``epoch * n + index`` as EpochShuffleSampler gives
    them, so anomaly injection pastes the same objects as in the run the batches come from."""

    def __init__(self, batches: list[list[list[str]]]) -> None:
        self.batches = batches

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule, original = trainer.datamodule, trainer.datamodule.train_dataloader

        def train_dataloader() -> DataLoader:
            dataset = original().dataset
            index = {sample.image.stem: i for i, sample in enumerate(dataset.samples)}
            assert len(index) == len(dataset)
            batches = [
                [[epoch * len(dataset) + index[name] for name in batch] for batch in epoch_batches]
                for epoch, epoch_batches in enumerate(self.batches)
            ]
            return DataLoader(dataset, batch_sampler=_Batches(trainer, batches), num_workers=0)

        datamodule.train_dataloader = train_dataloader


def cli_args(
    root: Path,
    out: Path,
    method: str = "sml",
    *,
    name: str = "run",
    image_size: tuple[int, int] = (64, 96),
    batch_size: int = 4,
    eval_batch_size: int | None = 1,
    encoder: str = TEST_ENCODER,
) -> list[str]:
    """The one CLI-argument builder of the tests: a tiny run of a registered method on the data at
    ``root``, logging to ``out/<name>/run`` (``checkpoint_dir(out)`` for the default name).

    ``encoder``: the tests' small encoder by default (the learning tests pass ``resnet18``, the
    demo's): what they check does not depend on the encoder, and it makes every fit, checkpoint
    and test several times cheaper."""
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(out), "name": name, "version": "run"},
    }
    return [
        *method_config_args(method),
        f"--data.root={root}",
        f"--data.image_size=[{image_size[0]}, {image_size[1]}]",
        f"--data.batch_size={batch_size}",
        "--data.train_crop_size=null",  # the demo's crops are for its 128x224 images
        *([f"--data.eval_batch_size={eval_batch_size}"] if eval_batch_size is not None else []),
        "--data.num_workers=0",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger={json.dumps(logger)}",
        "--trainer.limit_val_batches=1",
        "--trainer.check_val_every_n_epoch=1",  # the demo validates every 2nd epoch, without a sanity check
        "--trainer.num_sanity_val_steps=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        # 2**16 sub-bins per histogram (1 MiB instead of 64): these runs evaluate a few thousand
        # pixels, which the smallest histogram holds exactly; its state costs time in every run.
        "--evaluation.num_bits=16",
        f"--model.init_args.encoder_name={encoder}",
    ]


def checkpoint_dir(out: Path) -> Path:
    return out / "run" / "run" / "checkpoints"


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def callbacks_arg(*callbacks: tuple[str, dict[str, Any]]) -> str:
    items = [{"class_path": f"tests.helpers.{name}", "init_args": init} for name, init in callbacks]
    return f"--trainer.callbacks={json.dumps(items)}"


class ForkedMain:
    """``python main.py *argv`` as a child forked from this process, with a ``Popen``-like handle.

    The child starts from this process's imports (a fresh ``python main.py`` spends about 10 s of
    CPU importing torch and Lightning on the CI machine): it writes its stdout and stderr to
    ``log``, runs ``main.main`` with one thread and leaves with its exit code, or is ended by a
    signal (``returncode`` is then minus the signal, as for ``Popen``). Lightning's own log lines
    go to the handlers this process already had, not to ``log``. Not for ``ddp_fork`` runs: once
    this process has asked torch about CUDA (``torch.cuda.is_available()`` in any earlier test),
    torch marks its forked children as bad forks and Lightning's fork launcher refuses to start
    in one; run those through ``main.main`` in this process.
    """

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        import main

        descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: what `python main.py *argv` does, interpreter exit included
            code = 1
            try:
                os.dup2(descriptor, 1)
                os.dup2(descriptor, 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                os.chdir(REPO)
                os.environ.update(env or {})
                torch.set_num_threads(1)
                sys.argv = ["main.py", *argv]
                code = main.main()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(descriptor)
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.kill(self.pid, 9)
                self.wait(60)
                raise TimeoutError(f"main.py (pid {self.pid}) did not finish within {timeout} s")
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)


def run_forked_main(argv: list[str], log: Path, timeout: float = 600) -> tuple[int, str]:
    """:class:`ForkedMain` to the end: its exit code and what it wrote."""
    code = ForkedMain(argv, log).wait(timeout)
    return code, log.read_text()


def wait_for(condition: Callable[[], bool], proc: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the fit process exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def parameters_finite(checkpoint: dict[str, Any]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in checkpoint["state_dict"].values() if v.is_floating_point())


def method_config_args(method: str = "sml", demo: bool = True) -> list[str]:
    """The composed configs of a registered method: the experiment base, then the method block."""
    base = "configs/demo.yaml" if demo else "configs/streethazards.yaml"
    folder = "configs/method/demo" if demo else "configs/method"
    return [f"--config={REPO / base}", f"--config={REPO / folder / (method + '.yaml')}"]


def free_port() -> int:
    """A free TCP port on localhost for a process group."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _process_group_entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)  # a forked process must not use the parent's OpenMP pool
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        torch.distributed.destroy_process_group()


def run_in_process_group(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined in a gloo process group.

    The processes are forked from this one, one thread each: a spawned one would import torch,
    Lightning and the project again (about 10 s of CPU on the CI machine, per process).
    """
    import torch.multiprocessing as mp

    mp.start_processes(
        _process_group_entry, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="fork"
    )


# --------------------------------------------------------------------------------------- DDP harness
def run_one_and_two_processes(method: str, root: Path, extra: list[str], tmp_path: Path) -> dict[int, dict[str, Any]]:
    """``main.py test`` on 1 and on 2 gloo processes; metrics.json and buffers of each.

    Both run in this process through ``main.main``, the 2-process one with ``ddp_fork`` (its two
    processes forked from this one): no ``python main.py`` start-up, about 10 s of imports each
    on the CI machine (tests/test_ddp_equality.py runs the ``ddp`` launcher). One thread in both
    runs: the intra-op thread count changes float summation order.
    """
    import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    try:
        for world in (1, 2):
            out = tmp_path / f"world{world}"
            argv = [
                "test", *cli_args(root, out, method=method), *extra,
                *(["--trainer.strategy=ddp_fork", "--trainer.devices=2"] if world == 2 else []),
                callbacks_arg(("DumpBuffers", {"directory": str(out / "buffers")})),
            ]  # fmt: skip
            assert main.main(argv) == 0, f"main.py test on {world} process(es) failed"
            buffers = [torch.load(out / "buffers" / f"rank{r}.pt", weights_only=True) for r in range(world)]
            metrics = json.loads((out / "run" / "run" / "metrics.json").read_text())
            results[world] = {"metrics": metrics, "buffers": buffers}
    finally:
        torch.set_num_threads(threads)
    return results


#: The pooled metrics and the key of their guaranteed error bound.
POOLED_BOUNDS = {"aupr": "aupr_error_bound", "auroc": "auroc_error_bound", "fpr95": "fpr95_error_bound"}


def _assert_same_tree(one: Any, two: Any, path: str) -> None:
    """Equal nested results: the same keys, integers equal, floats to float64 summation order."""
    if isinstance(one, dict):
        assert isinstance(two, dict) and one.keys() == two.keys(), path
        for key in one:
            _assert_same_tree(one[key], two[key], f"{path}/{key}")
    elif isinstance(one, list):
        assert isinstance(two, list) and len(one) == len(two), path
        for i, (a, b) in enumerate(zip(one, two, strict=True)):
            _assert_same_tree(a, b, f"{path}[{i}]")
    elif isinstance(one, float) and isinstance(two, float):
        # A size bin's AUPR/AUROC come from the test split's negatives histogram, whose bin edges
        # depend on how the processes' layouts merged (like the pooled values, within ~1e-6 here).
        binned = "/size_strata/" in path and path.rsplit("/", 1)[-1] in ("aupr", "auroc")
        assert two == pytest.approx(one, rel=1e-9, abs=1e-5 if binned else 1e-12), path
    else:
        assert one == two, path


def assert_same_evaluation(one: dict[str, Any], two: dict[str, Any], exact_scores: tuple[str, ...]) -> None:
    for key in ("num_images", "num_valid_pixels", "num_anomaly_pixels", "segmentation", "anomaly_fraction"):
        assert one[key] == two[key], key
    assert one["num_images"] == 7  # a padding sampler would give 8 on 2 processes
    for score, values in one["scores"].items():
        for key, value in values.items():
            other = two["scores"][score][key]
            if key.endswith("_ci"):  # a bootstrap interval [low, high] (null: undefined)
                _assert_same_interval(score, key, value, other, values, two["scores"][score], score in exact_scores)
            elif key.endswith("_per_image"):
                # A mean over images, summed across processes in another order.
                assert other == pytest.approx(value, rel=1e-12, abs=1e-15), (score, key)
            elif value is None or other is None:  # NaN is written as null
                assert value is None and other is None, (score, key)
            elif key in POOLED_BOUNDS:
                # The adaptive histogram merges the processes' layouts: each result holds the exact
                # value within its reported bound, so the two lie within the sum of both bounds.
                bound = values[POOLED_BOUNDS[key]] + two["scores"][score][POOLED_BOUNDS[key]]
                assert abs(other - value) <= bound + 1e-12, (score, key, value, other, bound)
            elif key.endswith("_error_bound") or key == "threshold95":
                continue  # where the histogram's bin edges fall depends on how the layouts merged
            elif score in exact_scores:
                assert other == value, (score, key)
            else:
                assert other == pytest.approx(value, rel=1e-6, abs=1e-9), (score, key)
    if one.get("operating_points") is not None:
        _assert_same_operating_points(one["operating_points"], two["operating_points"])


def _assert_same_operating_points(one: dict[str, Any], two: dict[str, Any]) -> None:
    """The operating-point results of 1 and 2 processes (``metrics.json`` key ``operating_points``).

    A threshold is a bin edge of the calibration histogram, whose layout depends on how the
    processes merged theirs: the two operating points (tpr95, best_f1) must agree (the tests' runs
    use histograms fine enough to hold each of their calibration scores in its own bin) and then
    everything measured at them on test must too (pixel counts, SegmentMeIfYouCan components, size
    strata); an oracle-grid threshold is compared where both runs chose the same one.
    """
    _assert_same_tree(one["thresholds"], two["thresholds"], "operating_points/thresholds")
    for key in ("operating_points", "size_strata"):
        _assert_same_tree(one[key], two[key], f"operating_points/{key}")
    _assert_same_tree(one["calibration"]["operating_points"], two["calibration"]["operating_points"], "calibration")
    for key in ("aupr", "auroc"):  # binned, like the pooled test values
        assert two["calibration"][key] == pytest.approx(one["calibration"][key], abs=1e-5), key
    grid = [("oracle", one["oracle"], two["oracle"])]
    grid += [(name, point, two["grid"][name]) for name, point in one["grid"].items()]
    compared = 0
    for name, a, b in grid:
        if a["threshold"] == b["threshold"]:
            _assert_same_tree(a, b, f"operating_points/{name}")
            compared += 1
    assert compared >= len(grid) // 2, "most oracle-grid thresholds should agree"


class RecordOperatingPoints(L.Callback):
    """Test helper: when the first test batch reaches the model, record whether the evaluation's
    operating thresholds were already fixed (and what they were), and how many test steps ran
    before they were."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.record: dict[str, Any] = {}

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.record:
            return
        evaluation = next(cb for cb in trainer.callbacks if type(cb).__name__ == "AnomalyEvaluation")
        operating = evaluation.operating_points
        self.record = {
            "ready_at_first_test_batch": bool(operating is not None and operating.ready),
            "thresholds": dict(operating.thresholds) if operating is not None else None,
            "test_steps_before_thresholds": int(trainer.test_loop.batch_progress.total.completed),
        }
        Path(self.path).write_text(json.dumps(self.record))


def _assert_same_interval(
    score: str, key: str, value: Any, other: Any, one: dict[str, Any], two: dict[str, Any], exact: bool
) -> None:
    """A bootstrap interval on 2 processes against 1: the same resamples of the same per-image summaries.

    Per-image means are resampled from exact per-image values: equal (to float rounding where the
    scores themselves may differ in the last bit). Pooled intervals are moved onto the pooled value,
    which agrees within the error bounds.
    """
    assert (value is None) == (other is None), (score, key)
    if value is None:
        return
    metric = key[: -len("_ci")]
    for a, b in zip(value, other, strict=True):
        assert (a is None) == (b is None), (score, key, value, other)
        if a is None:
            continue
        if metric in POOLED_BOUNDS:
            bound = one[POOLED_BOUNDS[metric]] + two[POOLED_BOUNDS[metric]] + (0.0 if exact else 1e-6)
            assert abs(a - b) <= bound + 1e-12, (score, key, value, other, bound)
        elif exact:
            assert a == pytest.approx(b, rel=1e-12, abs=1e-15), (score, key, value, other)
        else:
            assert a == pytest.approx(b, rel=1e-6, abs=1e-9), (score, key, value, other)

"""Reliability of main.py under faults: kills, preemption, DDP sharding, NaN, long runs, bad input.

Every test drives the real command line (``python main.py ...`` subprocesses, or ``main.main`` in
this process) on a tiny synthetic dataset in the released layout: 11 training images (2 steps
of 4 per epoch), 4 validation and 7 test images at 64x96. 11 and 7 are odd on purpose: a
2-process sampler that padded its shards by repeating samples would count one image twice.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

import main
from datamodules.synthetic import write_synthetic_streethazards
from lightning_modules.base import AnomalySegmentationModule, MethodOutput

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 2  # 11 training images, batch 4, last partial batch dropped


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


def cli_args(root: Path, out: Path, config: str = "configs/demo/sml.yaml") -> list[str]:
    """Arguments of a tiny run whose log directory is ``out/run/run``."""
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(out), "name": "run", "version": "run"},
    }
    return [
        f"--config={REPO / config}",
        f"--data.root={root}",
        "--data.image_size=[64, 96]",
        "--data.batch_size=4",
        "--data.eval_batch_size=1",
        "--data.num_workers=0",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger={json.dumps(logger)}",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def checkpoint_dir(out: Path) -> Path:
    return out / "run" / "run" / "checkpoints"


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def callbacks_arg(*callbacks: tuple[str, dict[str, Any]]) -> str:
    items = [{"class_path": f"tests.test_reliability.{name}", "init_args": init} for name, init in callbacks]
    return f"--trainer.callbacks={json.dumps(items)}"


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float, what: str) -> None:
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


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "streethazards"
    write_synthetic_streethazards(root, 11, 4, 7, image_size=(64, 96), seed=3)
    return root


@pytest.fixture(scope="module")
def trained(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-epoch SML run: ``last`` (statistics fitted) and ``best`` (saved before they were)."""
    out = tmp_path_factory.mktemp("trained")
    assert main.main(["fit", *cli_args(data_root, out), "--trainer.max_epochs=2"]) == 0
    folder = checkpoint_dir(out)
    (best,) = folder.glob("best-*.ckpt")
    return {"out": out, "last": folder / "last.ckpt", "best": best}


# --------------------------------------------------------------------------------------- 1. SIGKILL
@pytest.mark.slow
def test_sigkill_during_fit_then_resume_reaches_full_step_count(data_root: Path, tmp_path: Path) -> None:
    """Killed three times while last.ckpt is rewritten every step: at a random moment of a step,
    in the middle of a checkpoint write, and at a random moment again. Every kill leaves a
    loadable last.ckpt, each restart continues from it, the last run ends at the full step
    count, and no partial checkpoint is left behind."""
    out, epochs = tmp_path / "kill", 10
    command = [
        sys.executable, "main.py", "fit", *cli_args(data_root, out),
        f"--trainer.max_epochs={epochs}", "--checkpoint.every_n_train_steps=1", "--ckpt_path=last",
    ]  # fmt: skip
    folder = checkpoint_dir(out)
    last = folder / "last.ckpt"

    def temporaries() -> list[Path]:
        return [p for p in folder.iterdir() if p.name.endswith(".tmp")] if folder.is_dir() else []

    rng = random.Random(20240607)
    steps_at_kill: list[int] = []
    for attempt, moment in enumerate(("random", "mid-write", "random")):
        with open(tmp_path / f"kill{attempt}.log", "wb") as log:
            proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            # Wait for 2 or 3 new writes of last.ckpt, whatever the machine's speed.
            written_at = []
            for _ in range(rng.randint(2, 3)):
                before = mtime(last)
                wait_for(lambda: mtime(last) > before, proc, 240, "a new last.ckpt")  # noqa: B023
                written_at.append(time.monotonic())
            if moment == "random":  # somewhere in the next step: forward/backward or its write
                time.sleep(rng.uniform(0.0, written_at[-1] - written_at[-2]))
            else:  # as soon as the next write has started
                wait_for(lambda: bool(temporaries()), proc, 240, "a checkpoint write")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"run {attempt} ended on its own before the kill"
        # The kill leaves the previous last.ckpt intact and, from an interrupted write, only a
        # hidden temporary file that is not named *.ckpt.
        left = temporaries()
        assert all(p.name.startswith(".") and ".ckpt." in p.name for p in left), left
        if moment == "mid-write":
            assert left, "the kill was meant to interrupt a checkpoint write"
        for path in folder.glob("*.ckpt"):
            load(path)  # a truncated checkpoint would raise here
        steps_at_kill.append(load(last)["global_step"])
    assert steps_at_kill == sorted(steps_at_kill) and steps_at_kill[-1] < epochs * STEPS_PER_EPOCH, steps_at_kill

    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    final = load(last)
    assert final["global_step"] == epochs * STEPS_PER_EPOCH
    assert final["epoch"] == epochs
    assert bool(final["state_dict"]["posthoc_fitted"])
    for path in folder.glob("*.ckpt"):
        load(path)
    assert not temporaries()  # removed when the next fit starts
    print(f"SIGKILL at steps {steps_at_kill}")


def test_resuming_twice_from_last_batch_checkpoints_keeps_the_step_count(data_root: Path, tmp_path: Path) -> None:
    """A checkpoint written at the last batch of an epoch, resumed, and a checkpoint of that
    resumed run resumed again: Lightning 2.6 alone repeats an epoch here (10 steps instead of 8,
    see callbacks.guards.repair_resume_after_last_batch)."""
    keep_all = ["--checkpoint.every_n_train_steps=1", "--checkpoint.save_top_k=-1", "--checkpoint.monitor=null"]
    keep_all.append("--checkpoint.filename=s{step}")
    previous = None
    for run, epochs in enumerate((2, 3, 4)):
        out = tmp_path / f"run{run}"
        resume = [f"--ckpt_path={checkpoint_dir(previous) / f's{2 * (epochs - 1)}.ckpt'}"] if previous else []
        assert main.main(["fit", *cli_args(data_root, out), f"--trainer.max_epochs={epochs}", *keep_all, *resume]) == 0
        assert load(checkpoint_dir(out) / "last.ckpt")["global_step"] == epochs * STEPS_PER_EPOCH
        previous = out


def test_truncated_last_resumes_from_older_valid_checkpoint(
    data_root: Path, trained: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "truncated"
    folder = checkpoint_dir(out)
    shutil.copytree(checkpoint_dir(trained["out"]), folder)
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    best = folder / trained["best"].name
    assert load(best)["global_step"] < STEPS_PER_EPOCH * 2 + 1

    with caplog.at_level("WARNING", logger="callbacks.checkpointing"):
        code = main.main(["fit", *cli_args(data_root, out), "--trainer.max_epochs=3", "--ckpt_path=last"])
    assert code == 0
    assert f"'{last}' is unreadable; resuming from '{best}' instead" in caplog.text
    assert load(last)["global_step"] == 3 * STEPS_PER_EPOCH


# --------------------------------------------------------------------------------------- 2. preemption
@pytest.mark.slow
def test_sigterm_saves_last_and_the_same_command_resumes_in_the_same_folder(data_root: Path, tmp_path: Path) -> None:
    """``kill -TERM`` from outside, then the requeued job's identical command. On this tiny run the
    signal usually lands in a validation pass (Lightning aborts it; the checkpoint is saved from
    on_exception); a signal during a training batch: test_signal_in_a_batch_saves_last_at_that_step_..."""
    out, epochs = tmp_path / "preempted", 3
    command = [sys.executable, "main.py", "fit", *cli_args(data_root, out), f"--trainer.max_epochs={epochs}"]
    command.append("--ckpt_path=last")  # what a requeued job runs, the first time too
    last = checkpoint_dir(out) / "last.ckpt"
    with open(tmp_path / "term.log", "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        wait_for(last.exists, proc, 240, "the first epoch's checkpoint")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    stderr = (tmp_path / "term.log").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("stopped: training stopped by SIGTERM"), message
    stopped_at = load(last)["global_step"]
    assert STEPS_PER_EPOCH <= stopped_at < epochs * STEPS_PER_EPOCH
    if "after global step" in message:  # stopped at a training batch end (not during validation)
        assert f"after global step {stopped_at}; saved '{last}'" in message
    print(f"SIGTERM: exit {proc.returncode}, last.ckpt at step {stopped_at}: {message}")

    # The requeued job runs the same command: config.yaml exists already, the folder is the same.
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load(last)["global_step"] == epochs * STEPS_PER_EPOCH
    assert [p.name for p in (out / "run").iterdir()] == ["run"]
    assert len(list((out / "run" / "run").glob("events.out.tfevents.*"))) == 2  # one per process, same folder


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_in_a_batch_saves_last_at_that_step_and_the_same_command_continues(
    signum: signal.Signals, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A signal during a training batch (SLURM's --signal=SIGUSR1@90 warning, or SIGTERM): last.ckpt
    is saved at the end of that batch, the run stops with 128 + signal, the handlers are restored."""
    out = tmp_path / signum.name
    command = ["fit", *cli_args(data_root, out), "--trainer.max_epochs=3", "--ckpt_path=last"]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    code = main.main([*command, callbacks_arg(("SignalAt", {"step": 3, "signum": int(signum)}))])
    assert code == 128 + signum
    last = checkpoint_dir(out) / "last.ckpt"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"stopped: training stopped by {signum.name} after global step 3; saved '{last}'; run the same command "
        "with --ckpt_path last to continue"
    )
    assert load(last)["global_step"] == 3
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # nothing left installed

    assert main.main(command) == 0
    assert load(last)["global_step"] == 3 * STEPS_PER_EPOCH


def test_batch_seed_is_a_function_of_seed_epoch_batch_and_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_modules.base import batch_seed

    seeds = {batch_seed(e, b, r, s) for e in range(3) for b in range(3) for r in range(2) for s in (0, 1)}
    assert len(seeds) == 36 and all(0 <= seed < 2**63 for seed in seeds)
    assert batch_seed(1, 2, 0, 5) == batch_seed(1, 2, 0, 5)
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    assert batch_seed(1, 2, 0) == batch_seed(1, 2, 0, 5)


@pytest.fixture(scope="module")
def uninterrupted(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The weights at the end of a 3-epoch fit that nothing interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main.main(["fit", *cli_args(data_root, out), "--trainer.max_epochs=3"]) == 0
    return load(checkpoint_dir(out) / "last.ckpt")["state_dict"]


@pytest.mark.parametrize(
    ("workers", "step"), [(0, 3), (2, 3), (2, 2)], ids=["mid-epoch", "mid-epoch-2-workers", "epoch-end-2-workers"]
)
def test_preempted_and_resumed_fit_ends_with_the_weights_of_an_uninterrupted_one(
    workers: int, step: int, data_root: Path, tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    """Stopped by SIGTERM after global step ``step`` (3: within the second epoch; 2: at the end of the
    first), then resumed: the resumed run trains on the batches the uninterrupted one trained on (the
    resumed epoch's own shuffle and augmentation, without the batches already done) with the same
    dropout draws, so the final weights are bitwise equal. The number of loader workers changes nothing."""
    out = tmp_path / "preempted"
    command = ["fit", *cli_args(data_root, out), "--trainer.max_epochs=3", f"--data.num_workers={workers}"]
    stop = callbacks_arg(("SignalAt", {"step": step, "signum": int(signal.SIGTERM)}))
    assert main.main([*command, "--ckpt_path=last", stop]) == 128 + signal.SIGTERM
    assert load(checkpoint_dir(out) / "last.ckpt")["global_step"] == step
    assert main.main([*command, "--ckpt_path=last"]) == 0
    resumed = load(checkpoint_dir(out) / "last.ckpt")["state_dict"]
    assert resumed.keys() == uninterrupted.keys()
    different = [name for name in uninterrupted if not torch.equal(resumed[name], uninterrupted[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_ddp_signal_on_one_process_stops_both_at_the_same_step(data_root: Path, tmp_path: Path) -> None:
    """2 gloo processes; only rank 1 gets SIGUSR1. Both agree to save at that batch and stop (a
    rank that saved alone would deadlock in the collective save or the next all-reduce). Each
    process gets 6 of the 11 training images (the training sampler pads): one step per epoch."""
    out, epochs = tmp_path / "ddp", 5
    command = [
        sys.executable, "main.py", "fit", *cli_args(data_root, out), f"--trainer.max_epochs={epochs}",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--ckpt_path=last",
    ]  # fmt: skip
    signal_rank1 = callbacks_arg(("SignalAt", {"step": 3, "signum": int(signal.SIGUSR1), "rank": 1}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run([*command, signal_rank1], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-3000:]
    last = checkpoint_dir(out) / "last.ckpt"
    assert "stopped: training stopped by SIGUSR1 after global step 3" in stopped.stderr
    assert load(last)["global_step"] == 3
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load(last)["global_step"] == epochs


def test_default_logger_has_a_fixed_folder(data_root: Path, tmp_path: Path) -> None:
    """Without a logger in the config, runs (and requeued runs) share <default_root_dir>/<method>/run;
    an explicit logger setting is left alone."""
    from lightning.pytorch.loggers import TensorBoardLogger

    base = [
        "--model=SMLSegmenter",
        "--model.init_args.encoder_name=resnet18",
        "--model.init_args.encoder_weights=null",
        f"--data.root={data_root}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    default = main.cli_main(base, run=False).trainer.logger
    assert isinstance(default, TensorBoardLogger) and Path(default.log_dir) == tmp_path / "sml" / "run"
    assert main.cli_main([*base, "--trainer.logger=false"], run=False).trainer.logger is None
    configured = main.cli_main([f"--config={REPO / 'configs/demo/fre.yaml'}", f"--data.root={data_root}"], run=False)
    assert Path(configured.trainer.logger.log_dir) == Path("outputs/demo/fre/run")


# --------------------------------------------------------------------------------------- 3. DDP
def _run_one_and_two_processes(config: str, root: Path, extra: list[str], tmp_path: Path) -> dict[int, dict[str, Any]]:
    """``main.py test`` on 1 and on 2 gloo processes, concurrently; metrics.json and buffers of each."""
    # One thread per process in both runs: the intra-op thread count changes float summation order.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        command = [
            sys.executable, "main.py", "test", *cli_args(root, out, config=config), *extra,
            *(["--trainer.strategy=ddp", "--trainer.devices=2"] if world == 2 else []),
            callbacks_arg(("DumpBuffers", {"directory": str(out / "buffers")})),
        ]  # fmt: skip
        log = open(tmp_path / f"world{world}.log", "wb")  # noqa: SIM115  (closed below)
        procs[world] = (subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log, out)
    results = {}
    for world, (proc, log, out) in procs.items():
        proc.wait(timeout=600)
        log.close()
        output = (tmp_path / f"world{world}.log").read_text()
        assert proc.returncode == 0, output[-3000:]
        buffers = [torch.load(out / "buffers" / f"rank{r}.pt", weights_only=True) for r in range(world)]
        results[world] = {"metrics": json.loads((out / "run" / "run" / "metrics.json").read_text()), "buffers": buffers}
    return results


def _assert_same_evaluation(one: dict[str, Any], two: dict[str, Any], exact_scores: tuple[str, ...]) -> None:
    for key in ("num_images", "num_valid_pixels", "num_anomaly_pixels", "segmentation", "anomaly_fraction"):
        assert one[key] == two[key], key
    assert one["num_images"] == 7  # a padding sampler would give 8 on 2 processes
    for score, values in one["scores"].items():
        for key, value in values.items():
            other = two["scores"][score][key]
            if key.endswith("_per_image"):
                # A mean over images, summed across processes in another order.
                assert other == pytest.approx(value, rel=1e-12, abs=1e-15), (score, key)
            elif score in exact_scores:
                assert other == value, (score, key)
            else:
                assert other == pytest.approx(value, rel=1e-6, abs=1e-9), (score, key)


@pytest.mark.slow
def test_ddp_sml_test_and_statistics_equal_one_process(
    data_root: Path, trained: dict[str, Path], tmp_path: Path
) -> None:
    """``test`` of a checkpoint without SML statistics: both runs fit them on the training split (11
    images over 2 processes: 6 + 5), then evaluate 7 test images (4 + 3)."""
    assert not bool(load(trained["best"])["state_dict"]["posthoc_fitted"])
    runs = _run_one_and_two_processes("configs/demo/sml.yaml", data_root, [f"--ckpt_path={trained['best']}"], tmp_path)
    one, (rank0, rank1) = runs[1]["buffers"][0], runs[2]["buffers"]
    for name in ("sml.counts", "sml.sums", "sml.sq_sums", "sml.means", "sml.stds"):
        assert torch.equal(rank0[name], rank1[name]), name  # all-reduced: identical on every process
    assert torch.equal(one["sml.counts"], rank0["sml.counts"])
    assert one["sml.counts"].sum() == 11 * 64 * 96  # every training pixel, none twice
    for name in ("sml.sums", "sml.sq_sums", "sml.means", "sml.stds"):
        torch.testing.assert_close(rank0[name], one[name], rtol=1e-12, atol=1e-12, msg=name)
    _assert_same_evaluation(runs[1]["metrics"], runs[2]["metrics"], exact_scores=("sml", "msp", "maxlogit", "entropy"))


@pytest.mark.slow
def test_ddp_fre_statistics_and_test_equal_one_process(
    data_root: Path, trained: dict[str, Path], tmp_path: Path
) -> None:
    """FRE scoring the trained segmenter: moments, subspaces and error statistics fitted on 2
    processes equal the 1-process fit (the pixel budget is large enough to keep every pixel, so
    both fits see the same pixels; with subsampling each process draws its own sample)."""
    extra = [f"--model.init_args.init_checkpoint={trained['last']}", "--model.init_args.max_pixels_per_class=100000000"]
    runs = _run_one_and_two_processes("configs/demo/fre.yaml", data_root, extra, tmp_path)
    one, (rank0, rank1) = runs[1]["buffers"][0], runs[2]["buffers"]
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
    for name in ("moment_counts", "error_counts", "subspace_ranks"):
        assert torch.equal(one[name], rank0[name]), name
    assert one["moment_counts"].sum() == 11 * 16 * 24  # every feature pixel (1/4 resolution) was used
    for name in ("moment_sums", "moment_outer", "subspace_means", "error_sums", "error_sq_sums"):
        torch.testing.assert_close(rank0[name], one[name], rtol=1e-10, atol=1e-9, msg=name)
    projector_one = one["subspace_bases"] @ one["subspace_bases"].transpose(1, 2)
    projector_two = rank0["subspace_bases"] @ rank0["subspace_bases"].transpose(1, 2)
    torch.testing.assert_close(projector_two, projector_one, rtol=0, atol=1e-7)
    torch.testing.assert_close(rank0["error_mean"], one["error_mean"], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(rank0["error_std"], one["error_std"], rtol=1e-7, atol=1e-9)
    _assert_same_evaluation(runs[1]["metrics"], runs[2]["metrics"], exact_scores=("msp", "maxlogit", "entropy"))


DUAL_DECODER = "configs/demo/dual_decoder.yaml"


@pytest.fixture(scope="module")
def dual_decoder_unfitted(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch dual-decoder run's checkpoint of epoch 1: it holds the epoch statistics of epoch
    0, and no post-hoc statistics (it was saved at validation, before training ended)."""
    out = tmp_path_factory.mktemp("dual_decoder")
    args = [*cli_args(data_root, out, config=DUAL_DECODER), "--trainer.max_epochs=2", "--checkpoint.save_top_k=-1"]
    assert main.main(["fit", *args]) == 0
    (path,) = checkpoint_dir(out).glob("best-epoch1-*.ckpt")
    return path


@pytest.mark.slow
def test_ddp_dual_decoder_test_and_posthoc_statistics_equal_one_process(
    data_root: Path, dual_decoder_unfitted: Path, tmp_path: Path
) -> None:
    """``test`` of a dual-decoder checkpoint without the post-hoc SML statistics of its semantic
    logits: both runs fit them (11 training images, 6 + 5 on 2 processes), then evaluate."""
    state = load(dual_decoder_unfitted)["state_dict"]
    assert not bool(state["posthoc_fitted"]) and bool(state["class_valid"].any())
    runs = _run_one_and_two_processes(DUAL_DECODER, data_root, [f"--ckpt_path={dual_decoder_unfitted}"], tmp_path)
    one, (rank0, rank1) = runs[1]["buffers"][0], runs[2]["buffers"]
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
    for name in EpochStatistics.STATISTICS:  # from the checkpoint, untouched by test
        assert torch.equal(one[name], state[name]) and torch.equal(rank0[name], state[name]), name
    assert bool(one["posthoc_fitted"]) and bool(rank0["posthoc_fitted"])
    assert torch.equal(one["sml.counts"], rank0["sml.counts"])
    assert one["sml.counts"].sum() == 11 * 64 * 96  # every training pixel, none twice
    for name in ("sml.sums", "sml.sq_sums", "sml.means", "sml.stds"):
        torch.testing.assert_close(rank0[name], one[name], rtol=1e-12, atol=1e-12, msg=name)
    exact = ("dual_decoder", "sml", "msp", "maxlogit", "entropy")
    _assert_same_evaluation(runs[1]["metrics"], runs[2]["metrics"], exact_scores=exact)


@pytest.mark.slow
def test_ddp_dual_decoder_epoch_statistics_equal_one_process(data_root: Path, tmp_path: Path) -> None:
    """2 epochs of ``fit`` on 2 gloo processes (3 steps of 2 images per process and epoch), and 1
    process that replays the same batches with ``accumulate_grad_batches=2``: at every step rank
    0's batch, then rank 1's. The per-epoch statistics (summed across processes at epoch end)
    equal the 1-process ones, epoch 1's computed by the network after its optimizer steps.

    What makes the runs comparable: the same initial weights (seed); no augmentation, and
    injection seeded per (seed, epoch, sample); every forward pass sees the same 2 images in both
    runs, so batch norm normalizes over the same batch; dropout seeded per batch (EpochStatistics);
    and DDP's gradient, the mean of the two processes' gradients, is what accumulating the two
    batches' losses halved gives. Only the batch-norm running statistics differ (DDP copies rank
    0's to rank 1 before every step), and training never reads them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as _run_one_and_two_processes
    common = ["--trainer.max_epochs=2", "--data.batch_size=2", "--data.train_augment=false"]
    outs = {world: tmp_path / f"world{world}" for world in (1, 2)}

    def fit(world: int, extra: list[str], *callbacks: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
        out = outs[world]
        record = ("EpochStatistics", {"directory": str(out / "epochs")})
        command = [sys.executable, "main.py", "fit", *cli_args(data_root, out, config=DUAL_DECODER), *common, *extra]
        command.append(callbacks_arg(record, *callbacks))
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        return [torch.load(out / "epochs" / f"rank{r}.pt", weights_only=True) for r in range(world)]

    rank0, rank1 = fit(2, ["--trainer.strategy=ddp", "--trainer.devices=2"])
    replay = [
        [batch for pair in zip(*steps, strict=True) for batch in pair]
        for steps in zip(rank0["names"], rank1["names"], strict=True)
    ]
    assert [len(batches) for batches in replay] == [6, 6]
    # The training sampler pads 11 images to 12: every image is seen, one of them twice.
    assert all(len({name for batch in batches for name in batch}) == 11 for batches in replay)
    (one,) = fit(1, ["--trainer.accumulate_grad_batches=2"], ("ReplayTrainBatches", {"batches": replay}))
    assert one["names"] == replay

    for epoch in range(2):
        summed = {name: rank0["accumulators"][epoch][name] + rank1["accumulators"][epoch][name]
                  for name in EpochStatistics.ACCUMULATORS}  # fmt: skip
        whole = one["accumulators"][epoch]
        assert whole["sem_counts"].sum() > 0
        for name in ("sem_counts", "emb_counts"):
            assert torch.equal(summed[name], whole[name]), (epoch, name)
        for name in ("sem_sums", "sem_sq_sums", "emb_sums"):
            torch.testing.assert_close(summed[name], whole[name], rtol=1e-12, atol=1e-12, msg=f"{epoch} {name}")
        two = rank0["statistics"][epoch]
        assert bool(two["class_valid"].any())
        for name in EpochStatistics.STATISTICS:
            assert torch.equal(two[name], rank1["statistics"][epoch][name]), (epoch, name)  # all-reduced
        assert torch.equal(two["class_valid"], one["statistics"][epoch]["class_valid"])
        for name in ("class_means", "class_stds", "prototypes"):
            torch.testing.assert_close(two[name], one["statistics"][epoch][name], rtol=1e-12, atol=1e-12)
    # The two runs took the same optimizer steps.
    weights = {world: load(checkpoint_dir(out) / "last.ckpt")["state_dict"] for world, out in outs.items()}
    for name, value in weights[1].items():
        if name.startswith("net.") and "running_" not in name and "num_batches_tracked" not in name:
            torch.testing.assert_close(weights[2][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_ddp_dual_decoder_checkpoint_within_an_epoch_holds_all_processes_sums(data_root: Path, tmp_path: Path) -> None:
    """A checkpoint written by 2 processes in the middle of an epoch (step 2 of 3) holds the sum of
    both processes' epoch accumulators (rank 0's alone would lose rank 1's pixels); resumed from
    it on 2 processes, rank 0 starts from that sum and rank 1 from zero (each starting from the
    sum would count it twice), and the epoch's total counts every pixel once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--trainer.max_epochs=1", "--data.batch_size=2", "--data.train_augment=false"]
    common += ["--trainer.strategy=ddp", "--trainer.devices=2"]

    def fit(out: Path, extra: list[str]) -> list[dict[str, Any]]:
        command = [sys.executable, "main.py", "fit", *cli_args(data_root, out, config=DUAL_DECODER), *common, *extra]
        command.append(callbacks_arg(("EpochStatistics", {"directory": str(out / "epochs")})))
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        return [torch.load(out / "epochs" / f"rank{r}.pt", weights_only=True) for r in range(2)]

    first = tmp_path / "first"
    keep = ["--checkpoint.every_n_train_steps=2", "--checkpoint.save_top_k=-1", "--checkpoint.monitor=null"]
    ranks = fit(first, [*keep, "--checkpoint.filename=s{step}"])
    assert [len(r["steps"]) for r in ranks] == [3, 3]
    saved = load(checkpoint_dir(first) / "s2.ckpt")["state_dict"]
    for name in EpochStatistics.ACCUMULATORS:
        assert torch.equal(saved[name], ranks[0]["steps"][1][name] + ranks[1]["steps"][1][name]), name
    assert saved["sem_counts"].sum() > 0

    resumed = fit(tmp_path / "resumed", [f"--ckpt_path={checkpoint_dir(first) / 's2.ckpt'}"])
    for name in EpochStatistics.ACCUMULATORS:
        assert torch.equal(resumed[0]["restored"][name], saved[name]), name
        assert not resumed[1]["restored"][name].any(), name
    # Each process runs the one step left, on its own shard's third batch (the loader skips the
    # two already done). Embedding counts (every known pixel, whatever the weights) of the epoch
    # are then those of the uninterrupted run.
    assert [r["names"] for r in resumed] == [[r["names"][0][2:]] for r in ranks]
    counts = [r["accumulators"][0]["emb_counts"] for r in resumed]
    uninterrupted = [r["accumulators"][0]["emb_counts"] for r in ranks]
    assert torch.equal(counts[0] + counts[1], uninterrupted[0] + uninterrupted[1])
    for name in EpochStatistics.STATISTICS:
        assert torch.equal(resumed[0]["statistics"][0][name], resumed[1]["statistics"][0][name]), name


# --------------------------------------------------------------------------------------- 4. numerical faults
@pytest.mark.parametrize(
    ("bad_step", "checkpointing", "last_good_step"),
    [
        # last.ckpt after every step (Lightning writes the first one at step 3, once val/miou
        # exists): caught by the check before the step-5 checkpoint is written.
        (5, ["--checkpoint.every_n_train_steps=1"], 4),
        # last.ckpt after each validation: caught by the check before epoch 1's validation.
        (3, [], 2),
    ],
)
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    bad_step: int,
    checkpointing: list[str],
    last_good_step: int,
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "nan"
    code = main.main(
        [
            "fit",
            *cli_args(data_root, out),
            "--trainer.max_epochs=3",
            *checkpointing,
            "--nonfinite.check_every_n_steps=100",  # only the checks before saving / validation act
            callbacks_arg(("NaNInputAt", {"step": bad_step})),
        ]
    )
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    epoch, batch = divmod(bad_step - 1, STEPS_PER_EPOCH)
    last = checkpoint_dir(out) / "last.ckpt"
    assert line == (
        f"error: training loss is nan at global step {bad_step} (epoch {epoch}, batch {batch}); training stopped, "
        f"'{last}' was written before it and is kept. Lower model.init_args.lr, check the inputs, or train in "
        "32-bit precision"
    )
    assert load(last)["global_step"] == last_good_step
    for path in checkpoint_dir(out).glob("*.ckpt"):
        checkpoint = load(path)
        assert checkpoint["global_step"] < bad_step and parameters_finite(checkpoint), path.name


class _NaNScores(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 2

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        score = torch.zeros(batch["mask"].shape)
        score[:, 1, 2] = float("nan")
        return {"logits": torch.zeros(score.shape[0], 2, *score.shape[1:]), "scores": {"broken": score}}


def test_nan_anomaly_scores_fail_evaluation_with_a_clear_message(tmp_path: Path) -> None:
    from callbacks.evaluation import AnomalyEvaluation

    mask = torch.zeros(2, 8, 8, dtype=torch.long)
    mask[:, :2] = 13
    loader = DataLoader([{"image": torch.zeros(3, 8, 8), "mask": m} for m in mask], batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, callbacks=[AnomalyEvaluation(output_dir=str(tmp_path))],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"anomaly scores contain 2 NaN values at non-ignored pixels"):
        trainer.test(_NaNScores(), dataloaders=loader, verbose=False)
    assert not (tmp_path / "metrics.json").exists()


# --------------------------------------------------------------------------------------- 5. long runs
HEIGHT, WIDTH = 720, 1280


class _Frames(Dataset):
    """1500 full-resolution frames from 8 label maps: classes 0/1, anomaly squares, ignored rows."""

    def __init__(self, count: int) -> None:
        self.count = count
        rows, cols = torch.arange(HEIGHT)[:, None], torch.arange(WIDTH)[None, :]
        self.masks = []
        for k in range(8):
            mask = ((rows // 48 + cols // 64 + k) % 2).long()
            mask[:16] = 255
            top, left = 40 + 70 * k, 60 + 140 * k
            mask[top : top + 90, left : left + 120] = 13
            self.masks.append(mask)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = torch.full((3, HEIGHT, WIDTH), (index % 97) / 97.0)
        return {"image": image, "mask": self.masks[index % 8]}


class _StandIn(AnomalySegmentationModule):
    """The method contract with ready-made outputs instead of a network: 2 classes, one score."""

    method_name = "stand_in"

    def __init__(self) -> None:
        super().__init__(num_classes=2)
        self.field = torch.rand(HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))

    def segment(self, image: torch.Tensor) -> MethodOutput:
        # Channels-last logits, as a model with channels_last: true returns them (an argmax over
        # NCHW logits alone costs ~80 ms per frame on CPU).
        logits = torch.zeros(image.shape[0], HEIGHT, WIDTH, 2).permute(0, 3, 1, 2)
        logits[:, 1] = self.field
        return MethodOutput(logits, {"score": self.field + image[:, 0]})


class _RssProbe(L.Callback):
    """Resident memory after every test batch, and the bytes the heatmap logger holds (for the report)."""

    def __init__(self, heatmaps: Any) -> None:
        self.heatmaps = heatmaps
        self.samples: list[tuple[int, int, int]] = []
        self.images = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def held_by_heatmaps(self) -> int:
        # Captured images wait on the host for the epoch's threshold (panel 5).
        captures = [c for pending in self.heatmaps._pending.values() for c in pending]
        return sum(c.nbytes for c in captures)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self.images += batch["mask"].shape[0]
        self.samples.append((self.images, self.rss(), self.held_by_heatmaps()))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_1500_full_resolution_images_stream_through_evaluation_in_flat_memory(tmp_path: Path) -> None:
    """The whole StreetHazards test split's size (1500 x 720 x 1280 = 1.4e9 pixels) through
    AnomalyEvaluation and AnomalyHeatmapLogger (2 images of every 10th batch, so that its cap of
    16 captured images per split is reached at batch 70 of 375): after the first 100 images, the
    process's resident memory may not grow by more than 150 MB in all, heatmap captures included.
    The cheap path: 2 classes, one score, no per-class false-positive histogram (~0.13 s per frame
    on CPU), ready-made outputs; batches of 4."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks.evaluation import AnomalyEvaluation
    from callbacks.visualization import AnomalyHeatmapLogger

    count, heatmaps = 1500, AnomalyHeatmapLogger(every_n_batches=10)
    probe = _RssProbe(heatmaps)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path), name="stream", version="run"),
        callbacks=[AnomalyEvaluation(output_dir=str(tmp_path), per_class_false_positives=False), heatmaps, probe],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    dataset = _Frames(count)
    start = time.perf_counter()
    trainer.test(_StandIn(), dataloaders=DataLoader(dataset, batch_size=4), verbose=False)
    elapsed = time.perf_counter() - start

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    valid = sum(int((dataset.masks[i % 8] != 255).sum()) for i in range(count))
    anomalous = sum(int((dataset.masks[i % 8] == 13).sum()) for i in range(count))
    assert metrics["num_images"] == count
    assert (metrics["num_valid_pixels"], metrics["num_anomaly_pixels"]) == (valid, anomalous)
    assert 0.0 < metrics["aupr"] < 1.0 and math.isfinite(metrics["auroc"])

    samples = np.array(probe.samples, dtype=np.int64)
    seen, rss, held = samples[:, 0], samples[:, 1], samples[:, 2]
    window = (seen >= 80) & (seen <= 120)
    baseline = rss[window].max()
    growth = rss[seen > 120].max() - baseline
    # At the end: the cap's 16 images (of the 76 that 38 logged batches offer), 9 bytes per pixel.
    assert held[-1] == heatmaps.max_captures * 360 * 640 * 9
    print(
        f"{count} frames in {elapsed:.0f} s ({1e3 * elapsed / count:.0f} ms/frame); RSS at 100 frames "
        f"{baseline / 2**20:.0f} MiB, at the end {rss[-1] / 2**20:.0f} MiB, peak after 100 frames "
        f"{rss[seen > 120].max() / 2**20:.0f} MiB: growth {growth / 2**20:.0f} MiB in all, of which heatmap "
        f"captures held at the end {held[-1] / 2**20:.1f} MiB ({heatmaps.max_captures} images, "
        f"{held[-1] / heatmaps.max_captures / 2**20:.2f} MiB each)"
    )
    assert growth < 150 * 2**20

    # The probe sees memory that is really held: 256 MiB touched show up.
    before = _RssProbe.rss()
    block = torch.ones(256 * 2**20 // 4)
    assert _RssProbe.rss() - before > 200 * 2**20
    del block


# --------------------------------------------------------------------------------------- 6. bad input
#: Each case runs main.py as its own process (forked from one that imported main once, to save the
#: 4 s import per case; test_bad_input_runner_matches_a_real_subprocess checks the emulation).
_RUNNER = textwrap.dedent(
    """
    import json, os, sys, traceback
    repo, cases_file, out_dir = sys.argv[1:4]
    os.chdir(repo)
    sys.path.insert(0, repo)
    import main

    codes = {}
    for name, argv in json.loads(open(cases_file).read()).items():
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # what `python main.py *argv` does, interpreter exit included
            os.dup2(os.open(os.path.join(out_dir, name + ".err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.argv = ["main.py", *argv]
            try:
                code = main.main()
            except SystemExit as stop:
                code = stop.code
                if code is None:
                    code = 0
                elif not isinstance(code, int):
                    print(code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        codes[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    json.dump(codes, open(os.path.join(out_dir, "codes.json"), "w"))
    """
)


def _bad_input_cases(root: Path, work: Path, sml_checkpoint: Path) -> dict[str, tuple[str, str, list[str], str]]:
    """name -> (fault, entry point, arguments, text the error must contain)."""
    sml, fre = str(REPO / "configs/demo/sml.yaml"), str(REPO / "configs/demo/fre.yaml")
    truncated = work / "truncated.ckpt"
    truncated.write_bytes(sml_checkpoint.read_bytes()[:1_000_000])
    a_file = work / "a_file"
    a_file.write_text("not a folder")
    empty, images = work / "empty", work / "images"
    empty.mkdir()
    images.mkdir()
    shutil.copy(next((root / "test").rglob("*.png")), images / "frame.png")
    run = [*cli_args(root, work / "runs"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"]
    other = work / "other"  # its last.ckpt is the SML checkpoint; the FRE config logs into the same folder
    checkpoint_dir(other).mkdir(parents=True)
    shutil.copy(sml_checkpoint, checkpoint_dir(other) / "last.ckpt")
    ck = f"--ckpt_path={sml_checkpoint}"
    compare_out = f"--output_dir={work / 'compare'}"
    return {
        "fit_missing_root": ("missing dataset folder", "fit", ["fit", *run, "--data.root=/nonexistent/sh"],
                             "StreetHazards root '/nonexistent/sh' does not exist"),
        "fit_missing_config": ("missing config file", "fit", ["fit", "--config=/nonexistent/sml.yaml"],
                               "File does not exist: '/nonexistent/sml.yaml'"),
        "fit_wrong_type": ("wrong type (`--data.batch_size=abc`)", "fit", ["fit", *run, "--data.batch_size=abc"],
                           'Parser key "data.batch_size"'),
        "fit_bad_value": ("invalid value (`--data.batch_size=0`)", "fit", ["fit", *run, "--data.batch_size=0"],
                          "data.batch_size must be >= 1, got 0"),
        "fit_unknown_method": ("unknown method (`--model=NoSuchMethod`)", "fit",
                               ["fit", *run, "--model=NoSuchMethod"], "NoSuchMethod"),
        "fit_unknown_option": ("unknown option (`--model.init_args.no_such_option=1`)", "fit",
                               ["fit", *run, "--model.init_args.no_such_option=1"], "no_such_option"),
        "fit_bad_method_option": ("invalid method option (FRE `--model.init_args.mode=bogus`)", "fit",
                                  ["fit", *run, f"--config={fre}", "--model.init_args.mode=bogus"],
                                  "model.mode must be one of"),
        "fit_other_method_checkpoint": ("checkpoint of another method (FRE config, SML checkpoint)", "fit",
                                        ["fit", *run, f"--config={fre}", ck],
                                        "was written by method sml (lightning_modules.sml.SMLSegmenter), not fre"),
        "fit_truncated_checkpoint": ("truncated checkpoint as explicit `--ckpt_path`", "fit",
                                     ["fit", *run, f"--ckpt_path={truncated}"],
                                     f"checkpoint '{truncated}' cannot be loaded safely"),
        "fit_resume_past_max_epochs": ("resume with `max_epochs` below the checkpoint's epoch", "fit",
                                       ["fit", *run, ck], "You restored a checkpoint with current_epoch=2"),
        "fit_output_not_a_folder": ("output folder cannot be created", "fit",
                                    ["fit", *run, f"--trainer.default_root_dir={a_file / 'out'}",
                                     f"--trainer.logger.init_args.save_dir={a_file / 'out'}"], "Not a directory"),
        "validate_missing_checkpoint": ("missing checkpoint", "validate",
                                        ["validate", *run, "--ckpt_path=/nonexistent/model.ckpt"],
                                        "checkpoint '/nonexistent/model.ckpt' does not exist"),
        "test_missing_checkpoint": ("missing checkpoint", "test", ["test", *run, "--ckpt_path=/nonexistent/model.ckpt"],
                                    "checkpoint '/nonexistent/model.ckpt' does not exist"),
        "test_other_method_checkpoint": ("checkpoint of another method (FRE config, SML checkpoint)", "test",
                                         ["test", *run, f"--config={fre}", ck],
                                         "was written by method sml (lightning_modules.sml.SMLSegmenter), not fre"),
        "test_last_of_other_method": ("`--ckpt_path last` finds another method's checkpoint", "test",
                                      ["test", *cli_args(root, other, config="configs/demo/fre.yaml"),
                                       "--ckpt_path=last"], "was written by method sml"),
        "test_truncated_checkpoint": ("truncated checkpoint", "test", ["test", *run, f"--ckpt_path={truncated}"],
                                      f"checkpoint '{truncated}' cannot be loaded safely"),
        "test_other_class_set": ("checkpoint of another class set (`--data.ignore_unlabeled=true`)", "test",
                                 ["test", *run, ck, "--data.ignore_unlabeled=true"],
                                 "'net.model.segmentation_head.0.weight': [13, 256, 1, 1] in the checkpoint, "
                                 "[12, 256, 1, 1] here"),
        "test_missing_init_checkpoint": ("missing `init_checkpoint`", "test",
                                         ["test", *run, f"--config={fre}",
                                          "--model.init_args.init_checkpoint=/nonexistent/model.ckpt"],
                                         "checkpoint '/nonexistent/model.ckpt' does not exist"),
        "test_wrong_type": ("wrong type (`--data.eval_batch_size=abc`)", "test",
                            ["test", *run, "--data.eval_batch_size=abc"], "eval_batch_size"),
        "predict_missing_folder": ("missing image folder", "predict",
                                   ["predict", *run, ck, "--data.predict_dir=/nonexistent/images"],
                                   "predict_dir '/nonexistent/images' does not exist or is not a folder"),
        "predict_no_folder": ("no image folder given", "predict", ["predict", *run, ck],
                              "predict needs data.predict_dir"),
        "predict_empty_folder": ("folder without images", "predict",
                                 ["predict", *run, ck, f"--data.predict_dir={empty}"], "contains no .png/.jpg images"),
        "predict_other_method_checkpoint": ("checkpoint of another method (FRE config, SML checkpoint)", "predict",
                                            ["predict", *run, f"--config={fre}", ck, f"--data.predict_dir={images}"],
                                            "was written by method sml"),
        "compare_missing_config": ("missing comparison config", "compare",
                                   ["compare", "--config=/nonexistent/compare.yaml"],
                                   "File does not exist: '/nonexistent/compare.yaml'"),
        "compare_missing_method_config": ("missing method config", "compare",
                                          ["compare", compare_out, '--methods={"sml": "/nonexistent/sml.yaml"}'],
                                          "config of method 'sml' not found: /nonexistent/sml.yaml"),
        "compare_wrong_type": ("wrong type (`--num_examples=abc`)", "compare",
                               ["compare", compare_out, "--num_examples=abc"], 'Parser key "num_examples"'),
        "compare_unknown_reuse": ("reuses a method that is not run", "compare",
                                  ["compare", compare_out, f'--methods={{"fre": "{fre}"}}',
                                   '--reuse_segmenter={"fre": "sml"}'], "which is not in --methods"),
        "compare_unknown_init": ("starts from a method that is not run", "compare",
                                 ["compare", compare_out, f'--methods={{"dual_decoder": "{REPO / DUAL_DECODER}"}}'],
                                 "starts from the network of 'sml', which is not a method trained from scratch"),
        "compare_unknown_method": ("unknown method in the overrides", "compare",
                                   ["compare", compare_out, f'--methods={{"sml": "{sml}"}}',
                                    '--overrides=["--model=NoSuchMethod"]'], "NoSuchMethod"),
        "download_no_root": ("no `--root`", "download", ["download"], "the following arguments are required: --root"),
        "download_wrong_type": ("wrong type (`--retries=abc`)", "download",
                                ["download", f"--root={work / 'dl'}", "--retries=abc"], "invalid int value: 'abc'"),
        "download_root_not_a_folder": ("root cannot be created", "download",
                                       ["download", f"--root={a_file / 'sh'}", "--no_progress"], "Not a directory"),
        "download_unreachable": ("server unreachable", "download",
                                 ["download", f"--root={work / 'dl'}", "--splits", "train", "--no_progress",
                                  "--retries=0", "--train_url=http://127.0.0.1:9/streethazards_train.tar"],
                                 "cannot reach http://127.0.0.1:9/streethazards_train.tar"),
        "no_subcommand": ("no subcommand", "main.py", [], "no subcommand given; pick one of fit, validate"),
        "unknown_subcommand": ("unknown subcommand (`train`)", "main.py", ["train"], "invalid choice: 'train'"),
    }  # fmt: skip


@pytest.fixture(scope="module")
def bad_input(data_root: Path, trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("bad_input")
    cases = _bad_input_cases(data_root, work, trained["last"])
    (work / "cases.json").write_text(json.dumps({name: case[2] for name, case in cases.items()}))
    runner = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(REPO), str(work / "cases.json"), str(work)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert runner.returncode == 0, runner.stderr[-3000:]
    codes = json.loads((work / "codes.json").read_text())
    return {
        name: {"case": case, "code": codes[name], "stderr": (work / f"{name}.err").read_text()}
        for name, case in cases.items()
    } | {"_work": work, "_cases": cases}


def _error_block(stderr: str) -> list[str]:
    """The lines from the first error line on (`error: ...`, or argparse's `prog: error: ...`)."""
    lines = stderr.rstrip().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error: ") or ": error: " in line:
            return lines[i:]
    return []


BAD_INPUT = [
    "fit_missing_root", "fit_missing_config", "fit_wrong_type", "fit_bad_value", "fit_unknown_method",
    "fit_unknown_option", "fit_bad_method_option", "fit_other_method_checkpoint", "fit_truncated_checkpoint",
    "fit_resume_past_max_epochs", "fit_output_not_a_folder", "validate_missing_checkpoint",
    "test_missing_checkpoint", "test_other_method_checkpoint", "test_last_of_other_method", "test_truncated_checkpoint",
    "test_other_class_set", "test_missing_init_checkpoint", "test_wrong_type", "predict_missing_folder",
    "predict_no_folder",
    "predict_empty_folder", "predict_other_method_checkpoint", "compare_missing_config",
    "compare_missing_method_config", "compare_wrong_type", "compare_unknown_reuse", "compare_unknown_init",
    "compare_unknown_method",
    "download_no_root", "download_wrong_type", "download_root_not_a_folder", "download_unreachable",
    "no_subcommand", "unknown_subcommand",
]  # fmt: skip


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_exits_non_zero_with_one_clear_error(name: str, bad_input: dict[str, Any]) -> None:
    result = bad_input[name]
    _, _, _, expected = result["case"]
    stderr = result["stderr"]
    assert result["code"] == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    block = _error_block(stderr)
    # Our errors are one line; jsonargparse explains a rejected value in a few more.
    assert 1 <= len(block) <= 10, stderr[-3000:]
    assert expected in "\n".join(block), block


def test_every_bad_input_case_is_checked(bad_input: dict[str, Any]) -> None:
    assert sorted(BAD_INPUT) == sorted(bad_input["_cases"])


def test_bad_input_runner_matches_a_real_subprocess(bad_input: dict[str, Any]) -> None:
    """The forked runner reports what `python main.py ...` itself prints and returns."""
    for name in ("test_truncated_checkpoint", "fit_wrong_type"):
        argv = bad_input["_cases"][name][2]
        real = subprocess.run([sys.executable, "main.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert real.returncode == bad_input[name]["code"]
        assert _error_block(real.stderr) == _error_block(bad_input[name]["stderr"])

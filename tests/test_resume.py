"""Killed and preempted runs resume where they stopped; the log folder is fixed."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from tests.helpers import (
    REPO,
    STEPS_PER_EPOCH,
    ForkedMain,
    callbacks_arg,
    checkpoint_dir,
    cli_args,
    free_port,
    load,
    method_config_args,
    mtime,
    run_forked_main,
    wait_for,
)


# --------------------------------------------------------------------------------------- 1. SIGKILL
@pytest.mark.slow
def test_sigkill_during_fit_then_resume_reaches_full_step_count(data_root: Path, tmp_path: Path) -> None:
    """Killed three times while last.ckpt is rewritten every step: at a random moment of a step,
    in the middle of a checkpoint write, and at a random moment again. Every kill leaves a
    loadable last.ckpt, each restart continues from it, the last run ends at the full step
    count, and no partial checkpoint is left behind."""
    out, epochs = tmp_path / "kill", 8  # 24 steps: three kills after 2-4 writes each stay below it
    command = [
        "fit", *cli_args(data_root, out),
        f"--trainer.max_epochs={epochs}", "--checkpoint.every_n_train_steps=1", "--ckpt_path=last",
    ]  # fmt: skip
    folder = checkpoint_dir(out)
    last = folder / "last.ckpt"

    def temporaries() -> list[Path]:
        return [p for p in folder.iterdir() if p.name.endswith(".tmp")] if folder.is_dir() else []

    rng = random.Random(20240607)
    steps_at_kill: list[int] = []
    for attempt, moment in enumerate(("random", "mid-write", "random")):
        # each run: `python main.py fit ...`, forked from this process (no second import)
        proc = ForkedMain(command, tmp_path / f"kill{attempt}.log")
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

    code, output = run_forked_main(command, tmp_path / "finished.log")
    assert code == 0, output[-3000:]
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

    with caplog.at_level("WARNING", logger="lightning_modules.checkpoints"):
        code = main.main(["fit", *cli_args(data_root, out), "--trainer.max_epochs=3", "--ckpt_path=last"])
    assert code == 0
    assert f"'{last}' is unreadable; resuming from '{best}' instead" in caplog.text
    assert load(last)["global_step"] == 3 * STEPS_PER_EPOCH


# --------------------------------------------------------------------------------------- 2. preemption
@pytest.mark.slow
def test_sigterm_saves_last_and_the_same_command_resumes_in_the_same_folder(data_root: Path, tmp_path: Path) -> None:
    """``kill -TERM`` from outside, then the requeued job's identical command. On this tiny run the
    signal often lands in a validation pass, which finishes; the checkpoint is saved at the end of
    the next training batch (a signal during a training batch: test_signal_in_a_batch_saves_...)."""
    out, epochs = tmp_path / "preempted", 3
    command = ["fit", *cli_args(data_root, out), f"--trainer.max_epochs={epochs}"]
    command.append("--ckpt_path=last")  # what a requeued job runs, the first time too
    last = checkpoint_dir(out) / "last.ckpt"
    # `python main.py fit ...`, forked from this process (no second import); stdout and stderr
    # both go to its log, whose last line is the one the command ends with
    proc = ForkedMain(command, tmp_path / "term.log")
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
    code, output = run_forked_main(command, tmp_path / "resumed.log")
    assert code == 0, output[-3000:]
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


def test_a_stopping_command_ignores_further_stop_signals_until_it_exits(data_root: Path, tmp_path: Path) -> None:
    """``python main.py`` (no argv: the process's own command) that stopped on SIGUSR1 keeps ignoring
    SIGUSR1 and SIGTERM until it exits: a second warning to a rank that had finished stopping
    (SLURM signals every task, not all at the same instant) used to end it with -10 instead of 138."""
    out = tmp_path / "stopping"
    argv = ["fit", *cli_args(data_root, out), "--trainer.max_epochs=3"]
    argv.append(callbacks_arg(("SignalAt", {"step": 3, "signum": int(signal.SIGUSR1)})))
    proc = ForkedMain(argv, tmp_path / "stopping.log")  # main.main() with sys.argv, as `python main.py`
    code = proc.wait(300)
    output = (tmp_path / "stopping.log").read_text()
    assert code == 128 + signal.SIGUSR1, output[-3000:]
    assert "stopped: training stopped by SIGUSR1 after global step 3" in output
    # In a process that outlives main.main (this one), the earlier handlers come back instead.
    from callbacks.guards import PreemptionCheckpoint

    guard = PreemptionCheckpoint()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    for ignore, expected in ((False, handlers), (True, dict.fromkeys(handlers, signal.SIG_IGN))):
        guard.ignore_signals_after_stop = ignore
        guard._install()
        guard.received = int(signal.SIGUSR1)
        guard._uninstall()
        assert {s: signal.getsignal(s) for s in handlers} == expected
        for s, handler in handlers.items():
            signal.signal(s, handler)
        guard.received = None


def test_the_preemption_handler_records_and_calls_the_earlier_handlers_but_not_lightnings() -> None:
    """During training the handler only records the signal: Lightning's own handlers (SLURM
    auto-requeue's in-handler checkpoint, its SIGTERM broadcast) are dropped from the chain, a
    handler that was there before Lightning wrapped it is still called."""
    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose, _SignalConnector

    from callbacks.guards import PreemptionCheckpoint

    calls = []
    connector = _SignalConnector.__new__(_SignalConnector)  # no trainer: calling its handlers would raise
    callback = PreemptionCheckpoint()
    callback._previous = {
        signal.SIGUSR1: _HandlersCompose([connector._slurm_sigusr_handler_fn]),
        signal.SIGTERM: _HandlersCompose([connector._sigterm_notifier_fn, lambda s, f: calls.append(s)]),
    }
    callback._handler(signal.SIGUSR1, None)
    callback._handler(signal.SIGTERM, None)
    assert callback.received == signal.SIGUSR1 and calls == [signal.SIGTERM]


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


FAKE_SRUN = """#!{python}
# srun for the tests: SLURM_NTASKS copies of the command with the variables srun gives each task,
# each in a process group of its own (the test signals a whole group, rank and loader workers,
# as SLURM signals a job step); writes their pids, then their exit codes; exits with the highest.
import os, subprocess, sys
tasks = []
for rank in range(int(os.environ["SLURM_NTASKS"])):
    env = {{**os.environ, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0"}}
    tasks.append(subprocess.Popen(sys.argv[1:], env=env, start_new_session=True))
with open(os.environ["FAKE_SRUN_LOG"], "w") as log:
    log.write(" ".join(str(task.pid) for task in tasks) + "\\n")
codes = [task.wait() for task in tasks]
with open(os.environ["FAKE_SRUN_LOG"], "a") as log:
    log.write(" ".join(map(str, codes)) + "\\n")
sys.exit(max(code if code >= 0 else 128 - code for code in codes))
"""


@pytest.mark.slow
def test_slurm_preemption_under_ddp_saves_once_exits_138_is_requeued_and_resumes(
    data_root: Path, tmp_path: Path
) -> None:
    """``configs/slurm.sbatch`` with the shipped ``configs/trainer/slurm.yaml`` (on CPU: gloo, fp32)
    and two tasks started as srun starts them (SLURM's variables, one process group each, one
    loader worker each). SIGUSR1 goes to every process of rank 1's group, then of rank 0's, as
    ``--signal=SIGUSR1@90`` does: both ranks stop after the same step (the one rank 1's signal
    reached, or a later one), last.ckpt holds that step, no other checkpoint is written (Lightning's
    in-handler save is off), both exit with 138, the loader workers survive the signal, and the
    script requeues the job. The requeued job's identical command continues to the full step count.
    Each process gets 6 of the 11 training images (the training sampler pads): one step per epoch."""
    epochs = 4
    out = tmp_path / "slurm"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    args = [
        *cli_args(data_root, out), "--config=configs/trainer/slurm.yaml", "--trainer.accelerator=cpu",
        "--trainer.devices=2", "--trainer.num_nodes=1", "--trainer.precision=32-true", "--trainer.benchmark=false",
        "--trainer.sync_batchnorm=false", f"--trainer.max_epochs={epochs}", "--data.num_workers=1",
        "--preemption.check_every_n_steps=1",
    ]  # fmt: skip
    env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "streethazards-test", "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODELIST": "127.0.0.1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "FAKE_SRUN_LOG": str(tmp_path / "srun.log"),
    }  # fmt: skip
    command = ["bash", "configs/slurm.sbatch", *args]
    last = checkpoint_dir(out) / "last.ckpt"
    with open(tmp_path / "job1.log", "wb") as log:
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(last.exists, job, 240, "the first epoch's checkpoint")
        pids = [int(pid) for pid in (tmp_path / "srun.log").read_text().split()]
        workers = {pid: _children(pid) for pid in pids}
        os.killpg(pids[1], signal.SIGUSR1)
        time.sleep(0.3)
        os.killpg(pids[0], signal.SIGUSR1)
        job.wait(timeout=240)
    output = (tmp_path / "job1.log").read_text()
    assert job.returncode == 0, output[-3000:]
    assert (tmp_path / "srun.log").read_text().splitlines()[1] == "138 138", output[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    steps = {int(m) for m in re.findall(r"stopped: training stopped by SIGUSR1 after global step (\d+)", output)}
    assert len(re.findall("stopped: training stopped by SIGUSR1", output)) == 2 and len(steps) == 1, output[-3000:]
    (step,) = steps
    assert 1 <= step < epochs and load(last)["global_step"] == step
    assert not list(tmp_path.rglob("hpc_ckpt*")) and [p.name for p in checkpoint_dir(out).glob("last*")] == [
        "last.ckpt"
    ]
    # Each rank had a loader worker in its group when the signal came; a worker killed by it would
    # have failed the next batch ("DataLoader worker ... is killed by signal") instead of exit 138.
    assert all(workers.values()) and "DataLoader worker" not in output, workers

    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load(last)["global_step"] == epochs
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # not requeued again


def _children(pid: int) -> list[int]:
    """Process ids of ``pid``'s children (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


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
    configured = main.cli_main([*method_config_args("fre"), f"--data.root={data_root}"], run=False)
    assert Path(configured.trainer.logger.log_dir) == Path("outputs/demo/fre/run")


# --------------------------------------------------------------------------------------- offline
def test_ckpt_path_last_takes_the_checkpoints_options_and_never_downloads(
    data_root: Path, trained: dict[str, Path], tmp_path: Path
) -> None:
    """The real-data configs (ResNet-50, ImageNet weights) with ``--ckpt_path last`` on a machine
    without internet: the checkpoint (a ResNet-18 here, trained from ImageNet weights and an
    init_checkpoint that only existed on the training machine) decides the network, and neither
    the ImageNet weights nor the init_checkpoint are fetched, since its state replaces them."""
    checkpoint = load(trained["last"])
    checkpoint["hyper_parameters"]["encoder_weights"] = "imagenet"
    checkpoint["hyper_parameters"]["init_checkpoint"] = "/training-machine/segmenter.ckpt"
    folder = tmp_path / "out" / "sml" / "run" / "checkpoints"  # the real config's fixed run folder
    folder.mkdir(parents=True)
    torch.save(checkpoint, folder / "last.ckpt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home"), "OMP_NUM_THREADS": "1"}
    real = ["--config=configs/streethazards.yaml", "--config=configs/method/sml.yaml"]
    small = [f"--data.root={data_root}", "--data.num_workers=0", "--data.eval_batch_size=2"]
    small += ["--trainer.enable_progress_bar=false", "--evaluation.num_bits=16"]
    # `test` (predict and a resumed fit build the model through the same CLI path)
    command = [sys.executable, "main.py", "test", *real, *small, "--ckpt_path=last"]
    command.append(f"--trainer.default_root_dir={tmp_path / 'out'}")
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "could not load pretrained weights" not in run.stderr
    metrics = json.loads((tmp_path / "out" / "sml" / "run" / "metrics.json").read_text())
    assert metrics["num_images"] == 7 and metrics["checkpoint"] == str(folder / "last.ckpt")

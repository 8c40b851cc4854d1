"""Guards that keep long training runs recoverable: preemption, numerical faults, wrong checkpoints.

- :class:`PreemptionCheckpoint`: on SIGTERM or SIGUSR1 during ``fit``, save ``last.ckpt`` at a
  training batch boundary all processes agree on (never inside the signal handler) and stop with
  :class:`TrainingPreempted` (exit code ``128 + signal``, the shell's convention for a process
  ended by a signal), so that ``--ckpt_path last`` continues exactly there.
- :class:`NonFiniteLossGuard`: stop on the first NaN/inf training loss with
  :class:`NonFiniteLossError` naming the step and the loss, and never let a checkpoint with
  non-finite weights be written (the last good ``last.ckpt`` stays).
- :func:`check_checkpoint_class` / :func:`check_checkpoint_matches`: refuse a checkpoint written
  by a different method or network before Lightning uses it (one
  :class:`~callbacks.checkpointing.CheckpointError` line instead of a silently swapped method or
  a ``load_state_dict`` traceback).
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

__all__ = [
    "GuardOptionError",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "PreemptionCheckpoint",
    "TrainingPreempted",
    "checkpoint_dir",
    "repair_resume_after_last_batch",
]

log = logging.getLogger(__name__)

#: Temporary files of ``datamodules.io.atomic_open`` for a checkpoint: ``.<name>.ckpt.<12 hex>.tmp``.
_TEMP_CHECKPOINT = re.compile(r"^\..+\.ckpt\.[0-9a-f]{12}\.tmp$")


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` lives: the ModelCheckpoint's folder, else ``<log_dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath)
    logger = trainer.logger
    if logger is not None and logger.log_dir is not None:
        return Path(logger.log_dir) / "checkpoints"
    return Path(trainer.default_root_dir) / "checkpoints"


class GuardOptionError(ValueError):
    """An invalid ``preemption.*`` or ``nonfinite.*`` option (a one-line user error on the command line)."""


# --------------------------------------------------------------------------------------- preemption
class TrainingPreempted(SystemExit):
    """``fit`` stopped on a signal after saving a checkpoint; ``code`` is ``128 + signal number``.

    A ``SystemExit`` so that it ends the process with that code wherever it is raised (also in
    the other DDP processes), and a non-zero code so that ``fit && test`` does not go on to
    evaluate a half-trained network.
    """

    def __init__(self, signum: int, step: int, path: Path | None) -> None:
        name = signal.Signals(signum).name
        saved = f"saved '{path}'" if path is not None else "no checkpoint saved"
        self.message = (
            f"training stopped by {name} after global step {step}; {saved}; "
            "run the same command with --ckpt_path last to continue"
        )
        super().__init__(128 + signum)


class PreemptionCheckpoint(L.Callback):
    """Save ``last.ckpt`` and stop cleanly when the job is asked to stop (SIGTERM, SIGUSR1).

    Schedulers announce the end of a job with a signal: SLURM sends SIGTERM (and, with
    ``--signal=SIGUSR1@90``, SIGUSR1 90 s before the time limit) to every process of the job step;
    ``kill`` and container runtimes send SIGTERM. During training the signal handler only records
    the signal: handlers run between Python bytecodes, anywhere (inside a collective, a backward
    pass, a checkpoint write), so nothing else may happen there. In particular it does not hand
    the signal on to Lightning's handlers, which do exactly that: with a ``SLURMEnvironment(
    auto_requeue=True)`` Lightning saves a checkpoint inside its SIGUSR1 handler on every process,
    which under DDP runs the collectives of the checkpoint hooks at whatever point each process was
    interrupted and hangs the job until its time limit (Lightning issue 21406), and its SIGTERM
    handler broadcasts under DDP from inside the handler. Handlers installed before ``fit`` (which
    Lightning wraps) are still called.

    The processes then agree at a training batch boundary whether any of them received a signal:
    after every batch in a single process (a Python flag, no device work), every
    ``check_every_n_steps`` batches under DDP (one scalar all-reduce read on the host; every
    process counts the same batches, so they all check at the same one). If so, all of them save
    ``<checkpoint dir>/last.ckpt`` together (atomically, through the trainer's checkpoint IO) and
    raise :class:`TrainingPreempted`: the process exits with ``128 + signal`` (143 for SIGTERM, 138
    for SIGUSR1), on which ``configs/slurm.sbatch`` requeues the job, whose identical command
    continues with ``--ckpt_path last``. A signal that arrives during validation takes effect at the
    next training batch; one after the last training batch lets the run finish (exit code 0).

    Under DDP, Lightning's own per-step broadcast of its SIGTERM flag (a collective and a host read
    every step) is switched off during training: that flag is only set by Lightning's handler,
    which this callback replaces while training runs.

    At the start of ``fit``, temporary checkpoint files left by a process killed while writing
    (``.<name>.ckpt.<hex>.tmp``) are deleted from the checkpoint folder.

    Args:
        signals: signal names to handle during training (those the platform lacks are skipped).
        filename: checkpoint name without extension (``last`` is what ``--ckpt_path last`` finds).
        check_every_n_steps: under DDP, training batches between two agreements (a signal is acted
            upon at most this many batches late; SLURM's warning comes 90 s before the end).
    """

    #: Set by ``main.main`` when it is the process's command (``python main.py``): after a stop
    #: signal the handlers become no-ops until the process exits, instead of the defaults coming
    #: back while it finishes (SIGUSR1's default action ends the process: a second signal to a
    #: rank that had already stopped turned its exit code 138 into -10). In-process callers get
    #: their handlers back.
    ignore_signals_after_stop: bool = False

    def __init__(
        self,
        signals: Sequence[str] = ("SIGTERM", "SIGUSR1"),
        filename: str = "last",
        check_every_n_steps: int = 10,
    ) -> None:
        super().__init__()
        if not filename:
            raise GuardOptionError("preemption.filename must not be empty")
        if isinstance(check_every_n_steps, bool) or check_every_n_steps < 1:
            raise GuardOptionError(f"preemption.check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.signal_names = tuple(signals)
        unknown = [name for name in self.signal_names if not name.startswith("SIG") or name in ("SIGKILL", "SIGSTOP")]
        if unknown:
            raise GuardOptionError(f"preemption.signals: cannot handle {unknown}")
        self.filename = filename
        self.check_every_n_steps = int(check_every_n_steps)
        self.received: int | None = None
        self.saved_path: Path | None = None
        self._previous: dict[int, Any] = {}
        self._batches = 0
        self._silenced_loop: Any = None

    # ------------------------------------------------------------------ signal handling
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        # Lightning's handlers are the ones this replaces (see the class docstring); SIG_DFL would
        # end the process (SIGUSR1's default action), SIG_IGN does nothing.
        for handler in _other_handlers(self._previous.get(signum)):
            handler(signum, frame)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works in the main thread
        for name in self.signal_names:
            signum = getattr(signal, name, None)
            if signum is None or signum in self._previous:
                continue
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def _uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            # Only undo our own registration; Lightning restores its handlers itself.
            if signal.getsignal(signum) == self._handler:
                if self.received is not None and self.ignore_signals_after_stop:
                    signal.signal(signum, signal.SIG_IGN)
                else:
                    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _silence_lightning_sigterm_broadcast(self, trainer: L.Trainer) -> None:
        epoch_loop = trainer.fit_loop.epoch_loop
        if trainer.world_size > 1 and callable(getattr(epoch_loop, "_broadcast_sigterm_tensor", None)):
            epoch_loop._broadcast_sigterm_tensor = _nothing  # an instance attribute shadows the method
            self._silenced_loop = epoch_loop

    def _restore_lightning_sigterm_broadcast(self) -> None:
        if self._silenced_loop is not None:
            self._silenced_loop.__dict__.pop("_broadcast_sigterm_tensor", None)
            self._silenced_loop = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self.saved_path = None, None
        if trainer.is_global_zero:
            _remove_temporary_checkpoints(checkpoint_dir(trainer))
        environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            rank_zero_info(
                "PreemptionCheckpoint handles SLURM's SIGUSR1 during training (saves at a batch boundary, exit code "
                "138); SLURMEnvironment(auto_requeue=True) would save inside Lightning's signal handler outside "
                "training: prefer auto_requeue: false and requeue from the batch script (configs/slurm.sbatch)"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its handlers just before the training stage starts; installing
        # ours here (after it) replaces them until the trainer tears down (it restores its own).
        self._batches = 0
        self._install()
        self._silence_lightning_sigterm_broadcast(trainer)
        if repair_resume_after_last_batch(trainer):
            rank_zero_info("PreemptionCheckpoint: resumed after the last batch of an epoch; starting the next one")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        signum = self.received or 0
        if trainer.world_size > 1:
            # Processes receive the signal at different moments; they must save (a collective)
            # and stop at the same batch. No barrier: the all-reduce itself waits for everyone.
            if self._batches % self.check_every_n_steps:
                return
            agreed = torch.tensor([signum], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
            signum = int(agreed.item())
        if not signum:
            return
        path = self._save(trainer, signum)
        raise TrainingPreempted(signum, trainer.global_step, path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_lightning_sigterm_broadcast()
        if not isinstance(exception, SIGTERMException) or self.saved_path is not None:
            return
        # Lightning's own SIGTERM stop (its handler is active outside training, e.g. in the sanity check).
        if trainer.global_step == 0 or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.world_size > 1:
            rank_zero_warn(
                "PreemptionCheckpoint: SIGTERM arrived outside training under DDP; no checkpoint saved now, a "
                "restart resumes from the previous last.ckpt"
            )
            return
        self._save(trainer, signal.SIGTERM)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_lightning_sigterm_broadcast()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_lightning_sigterm_broadcast()
        self._uninstall()

    def _save(self, trainer: L.Trainer, signum: int) -> Path:
        path = checkpoint_dir(trainer) / f"{self.filename}{ModelCheckpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(path, weights_only=False)  # every process: a collective under DDP
        self.saved_path = path
        rank_zero_info(
            f"PreemptionCheckpoint: {signal.Signals(signum).name} received; saved {path} at global step "
            f"{trainer.global_step}"
        )
        return path


def _nothing() -> None:
    return None


def _other_handlers(handler: Any) -> list[Any]:
    """The callable handlers in ``handler`` that are not Lightning's own (see PreemptionCheckpoint).

    Lightning's signal connector installs a composition of its own handlers and the ones it found
    (it always wraps SIGTERM's); those found are kept, its own are dropped.
    """
    try:
        from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose, _SignalConnector
    except ImportError:  # another Lightning version: its handlers are not recognised
        return [handler] if callable(handler) else []
    if not isinstance(handler, _HandlersCompose):
        return [handler] if callable(handler) else []
    return [
        inner
        for inner in handler.signal_handlers
        if callable(inner) and not isinstance(getattr(inner, "__self__", None), _SignalConnector)
    ]


def repair_resume_after_last_batch(trainer: L.Trainer) -> bool:
    """Work around a Lightning 2.x resume bug; returns whether it acted.

    A checkpoint written at the end of the *last* training batch of an epoch (by
    :class:`PreemptionCheckpoint`, or by ``ModelCheckpoint(every_n_train_steps=...)``) is restored
    as "restarted mid-epoch, on a train batch end": ``_FitLoop.reset`` then counts that epoch as
    processed and completed, but keeps the "mid-epoch" restart stage for the next epoch, whose
    ``on_train_epoch_start`` hooks and ``ready``/``started`` counters it therefore skips. The
    counters stay one behind for the rest of the run, and the next resume from any checkpoint
    of that run repeats a whole epoch (more optimizer steps than ``max_epochs`` allows). Called
    from ``on_train_start`` (after ``reset``, before the next epoch starts), this clears the
    stale stage, so the next epoch starts like any other.
    """
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    try:
        from lightning.pytorch.loops.fit_loop import RestartStage

        stale = (
            fit_loop.restarted_mid_epoch
            and epoch_loop.restarted_on_train_batch_end
            and epoch_loop.batch_progress.is_last_batch
        )
    except (ImportError, AttributeError):  # a Lightning version with other loop internals
        return False
    if stale:
        fit_loop._restart_stage = RestartStage.NONE
    return bool(stale)


def _remove_temporary_checkpoints(folder: Path) -> None:
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if _TEMP_CHECKPOINT.match(path.name) and path.is_file():
            try:
                size = path.stat().st_size
                path.unlink()
            except OSError:
                continue
            log.info("removed %s (%d bytes), left by a process killed while writing it", path, size)


# --------------------------------------------------------------------------------------- numerical faults
class NonFiniteLossError(RuntimeError):
    """The training loss (or the weights about to be checkpointed) became NaN or infinite."""


class NonFiniteLossGuard(L.Callback):
    """Stop training at the first NaN/inf loss, and never checkpoint non-finite weights.

    Reading the loss on the host every step would synchronise a GPU with the host once per
    step. Instead the first non-finite loss is recorded on the device (global step, epoch,
    batch index and the value, with ``torch.where``: no synchronisation) and the record is read
    every ``check_every_n_steps`` training batches, before validation and at the end of every
    training epoch, and before every checkpoint save. The trade-off: training may run up to
    ``check_every_n_steps - 1`` batches past the fault before it stops (the error still names the
    first bad step), but no checkpoint is ever written after it, so ``last.ckpt`` keeps the last
    good state. ``check_every_n_steps: 1`` stops at once at the cost of one sync per step.

    Before a checkpoint is written, the parameters are also checked to be finite (one
    reduction per save), which also covers non-finite weights reached with a finite loss.
    Under DDP the processes exchange their records at each check so that all of them stop at the
    same batch (each process only sees its own shard's loss).

    With ``precision: 16-mixed`` the GradScaler skips optimizer steps whose *gradients* overflow
    and the loss (computed in float32) stays finite, so loss scaling works as usual; a forward
    pass that overflows float16 (infinite logits) does give a non-finite loss and stops training.
    """

    def __init__(self, check_every_n_steps: int = 10) -> None:
        super().__init__()
        if check_every_n_steps < 1:
            raise GuardOptionError(f"nonfinite.check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = int(check_every_n_steps)
        self._record: Tensor | None = None
        self._batches = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # [global step, epoch, batch index, loss] of the first non-finite loss; step -1: none yet.
        # Created on every process before the first check, which is collective under DDP.
        self._record = torch.tensor([-1.0, -1.0, -1.0, 0.0], dtype=torch.float64, device=pl_module.device)
        self._batches = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            self._observe(loss.detach(), trainer, batch_idx)
        self._batches += 1
        if self._batches % self.check_every_n_steps == 0:
            self._check(trainer)

    def _observe(self, loss: Tensor, trainer: L.Trainer, batch_idx: int) -> None:
        loss = loss.double().reshape(())
        record = self._record
        if record is None:
            return
        first = ~torch.isfinite(loss) & (record[0] < 0)
        # Python scalars go into the kernel as arguments: no host -> device copy, no sync.
        for index, value in enumerate((trainer.global_step, trainer.current_epoch, batch_idx)):
            record[index] = torch.where(first, float(value), record[index])
        record[3] = torch.where(first, loss, record[3])

    def _check(self, trainer: L.Trainer) -> None:
        if self._record is None:
            return
        records = self._record
        if trainer.world_size > 1:
            records = trainer.strategy.all_gather(records).reshape(-1, 4)
        else:
            records = records.reshape(1, 4)
        rows = [row for row in records.tolist() if row[0] >= 0]
        if not rows:
            return
        step, epoch, batch_idx, value = min(rows)
        where = checkpoint_dir(trainer) / "last.ckpt"
        kept = f"'{where}' was written before it and is kept" if where.is_file() else "no checkpoint was written"
        raise NonFiniteLossError(
            f"training loss is {_format_value(value)} at global step {int(step)} (epoch {int(epoch)}, batch "
            f"{int(batch_idx)}); training stopped, {kept}. Lower model.init_args.lr, check the inputs, or train "
            "in 32-bit precision"
        )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation inside fit runs before on_train_epoch_end; NaN weights would fail there first.
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before the module's own on_train_end fits post-hoc statistics and re-saves last.ckpt.
        self._check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Raising here aborts the save before anything is written.
        self._check(trainer)
        parameters = [p.detach() for p in pl_module.parameters() if p.is_floating_point()]
        if not parameters:
            return
        finite = torch.stack([torch.isfinite(p).all() for p in parameters])
        if bool(finite.all()):
            return
        names = [name for name, p in pl_module.named_parameters() if p.is_floating_point()]
        bad = [names[i] for i in (~finite).nonzero().flatten().tolist()]
        raise NonFiniteLossError(
            f"{len(bad)} parameter tensor(s) hold NaN/inf at global step {trainer.global_step} (e.g. '{bad[0]}'); "
            "the checkpoint was not written and the previous one is kept"
        )


def _format_value(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else f"{value:.6g}"

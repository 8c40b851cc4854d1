"""The method contract every anomaly-segmentation method implements.

A method answers two questions for a batch of normalized images: closed-set logits
``[B, K, h, w]`` and one or more anomaly scores ``[B, h, w]`` (higher = more anomalous).
Callbacks only talk to methods through :meth:`AnomalySegmentationModule.segment`, so adding a
method is one new folder whose module subclasses this base (and registers itself, see
:mod:`lightning_modules.registry`).

Post-hoc statistics (SML means/stds, FRE subspaces, a kNN memory bank, ...) are fitted after
training in one or more passes over the training split. A method declares the buffers it
accumulates into (:meth:`AnomalySegmentationModule.declare_posthoc_accumulator`, each with its
reduction across processes: ``sum`` or ``cat`` for a memory bank, and the pass it belongs to)
and implements ``update_posthoc`` / ``finalize_posthoc``; the base drives the passes, reduces
the accumulators across processes and records that the fit happened. Whether a method needs a
post-hoc fit follows from whether it declared accumulators.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.labels import ANOMALY_INDEX, IGNORE_INDEX, NUM_CLASSES
from datamodules.streethazards import is_padding
from lightning_modules.scoring.baselines import baseline_scores
from lightning_modules.scoring.test_time_augmentation import TestTimeAugmentation

log = logging.getLogger(__name__)

Reduction = Literal["sum", "cat"]
_REDUCTIONS = ("sum", "cat")


@dataclass
class MethodOutput:
    """What a method hands to the callbacks for one batch.

    ``logits``: closed-set logits ``[B, K, h, w]`` (any resolution; callbacks resize).
    ``scores``: named anomaly scores ``[B, h, w]``, higher = more anomalous. The first key is
    the method's own score; further keys are baselines computed from the same forward pass.
    """

    logits: Tensor
    scores: dict[str, Tensor] = field(default_factory=dict)

    @property
    def primary_score_name(self) -> str:
        return next(iter(self.scores))


def class_weights_from_frequencies(counts: Tensor, scheme: str) -> Tensor:
    """Cross-entropy class weights from pixel counts.

    'enet': 1 / ln(1.02 + p) (Paszke et al., the weighting ERFNet and ContMAV use);
    'inverse_sqrt': 1 / sqrt(p), normalized to mean 1. Classes without pixels get weight 0.
    """
    counts = counts.double()
    freq = counts / counts.sum().clamp_min(1)
    if scheme == "enet":
        weights = 1.0 / torch.log(1.02 + freq)
    elif scheme == "inverse_sqrt":
        weights = freq.clamp_min(1e-12).rsqrt()
        weights = weights / weights[counts > 0].mean()
    else:
        raise ValueError(f"unknown class weighting '{scheme}'; expected 'none', 'enet' or 'inverse_sqrt'")
    return torch.where(counts > 0, weights, torch.zeros_like(weights)).float()


def batch_seed(epoch: int, batch_idx: int, rank: int, seed: int | None = None) -> int:
    """A 63-bit seed for one training batch of one process; ``seed`` defaults to the run's
    ``seed_everything`` seed (``PL_GLOBAL_SEED``), or 0."""
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    words = np.random.SeedSequence([int(seed) & (2**64 - 1), int(epoch), int(batch_idx), int(rank)]).generate_state(2)
    return int(words[0]) | (int(words[1]) & 0x7FFFFFFF) << 32


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate every process's ``tensor`` along dim 0, in rank order (lengths may differ)."""
    world = torch.distributed.get_world_size()
    length = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    torch.distributed.all_gather(lengths, length)
    longest = int(max(int(n) for n in lengths))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded.contiguous())
    return torch.cat([part[: int(n)] for part, n in zip(gathered, lengths, strict=True)])


class AnomalySegmentationModule(L.LightningModule):
    """Shared base: evaluation steps, prediction step and the post-hoc fitting loop."""

    #: Short name used in result files and tables; set by ``registry.register_method``.
    method_name: str = "base"
    #: Options (``model.init_args``) under which the post-hoc fit is the same on any number of
    #: processes, for a method that subsamples per process (checked by the contract tests).
    POSTHOC_EXACT_OPTIONS: dict[str, Any] = {}

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        class_weighting: Literal["none", "enet", "inverse_sqrt"] = "none",
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        scheduler: Literal["poly", "cosine", "none"] = "poly",
        poly_power: float = 0.9,
        ignore_index: int = IGNORE_INDEX,
        anomaly_index: int = ANOMALY_INDEX,
        energy_temperature: float = 1.0,
    ) -> None:
        """Training options shared by every method.

        Args:
            num_classes: known classes (13, or 12 with ``data.ignore_unlabeled``); the CLI links
                it from the datamodule.
            class_weighting: cross-entropy class weights, 'none', 'enet' or 'inverse_sqrt';
                frequencies are counted once over the training split and cached by the datamodule.
            optimizer: 'adamw' or 'sgd' (Nesterov); ``lr``, ``weight_decay``, ``momentum`` (SGD).
            scheduler: 'poly' (power ``poly_power``), 'cosine' or 'none', stepped per batch.
            energy_temperature: ``T`` of the energy baseline ``-T logsumexp(logits / T)``, for the
                methods that compute their baselines with :meth:`baseline_scores`; recorded in
                :meth:`scoring_options`.
        """
        super().__init__()
        self.save_hyperparameters()
        for name, value, allowed in (
            ("class_weighting", class_weighting, ("none", "enet", "inverse_sqrt")),
            ("optimizer", optimizer, ("adamw", "sgd")),
            ("scheduler", scheduler, ("poly", "cosine", "none")),
        ):
            if value not in allowed:
                raise ValueError(f"model.{name} must be one of {allowed}, got '{value}'")
        if isinstance(energy_temperature, bool) or not (math.isfinite(energy_temperature) and energy_temperature > 0):
            raise ValueError(f"model.energy_temperature must be a finite number > 0, got {energy_temperature!r}")
        self.num_classes = num_classes
        self.energy_temperature = float(energy_temperature)
        # The views ``test`` and ``predict`` average over; an evaluation setting, not a model
        # option (a checkpoint's options win over the command line): AnomalyEvaluation sets it.
        self.tta = TestTimeAugmentation()
        self.ignore_index = ignore_index
        self.anomaly_index = anomaly_index
        self.register_buffer("class_weights", torch.ones(num_classes))
        # Whether post-hoc statistics have been fitted; checkpointed so tests of a trained and
        # fitted checkpoint do not refit.
        self.register_buffer("posthoc_fitted", torch.zeros((), dtype=torch.bool))
        self._posthoc_accumulators: dict[str, tuple[Reduction, int]] = {}

    # ----------------------------------------------------------------- the contract
    def segment(self, image: Tensor) -> MethodOutput:
        """Closed-set logits and anomaly scores for a batch of normalized images."""
        raise NotImplementedError

    def scoring_options(self) -> dict[str, Any]:
        """Options that shape the scores (e.g. SML's post-processing), recorded in ``metrics.json``."""
        return {"energy_temperature": self.energy_temperature, "test_time_augmentation": self.tta.describe()}

    def baseline_scores(self, logits: Tensor) -> dict[str, Tensor]:
        """The logit baselines (MSP, MaxLogit, entropy, energy at ``energy_temperature``) of ``logits``."""
        return baseline_scores(logits, self.energy_temperature)

    # ----------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.class_weighting != "none":
            counts = torch.as_tensor(self.trainer.datamodule.class_pixel_counts(), dtype=torch.float64)
            self.class_weights.copy_(class_weights_from_frequencies(counts, self.hparams.class_weighting))
            log.info("class weights (%s): %s", self.hparams.class_weighting, self.class_weights.tolist())

    def training_batch_seed(self, batch: Any, batch_idx: int) -> int:
        """Seed of the global RNG (dropout's) for one training batch of this process.

        A function of the run's seed, the epoch, the batch and the process rank, so that a run
        resumed from a checkpoint draws exactly what the uninterrupted run drew, with no RNG
        state to store or to gather across processes. Override to seed differently.
        """
        return batch_seed(self.current_epoch, batch_idx, self.global_rank)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(self.training_batch_seed(batch, batch_idx))

    def log_loss_to_progress_bar(self, loss: Tensor, batch_size: int) -> None:
        """Show the training loss in the progress bar as its mean over the last finished epoch.

        Lightning reads every ``prog_bar`` value logged for a step back to the host after every
        training batch, which waits for the accelerator each step; an epoch mean is accumulated on
        the device and read once per epoch. The per-step loss goes to the logger (``train/loss``,
        read every ``log_every_n_steps``).
        """
        self.log(
            "train/loss_epoch", loss, on_step=False, on_epoch=True, prog_bar=True, logger=False, batch_size=batch_size
        )

    def segmentation_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy in float32 (also under mixed precision), optional class weights, ignore 255."""
        weight = self.class_weights if self.hparams.class_weighting != "none" else None
        return F.cross_entropy(logits.float(), target, weight=weight, ignore_index=self.ignore_index)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=True
            )
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        else:
            power = hp.poly_power
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: max(0.0, 1.0 - min(step, total) / total) ** power
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- evaluation steps
    def _evaluation_step(self, batch: Mapping[str, Tensor], augment: bool = False) -> dict[str, object]:
        output = self.tta(self.segment, batch["image"]) if augment else self.segment(batch["image"])
        return {"logits": output.logits, "scores": output.scores}

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, object]:
        return self._evaluation_step(batch)  # validation stays a single view: it runs every epoch

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, object]:
        return self._evaluation_step(batch, augment=True)

    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, object]:
        out = self._evaluation_step(batch, augment=True)
        out.update({k: v for k, v in batch.items() if k not in ("image",)})
        return out

    # ----------------------------------------------------------------- post-hoc statistics
    def declare_posthoc_accumulator(self, name: str, reduction: Reduction = "sum", pass_index: int = 0) -> None:
        """Mark the buffer ``name`` (its state-dict name, e.g. ``"sml.sums"``) as a post-hoc accumulator.

        ``reduction``: ``"sum"`` (summed across processes) or ``"cat"`` (a memory bank: the
        processes' rows are concatenated in rank order along dim 0; its length may change while
        accumulating and is restored from a checkpoint). ``pass_index``: the pass over the
        training split that fills it; pass ``p`` sees the statistics finalized by passes ``< p``.
        Accumulators stay out of DDP's buffer broadcast: each process holds its own share until
        the pass ends.
        """
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"reduction of post-hoc accumulator '{name}' must be one of {_REDUCTIONS}, got '{reduction}'"
            )
        if isinstance(pass_index, bool) or not isinstance(pass_index, int) or pass_index < 0:
            raise ValueError(f"pass_index of post-hoc accumulator '{name}' must be an integer >= 0, got {pass_index!r}")
        self.get_buffer(name)  # raises if there is no such buffer
        self._posthoc_accumulators[name] = (reduction, pass_index)
        ignored = getattr(self, "_ddp_params_and_buffers_to_ignore", [])
        self._ddp_params_and_buffers_to_ignore = [*ignored, name] if name not in ignored else list(ignored)

    @property
    def needs_posthoc(self) -> bool:
        """Whether this method has statistics to fit after training (it declared accumulators)."""
        return bool(self._posthoc_accumulators)

    def posthoc_passes(self) -> list[int]:
        """The passes over the training split a post-hoc fit makes, in order."""
        return sorted({pass_index for _, pass_index in self._posthoc_accumulators.values()})

    def posthoc_accumulators(self, pass_index: int | None = None) -> dict[str, Tensor]:
        """The accumulator buffers (of one pass, or all) by state-dict name."""
        return {
            name: self.get_buffer(name)
            for name, (_, index) in self._posthoc_accumulators.items()
            if pass_index is None or index == pass_index
        }

    def start_posthoc_pass(self, pass_index: int, num_batches: int | None) -> None:
        """Called before each pass, after its accumulators were emptied; ``num_batches`` of this process."""

    def update_posthoc(self, batch: Mapping[str, Tensor], pass_index: int) -> None:
        """Accumulate one batch of training pixels (called under ``no_grad`` in eval mode)."""
        raise NotImplementedError(
            f"{type(self).__name__} declares post-hoc accumulators but does not implement update_posthoc()"
        )

    def finalize_posthoc(self, pass_index: int) -> None:
        """Turn the pass's reduced accumulators into the statistics used for scoring."""
        raise NotImplementedError(
            f"{type(self).__name__} declares post-hoc accumulators but does not implement finalize_posthoc()"
        )

    def _reset_accumulators(self, pass_index: int) -> None:
        for name, buffer in self.posthoc_accumulators(pass_index).items():
            if self._posthoc_accumulators[name][0] == "cat":
                self._set_buffer(name, buffer.new_zeros((0, *buffer.shape[1:])))
            else:
                buffer.zero_()

    def _reduce_accumulators(self, pass_index: int) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for name, buffer in self.posthoc_accumulators(pass_index).items():
            if self._posthoc_accumulators[name][0] == "cat":
                self._set_buffer(name, all_gather_cat(buffer))
            else:
                torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)

    def _set_buffer(self, name: str, value: Tensor) -> None:
        module_name, _, buffer_name = name.rpartition(".")
        owner = self.get_submodule(module_name) if module_name else self
        setattr(owner, buffer_name, value)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Memory banks (and buffers a method lists in _resizable_buffers) change length when
        # fitted: take the checkpoint's shape before copying.
        resizable = {n for n, (reduction, _) in self._posthoc_accumulators.items() if reduction == "cat"}
        for name in resizable | set(getattr(self, "_resizable_buffers", ())):
            key = prefix + name
            if key in state_dict:
                current = self.get_buffer(name)
                self._set_buffer(name, torch.empty_like(state_dict[key], device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit_posthoc(self, batches: Iterable[Mapping[str, Tensor]]) -> None:
        """Every post-hoc pass over ``batches`` (this process's shard): accumulate, reduce, finalize.

        Under DDP every process must call this with its own disjoint shard; accumulators are
        summed (or concatenated) across processes, so the result equals one process seeing all
        the data.
        """
        was_training = self.training
        self.eval()
        num_batches = len(batches) if hasattr(batches, "__len__") else None
        for pass_index in self.posthoc_passes():
            self._reset_accumulators(pass_index)
            self.start_posthoc_pass(pass_index, num_batches)
            for batch in batches:
                if is_padding(batch):
                    continue
                batch = {k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
                self.update_posthoc(batch, pass_index)
            self._reduce_accumulators(pass_index)
            self.finalize_posthoc(pass_index)
        self.posthoc_fitted.fill_(True)
        self.train(was_training)

    def fit_posthoc_from_datamodule(self) -> None:
        """Fit post-hoc statistics on the datamodule's training split (no augmentation)."""
        trainer = self.trainer
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "posthoc_dataloader"):
            raise RuntimeError(
                f"{type(self).__name__} needs post-hoc statistics, but the trainer has no datamodule with "
                "a posthoc_dataloader() to fit them on"
            )
        loader = datamodule.posthoc_dataloader()
        log.info("%s: fitting post-hoc statistics on %d training images", self.method_name, len(loader.dataset))
        with trainer.precision_plugin.forward_context():
            self.fit_posthoc(loader)

    def on_train_start(self) -> None:
        # Statistics fitted on an earlier network no longer describe the one being trained.
        self.posthoc_fitted.fill_(False)

    def on_train_end(self) -> None:
        if not self.needs_posthoc:
            return
        self.fit_posthoc_from_datamodule()
        # Re-save last.ckpt so that it carries the statistics and `test --ckpt_path last`
        # does not refit them. Every rank calls save_checkpoint (it is collective under DDP).
        callback = self.trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") if callback is not None else ""
        if last:
            self.trainer.save_checkpoint(last, weights_only=False)

    def _ensure_posthoc(self) -> None:
        if self.needs_posthoc and not bool(self.posthoc_fitted):
            self.fit_posthoc_from_datamodule()

    def on_test_start(self) -> None:
        self._ensure_posthoc()

    def on_predict_start(self) -> None:
        self._ensure_posthoc()

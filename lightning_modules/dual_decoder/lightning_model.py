"""The dual-decoder LightningModule: training with pasted outliers, epoch statistics, scoring."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_modules.base import AnomalySegmentationModule, MethodOutput
from lightning_modules.checkpoints import initial_weights_replaced_by, load_network_weights
from lightning_modules.dual_decoder.functional import (
    accumulate_embedding_sums,
    accumulate_semantic_stats,
    dual_decoder_anomaly_score,
    finalize_semantic_stats,
    update_prototypes,
)
from lightning_modules.dual_decoder.loss import contrastive_prototype_loss, objectosphere_loss, semantic_feature_loss
from lightning_modules.dual_decoder.torch_model import DualDecoderNet, segmenter_to_dual_decoder_state
from lightning_modules.registry import register_method
from lightning_modules.scoring.sml import SMLOptions, SMLScorer


@register_method("dual_decoder", init_from="sml")
class DualDecoderSegmenter(AnomalySegmentationModule):
    """Open-world segmenter with a semantic and a contrastive decoder, trained on pasted outliers.

    Training batches need ``mask`` (13 where outliers were pasted) and ``mask_clean`` (the label
    before pasting): use the datamodule's ``injection`` option. Per-class logit means/stds (from
    true-positive pixels) and embedding prototypes are accumulated in float64 buffers during each
    training epoch, summed across processes and turned into the next epoch's statistics at its
    end; they are checkpointed, so a resumed run continues with the same statistics.

    With ``sml_on_semantic`` the SML statistics of the semantic logits are fitted after training
    too, and the evaluation reports SML on this model beside its own score.

    Args (besides the training options of ``AnomalySegmentationModule``):
        encoder_name, encoder_weights: the shared smp encoder (weights: 'imagenet', a local file or None).
        embedding_dim: ``D`` of the contrastive decoder (default ``K``).
        xi: objectosphere radius (squared norm) of known pixels.
        temperature: softmax temperature of the prototype-contrastive loss.
        prototype_momentum: EMA weight of the previous prototypes at each epoch end.
        ce_weight, feature_weight, objectosphere_weight, contrastive_weight: loss weights.
        unknown_weight: weight of the anomaly-pixel term inside the objectosphere loss.
        std_floor: lower bound of the per-class logit std used to standardize the feature loss and
            the score. A class seen on a handful of true-positive pixels has a near-zero std, and
            dividing by it makes the feature loss explode (measured on the demo: mIoU 0.22 instead
            of 0.47 with a floor of 1e-4).
        min_statistics_pixels: a class's epoch statistics are only updated from at least this many
            true-positive pixels; otherwise the previous ones are kept.
        sml_on_semantic: also score with SML on the semantic logits (fitted after training).
        sml: SML's post-processing for that score, the same block as the SML segmenter's
            (:class:`~lightning_modules.scoring.sml.SMLPostprocessing`; default: the paper's).
        init_checkpoint: start training from the network of a checkpoint: a dual-decoder one
            (weights copied as they are), or a DeepLabV3+ segmenter of SML/FRE (its encoder, its
            decoder into both decoders, its classifier into the semantic head; the contrastive head
            starts random). Epoch statistics and optimizer state are not taken over.
    """

    #: Buffers that sum the current epoch's statistics, per process until the epoch ends.
    EPOCH_ACCUMULATORS = ("sem_sums", "sem_sq_sums", "sem_counts", "emb_sums", "emb_counts")

    def __init__(
        self,
        encoder_name: str = "resnet50",
        encoder_weights: str | None = "imagenet",
        embedding_dim: int | None = None,
        xi: float = 1.0,
        temperature: float = 0.1,
        prototype_momentum: float = 0.9,
        ce_weight: float = 0.9,
        feature_weight: float = 0.1,
        objectosphere_weight: float = 0.5,
        contrastive_weight: float = 0.5,
        unknown_weight: float = 10.0,
        std_floor: float = 0.1,
        min_statistics_pixels: int = 64,
        sml_on_semantic: bool = True,
        sml: SMLOptions | None = None,
        init_checkpoint: str | None = None,
        channels_last: bool = False,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(**base_kwargs)
        k = self.num_classes
        self.net = DualDecoderNet(k, embedding_dim, encoder_name, encoder_weights)
        if init_checkpoint is not None and initial_weights_replaced_by() is None:
            self.load_network_weights(init_checkpoint)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        d = self.net.embedding_dim
        f64 = torch.float64
        # epoch accumulators
        self.register_buffer("sem_sums", torch.zeros(k, k, dtype=f64))
        self.register_buffer("sem_sq_sums", torch.zeros(k, k, dtype=f64))
        self.register_buffer("sem_counts", torch.zeros(k, dtype=f64))
        self.register_buffer("emb_sums", torch.zeros(k, d, dtype=f64))
        self.register_buffer("emb_counts", torch.zeros(k, dtype=f64))
        # DDP copies rank 0's buffers to every process before each training forward pass
        # (broadcast_buffers, on by default). The accumulators hold each process's own sums until
        # on_train_epoch_end adds them up, so they must not be copied: rank 0's would replace the
        # others' at every step and be counted once per process.
        self._ddp_params_and_buffers_to_ignore = [*getattr(self, "_ddp_params_and_buffers_to_ignore", [])]
        self._ddp_params_and_buffers_to_ignore += list(self.EPOCH_ACCUMULATORS)
        # statistics of the previous epoch, used by the losses and the score
        self.register_buffer("class_means", torch.zeros(k, k, dtype=f64))
        self.register_buffer("class_stds", torch.ones(k, k, dtype=f64))
        self.register_buffer("class_valid", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("prototypes", torch.zeros(k, d, dtype=f64))
        # post-hoc SML statistics of the semantic logits
        self.sml = SMLScorer(k, sml)
        if sml_on_semantic:
            for name in self.sml.ACCUMULATORS:
                self.declare_posthoc_accumulator(f"sml.{name}", "sum")

    def load_network_weights(self, path: str) -> None:
        """Initialize ``net`` from a dual-decoder or a DeepLabV3+ segmenter checkpoint (see ``init_checkpoint``)."""

        def convert(state: dict[str, Tensor]) -> dict[str, Tensor]:
            if any(key.startswith("model.") for key in state):  # a DeepLabV3+ segmenter's network
                return segmenter_to_dual_decoder_state(state, self.net.contrastive_head.state_dict())
            return state

        load_network_weights(self.net, path, "dual-decoder network", convert)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        if self.hparams.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        hp = self.hparams
        mask = batch["mask"]
        clean = batch.get("mask_clean", mask)
        # The semantic decoder learns the known classes only: pasted pixels are ignored there.
        semantic_target = torch.where(mask == self.anomaly_index, torch.full_like(clean, self.ignore_index), clean)
        logits, embedding = self(batch["image"])
        ce = self.segmentation_loss(logits, semantic_target)
        feature = semantic_feature_loss(
            logits, semantic_target, self.class_means.float(), self.class_stds.float(), self.class_valid
        )
        objectosphere = objectosphere_loss(
            embedding, mask, hp.xi, hp.unknown_weight, self.anomaly_index, self.ignore_index
        )
        contrastive = contrastive_prototype_loss(embedding, semantic_target, self.prototypes.float(), hp.temperature)
        loss = (
            hp.ce_weight * ce
            + hp.feature_weight * feature
            + hp.objectosphere_weight * objectosphere
            + hp.contrastive_weight * contrastive
        )
        with torch.no_grad():
            sums, sq_sums, counts = accumulate_semantic_stats(
                logits.detach(), semantic_target, self.sem_sums, self.sem_sq_sums, self.sem_counts
            )
            self.sem_sums.copy_(sums)
            self.sem_sq_sums.copy_(sq_sums)
            self.sem_counts.copy_(counts)
            emb_sums, emb_counts = accumulate_embedding_sums(
                embedding.detach(), semantic_target, self.emb_sums, self.emb_counts
            )
            self.emb_sums.copy_(emb_sums)
            self.emb_counts.copy_(emb_counts)
        batch_size = batch["image"].shape[0]
        self.log_dict(
            {
                "train/loss": loss,
                "train/ce": ce,
                "train/feature": feature,
                "train/objectosphere": objectosphere,
                "train/contrastive": contrastive,
            },
            batch_size=batch_size,
        )
        self.log_loss_to_progress_bar(loss, batch_size)
        return loss

    def epoch_accumulators(self) -> list[Tensor]:
        return [getattr(self, name) for name in self.EPOCH_ACCUMULATORS]

    @torch.no_grad()
    def on_train_epoch_end(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for acc in self.epoch_accumulators():
                torch.distributed.all_reduce(acc, op=torch.distributed.ReduceOp.SUM)
        self.update_epoch_statistics()

    @torch.no_grad()
    def update_epoch_statistics(self) -> None:
        """Turn this epoch's (summed) accumulators into the statistics of the next epoch."""
        hp = self.hparams
        enough = self.sem_counts >= hp.min_statistics_pixels
        means, stds = finalize_semantic_stats(
            self.sem_sums,
            self.sem_sq_sums,
            torch.where(enough, self.sem_counts, torch.zeros_like(self.sem_counts)),
            self.class_means,
            self.class_stds,
            eps=hp.std_floor,
        )
        self.class_means.copy_(means)
        self.class_stds.copy_(stds)
        self.class_valid |= enough
        self.prototypes.copy_(
            update_prototypes(self.prototypes, self.emb_sums, self.emb_counts, self.hparams.prototype_momentum)
        )
        for acc in self.epoch_accumulators():
            acc.zero_()

    # ----------------------------------------------------------------- checkpoints within an epoch
    @torch.no_grad()
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Under DDP, store the accumulators summed over all processes (not rank 0's share alone).

        A checkpoint written before an epoch ends (every N steps, on preemption, at validation)
        holds that epoch's partial sums. Each process has its own; the checkpoint gets their sum,
        and ``on_load_checkpoint`` gives it to rank 0 only, so that a resumed run, on any number of
        processes, counts every pixel once. Every process calls this (saving is collective).
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() < 2:
            return
        state = checkpoint["state_dict"]
        for name in self.EPOCH_ACCUMULATORS:
            total = getattr(self, name).detach().clone()
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
            state[name] = total

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Processes other than rank 0 start from zero accumulators (see ``on_save_checkpoint``)."""
        trainer = self._trainer
        if trainer is None or trainer.global_rank == 0:
            return
        state = checkpoint.get("state_dict", {})
        for name in self.EPOCH_ACCUMULATORS:
            if name in state:
                state[name] = torch.zeros_like(state[name])

    # ----------------------------------------------------------------- post-hoc SML on the semantic logits
    def update_posthoc(self, batch: Mapping[str, Tensor], pass_index: int) -> None:
        self.sml.update(self(batch["image"])[0])

    def finalize_posthoc(self, pass_index: int) -> None:
        self.sml.finalize()

    def scoring_options(self) -> dict[str, Any]:
        options = super().scoring_options()
        return {**options, "sml": self.sml.postprocessing.as_dict()} if self.hparams.sml_on_semantic else options

    # ----------------------------------------------------------------- scoring
    def segment(self, image: Tensor) -> MethodOutput:
        logits, embedding = self(image)
        scores = {
            "dual_decoder": dual_decoder_anomaly_score(
                logits, embedding, self.class_means.float(), self.class_stds.float(), self.hparams.xi, self.class_valid
            )
        }
        if self.hparams.sml_on_semantic:
            scores["sml"] = self.sml.score(logits)
        scores.update(self.baseline_scores(logits))
        return MethodOutput(logits, scores)

"""Entropy-maximisation outlier exposure (Chan, Rottmann, Gottschalk, ICCV 2021): a segmenter
fine-tuned to be uncertain on pasted outliers, scored by its softmax entropy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_modules.base import MethodOutput
from lightning_modules.entropy_oe.loss import entropy_maximisation_loss
from lightning_modules.registry import register_method
from lightning_modules.segmenter import DeepLabV3PlusSegmenter


@register_method("entropy_oe", init_from="sml", compared_by_default=False)
class EntropyOESegmenter(DeepLabV3PlusSegmenter):
    """DeepLabV3+ fine-tuned with cross-entropy on known pixels and entropy maximisation on
    pasted outlier pixels; its anomaly score is the softmax entropy.

    Training batches need outliers labelled 13 in ``mask`` (the datamodule's ``injection``
    option); a batch without any trains the known classes only. ``compare`` starts it from the
    segmenter trained for SML, as the paper fine-tunes a trained segmenter. Scores, in order:
    ``entropy`` (the method's own), then ``msp``, ``maxlogit`` and ``energy`` of the same logits.
    Nothing is fitted after training.

    Args (besides the segmenter's, see ``DeepLabV3PlusSegmenter``):
        outlier_weight: ``lambda`` of the loss, the weight of the outlier term against the
            known-class cross-entropy (0.9 in the paper and its code).
    """

    def __init__(self, outlier_weight: float = 0.9, **segmenter_kwargs: Any) -> None:
        super().__init__(**segmenter_kwargs)
        if isinstance(outlier_weight, bool) or not 0.0 <= outlier_weight <= 1.0:
            raise ValueError(f"model.outlier_weight must be in [0, 1], got {outlier_weight!r}")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        # Without pasted outliers the loss is (1 - lambda) times plain cross-entropy: a silent no-op.
        if stage == "fit" and datamodule is not None and getattr(datamodule, "injection", False) is None:
            raise ValueError(
                "entropy_oe trains on pasted outliers, but data.injection is not set: add e.g. "
                "`data: {injection: {source: procedural}}` (configs/method/demo/entropy_oe.yaml)"
            )

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        weight = self.class_weights if self.hparams.class_weighting != "none" else None
        loss, known_ce, outlier_ce = entropy_maximisation_loss(
            self(batch["image"]), batch["mask"], self.hparams.outlier_weight, self.anomaly_index, weight
        )
        batch_size = batch["image"].shape[0]
        self.log_dict(
            {"train/loss": loss, "train/known_ce": known_ce, "train/outlier_ce": outlier_ce}, batch_size=batch_size
        )
        self.log_loss_to_progress_bar(loss, batch_size)
        return loss

    def segment(self, image: Tensor) -> MethodOutput:
        logits = self(image)
        baselines = self.baseline_scores(logits)
        return MethodOutput(logits, {"entropy": baselines.pop("entropy"), **baselines})

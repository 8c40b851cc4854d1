"""DMLNet (Cen et al., ICCV 2021): DeepLabV3+ with a metric-learning head, scored by MMSP, EDS and their fusion."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_modules.base import MethodOutput
from lightning_modules.dmlnet.functional import distance_logits, dmlnet_scores
from lightning_modules.dmlnet.loss import dmlnet_loss
from lightning_modules.dmlnet.torch_model import PrototypeHead
from lightning_modules.registry import register_method
from lightning_modules.scoring.baselines import energy_score, entropy_score, max_logit_score
from lightning_modules.segmenter import DeepLabV3PlusSegmenter


@register_method("dmlnet", compared_by_default=False)
class DMLNetSegmenter(DeepLabV3PlusSegmenter):
    """DeepLabV3+ whose ``K`` outputs are an embedding, classified by distance to fixed prototypes.

    Trained with the distance-based cross-entropy plus ``variance_weight`` times the variance
    loss; the closed-set prediction is the nearest prototype. Scores (higher = more anomalous):
    ``dmlnet`` (the fusion of EDS and MMSP, the method's own), ``mmsp``, ``eds``, and the
    ``maxlogit``, ``entropy`` and ``energy`` baselines of the distance logits (MaxLogit of ``-gamma d`` is the
    distance to the nearest prototype; MSP of them is ``mmsp``). Nothing is fitted after training.

    Args (besides the segmenter's, see ``DeepLabV3PlusSegmenter``):
        prototype_magnitude: ``T`` of the prototypes ``T e_k`` (3 in the reference code).
        gamma: distance scale of the logits ``-gamma d`` (1 in the reference code).
        variance_weight: ``lambda`` of the variance loss (0.01 in the reference code).
        eds_clip: EDS is clipped at this value before the fusion normalizes it per image (400 in
            the reference code, set for 13 classes at ``T`` = 3, where a pixel on its prototype
            has EDS 216); ``null`` skips the clip.
        fusion_threshold, fusion_sharpness: the gate ``1 / (1 + exp(sharpness (e - threshold)))``
            on the normalized EDS ``e`` (0.2 and 50 in the reference code).
    """

    def __init__(
        self,
        prototype_magnitude: float = 3.0,
        gamma: float = 1.0,
        variance_weight: float = 0.01,
        eds_clip: float | None = 400.0,
        fusion_threshold: float = 0.2,
        fusion_sharpness: float = 50.0,
        **segmenter_kwargs: Any,
    ) -> None:
        super().__init__(**segmenter_kwargs)
        for name, value in (("prototype_magnitude", prototype_magnitude), ("gamma", gamma)):
            if not value > 0:
                raise ValueError(f"model.{name} must be > 0, got {value}")
        if not variance_weight >= 0:
            raise ValueError(f"model.variance_weight must be >= 0, got {variance_weight}")
        if eds_clip is not None and not eds_clip > 0:
            raise ValueError(f"model.eds_clip must be > 0 or null, got {eds_clip}")
        self.head = PrototypeHead(self.num_classes, prototype_magnitude)

    def distances(self, image: Tensor) -> Tensor:
        """Squared distances ``[B, K, H, W]`` (float32) of each pixel's embedding to the prototypes."""
        return self.head(self(image))

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        hp = self.hparams
        weight = self.class_weights if hp.class_weighting != "none" else None
        loss, dce, vl = dmlnet_loss(self.distances(batch["image"]), batch["mask"], hp.gamma, hp.variance_weight, weight)
        batch_size = batch["image"].shape[0]
        self.log_dict({"train/loss": loss, "train/dce": dce, "train/variance": vl}, batch_size=batch_size)
        self.log_loss_to_progress_bar(loss, batch_size)
        return loss

    def scoring_options(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            **super().scoring_options(),
            "dmlnet": {
                "prototype_magnitude": hp.prototype_magnitude,
                "gamma": hp.gamma,
                "eds_clip": hp.eds_clip,
                "fusion_threshold": hp.fusion_threshold,
                "fusion_sharpness": hp.fusion_sharpness,
            },
        }

    def segment(self, image: Tensor) -> MethodOutput:
        hp = self.hparams
        distances = self.distances(image)
        logits = distance_logits(distances, hp.gamma)
        scores = dmlnet_scores(distances, hp.gamma, hp.eds_clip, hp.fusion_threshold, hp.fusion_sharpness)
        scores.update(
            {
                "maxlogit": max_logit_score(logits),
                "entropy": entropy_score(logits),
                "energy": energy_score(logits, self.energy_temperature),
            }
        )
        return MethodOutput(logits, scores)

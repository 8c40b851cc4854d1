"""DeepLabV3+ scored by Standardized Max Logits (Jung et al., ICCV 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_modules.base import MethodOutput
from lightning_modules.registry import register_method
from lightning_modules.scoring.sml import SMLOptions, SMLScorer
from lightning_modules.segmenter import DeepLabV3PlusSegmenter


@register_method("sml")
class SMLSegmenter(DeepLabV3PlusSegmenter):
    """DeepLabV3+ trained with cross-entropy, scored by Standardized Max Logits.

    The per-class max-logit statistics are fitted after training in one pass over the training
    split, accumulated in float64 buffers that are summed across processes and saved in the
    checkpoint. MSP, MaxLogit and entropy are reported beside SML from the same logits.

    Args (besides the segmenter's, see ``DeepLabV3PlusSegmenter``):
        sml: SML's post-processing, one block shared with every SML score of the project
            (:class:`~lightning_modules.scoring.sml.SMLPostprocessing`; default: the paper's).
    """

    def __init__(self, sml: SMLOptions | None = None, **segmenter_kwargs: Any) -> None:
        super().__init__(**segmenter_kwargs)
        self.sml = SMLScorer(self.num_classes, sml)
        for name in self.sml.ACCUMULATORS:
            self.declare_posthoc_accumulator(f"sml.{name}", "sum")

    def update_posthoc(self, batch: Mapping[str, Tensor], pass_index: int) -> None:
        self.sml.update(self(batch["image"]))

    def finalize_posthoc(self, pass_index: int) -> None:
        self.sml.finalize()

    def scoring_options(self) -> dict[str, Any]:
        return {**super().scoring_options(), "sml": self.sml.postprocessing.as_dict()}

    def segment(self, image: Tensor) -> MethodOutput:
        logits = self(image)
        return MethodOutput(logits, {"sml": self.sml.score(logits), **self.baseline_scores(logits)})


"""A toy method: how far a pixel's max logit lies from the training pixels' max logits."""

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_modules.base import MethodOutput
from lightning_modules.registry import register_method
from lightning_modules.scoring.baselines import baseline_scores
from lightning_modules.segmenter import DeepLabV3PlusSegmenter


@register_method("toy_bank", compared_by_default=False)
class ToyBankSegmenter(DeepLabV3PlusSegmenter):
    """Score: distance of the max logit to its nearest neighbour in a bank of training max logits."""

    def __init__(self, samples_per_batch: int = 32, **segmenter_kwargs) -> None:
        super().__init__(**segmenter_kwargs)
        self.register_buffer("bank", torch.zeros(0, 1, dtype=torch.float64))
        self.declare_posthoc_accumulator("bank", "cat")

    def update_posthoc(self, batch: Mapping[str, Tensor], pass_index: int) -> None:
        max_logit = self(batch["image"]).amax(dim=1).flatten().double()
        step = max(1, max_logit.numel() // self.hparams.samples_per_batch)
        self.bank = torch.cat([self.bank, max_logit[::step, None]])

    def finalize_posthoc(self, pass_index: int) -> None:
        self.bank = self.bank.sort(dim=0).values

    def segment(self, image: Tensor) -> MethodOutput:
        logits = self(image)
        max_logit = logits.amax(dim=1, keepdim=True).double()
        if self.bank.numel() == 0:  # validation during fit, before the bank is filled
            return MethodOutput(logits, {"toy_bank": torch.zeros_like(max_logit[:, 0]).float()})
        distance = (max_logit[..., None] - self.bank.view(1, 1, 1, 1, -1)).abs().amin(dim=-1)[:, 0]
        return MethodOutput(logits, {"toy_bank": distance.float(), **baseline_scores(logits)})

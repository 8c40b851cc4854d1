"""A DeepLabV3+ closed-set segmenter: the network, loss and optimisation shared by SML, FRE and others.

On its own it is a method too: its anomaly scores are the logit baselines (MSP, MaxLogit,
entropy). SML and FRE subclass it and add post-hoc statistics; both can start from the weights
of any segmenter checkpoint (``init_checkpoint``) so one trained network serves every scorer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_modules.base import AnomalySegmentationModule, MethodOutput
from lightning_modules.checkpoints import initial_weights_replaced_by, load_network_weights
from lightning_modules.segmenter.torch_model import DeepLabV3Plus


class DeepLabV3PlusSegmenter(AnomalySegmentationModule):
    """DeepLabV3+ trained with (optionally class-weighted) cross-entropy, ignore index 255.

    Args (besides the training options of ``AnomalySegmentationModule``):
        encoder_name: any segmentation-models-pytorch encoder (``resnet50``, ``resnet18``, ...).
        encoder_weights: 'imagenet' (downloaded once into the Hugging Face cache), a local
            state-dict file, or None to train from scratch.
        output_stride: encoder output stride (8 or 16).
        init_checkpoint: start from the network weights of another segmenter-based checkpoint
            (SML, FRE or this class), e.g. to score an already trained segmenter without retraining.
        channels_last: NHWC memory format, faster with mixed precision on GPUs.
    """

    method_name = "segmenter"  # not registered: a base for methods, its scores are the baselines

    def __init__(
        self,
        encoder_name: str = "resnet50",
        encoder_weights: str | None = "imagenet",
        output_stride: int = 16,
        init_checkpoint: str | None = None,
        channels_last: bool = False,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(**base_kwargs)
        self.net = DeepLabV3Plus(self.num_classes, encoder_name, encoder_weights, output_stride)
        if init_checkpoint is not None and initial_weights_replaced_by() is None:
            self.load_network_weights(init_checkpoint)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------- network
    def load_network_weights(self, path: str) -> None:
        """Copy ``net.*`` weights from a checkpoint of any segmenter-based method."""
        load_network_weights(self.net, path, "segmenter", expected="DeepLabV3+ segmenter")

    def _prepare(self, image: Tensor) -> Tensor:
        return image.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else image

    def forward(self, image: Tensor) -> Tensor:
        return self.net(self._prepare(image))

    def forward_features(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.net.forward_features(self._prepare(image))

    def forward_layer(self, image: Tensor, layer: str) -> tuple[Tensor, Tensor]:
        """(features of ``layer``, logits): see :meth:`DeepLabV3Plus.forward_layer`."""
        return self.net.forward_layer(self._prepare(image), layer)

    def segment(self, image: Tensor) -> MethodOutput:
        logits = self(image)
        return MethodOutput(logits, self.baseline_scores(logits))

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        loss = self.segmentation_loss(logits, batch["mask"])
        batch_size = batch["image"].shape[0]
        self.log("train/loss", loss, batch_size=batch_size)
        self.log_loss_to_progress_bar(loss, batch_size)
        return loss

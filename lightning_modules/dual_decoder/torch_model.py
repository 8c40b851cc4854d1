"""The dual-decoder network: one smp encoder, a semantic and a contrastive DeepLabV3+ decoder."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch.nn.functional as F
from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3PlusDecoder
from torch import Tensor, nn

from datamodules.labels import NUM_CLASSES
from lightning_modules.precision import float32_head
from lightning_modules.segmenter import build_encoder

__all__ = ["DualDecoderNet", "segmenter_to_dual_decoder_state"]


class DualDecoderNet(nn.Module):
    """Shared encoder, a semantic and a contrastive DeepLabV3+ decoder.

    ``forward(x [B, 3, H, W]) -> (logits [B, K, H, W], embedding [B, D, H, W])``, both bilinearly
    upsampled to the input resolution, both float32 (the heads run in float32 under autocast).
    The encoder with DeepLabV3+ needs height and width divisible by its output stride (16 by
    default); other sizes are replicate-padded at the bottom/right to the next multiple and the
    outputs cropped back, so any size works.

    Note: the ASPP image-pooling branch has a BatchNorm on a 1x1 map, so training mode needs a
    batch of at least 2 (as for smp's own DeepLabV3+).

    Args:
        num_classes: ``K``, closed-set classes of the semantic head.
        embedding_dim: ``D`` of the contrastive head; ``None`` means ``D = K`` as in the paper.
        encoder_name: any segmentation-models-pytorch encoder name.
        encoder_weights: ``None`` (random) or the encoder's pretrained weights, e.g. "imagenet".
        encoder_output_stride: 16 (default) or 8 (dilated, more memory).
        decoder_channels, decoder_atrous_rates, decoder_aspp_separable, decoder_aspp_dropout:
            passed to each ``DeepLabV3PlusDecoder`` (smp's DeepLabV3+ defaults).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        embedding_dim: int | None = None,
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        encoder_output_stride: int = 16,
        decoder_channels: int = 256,
        decoder_atrous_rates: Sequence[int] = (12, 24, 36),
        decoder_aspp_separable: bool = True,
        decoder_aspp_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if encoder_output_stride not in (8, 16):
            raise ValueError(f"encoder_output_stride must be 8 or 16, got {encoder_output_stride}")
        self.num_classes = num_classes
        self.embedding_dim = num_classes if embedding_dim is None else embedding_dim
        self.encoder = build_encoder(encoder_name, encoder_weights, output_stride=encoder_output_stride)

        def make_decoder() -> DeepLabV3PlusDecoder:
            return DeepLabV3PlusDecoder(
                encoder_channels=self.encoder.out_channels,
                encoder_depth=5,
                out_channels=decoder_channels,
                atrous_rates=tuple(decoder_atrous_rates),
                output_stride=encoder_output_stride,
                aspp_separable=decoder_aspp_separable,
                aspp_dropout=decoder_aspp_dropout,
            )

        self.semantic_decoder = make_decoder()
        self.contrastive_decoder = make_decoder()
        self.semantic_head = nn.Conv2d(decoder_channels, num_classes, kernel_size=1)
        self.contrastive_head = nn.Conv2d(decoder_channels, self.embedding_dim, kernel_size=1)

    @property
    def size_divisor(self) -> int:
        """Input height and width must be multiples of this (``forward`` pads to it)."""
        return int(self.encoder.output_stride)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 4:
            raise ValueError(f"DualDecoderNet expects images [B, C, H, W], got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % self.size_divisor, (-width) % self.size_divisor
        if pad_h or pad_w:
            # Replicate rather than zero padding: no artificial edge next to the border pixels.
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        features = self.encoder(x)
        size = x.shape[-2:]

        def head(conv: nn.Conv2d) -> Callable[[Tensor], Tensor]:
            return lambda decoded: F.interpolate(conv(decoded), size=size, mode="bilinear", align_corners=False)

        # The 1x1 heads and the upsampling in float32 also under mixed precision: the scores read
        # the logits' and the embedding's fine differences (standardised by small stds).
        logits = float32_head(head(self.semantic_head), self.semantic_decoder(features))
        embedding = float32_head(head(self.contrastive_head), self.contrastive_decoder(features))
        return logits[..., :height, :width], embedding[..., :height, :width]


def segmenter_to_dual_decoder_state(
    segmenter_state: Mapping[str, Tensor], contrastive_head: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Map a DeepLabV3+ state dict (smp keys under ``model.``) onto :class:`DualDecoderNet` keys.

    The segmenter's decoder initializes both decoders: the semantic one continues what it was
    trained for, and the contrastive one starts from features that already separate the
    classes. ``contrastive_head`` (the target's own, usually random) is kept.
    """
    out: dict[str, Tensor] = {}
    for key, value in segmenter_state.items():
        if key.startswith("model.encoder."):
            out["encoder." + key[len("model.encoder.") :]] = value
        elif key.startswith("model.decoder."):
            rest = key[len("model.decoder.") :]
            out["semantic_decoder." + rest] = value
            out["contrastive_decoder." + rest] = value  # load_state_dict copies: sharing is fine
        elif key.startswith("model.segmentation_head.0."):
            out["semantic_head." + key[len("model.segmentation_head.0.") :]] = value
    out.update({"contrastive_head." + key: value for key, value in contrastive_head.items()})
    return out

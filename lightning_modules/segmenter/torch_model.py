"""The DeepLabV3+ network (segmentation-models-pytorch) and its encoder weights, offline-safe."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.checkpoints import initial_weights_replaced_by
from lightning_modules.precision import float32_head

log = logging.getLogger(__name__)

#: smp's DeepLabV3+ needs input sides divisible by this (output stride 16 and a 1/4 skip).
SIZE_DIVISOR = 16


class PretrainedWeightsError(RuntimeError):
    """Pretrained encoder weights could not be loaded; the message says how to proceed."""


def _load_local_encoder_weights(encoder: nn.Module, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, Mapping) else state
    # smp encoders drop classifier keys in their own load_state_dict and return nothing, so the
    # key check is done here.
    expected = set(encoder.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise PretrainedWeightsError(
            f"encoder_weights '{path}': {len(missing)} encoder parameters missing (e.g. {missing[:3]}); "
            "is it a state dict of this encoder?"
        )
    unexpected = set(state) - expected
    if unexpected - {"fc.weight", "fc.bias"}:
        log.warning("encoder_weights '%s': ignored %d unexpected keys", path, len(unexpected))
    encoder.load_state_dict({k: v for k, v in state.items() if k in expected})


def build_encoder(name: str, weights: str | None, output_stride: int = 32, depth: int = 5) -> nn.Module:
    """An smp encoder; ``weights`` is an smp weight name ('imagenet'), a local file, or None.

    Downloads go through the Hugging Face hub cache. Offline, a missing download becomes a
    :class:`PretrainedWeightsError` that says how to proceed instead of a network traceback.
    Inside :func:`~lightning_modules.checkpoints.initial_weights_from` no weights are loaded: a
    checkpoint's state replaces them.
    """
    replaced_by = initial_weights_replaced_by()
    if weights is not None and replaced_by is not None:
        log.info("encoder weights '%s' not loaded: the weights come from %s", weights, replaced_by)
        weights = None
    if weights is not None and (os.sep in weights or Path(weights).suffix in (".pth", ".pt", ".safetensors")):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(f"encoder_weights '{weights}' looks like a file but does not exist")
        encoder = smp.encoders.get_encoder(name, weights=None, output_stride=output_stride, depth=depth)
        _load_local_encoder_weights(encoder, path)
        return encoder
    try:
        return smp.encoders.get_encoder(name, weights=weights, output_stride=output_stride, depth=depth)
    except KeyError as error:
        raise PretrainedWeightsError(f"model.encoder_name / encoder_weights: {error.args[0]}") from None
    except Exception as error:  # network and hub errors come in many types
        if weights is None:
            raise
        settings = smp.encoders.encoders.get(name, {}).get("pretrained_settings", {}).get(weights, {})
        repo = settings.get("repo_id", f"<the hub repository of {name}>")
        raise PretrainedWeightsError(
            f"could not load pretrained weights '{weights}' for encoder '{name}' "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). This machine may be offline. "
            f"Either pre-download them into the Hugging Face cache on a machine with internet "
            f"(`huggingface-cli download {repo}`, then copy $HF_HOME, default ~/.cache/huggingface), "
            f"point model.encoder_weights at a local .safetensors/.pth state dict of the encoder, "
            f"or train from scratch with `encoder_weights: null`."
        ) from None


class DeepLabV3Plus(nn.Module):
    """smp's DeepLabV3+ with its decoder features exposed, for any input size.

    Inputs whose sides are not multiples of 16 are padded (replicated border) and the outputs
    cropped back, so predict works on images of any size.
    """

    def __init__(
        self, num_classes: int, encoder_name: str, encoder_weights: str | None, output_stride: int = 16
    ) -> None:
        super().__init__()
        self.model = smp.DeepLabV3Plus(
            encoder_name=encoder_name, encoder_weights=None, classes=num_classes, encoder_output_stride=output_stride
        )
        if encoder_weights is not None:
            self.model.encoder = build_encoder(encoder_name, encoder_weights, output_stride=output_stride)

    def feature_layers(self) -> list[str]:
        """The layers :meth:`forward_layer` can return: 'decoder' and 'encoder1'..'encoder<N>'."""
        return ["decoder", *(f"encoder{i}" for i in range(1, len(self.model.encoder.out_channels)))]

    def feature_channels(self, layer: str) -> int:
        """Channels of ``layer``'s features."""
        stage = self._stage(layer)
        return self.model.segmentation_head[0].in_channels if stage is None else self.model.encoder.out_channels[stage]

    def _stage(self, layer: str) -> int | None:
        if layer not in self.feature_layers():
            raise ValueError(f"feature layer must be one of {self.feature_layers()}, got {layer!r}")
        return None if layer == "decoder" else int(layer[len("encoder") :])

    def forward_layer(self, image: Tensor, layer: str = "decoder") -> tuple[Tensor, Tensor]:
        """(features of ``layer`` ``[B, C, h, w]``, float32 logits ``[B, K, H, W]``) from one forward pass.

        'decoder': the decoder output before the segmentation head (256 channels at 1/4 of the
        input resolution); 'encoder<i>': encoder stage ``i`` (stride ``2**i``, capped at the
        output stride). Features cover the unpadded image (``ceil(H / stride)`` rows).
        """
        stage = self._stage(layer)
        height, width = image.shape[-2:]
        pad_h = (-height) % SIZE_DIVISOR
        pad_w = (-width) % SIZE_DIVISOR
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        stages = self.model.encoder(image)
        features = self.model.decoder(stages)
        # The 1x1 classifier and the upsampling in float32 also under mixed precision: the logits
        # are what every score reads (bf16 logits leave a few hundred distinct values per image).
        logits = float32_head(self.model.segmentation_head, features)
        if stage is not None:
            features = stages[stage]
        if pad_h or pad_w:
            logits = logits[..., :height, :width]
        stride = image.shape[-2] // features.shape[-2]
        features = features[..., : math.ceil(height / stride), : math.ceil(width / stride)]
        return features, logits

    def forward_features(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """(decoder features [B, 256, H/4, W/4], logits [B, K, H, W]) for input [B, 3, H, W]."""
        return self.forward_layer(image, "decoder")

    def forward(self, image: Tensor) -> Tensor:
        return self.forward_features(image)[1]

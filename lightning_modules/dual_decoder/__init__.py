"""Dual-decoder open-world segmentation, after Sodano et al. (CVPR 2024, ContMAV), trained on pasted outliers."""

from lightning_modules.dual_decoder.functional import *  # noqa: F403
from lightning_modules.dual_decoder.functional import __all__ as _functional_all
from lightning_modules.dual_decoder.lightning_model import DualDecoderSegmenter
from lightning_modules.dual_decoder.loss import contrastive_prototype_loss, objectosphere_loss, semantic_feature_loss
from lightning_modules.dual_decoder.torch_model import DualDecoderNet, segmenter_to_dual_decoder_state

__all__ = [
    *_functional_all,
    "DualDecoderNet",
    "DualDecoderSegmenter",
    "contrastive_prototype_loss",
    "objectosphere_loss",
    "segmenter_to_dual_decoder_state",
    "semantic_feature_loss",
]

# Checkpoints and configs name the class by this public path, not by the file that defines it.
DualDecoderSegmenter.__module__ = __name__

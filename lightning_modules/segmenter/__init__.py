"""The DeepLabV3+ segmenter every segmenter-based method builds on (not a method folder of its own)."""

from lightning_modules.segmenter.lightning_model import DeepLabV3PlusSegmenter
from lightning_modules.segmenter.torch_model import SIZE_DIVISOR, DeepLabV3Plus, PretrainedWeightsError, build_encoder

__all__ = ["SIZE_DIVISOR", "DeepLabV3Plus", "DeepLabV3PlusSegmenter", "PretrainedWeightsError", "build_encoder"]

# Checkpoints and configs name the class by this public path, not by the file that defines it.
DeepLabV3PlusSegmenter.__module__ = __name__

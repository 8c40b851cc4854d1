"""Entropy-maximisation outlier exposure: a DeepLabV3+ fine-tuned to be uncertain on pasted outliers."""

from lightning_modules.entropy_oe.lightning_model import EntropyOESegmenter
from lightning_modules.entropy_oe.loss import entropy_maximisation_loss

__all__ = ["EntropyOESegmenter", "entropy_maximisation_loss"]

# Checkpoints and configs name the class by this public path, not by the file that defines it.
EntropyOESegmenter.__module__ = __name__

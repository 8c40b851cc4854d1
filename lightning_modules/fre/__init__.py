"""FRE: a DeepLabV3+ segmenter scored by the reconstruction error of its features in per-class PCA subspaces."""

from lightning_modules.fre.functional import *  # noqa: F403  (the pure functions, public as before)
from lightning_modules.fre.functional import __all__ as _functional_all
from lightning_modules.fre.lightning_model import FRESegmenter

__all__ = [*_functional_all, "FRESegmenter"]

# Checkpoints and configs name the class by this public path, not by the file that defines it.
FRESegmenter.__module__ = __name__

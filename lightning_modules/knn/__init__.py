"""kNN: a DeepLabV3+ segmenter scored by the distance of its pixel features to a memory bank of training pixels."""

from lightning_modules.knn.functional import *  # noqa: F403  (the pure functions)
from lightning_modules.knn.functional import __all__ as _functional_all
from lightning_modules.knn.lightning_model import KNNSegmenter

__all__ = [*_functional_all, "KNNSegmenter"]

# Checkpoints and configs name the class by this public path, not by the file that defines it.
KNNSegmenter.__module__ = __name__

"""SML: a DeepLabV3+ segmenter scored by Standardized Max Logits.

The SML math is shared with other methods and lives in :mod:`lightning_modules.scoring.sml`;
it is re-exported here because ``lightning_modules.sml`` is where users (and checkpoints written
before the method folders) find it.
"""

from lightning_modules.scoring.baselines import entropy_score, max_logit_score, msp_score
from lightning_modules.scoring.postprocessing import dilated_smoothing, prediction_boundaries, suppress_boundaries
from lightning_modules.scoring.sml import (
    SMLPostprocessing,
    SMLScorer,
    sml_accumulate,
    sml_anomaly_score,
    sml_statistics,
    standardized_max_logit,
)
from lightning_modules.sml.lightning_model import SMLSegmenter

__all__ = [
    "SMLPostprocessing",
    "SMLScorer",
    "SMLSegmenter",
    "dilated_smoothing",
    "entropy_score",
    "max_logit_score",
    "msp_score",
    "prediction_boundaries",
    "sml_accumulate",
    "sml_anomaly_score",
    "sml_statistics",
    "standardized_max_logit",
    "suppress_boundaries",
]

# Checkpoints and configs name the class by this public path, not by the file that defines it.
SMLSegmenter.__module__ = __name__

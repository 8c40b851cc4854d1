"""Anomaly scores shared by several methods: logit baselines, SML and its post-processing."""

from lightning_modules.scoring.baselines import BASELINES, baseline_scores, entropy_score, max_logit_score, msp_score
from lightning_modules.scoring.postprocessing import dilated_smoothing, prediction_boundaries, suppress_boundaries
from lightning_modules.scoring.sml import (
    SMLOptions,
    SMLPostprocessing,
    SMLScorer,
    sml_accumulate,
    sml_anomaly_score,
    sml_statistics,
    standardized_max_logit,
)

__all__ = [
    "BASELINES",
    "SMLOptions",
    "SMLPostprocessing",
    "SMLScorer",
    "baseline_scores",
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

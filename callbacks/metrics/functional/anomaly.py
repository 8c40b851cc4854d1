"""``anomaly_metrics``: the one-shot, exact twin of ``AnomalyMetrics``.

>>> import torch
>>> scores = torch.tensor([[[0.9, 0.8], [0.7, 0.1]]])
>>> result = anomaly_metrics(scores, torch.tensor([[[13, 0], [13, 2]]]))
>>> result["aupr"], result["auroc"], result["fpr95"], result["threshold95"]
(0.8333333333333333, 0.75, 0.5, 0.699999988079071)
"""

from __future__ import annotations

import torch
from torch import Tensor

from callbacks.metrics.functional.curves import binary_metrics_from_counts
from callbacks.metrics.functional.keys import KEY_POS_INF, float_to_key, key_to_float
from callbacks.metrics.functional.per_image import per_image_metrics_from_keys

__all__ = ["anomaly_metrics"]


def anomaly_metrics(scores: Tensor, mask: Tensor, anomaly_index: int = 13, ignore_index: int = 255) -> dict[str, float]:
    """Everything ``AnomalyMetrics.compute()`` reports, for one set of images held in memory, exactly.

    Pooled metrics count every distinct float32 score on its own (``torch.unique``, memory linear
    in the pixels), so they equal scikit-learn's and the ``*_error_bound`` entries are 0;
    ``AnomalyMetrics`` reports the same keys from a fixed-size histogram, within its bounds of these.
    Per-image values follow the StreetHazards reference code (see :mod:`.per_image`). Undefined
    values are NaN.

    Args:
        scores: float ``[B, H, W]`` (or ``[H, W]``), higher = more anomalous; converted to float32.
        mask: integer labels of the same shape: ``anomaly_index`` positive, ``ignore_index`` skipped,
            anything else negative.

    Raises:
        ValueError: on mismatched shapes or NaN scores at valid pixels.
    """
    if scores.shape != mask.shape:
        raise ValueError(f"scores and mask must have the same shape, got {tuple(scores.shape)} and {tuple(mask.shape)}")
    if scores.ndim == 2:
        scores, mask = scores.unsqueeze(0), mask.unsqueeze(0)
    keys = float_to_key(scores.detach().reshape(scores.shape[0], -1))
    mask = mask.reshape(keys.shape).to(keys.device)
    positive, valid = mask == anomaly_index, mask != ignore_index
    if bool(((keys.abs() > KEY_POS_INF) & valid).any()):
        raise ValueError("anomaly scores contain NaN values at non-ignored pixels; NaN cannot be ranked")

    distinct, group = torch.unique(keys[valid].long(), return_inverse=True)
    labels = positive[valid]
    neg = torch.bincount(group[~labels], minlength=distinct.numel())
    pos = torch.bincount(group[labels], minlength=distinct.numel())
    pooled = binary_metrics_from_counts(neg, pos)
    index95 = int(pooled["index95"])
    threshold95 = float(key_to_float(distinct[index95])) if index95 >= 0 and distinct.numel() else float("nan")

    per_image = per_image_metrics_from_keys(keys, positive, valid)
    usable = per_image.usable
    num_images = int(usable.sum())
    num_pos, num_neg = int(pooled["num_pos"]), int(pooled["num_neg"])
    num_valid = num_pos + num_neg
    nan = float("nan")

    def mean(values: Tensor) -> float:
        return float(values[usable].mean()) if num_images else nan

    return {
        "aupr": float(pooled["aupr"]),
        "auroc": float(pooled["auroc"]),
        "fpr95": float(pooled["fpr95"]),
        "threshold95": threshold95,
        "aupr_error_bound": 0.0,
        "auroc_error_bound": 0.0,
        "fpr95_error_bound": 0.0,
        "aupr_per_image": mean(per_image.aupr),
        "auroc_per_image": mean(per_image.auroc),
        "fpr95_per_image": mean(per_image.fpr95),
        "fpr95_first_per_image": mean(per_image.fpr95_first),
        "num_images_per_image": float(num_images),
        "anomaly_fraction": num_pos / num_valid if num_valid else nan,
        "num_valid_pixels": float(num_valid),
    }

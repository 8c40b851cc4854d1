"""Where the false positives of a thresholded score land, per class.

>>> import torch
>>> parts = false_positive_breakdown(torch.tensor([[5, 1, 2], [1, 3, 0]]), threshold_bin=1)
>>> parts["false_positives"].tolist(), parts["fraction"].tolist()
([3.0, 3.0], [0.5, 0.5])
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["false_positive_breakdown"]


def false_positive_breakdown(negatives: Tensor, threshold_bin: int) -> dict[str, np.ndarray]:
    """Where the false positives of a thresholded score land, per class.

    ``negatives``: ``[K, nbins]`` counts of negative (known-class) pixels per class and per score
    bin, bins in increasing score order. A pixel is flagged anomalous when its bin index is
    ``>= threshold_bin``.

    Returns float64 arrays of length K:

    - ``false_positives``: flagged negative pixels of each class, ``FP_c``;
    - ``negatives``: all negative pixels of each class, ``N_c``;
    - ``fraction``: ``FP_c / sum_c FP_c`` (sums to 1; NaN everywhere when nothing is flagged);
    - ``false_positive_rate``: ``FP_c / N_c`` (NaN for classes without pixels).
    """
    counts = negatives.detach().to("cpu", torch.float64)
    if counts.dim() != 2:
        raise ValueError(f"expected [K, nbins] counts, got shape {tuple(counts.shape)}")
    false_pos = counts[:, max(int(threshold_bin), 0) :].sum(dim=1).numpy()
    total = counts.sum(dim=1).numpy()
    flagged = false_pos.sum()
    fraction = false_pos / flagged if flagged > 0 else np.full_like(false_pos, np.nan)
    rate = np.divide(false_pos, total, out=np.full_like(false_pos, np.nan), where=total > 0)
    return {"false_positives": false_pos, "negatives": total, "fraction": fraction, "false_positive_rate": rate}

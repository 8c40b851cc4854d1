"""Order-preserving float32 <-> integer keys.

A float32 score is mapped to a signed 32-bit integer *key* through its bit pattern so that
``a < b  <=>  key(a) < key(b)`` for all non-NaN floats: the key of a non-negative float is its
bit pattern, the key of a negative float is minus the bit pattern of its magnitude. So
``key(-x) == -key(x)``, ``-0.0`` and ``+0.0`` share the key 0, ``-inf``/``+inf`` have the
smallest/largest keys ``KEY_NEG_INF = -KEY_POS_INF`` and consecutive keys are consecutive floats.
NaNs map outside ``[KEY_NEG_INF, KEY_POS_INF]``.

>>> import torch
>>> float_to_key(torch.tensor([-1.0, -0.0, 0.0, 1.5])).tolist()
[-1065353216, 0, 0, 1069547520]
>>> key_to_float(float_to_key(torch.tensor([-2.5, 3.0]))).tolist()
[-2.5, 3.0]
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from callbacks.metrics.functional import _backend

__all__ = ["KEY_NEG_INF", "KEY_POS_INF", "float_to_key", "key_to_float"]

# Keys of -inf and +inf: every non-NaN float32 has a key in [KEY_NEG_INF, KEY_POS_INF].
KEY_POS_INF: int = 0x7F800000
KEY_NEG_INF: int = -KEY_POS_INF


def float_to_key(scores: Tensor) -> Tensor:
    """Map float scores to int32 keys with the same order (see the module docstring).

    Args:
        scores: float tensor of any shape; other float dtypes are converted to float32 first
            (bf16/fp16 exactly, float64 by rounding).

    Returns:
        int32 tensor of the same shape. Non-NaN values map into ``[KEY_NEG_INF, KEY_POS_INF]``;
        NaNs map outside that interval (positive NaNs above, negative NaNs below).
    """
    scores = scores.detach().to(torch.float32).contiguous()
    if _backend.numpy_on_cpu(scores):
        # NumPy's integer kernels are several times faster than torch's on CPU; same arithmetic.
        return torch.from_numpy(_float_to_key_array(scores.numpy()))
    return _float_to_key_array(scores)


def _float_to_key_array(scores: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """``float_to_key`` on a float32 NumPy array or torch tensor (same operators for both)."""
    bits = scores.view(np.int32) if isinstance(scores, np.ndarray) else scores.view(torch.int32)
    # sign is -1 for negative floats and 0 otherwise (arithmetic shift). For negative floats,
    # bits ^ 0x7FFFFFFF is -magnitude - 1 in two's complement, and subtracting sign adds the 1
    # back: key = -magnitude, which also sends -0.0 to 0. Non-negative floats are unchanged.
    sign = bits >> 31
    key = bits ^ (sign & 0x7FFFFFFF)
    key -= sign
    return key


def key_to_float(keys: Tensor) -> Tensor:
    """Inverse of ``float_to_key``: int keys (int32, or int64 within int32 range) to float32."""
    keys = keys.to(torch.int32)
    bits = torch.where(keys < 0, (-keys) | torch.iinfo(torch.int32).min, keys)
    return bits.contiguous().view(torch.float32)

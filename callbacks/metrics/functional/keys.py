"""Order-preserving float32 <-> integer keys.

A float32 score is mapped to a signed 32-bit integer *key* through its bit pattern so that
``a < b  <=>  key(a) < key(b)`` for all non-NaN floats, ``-0.0`` and ``+0.0`` share one key
and ``-inf``/``+inf`` are the smallest/largest keys (``float_to_key``). For non-negative
floats the key is the bit pattern itself; for negative floats the 31 magnitude bits are
inverted, which reverses their order and puts them below zero.

>>> import torch
>>> float_to_key(torch.tensor([-1.0, -0.0, 0.0, 1.5])).tolist()
[-1065353217, 0, 0, 1069547520]
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
KEY_NEG_INF: int = -KEY_POS_INF - 1


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
    # Negative floats: keep the sign bit, invert the magnitude so larger magnitudes sort lower.
    # (bits >> 31) is -1 for negative floats and 0 otherwise (arithmetic shift).
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    # -0.0 maps to -1 (the only float that does); merge it with +0.0 so the two compare equal.
    key += key == -1
    return key


def key_to_float(keys: Tensor) -> Tensor:
    """Inverse of ``float_to_key``: int keys (int32 or int64 within int32 range) to float32."""
    keys = keys.to(torch.int32)
    bits = torch.where(keys < 0, keys ^ 0x7FFFFFFF, keys)
    return bits.contiguous().view(torch.float32)

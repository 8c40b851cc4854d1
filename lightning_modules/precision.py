"""Float32 where mixed precision would cost the scores their resolution.

Under ``bf16-mixed`` autocast runs convolutions and matrix products in bfloat16 (8 significant
bits). The networks' bodies may, but what is read as a score may not: a 1x1 output head run in
bf16 rounds every full-resolution logit to one of 256 values per binade (MaxLogit on a 720x1280
test image went from 2.56 million distinct values to 636), and a standardised distance divides
that rounding error by a small standard deviation.

- :func:`float32_head`: a network's output head (1x1 convolution, upsampling) run in float32 with
  autocast off, on float32 inputs: logits and embeddings come out in float32.
- :func:`full_precision_matmul`: float32 matrix products without TF32 inside the block (scores
  that are differences of large products, such as squared distances expanded into matmuls,
  lose about 3e-4 relative precision to TF32's 10-bit mantissa). A no-op on CPU and when TF32
  is off already.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["float32_head", "full_precision_matmul"]


def float32_head(head: Callable[[Tensor], Tensor], features: Tensor) -> Tensor:
    """``head(features)`` in float32 with autocast off (float64 features stay float64)."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return head(features if features.dtype == torch.float64 else features.float())


@contextmanager
def full_precision_matmul() -> Iterator[None]:
    """CUDA float32 matrix products in full float32 (no TF32) inside the block; the setting is restored after.

    PyTorch has two switches for TF32 (``torch.set_float32_matmul_precision`` and, newer,
    ``torch.backends.cuda.matmul.fp32_precision``) and raises when a program reads one after the
    other was written; this uses whichever the program uses already (the older one by default).
    """
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the program set the newer switch: keep to it
        legacy = None
    if legacy is not None:
        if legacy == "highest":
            yield
            return
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(legacy)
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    if previous == "ieee":
        yield
        return
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous

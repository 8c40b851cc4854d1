"""Which code path runs on CPU tensors: NumPy (fast) or the torch code that also runs on CUDA."""

from __future__ import annotations

from torch import Tensor

# CPU tensors go through NumPy in the hot paths: its integer kernels and SIMD sort are several
# times faster than torch's CPU kernels. Setting this to False runs the torch code (the one used
# on CUDA) on CPU too, which the tests use to check that both paths agree.
NUMPY_ON_CPU = True


def numpy_on_cpu(tensor: Tensor) -> bool:
    """True when ``tensor`` lives on the CPU and the NumPy fast path is enabled."""
    return NUMPY_ON_CPU and tensor.device.type == "cpu"

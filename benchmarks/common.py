"""Helpers shared by the GPU benchmark scripts (each script puts the repository on sys.path)."""

from __future__ import annotations

import argparse
import contextlib
import platform
from collections.abc import Iterator

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU and the torch thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def select_device(name: str, threads: int | None = None) -> torch.device:
    """The device named on the command line (and the torch CPU thread count, when given); exits
    with a one-line error when CUDA is asked for and absent."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available (use --device cpu)")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_bool(text: str) -> bool:
    """argparse type for ``true``/``false``."""
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")
    return text.lower() == "true"


def print_device_header(device: torch.device) -> None:
    """Device, torch version and, on CUDA, which fp32 the fp32 figures are."""
    print(f"device: {device} ({device_name(device)}), torch {torch.__version__}")
    if device.type == "cuda":
        # fp32 convolutions on Ampere+ use TF32 unless cuDNN's flag is off: say which fp32 this is.
        print(
            f"fp32 settings: cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
            f"float32_matmul_precision={torch.get_float32_matmul_precision()}"
        )


@contextlib.contextmanager
def tf32(allowed: bool | None) -> Iterator[None]:
    """TF32 for cuDNN convolutions and CUDA matmuls on (``True``) or off (``False``) inside the
    block, restored afterwards; ``None`` leaves torch's settings as they are. cuDNN allows TF32 by
    default, so a plain ``32-true`` run on Ampere or newer convolves in TF32, not fp32."""
    if allowed is None:
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

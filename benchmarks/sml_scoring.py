"""Time Standardized Max Logits scoring and its stages, per image.

    python benchmarks/sml_scoring.py --device cpu --height 720 --width 1280 --batch 1 --repeats 10
    python benchmarks/sml_scoring.py --device cuda --batch 8 --dtype bfloat16

Logits are smooth random fields (coarse noise upsampled bilinearly), so the predicted class map
has regions and boundaries like a real segmenter's rather than per-pixel noise. Reported times
are milliseconds per image (batch time / batch size): median and min over ``--repeats`` runs
after ``--warmup`` runs, with the device synchronized around each run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.sml import (  # noqa: E402
    dilated_smoothing,
    entropy_score,
    max_logit_score,
    msp_score,
    prediction_boundaries,
    sml_accumulate,
    sml_anomaly_score,
    standardized_max_logit,
    suppress_boundaries,
)


def make_logits(
    batch: int, classes: int, height: int, width: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    coarse = 3.0 * torch.randn(batch, classes, height // 16 + 1, width // 16 + 1, generator=generator)
    logits = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    logits += 0.3 * torch.randn(batch, classes, height, width, generator=generator)
    return logits.to(device=device, dtype=dtype)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--classes", type=int, default=13)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    logits = make_logits(args.batch, args.classes, args.height, args.width, device, dtype)
    gen = torch.Generator().manual_seed(1)
    means = (3.0 + torch.randn(args.classes, generator=gen)).to(device=device, dtype=torch.float64)
    stds = (1.0 + torch.rand(args.classes, generator=gen)).to(device=device, dtype=torch.float64)
    sml, pred = standardized_max_logit(logits, means, stds)
    suppressed = suppress_boundaries(sml, pred)
    sums = torch.zeros(args.classes, dtype=torch.float64, device=device)
    sq_sums, counts = torch.zeros_like(sums), torch.zeros_like(sums)

    stages: dict[str, Callable[[], object]] = {
        "sml_anomaly_score (suppression + smoothing)": lambda: sml_anomaly_score(logits, means, stds),
        "  standardized_max_logit": lambda: standardized_max_logit(logits, means, stds),
        "  prediction_boundaries": lambda: prediction_boundaries(pred),
        "  suppress_boundaries (4/4, incl. boundaries)": lambda: suppress_boundaries(sml, pred),
        "  dilated_smoothing (7x7, d=6)": lambda: dilated_smoothing(suppressed),
        "sml_accumulate (statistics pass)": lambda: sml_accumulate(logits, sums, sq_sums, counts),
        "msp_score": lambda: msp_score(logits),
        "max_logit_score": lambda: max_logit_score(logits),
        "entropy_score": lambda: entropy_score(logits),
    }

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"device {device} ({name}), logits {args.batch}x{args.classes}x{args.height}x{args.width} {args.dtype}, "
        f"{args.repeats} repeats after {args.warmup} warm-up, torch {torch.__version__}"
    )
    print(f"{'stage':48s} {'median ms/img':>14s} {'min ms/img':>11s}")
    with torch.inference_mode():
        for label, fn in stages.items():
            times = [t / args.batch for t in time_ms(fn, device, args.warmup, args.repeats)]
            print(f"{label:48s} {statistics.median(times):14.2f} {min(times):11.2f}")


if __name__ == "__main__":
    main()

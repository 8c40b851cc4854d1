"""Time FRE scoring of DeepLabV3+ decoder features at StreetHazards resolution.

Scores 256-channel features on the decoder's 1/4 grid of a 720x1280 frame (180x320) against
13 class subspaces with ranks drawn from ``--min-rank..--max-rank`` (or one global subspace),
then upsamples the score map bilinearly to 720x1280, as evaluation does. Prints milliseconds per
image for the scoring, the upsampling and both together (median over repeats).

    python benchmarks/fre_scoring.py --device cpu --mode all
    python benchmarks/fre_scoring.py --device cuda --mode min --batch-size 8 --dtype bfloat16
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

FEATURE_CHANNELS = 256
FEATURE_SIZE = (180, 320)  # 1/4 of 720x1280
IMAGE_SIZE = (720, 1280)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", choices=("predicted", "min", "global", "all"), default="all")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--classes", type=int, default=13)
    p.add_argument("--min-rank", type=int, default=30)
    p.add_argument("--max-rank", type=int, default=100)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="feature dtype")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def random_subspaces(num: int, ranks: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Means ``[K, C]`` and zero-padded orthonormal bases ``[K, C, r_max]``, as fit_subspaces returns."""
    r_max = int(ranks.max())
    q = torch.linalg.qr(torch.randn(num, FEATURE_CHANNELS, r_max, generator=g, dtype=torch.float64))[0]
    used = torch.arange(r_max)[None, :] < ranks[:, None]
    means = torch.randn(num, FEATURE_CHANNELS, generator=g, dtype=torch.float64)
    return means, q * used[:, None, :]


def timed(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without install
    from lightning_modules import fre

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    ranks = torch.randint(args.min_rank, args.max_rank + 1, (args.classes,), generator=g)
    per_class = random_subspaces(args.classes, ranks, g)
    pooled = random_subspaces(1, torch.tensor([args.max_rank]), g)
    per_class = tuple(t.to(device) for t in per_class)
    pooled = tuple(t.to(device) for t in pooled)

    b = args.batch_size
    dtype = getattr(torch, args.dtype)
    features = torch.randn(b, FEATURE_CHANNELS, *FEATURE_SIZE, generator=g).to(device=device, dtype=dtype)
    # Piecewise-constant predicted classes, like a segmentation map, on the feature grid.
    coarse = torch.randint(0, args.classes, (b, 1, 18, 32), generator=g).float()
    predicted = F.interpolate(coarse, size=FEATURE_SIZE, mode="nearest")[:, 0].long().to(device)

    modes = ("predicted", "min", "global") if args.mode == "all" else (args.mode,)
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"threads={torch.get_num_threads()}, batch={b}, features {args.dtype} "
        f"[{b}, {FEATURE_CHANNELS}, {FEATURE_SIZE[0]}, {FEATURE_SIZE[1]}], K={args.classes}, "
        f"ranks {ranks.tolist()} (global rank {args.max_rank}), torch {torch.__version__}"
    )
    print(f"{'mode':<10} {'score ms/img':>13} {'upsample ms/img':>16} {'total ms/img':>13}")
    for mode in modes:
        means, bases = pooled if mode == "global" else per_class

        def score(mode: str = mode, means: torch.Tensor = means, bases: torch.Tensor = bases) -> torch.Tensor:
            return fre.reconstruction_error(features, means, bases, predicted, mode=mode)

        scores = score()

        def upsample(scores: torch.Tensor = scores) -> torch.Tensor:
            return F.interpolate(scores[:, None], size=IMAGE_SIZE, mode="bilinear", align_corners=False)

        def total(score: Callable[[], torch.Tensor] = score) -> torch.Tensor:
            return F.interpolate(score()[:, None], size=IMAGE_SIZE, mode="bilinear", align_corners=False)

        results = [timed(fn, device, args.warmup, args.repeats) for fn in (score, upsample, total)]
        ms = [1000.0 * statistics.median(r) / b for r in results]
        print(f"{mode:<10} {ms[0]:>13.1f} {ms[1]:>16.1f} {ms[2]:>13.1f}")


if __name__ == "__main__":
    main()

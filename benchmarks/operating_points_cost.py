"""What the operating-point evaluation costs: component-metric throughput and its share of a test pass.

Two figures:

1. **Throughput at a resolution** (default 720x1280, StreetHazards'): the per-batch work of
   :class:`callbacks.operating_points.OperatingPointEvaluation` on synthetic frames (smooth
   scores, anomaly blobs of many sizes, void stripes) at the default 10 thresholds (2 operating
   points + 8 for the oracle): pixel counts, SegmentMeIfYouCan's components at each threshold,
   size strata with their per-bin histograms, gallery bookkeeping. Reported as images/s and
   Mpx/s, and for ``ComponentMetrics`` alone.
2. **Share of a demo test pass** (with ``--ckpt``): ``main.py test`` of that checkpoint on the
   demo configs with ``--evaluation.operating_points`` off and on (calibration pass included),
   alternated ``--repeats`` times after one untimed warm-up; the fastest of each, and the
   difference over the time without.

    python benchmarks/operating_points_cost.py                               # throughput at 720x1280
    python benchmarks/operating_points_cost.py --ckpt outputs/compare/sml/run/checkpoints/last.ckpt --method sml
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_device_header, select_device  # noqa: E402
from callbacks.metrics import ComponentMetrics  # noqa: E402
from callbacks.operating_points import OperatingPointEvaluation  # noqa: E402


def synthetic_frames(count: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [count, H, W] float32 and labels (13 anomaly blobs, 255 stripes, known classes)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 13, (count, height, width)).astype(np.int64)
    scores = np.empty((count, height, width), np.float32)
    for i in range(count):
        for _ in range(rng.integers(1, 8)):
            h, w = (rng.uniform(0.01, 0.2, 2) * (height, width)).astype(int) + 2
            top, left = rng.integers(0, height - h), rng.integers(0, width - w)
            labels[i, top : top + h, left : left + w] = 13
        labels[i, :, rng.integers(0, width)] = 255
        noise = ndimage.gaussian_filter(rng.random((height // 4, width // 4)), 2)
        scores[i] = np.kron(noise, np.ones((4, 4)))[:height, :width] + (labels[i] == 13) * rng.uniform(0, 0.3)
    return torch.from_numpy(scores), torch.from_numpy(labels)


def throughput(args: argparse.Namespace, device: torch.device) -> None:
    scores, labels = synthetic_frames(args.images, args.height, args.width)
    images = torch.zeros(args.images, 3, args.height, args.width)
    scores, labels, images = scores.to(device), labels.to(device), images.to(device)
    evaluation = OperatingPointEvaluation(oracle_thresholds=8)
    quantiles = np.quantile(scores.cpu().numpy(), np.linspace(0.80, 0.995, 10))
    evaluation.thresholds = {"tpr95": float(quantiles[0]), "best_f1": float(quantiles[5])}
    evaluation._grid = [float(q) for i, q in enumerate(quantiles) if i not in (0, 5)]

    def run_all() -> None:
        for i in range(0, args.images, args.batch_size):
            batch = slice(i, i + args.batch_size)
            evaluation.update(scores[batch], labels[batch], images[batch], [f"{k}" for k in range(i, i + 2)])

    evaluation._create(args.height, args.width, device)
    start = time.perf_counter()
    run_all()
    elapsed = time.perf_counter() - start
    pixels = args.images * args.height * args.width
    print(
        f"operating-point evaluation, {len(evaluation.evaluated_thresholds)} thresholds, {args.height}x{args.width}: "
        f"{args.images / elapsed:.1f} images/s, {pixels / elapsed / 1e6:.1f} Mpx/s ({elapsed:.2f} s for {args.images})"
    )
    components = ComponentMetrics(evaluation.evaluated_thresholds, 500, 100).to(device)
    start = time.perf_counter()
    for i in range(0, args.images, args.batch_size):
        components.update(scores[i : i + args.batch_size], labels[i : i + args.batch_size])
    elapsed = time.perf_counter() - start
    print(
        f"ComponentMetrics alone, same thresholds: {args.images / elapsed:.1f} images/s, "
        f"{pixels / elapsed / 1e6:.1f} Mpx/s"
    )


def test_pass_share(args: argparse.Namespace) -> None:
    import main

    repo = Path(__file__).resolve().parents[1]
    configs = [
        f"--config={repo / 'configs/demo.yaml'}",
        f"--config={repo / 'configs/method/demo' / f'{args.method}.yaml'}",
    ]
    times: dict[str, list[float]] = {"without": [], "with": []}
    runs = [("warm-up", "false")] + [("without", "false"), ("with", "true")] * args.repeats
    with tempfile.TemporaryDirectory() as out:
        for k, (label, enabled) in enumerate(runs):
            argv = [
                *configs, f"--trainer.default_root_dir={out}/{k}",
                f"--evaluation.operating_points={enabled}", "--trainer.enable_progress_bar=false",
            ]  # fmt: skip
            cli = main.cli_main(argv, run=False)
            start = time.perf_counter()
            cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=args.ckpt, verbose=False)
            if label != "warm-up":
                times[label].append(time.perf_counter() - start)
    times = {label: min(values) for label, values in times.items()}  # type: ignore[misc]
    share = (times["with"] - times["without"]) / times["without"]
    print(
        f"demo test pass ({args.method}, {args.ckpt}): {times['without']:.1f} s without, {times['with']:.1f} s with "
        f"the operating-point evaluation (calibration pass included): +{100 * share:.1f}%"
    )


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--ckpt", default=None, help="a demo checkpoint: also measure the share of its test pass")
    parser.add_argument("--method", default="sml", help="the method of --ckpt (its demo config)")
    parser.add_argument("--repeats", type=int, default=2, help="timed pairs (without, with); the fastest of each")
    args = parser.parse_args()
    device = select_device(args.device, args.threads)
    print_device_header(device)
    print(f"CPUs available: {len(os.sched_getaffinity(0))}")
    throughput(args, device)
    if args.ckpt:
        test_pass_share(args)


if __name__ == "__main__":
    main_cli()

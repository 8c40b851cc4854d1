"""Data-loader throughput of the StreetHazards datamodule (images/s).

Writes (or reuses) a synthetic dataset in the released format at the requested size, then
iterates the training loader (decode, label shift, resize on load, albumentations augmentation,
normalization, collation) and the test loader (no augmentation) for a number of batches:

    python benchmarks/loader_throughput.py --height 360 --width 640 --workers 2

The figure is what a GPU would be fed; nothing is computed on the batches.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.streethazards import StreetHazardsDataModule  # noqa: E402
from datamodules.synthetic import write_synthetic_streethazards  # noqa: E402


def measure(loader, max_batches: int, warmup: int) -> tuple[float, int]:
    images = 0
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        if i == warmup:  # worker start-up is not throughput
            start, images = time.perf_counter(), 0
        if i >= warmup:
            images += batch["image"].shape[0]
        if i + 1 >= max_batches + warmup:
            break
    return images / (time.perf_counter() - start), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=str, default=None, help="Existing dataset; default: a synthetic one")
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--num_images", type=int, default=300, help="Training images of the synthetic dataset")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()

    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = str(Path(tmp.name) / "streethazards")
        start = time.perf_counter()
        num_test = (args.batches + 2) * args.batch_size
        size = (args.height, args.width)
        write_synthetic_streethazards(root, args.num_images, 8, num_test, image_size=size, workers=2)
        print(f"wrote the dataset at {args.height}x{args.width} in {time.perf_counter() - start:.1f} s")
    dm = StreetHazardsDataModule(
        root=root,
        image_size=(args.height, args.width),
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    dm.setup("fit")
    dm.setup("test")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, workers={args.workers}")
    for name, loader in (("train (augmented)", dm.train_dataloader()), ("test", dm.test_dataloader())):
        rate, count = measure(loader, args.batches, warmup=2)
        print(f"{name:18s} {rate:7.1f} images/s at {args.height}x{args.width} ({count} images)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

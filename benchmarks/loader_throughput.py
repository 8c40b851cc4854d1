"""Data-loader throughput of the StreetHazards datamodule (images/s), before and after the loader work.

At the real-data sizes by default: 720x1280 RGBA PNGs; the training split resized on load to
512x896, randomly scaled (0.5-2), cropped to 512x896, flipped and colour-jittered, batches of 8
(``configs/streethazards.yaml``); the test split at its native 720x1280, batches of 4. Each
configuration iterates the datamodule's own loaders (workers, collation, pinning on CUDA) and
delivers every batch in the data contract on ``--device`` (normalized float images, long masks),
so the figure is what a model on that device would be fed; nothing is computed on the batches.

    python benchmarks/loader_throughput.py                        # synthetic set under /tmp, written once
    python benchmarks/loader_throughput.py --root data/streethazards --device cuda
    python benchmarks/loader_throughput.py --height 64 --width 96 --image-size 48 64 --num-train 8 \\
        --num-test 4 --batches 2 --warmup 1 --workers 0          # a smoke run

Configurations:

- ``before``: the loader as it was: Pillow decodes, the workers normalize to float32 (and masks to
  int64), the float batch travels to the device (``decoder=pil``, ``normalize_on_device=false``).
- ``after``: OpenCV decodes, uint8 batches travel, normalization runs on ``--device`` after the
  move (the defaults).
- ``cached``: ``after`` with ``cache_dir``: one untimed epoch fills the cache of decoded, resized
  samples, then the timed epochs read it (training split; the test split is not cached).

Workers: ``--workers`` or, by default, the datamodule's own count from the CPUs this process may
use. The synthetic images are procedural scenes with noise, about 2.3 MB a PNG (the released
ones are about 1.5 MB), so decoding here is, if anything, slower than on the real files. The
timer starts after ``--warmup`` batches (worker start-up) and runs over ``--batches`` batches,
across epochs when the split is shorter.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import select_device, synchronize  # noqa: E402
from datamodules.streethazards import (  # noqa: E402
    StreetHazardsDataModule,
    available_cpus,
    list_split,
    prepare_batch,
)
from datamodules.synthetic import write_synthetic_streethazards  # noqa: E402

CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "before": {"decoder": "pil", "normalize_on_device": False},
    "after": {"decoder": "cv2", "normalize_on_device": True},
    "cached": {"decoder": "cv2", "normalize_on_device": True, "cache": True},
}


def load_average() -> float:
    """The 1-minute load average (other jobs on the machine), NaN where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine_line(workers: int, load: tuple[float, float]) -> str:
    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"({available_cpus()} available to this process), load average {load[0]:.2f} at start, "
        f"{load[1]:.2f} at the end; "
        f"{workers} loader workers, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )


def endless(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def measure(loader: Any, batches: int, warmup: int, device: torch.device) -> float:
    """Images/s over ``batches`` batches after ``warmup``, each delivered in the contract on ``device``."""
    stream = endless(loader)
    for _ in range(warmup):
        prepare_batch(next(stream), device)
    synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += prepare_batch(next(stream), device)["image"].shape[0]
    synchronize(device)
    elapsed = time.perf_counter() - start
    stream.close()
    return images / elapsed


def prepare_dataset(args: argparse.Namespace) -> tuple[Path, float | None]:
    if args.root is not None:
        return Path(args.root), None
    name = f"streethazards-loader-{args.height}x{args.width}-{args.num_train}train-{args.num_test}test"
    root = Path(args.data_dir or tempfile.gettempdir()) / name
    if root.exists():
        return root, None
    start = time.perf_counter()
    write_synthetic_streethazards(
        root,
        args.num_train,
        1,
        args.num_test,
        image_size=(args.height, args.width),
        workers=1 if args.num_train + args.num_test < 32 else max(1, min(8, available_cpus())),
    )
    return root, time.perf_counter() - start


def run_configuration(name: str, root: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    options = dict(CONFIGURATIONS[name])
    cached = options.pop("cache", False)
    cache = tempfile.TemporaryDirectory(prefix="loader-cache-", ignore_cleanup_errors=True) if cached else None

    def datamodule(workers: int | None) -> StreetHazardsDataModule:
        dm = StreetHazardsDataModule(
            root=str(root),
            image_size=tuple(args.image_size),
            test_native_resolution=args.test_size is None,
            test_image_size=tuple(args.test_size) if args.test_size is not None else None,
            batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size,
            num_workers=workers,
            scale_range=(0.5, 2.0),
            cache_dir=cache.name if cache is not None else None,
            **options,
        )
        dm.setup("fit")
        dm.setup("test")
        return dm

    dm = datamodule(args.workers)
    row: dict[str, Any] = {"configuration": name, "workers": dm.loader_workers(), **CONFIGURATIONS[name]}
    train = dm.train_dataloader()
    if cache is not None:
        for _ in train:  # the untimed first epoch fills the cache
            pass
    row["train_images_per_s"] = measure(train, args.batches, args.warmup, device)
    if cache is None:
        row["test_images_per_s"] = measure(dm.test_dataloader(), args.batches, args.warmup, device)
    else:
        row["test_images_per_s"] = float("nan")  # the test split is read once: it is not cached
    del train, dm
    gc.collect()  # stops the persistent workers (which may still be writing to the cache)
    if args.cpu_time:
        # CPU time per image, all in this process (no workers): what each worker core spends, which
        # other jobs on the machine disturb far less than the wall-clock rates above
        single = datamodule(0)
        row["train_cpu_ms"] = cpu_ms_per_image(single.train_dataloader(), args.cpu_batches, device)
        row["test_cpu_ms"] = (
            cpu_ms_per_image(single.test_dataloader(), args.cpu_batches, device) if cache is None else float("nan")
        )
    if cache is not None:
        cache.cleanup()
    return row


def cpu_ms_per_image(loader: Any, batches: int, device: torch.device) -> float:
    """CPU milliseconds per image of this process over ``batches`` batches after one untimed batch."""
    stream = endless(loader)
    prepare_batch(next(stream), device)
    start, images = time.process_time(), 0
    for _ in range(batches):
        images += prepare_batch(next(stream), device)["image"].shape[0]
    synchronize(device)
    stream.close()
    return 1e3 * (time.process_time() - start) / images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="an existing dataset (default: a synthetic one, written once)")
    parser.add_argument("--data-dir", default=None, help="where the synthetic set is kept (default: the temp folder)")
    parser.add_argument("--height", type=int, default=720, help="image height of the synthetic set (default: 720)")
    parser.add_argument("--width", type=int, default=1280, help="image width of the synthetic set (default: 1280)")
    parser.add_argument(
        "--image-size", type=int, nargs=2, default=(512, 896), metavar=("H", "W"), help="training size (512 896)"
    )
    parser.add_argument(
        "--test-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="test size (default: native)"
    )
    parser.add_argument("--num-train", type=int, default=64, help="synthetic training images (default: 64)")
    parser.add_argument("--num-test", type=int, default=32, help="synthetic test images (default: 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch (default: 8, the configs')")
    parser.add_argument("--eval-batch-size", type=int, default=4, help="test batch (default: 4, the configs')")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: from the CPUs)")
    parser.add_argument("--batches", type=int, default=24, help="timed batches per split (default: 24)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (default: 3)")
    parser.add_argument("--device", default="cpu", help="where batches are delivered: cpu or cuda (default: cpu)")
    parser.add_argument(
        "--configs", nargs="+", choices=list(CONFIGURATIONS), default=list(CONFIGURATIONS), help="default: all"
    )
    parser.add_argument(
        "--cpu-time", action="store_true", help="also CPU ms per image, measured in this process without workers"
    )
    parser.add_argument("--cpu-batches", type=int, default=4, help="batches of the CPU-time pass (default: 4)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.batches < 1 or args.warmup < 0:
        raise SystemExit("error: --batches must be >= 1 and --warmup >= 0")
    device = select_device(args.device)
    root, written = prepare_dataset(args)
    load_at_start = load_average()
    rows = [run_configuration(name, root, args, device) for name in args.configs]
    workers = rows[0]["workers"]
    source = f"written in {written:.0f} s, not timed" if written is not None else "reused"
    test_size = "x".join(map(str, args.test_size)) if args.test_size else "native"
    print(machine_line(workers, (load_at_start, load_average())))
    print(
        f"data: {root} ({len(list_split(root, 'train'))} training, {len(list_split(root, 'test'))} test images, "
        f"{source}); training: resize to {args.image_size[0]}x{args.image_size[1]}, scale 0.5-2, crop, flip, "
        f"colour jitter, batch {args.batch_size}; test: {test_size}, batch {args.eval_batch_size}; "
        f"delivered normalized on {device}"
    )
    before = next((r for r in rows if r["configuration"] == "before"), None)
    cpu = args.cpu_time
    print(
        "| configuration | decoder | normalized on | cache | train images/s | test images/s |"
        + (" train CPU ms/image | test CPU ms/image |" if cpu else "")
    )
    print("|---|---|---|---|---|---|" + ("---|---|" if cpu else ""))
    for row in rows:
        cells = []
        for key in ("train_images_per_s", "test_images_per_s"):
            value = row[key]
            text = f"{value:.1f}" if value == value else "n/a"
            if before is not None and row is not before and value == value:
                text += f" ({value / before[key]:.2f}x)"
            cells.append(text)
        where = str(device) if row["normalize_on_device"] else "workers"
        cache = "yes (2nd epoch on)" if row.get("cache") else "no"
        line = f"| {row['configuration']} | {row['decoder']} | {where} | {cache} | {cells[0]} | {cells[1]} |"
        if cpu:
            line += "".join(
                f" {row[k]:.1f} |" if row[k] == row[k] else " n/a |" for k in ("train_cpu_ms", "test_cpu_ms")
            )
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

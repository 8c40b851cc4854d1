"""Test throughput of each method (images/s) at 720x1280, data loading and evaluation included.

What is timed is one ``trainer.test`` as ``main.py test`` runs it: the same CLI builds the
method from its real-data configs
(``configs/streethazards.yaml`` + ``configs/method/<method>.yaml``) with the trainer preset
(``configs/trainer/gpu.yaml`` or ``cpu.yaml``), so the callbacks are the command's own
(``AnomalyEvaluation`` with every score's metrics and ``metrics.json``, the heatmap logger with
TensorBoard), and the ``StreetHazardsDataModule`` reads and decodes PNGs with ``--num-workers``
workers (default: the datamodule's count from the CPUs). Only the precision, batch size, workers
and ``encoder_weights=null`` (nothing is downloaded) are set here.

    python -m datamodules.synthetic /data/sh-bench --height 720 --width 1280 --num-train 8 \\
        --num-val 1 --num-test 1500                                # once, before the GPU lease
    python benchmarks/test_throughput.py --data-root /data/sh-bench  # the whole 1500-image split
    python benchmarks/test_throughput.py                          # 64 images written to /tmp, extrapolated
    python benchmarks/test_throughput.py --checkpoint sml=outputs/streethazards/sml/run/checkpoints/last.ckpt
    python benchmarks/test_throughput.py --device cpu --height 90 --width 160 --num-test 8 --num-train 2 \\
        --batch-size 2 --num-workers 0 --encoder resnet18         # a CPU smoke run

The data: a prepared folder (``--data-root``: a synthetic set written beforehand, or a real
StreetHazards folder, whose untimed statistics are then fitted on its whole training split, 5125
images, first). A missing ``--data-root`` (default: a cache folder under /tmp named after its size)
gets a synthetic set of ``--num-test`` images written first: 64 by default, since writing 1500
720x1280 PNGs takes about a minute of a GPU lease; the writing time is printed and not part of
any figure, and the time for 1500 images is extrapolated.
Networks are randomly initialised (the cost of a forward pass does not depend on the weights)
unless ``--checkpoint method=PATH`` gives one (loaded as ``model.init_args.init_checkpoint``).

Per method: an untimed warm-up ``test`` over ``--warmup-batches`` batches fits the post-hoc
statistics (SML statistics, FRE subspaces, SML on the dual decoder) on the ``--num-train``
training images and lets cuDNN choose its kernels; then the timed ``test`` runs over the whole
test split. Reported: its wall time (worker start-up and the end-of-test metric computation
included), images/s over it, the steady-state rate (from the end of batch ``--skip-batches``
to the end of the last batch, device synchronized at both ends), and the time for 1500 images:
measured when the split holds 1500, otherwise the fixed overhead (wall time minus the images at
the steady rate) plus 1500 images at the steady rate.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import parse_bool, print_device_header, select_device, synchronize  # noqa: E402
from datamodules.streethazards import list_split  # noqa: E402
from datamodules.synthetic import write_synthetic_streethazards  # noqa: E402
from lightning_modules.registry import discover_methods, methods, roster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
discover_methods()
METHODS = tuple(roster(methods()))
FULL_TEST_SPLIT = 1500


class BatchTimer(L.Callback):
    """Steady-state test rate: from the end of batch ``skip - 1`` to the end of the last batch."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.start: float | None = None
        self.end: float | None = None
        self.images = 0
        self.total_images = 0

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0 and self.skip == 0:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        size = batch["image"].shape[0]
        self.total_images += size
        if batch_idx >= self.skip:
            self.images += size
        if batch_idx == self.skip - 1:
            synchronize(pl_module.device)
            self.start = time.perf_counter()
        if batch_idx == trainer.num_test_batches[0] - 1:
            synchronize(pl_module.device)
            self.end = time.perf_counter()

    @property
    def rate(self) -> float:
        if self.start is None or self.end is None or self.images == 0:
            return math.nan
        return self.images / (self.end - self.start)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def prepare_dataset(args: argparse.Namespace) -> tuple[Path, int, float | None]:
    """The dataset root, its number of test images, and the seconds spent writing it (None if reused)."""
    if args.data_root is not None:
        root = Path(args.data_root)
    else:
        name = f"streethazards-bench-{args.height}x{args.width}-{args.num_train}train-{args.num_test}test"
        root = Path(tempfile.gettempdir()) / name
    written = None
    if not root.exists():
        start = time.perf_counter()
        workers = args.write_workers or os.cpu_count() or 1
        print(f"writing a synthetic dataset at {args.height}x{args.width} to {root} ({workers} processes) ...")
        write_synthetic_streethazards(
            root, args.num_train, 1, args.num_test, image_size=(args.height, args.width), workers=workers
        )
        written = time.perf_counter() - start
    return root, len(list_split(root, "test")), written


# ------------------------------------------------------------------------------------------------
# One method
# ------------------------------------------------------------------------------------------------
def cli_args(method: str, args: argparse.Namespace, device: torch.device, root: Path, out: Path) -> list[str]:
    """``main.py test`` arguments for ``method``: its real-data config, the trainer preset, our overrides."""
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(out), "name": method, "version": "run"},
    }
    preset = "gpu" if device.type == "cuda" else "cpu"
    argv = [
        f"--config={REPO / 'configs' / 'streethazards.yaml'}",
        f"--config={REPO / 'configs' / 'method' / f'{method}.yaml'}",
        f"--config={REPO / 'configs' / 'trainer' / f'{preset}.yaml'}",
        f"--trainer.precision={args.precision}",
        f"--trainer.default_root_dir={out / method}",
        f"--trainer.logger={json.dumps(logger)}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--data.root={root}",
        # The training-split size: used only by the post-hoc statistics here, which need no crops.
        f"--data.image_size=[{args.height}, {args.width}]",
        f"--data.eval_batch_size={args.batch_size}",
        "--model.init_args.encoder_weights=null",
    ]
    if args.num_workers is not None:
        argv.append(f"--data.num_workers={args.num_workers}")
    if device.type == "cuda" and device.index is not None:
        argv.append(f"--trainer.devices=[{device.index}]")
    if args.encoder is not None:
        argv.append(f"--model.init_args.encoder_name={args.encoder}")
    if args.channels_last is not None:
        argv.append(f"--model.init_args.channels_last={str(args.channels_last).lower()}")
    if method in args.checkpoints:
        argv.append(f"--model.init_args.init_checkpoint={args.checkpoints[method]}")
    return argv


def run_method(method: str, args: argparse.Namespace, device: torch.device, root: Path, out: Path) -> dict[str, Any]:
    """Warm up (and fit the post-hoc statistics), then time one full ``trainer.test``."""
    from main import cli_main

    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI also reads sys.argv
    try:
        cli = cli_main(cli_args(method, args, device, root, out), run=False)
    finally:
        sys.argv = saved_argv
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule

    start = time.perf_counter()
    trainer.limit_test_batches = args.warmup_batches
    trainer.test(model, datamodule=datamodule, verbose=False)
    warmup_s = time.perf_counter() - start
    if model.needs_posthoc and not bool(model.posthoc_fitted):
        raise RuntimeError(f"{method}: the warm-up did not fit the post-hoc statistics")

    timer = BatchTimer(args.skip_batches)
    trainer.callbacks.append(timer)
    trainer.limit_test_batches = 1.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    trainer.test(model, datamodule=datamodule, verbose=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start

    evaluation = next(cb for cb in trainer.callbacks if type(cb).__name__ == "AnomalyEvaluation")
    results = evaluation.results["test"]
    images = timer.total_images
    steady = timer.rate
    if images == FULL_TEST_SPLIT:
        full, full_kind = wall, "measured"
    else:
        overhead = max(0.0, wall - images / steady) if math.isfinite(steady) else math.nan
        full, full_kind = overhead + FULL_TEST_SPLIT / steady, "extrapolated"
    row = {
        "method": method,
        "precision": args.precision,
        "images": images,
        "num_images_evaluated": results.get("num_images"),
        "warmup_s": warmup_s,
        "wall_s": wall,
        "images_per_s": images / wall,
        "steady_images_per_s": steady,
        "full_split_s": full,
        "full_split_kind": full_kind,
        "aupr": results["scores"][results["primary_score"]].get("aupr", math.nan),
    }
    evaluation.release("test")
    del cli, trainer, model, datamodule
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def _checkpoint(text: str) -> tuple[str, str]:
    method, sep, path = text.partition("=")
    if not sep or method not in METHODS or not path:
        raise argparse.ArgumentTypeError(f"expected METHOD=PATH with METHOD one of {', '.join(METHODS)}, got '{text}'")
    return method, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu (default: cuda)")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: every registered method"
    )
    parser.add_argument("--height", type=int, default=720, help="test image height (default: 720, native)")
    parser.add_argument("--width", type=int, default=1280, help="test image width (default: 1280, native)")
    parser.add_argument(
        "--num-test",
        type=int,
        default=64,
        help="test images of a synthetic set written when --data-root is missing"
        " (default: 64; the real split has 1500)",
    )
    parser.add_argument("--num-train", type=int, default=8, help="synthetic training images (default: 8)")
    parser.add_argument("--data-root", default=None, help="dataset folder, written if missing (default: under /tmp)")
    parser.add_argument("--write-workers", type=int, default=None, help="processes writing the dataset (default: all)")
    parser.add_argument("--batch-size", type=int, default=4, help="test batch size (default: 4, the configs')")
    parser.add_argument("--num-workers", type=int, default=None, help="loader workers (default: from the CPUs)")
    parser.add_argument(
        "--precision", default=None, help="trainer precision (default: bf16-mixed on cuda, 32-true on cpu)"
    )
    parser.add_argument(
        "--channels-last", type=parse_bool, default=None, help="true/false (default: the configs', true)"
    )
    parser.add_argument("--encoder", default=None, help="smp encoder instead of the configs' (resnet50)")
    parser.add_argument(
        "--checkpoint",
        dest="checkpoints",
        type=_checkpoint,
        action="append",
        default=[],
        help="METHOD=PATH: network weights for a method (repeatable); default: random init",
    )
    parser.add_argument("--warmup-batches", type=int, default=2, help="untimed warm-up batches (default: 2)")
    parser.add_argument("--skip-batches", type=int, default=2, help="batches before the steady window (default: 2)")
    parser.add_argument("--output-dir", default=None, help="logs and metrics.json (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Time ``trainer.test`` of every method, print the table and return its rows."""
    args = build_parser().parse_args(argv)
    args.checkpoints = dict(args.checkpoints)
    device = select_device(args.device, args.threads)
    if args.precision is None:
        args.precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    if args.warmup_batches < 1 or args.skip_batches < 0 or args.batch_size < 1:
        raise SystemExit("error: --warmup-batches and --batch-size must be >= 1, --skip-batches >= 0")

    root, num_test, written = prepare_dataset(args)
    if args.skip_batches >= math.ceil(num_test / args.batch_size):
        raise SystemExit(f"error: --skip-batches {args.skip_batches} leaves no batch of the {num_test} test images")
    tmp = tempfile.TemporaryDirectory() if args.output_dir is None else None
    out = Path(tmp.name if tmp is not None else args.output_dir)
    print_device_header(device)
    note = f"written in {written:.1f} s, not timed" if written is not None else "reused"
    workers = args.num_workers if args.num_workers is not None else "auto"
    print(f"data: {root} ({num_test} test images, {note}); batch {args.batch_size}, {workers} workers")
    rows = []
    with warnings.catch_warnings():
        # Random networks predict few classes: the statistics warn about the others, which is
        # expected here and says nothing about speed.
        warnings.filterwarnings("ignore", message=".*(never predicted|too few|fewer than).*")
        for method in args.methods:
            row = run_method(method, args, device, root, out)
            rows.append(row)
            print(f"  done: {method} ({row['images_per_s']:.2f} images/s)", flush=True)
    if tmp is not None:
        tmp.cleanup()

    print()
    columns = ("method", "precision", "images", "wall s", "images/s", "steady images/s", "1500 images s", "warm-up s")
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['precision']} | {row['images']} | {row['wall_s']:.2f} | "
            f"{row['images_per_s']:.2f} | {row['steady_images_per_s']:.2f} | "
            f"{row['full_split_s']:.1f} ({row['full_split_kind']}) | {row['warmup_s']:.1f} |"
        )
    print("warm-up: the untimed first test (post-hoc statistics, cuDNN autotuning); wall s: the timed test")
    return rows


if __name__ == "__main__":
    main()

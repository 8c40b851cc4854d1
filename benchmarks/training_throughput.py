"""Training throughput (images/s): the training step alone, and ``main.py fit`` end to end.

**Compute only** (the default). Each configuration builds the method from its real-data config
(``configs/method/sml.yaml``, ``configs/method/dual_decoder.yaml``: ResNet-50 encoder, optimizer,
scheduler, class weighting) with ``encoder_weights=None`` so nothing is downloaded, and trains it
for ``--warmup + --steps`` steps with ``lightning.Trainer``: the precision plugin, the gradient
path and the methods' ``channels_last`` option are what ``main.py fit`` uses. Batches are random
tensors already on the device (the same batch every step), so the figure is the training step
alone: no loader, no progress bar, no validation. The timer starts at the first step after the
warm-up (cuDNN autotuning, allocator growth, lazy initialisation) and stops after the last
optimizer step, with the device synchronized at both ends.

**End to end** (``--end-to-end --data-root DIR``): ``main.py fit`` itself (``cli_main``) with the
real-data configs and the trainer preset over a prepared dataset folder (write one before a GPU
lease: ``python -m datamodules.synthetic DIR --height 720 --width 1280 --num-train 64 ...``): the
datamodule's loaders and workers, the progress bar, every callback, validation after each epoch,
checkpointing and, after training, the post-hoc fit. A callback times every epoch; the figures
are from the epochs after the first (worker start-up, cuDNN autotuning): training images/s over
the training batches (loader waits, steps, callbacks, progress bar) and over the whole epoch
(validation and checkpointing included), beside the compute-only figure of the same precision.

    python benchmarks/training_throughput.py                     # H100 defaults: 512x896, batch 8
    python benchmarks/training_throughput.py --precision 16-mixed --configs fp32 mixed mixed-cl
    python benchmarks/training_throughput.py --end-to-end --data-root /data/sh-bench --epochs 3
    python benchmarks/training_throughput.py --device cpu --height 64 --width 96 --batch-size 2 \\
        --steps 3 --warmup 1 --encoder resnet18                   # a CPU smoke run

Configurations: ``fp32`` (``32-true`` with TF32 off: true fp32 convolutions and matmuls),
``tf32`` (``32-true`` with TF32 on, cuDNN's own default on Ampere and newer), ``fp32-cl``
(fp32 + channels_last), ``mixed`` (``--precision``) and ``mixed-cl`` (+ channels_last, what
``configs/trainer/gpu.yaml`` and the real-data configs give). FRE and kNN score SML's network (a
DeepLabV3+ trained with cross-entropy): their training throughput is SML's.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_device_header, select_device, synchronize, tf32  # noqa: E402
from datamodules.labels import ANOMALY_INDEX, NUM_CLASSES  # noqa: E402
from lightning_modules.base import AnomalySegmentationModule  # noqa: E402
from lightning_modules.registry import discover_methods, methods, roster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
discover_methods()
# Every registered method that trains a network of its own (FRE scores SML's), with its real-data config.
METHODS: dict[str, tuple[type[AnomalySegmentationModule], str]] = {
    name: (methods()[name].cls, str(methods()[name].config(demo=False).relative_to(REPO)))
    for name in roster(methods())
    if methods()[name].scores_network_of is None
}
CONFIGS = ("fp32", "tf32", "fp32-cl", "mixed", "mixed-cl")


# ------------------------------------------------------------------------------------------------
# Data: one random batch, repeated
# ------------------------------------------------------------------------------------------------
def make_batch(method: str, batch_size: int, height: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A training batch of the shape the datamodule delivers; the dual decoder's has pasted outliers."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch_size, 3, height, width, generator=generator)
    # Regions of one class rather than per-pixel noise, so the losses see segment-like labels.
    coarse = torch.randint(0, NUM_CLASSES, (batch_size, 1, height // 32 + 1, width // 32 + 1), generator=generator)
    clean = F.interpolate(coarse.float(), size=(height, width), mode="nearest")[:, 0].long()
    batch = {"image": image, "mask": clean}
    if method == "dual_decoder":
        mask = clean.clone()
        h, w = max(1, height // 6), max(1, width // 6)
        for i in range(batch_size):
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            mask[i, top : top + h, left : left + w] = ANOMALY_INDEX
        batch = {"image": image, "mask": mask, "mask_clean": clean}
    return {key: value.to(device) for key, value in batch.items()}


class _Repeat(Dataset):
    def __init__(self, batch: dict[str, torch.Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batch


class RandomBatches(L.LightningDataModule):
    """The parts of the StreetHazards datamodule that ``fit`` touches, over one in-memory batch.

    ``posthoc_dataloader`` and ``class_pixel_counts`` are there because the methods call them
    (post-hoc statistics after training, ENet class weights in ``setup``); neither is timed.
    """

    def __init__(self, batch: dict[str, torch.Tensor], num_batches: int) -> None:
        super().__init__()
        self.batch, self.num_batches = batch, num_batches

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: items are whole batches, already on the device, passed through uncollated.
        return DataLoader(_Repeat(self.batch, self.num_batches), batch_size=None)

    def posthoc_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.batch, 1), batch_size=None)

    def class_pixel_counts(self) -> list[int]:
        labels = self.batch.get("mask_clean", self.batch["mask"])
        return torch.bincount(labels.flatten().cpu(), minlength=NUM_CLASSES)[:NUM_CLASSES].tolist()


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
class StepTimer(L.Callback):
    """Wall time of training steps ``warmup .. warmup + steps - 1``, device synchronized at both ends."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start: float | None = None
        self.elapsed: float | None = None
        self.images = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.warmup:
            synchronize(pl_module.device)  # the warm-up steps' kernels must not run into the timed window
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx >= self.warmup:
            self.images += batch["image"].shape[0]
        if batch_idx == self.warmup + self.steps - 1:
            synchronize(pl_module.device)
            self.elapsed = time.perf_counter() - self.start


# ------------------------------------------------------------------------------------------------
# One configuration
# ------------------------------------------------------------------------------------------------
def model_kwargs(config_path: str, encoder: str | None, channels_last: bool) -> dict[str, Any]:
    """The method's ``model.init_args`` from its real-data config, without pretrained weights."""
    config = yaml.safe_load((REPO / config_path).read_text())
    kwargs = dict(config["model"]["init_args"])
    kwargs.update(encoder_weights=None, channels_last=channels_last)
    if encoder is not None:
        kwargs["encoder_name"] = encoder
    return kwargs


def trainer_device(device: torch.device) -> tuple[str, Any]:
    if device.type == "cuda":
        return "gpu", [device.index if device.index is not None else torch.cuda.current_device()]
    return "cpu", 1


def precision_of(config: str, mixed: str) -> tuple[str, bool | None]:
    """The trainer precision of a configuration and whether TF32 is allowed (``None``: torch's default)."""
    if config == "tf32":
        return "32-true", True
    if config.startswith("fp32"):
        return "32-true", False
    return mixed, None


def precision_label(config: str, precision: str) -> str:
    return {"fp32": "32-true (TF32 off)", "fp32-cl": "32-true (TF32 off)", "tf32": "32-true (TF32 on)"}.get(
        config, precision
    )


def run_configuration(method: str, config: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Train ``warmup + steps`` steps of one method in one configuration; return its figures."""
    model_class, config_path = METHODS[method]
    precision, allow_tf32 = precision_of(config, args.precision)
    channels_last = config.endswith("-cl")
    torch.manual_seed(0)
    model = model_class(**model_kwargs(config_path, args.encoder, channels_last))
    batch = make_batch(method, args.batch_size, args.height, args.width, device)
    total = args.warmup + args.steps
    timer = StepTimer(args.warmup, args.steps)
    accelerator, devices = trainer_device(device)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        max_steps=total,
        limit_train_batches=total,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        benchmark=device.type == "cuda",  # as configs/trainer/gpu.yaml
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tf32(allow_tf32 if device.type == "cuda" else None):
        trainer.fit(model, datamodule=RandomBatches(batch, total))
    if timer.elapsed is None:
        raise RuntimeError(f"{method}: the timed steps did not all run (stopped at step {trainer.global_step})")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    del trainer, model, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "images_per_s": timer.images / timer.elapsed,
        "ms_per_step": 1e3 * timer.elapsed / args.steps,
        "peak_gib": peak,
    }


# ------------------------------------------------------------------------------------------------
# End to end: main.py fit
# ------------------------------------------------------------------------------------------------
class EpochTimer(L.Callback):
    """Per training epoch: images, wall time, and the part of it spent in validation.

    The device is synchronized at every boundary, so each time holds its own GPU work. The
    sanity-check validation before training is not part of any epoch.
    """

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.train_end: float | None = None
        self._start = self._validation_start = 0.0
        self._images, self._validation = 0, 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self._start, self._images, self._validation = time.perf_counter(), 0, 0.0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += batch["image"].shape[0]

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            synchronize(pl_module.device)
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            synchronize(pl_module.device)
            self._validation += time.perf_counter() - self._validation_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        seconds = time.perf_counter() - self._start
        self.epochs.append(
            {"images": self._images, "epoch_s": seconds, "validation_s": self._validation,
             "train_s": seconds - self._validation}
        )  # fmt: skip

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self.train_end = time.perf_counter()


def fit_args(method: str, args: argparse.Namespace, device: torch.device, out: Path) -> list[str]:
    """``main.py fit`` arguments: the method's real-data configs, the device's preset, the prepared data."""
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(out), "name": method, "version": "run"},
    }
    preset = "gpu" if device.type == "cuda" else "cpu"
    argv = [
        "fit",
        f"--config={REPO / 'configs' / 'streethazards.yaml'}",
        f"--config={REPO / 'configs' / 'method' / f'{method}.yaml'}",
        f"--config={REPO / 'configs' / 'trainer' / f'{preset}.yaml'}",
        f"--data.root={args.data_root}",
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger={json.dumps(logger)}",
        "--model.init_args.encoder_weights=null",
        "--trainer.callbacks+=benchmarks.training_throughput.EpochTimer",
    ]
    if device.type == "cuda" and device.index is not None:
        argv.append(f"--trainer.devices=[{device.index}]")
    if args.e2e_precision is not None:
        argv.append(f"--trainer.precision={args.e2e_precision}")
    if args.encoder is not None:
        argv.append(f"--model.init_args.encoder_name={args.encoder}")
    if args.num_workers is not None:
        argv.append(f"--data.num_workers={args.num_workers}")
    return argv + list(args.override)


def run_end_to_end(method: str, args: argparse.Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    """``main.py fit`` of one method; its figures from the epochs after the first."""
    from main import cli_main

    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI also reads sys.argv
    start = time.perf_counter()
    try:
        cli = cli_main(fit_args(method, args, device, out))
    finally:
        sys.argv = saved_argv
    wall = time.perf_counter() - start
    timer = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "EpochTimer")
    if len(timer.epochs) < 2 or timer.train_end is None:
        raise RuntimeError(f"{method}: fit ran {len(timer.epochs)} epoch(s); the figures need at least 2")
    steady = timer.epochs[1:]
    images = sum(e["images"] for e in steady)
    row = {
        "method": method,
        "precision": str(cli.trainer.precision),
        "epochs_timed": len(steady),
        "images_per_epoch": steady[0]["images"],
        "train_images_per_s": images / sum(e["train_s"] for e in steady),
        "epoch_images_per_s": images / sum(e["epoch_s"] for e in steady),
        "validation_s": sum(e["validation_s"] for e in steady) / len(steady),
        "first_epoch_s": timer.epochs[0]["epoch_s"],
        # after the last epoch: the post-hoc fit, last.ckpt re-saved with it, teardown
        "after_training_s": (start + wall) - timer.train_end,
        "fit_wall_s": wall,
    }
    del cli
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def end_to_end(args: argparse.Namespace, device: torch.device, compute_rows: list[dict[str, Any]]) -> list[dict]:
    tmp = tempfile.TemporaryDirectory() if args.output_dir is None else None
    out = Path(tmp.name if tmp is not None else args.output_dir)
    rows = []
    for method in args.e2e_methods:
        row = run_end_to_end(method, args, device, out)
        network = methods()[method].scores_network_of or method  # FRE and kNN train SML's network
        same = [r for r in compute_rows if r["method"] == network and r["precision"] == row["precision"]]
        same = [r for r in same if r["channels_last"]] or same  # the real-data configs use channels_last
        row["compute_images_per_s"] = same[0]["images_per_s"] if same else math.nan
        rows.append(row)
        print(f"  done: {method} main.py fit ({row['epoch_images_per_s']:.2f} images/s)", flush=True)
    if tmp is not None:
        tmp.cleanup()
    print()
    print(
        f"main.py fit end to end over {args.data_root} ({args.epochs} epochs; figures from epochs 2-{args.epochs}): "
        "loader, progress bar, callbacks, validation, checkpoints"
    )
    print(
        "| method | precision | training images/s | epoch images/s (with validation) | validation s/epoch "
        "| compute-only images/s | first epoch s | post-hoc fit + save s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        compute = f"{row['compute_images_per_s']:.2f}" if math.isfinite(row["compute_images_per_s"]) else "n/a"
        print(
            f"| {row['method']} | {row['precision']} | {row['train_images_per_s']:.2f} | "
            f"{row['epoch_images_per_s']:.2f} | {row['validation_s']:.2f} | {compute} | "
            f"{row['first_epoch_s']:.1f} | {row['after_training_s']:.1f} |"
        )
    return rows


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu (default: cuda)")
    parser.add_argument("--height", type=int, default=512, help="training crop height (default: 512)")
    parser.add_argument("--width", type=int, default=896, help="training crop width (default: 896)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (default: 5)")
    parser.add_argument(
        "--encoder", default=None, help="smp encoder instead of the configs' (resnet50), e.g. resnet18 for a smoke run"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(METHODS),
        default=list(METHODS),
        help="default: every method that trains a network",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=[*CONFIGS, "none"],
        default=["fp32", "mixed-cl"],
        help="fp32 (TF32 off), tf32, fp32-cl, mixed, mixed-cl (cl = channels_last; default: fp32 mixed-cl); "
        "none: no compute-only runs",
    )
    parser.add_argument(
        "--precision",
        default="bf16-mixed",
        choices=["bf16-mixed", "16-mixed"],
        help="the mixed precision of the 'mixed' configurations (default: bf16-mixed; 16-mixed for GPUs without bf16)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    e2e = parser.add_argument_group("end to end (main.py fit)")
    e2e.add_argument("--end-to-end", action="store_true", help="also time main.py fit over --data-root")
    e2e.add_argument("--data-root", default=None, help="a prepared dataset folder (StreetHazards layout)")
    e2e.add_argument("--epochs", type=int, default=3, help="epochs of the fit; the first is not timed (default: 3)")
    e2e.add_argument(
        "--e2e-methods",
        nargs="+",
        choices=list(roster(methods())),
        default=None,
        help="methods fitted end to end (default: --methods)",
    )
    e2e.add_argument("--e2e-precision", default=None, help="trainer precision (default: the preset's)")
    e2e.add_argument("--num-workers", type=int, default=None, help="loader workers (default: the datamodule's)")
    e2e.add_argument("--output-dir", default=None, help="logs and checkpoints (default: a temporary folder)")
    e2e.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra main.py fit argument (repeatable), e.g. --override=--trainer.limit_val_batches=2",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run every (method, configuration) pair, print the table and return its rows."""
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise SystemExit("error: --steps and --batch-size must be >= 1, --warmup >= 0")
    if args.end_to_end and (args.data_root is None or not Path(args.data_root).is_dir()):
        raise SystemExit("error: --end-to-end needs --data-root: a prepared dataset folder")
    if args.end_to_end and args.epochs < 2:
        raise SystemExit("error: --epochs must be >= 2 (the first epoch is not timed)")
    args.e2e_methods = args.e2e_methods or list(args.methods)
    configs = [c for c in args.configs if c != "none"]
    device = select_device(args.device, args.threads)

    encoder = (
        args.encoder
        or yaml.safe_load((REPO / "configs/method/sml.yaml").read_text())["model"]["init_args"]["encoder_name"]
    )
    print_device_header(device)
    print(
        f"training steps at {args.height}x{args.width}, batch {args.batch_size}, encoder {encoder} (random init), "
        f"{args.steps} timed steps after {args.warmup} warm-up; random batches already on the device"
    )
    print("FRE and kNN score SML's network (DeepLabV3+ with cross-entropy): their training throughput is SML's.")
    rows: list[dict[str, Any]] = []
    for method in args.methods if configs else []:
        baseline = None
        for config in configs:
            precision, _ = precision_of(config, args.precision)
            channels_last = config.endswith("-cl")
            with warnings.catch_warnings():
                # The untimed post-hoc fit after training sees one random batch, so most classes are
                # never predicted and the statistics warn; and there is no validation loop on purpose.
                warnings.filterwarnings("ignore", message=".*(never predicted|fewer than|no `val_dataloader`).*")
                figures = run_configuration(method, config, args, device)
            if config == "fp32":
                baseline = figures["images_per_s"]
            row = {"method": method, "config": config, "precision": precision, "channels_last": channels_last}
            row.update(figures)
            row["speedup"] = figures["images_per_s"] / baseline if baseline else math.nan
            rows.append(row)
            print(f"  done: {method} {config} ({figures['images_per_s']:.2f} images/s)", flush=True)

    if rows:
        print()
        print("compute only: the training step on random batches already on the device")
        print("| method | config | precision | channels_last | images/s | ms/step | vs fp32 | peak GiB |")
        print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        speedup = f"{row['speedup']:.2f}x" if math.isfinite(row["speedup"]) else "n/a"
        peak = f"{row['peak_gib']:.1f}" if math.isfinite(row["peak_gib"]) else "n/a"
        print(
            f"| {row['method']} | {row['config']} | {precision_label(row['config'], row['precision'])} | "
            f"{row['channels_last']} | {row['images_per_s']:.2f} | {row['ms_per_step']:.1f} | {speedup} | {peak} |"
        )
    if args.end_to_end:
        for row in end_to_end(args, device, rows):
            rows.append({**row, "config": "main.py fit"})
    return rows


if __name__ == "__main__":
    main()

"""Training throughput (images/s) in fp32 and in mixed precision + channels_last, through a real Trainer.

Each configuration builds the method from its real-data config (``configs/method/sml.yaml``,
``configs/method/dual_decoder.yaml``: ResNet-50 encoder, optimizer, scheduler, class weighting) with
``encoder_weights=None`` so nothing is downloaded, and trains it for ``--warmup + --steps``
steps with ``lightning.Trainer``: the precision plugin, the gradient path and the methods'
``channels_last`` option are what ``main.py fit`` uses. Batches are random tensors already on
the device (the same batch every step), so the figure is the training step alone; data loading
is measured by ``loader_throughput.py`` and, for testing, ``test_throughput.py``.

    python benchmarks/training_throughput.py                     # H100 defaults: 512x896, batch 8
    python benchmarks/training_throughput.py --precision 16-mixed --configs fp32 mixed mixed-cl
    python benchmarks/training_throughput.py --device cpu --height 64 --width 96 --batch-size 2 \\
        --steps 3 --warmup 1 --encoder resnet18                   # a CPU smoke run

Configurations: ``fp32`` (``32-true``), ``fp32-cl`` (+ channels_last), ``mixed`` (``--precision``)
and ``mixed-cl`` (+ channels_last, what ``configs/trainer/gpu.yaml`` and the real-data configs
give). The timer starts at the first step after the warm-up (cuDNN autotuning, allocator growth,
lazy initialisation) and stops after the last optimizer step, with the device synchronized at
both ends. FRE trains exactly SML's network (a DeepLabV3+ with cross-entropy), so its training
throughput is SML's.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
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

from benchmarks.common import print_device_header, select_device, synchronize  # noqa: E402
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
CONFIGS = ("fp32", "fp32-cl", "mixed", "mixed-cl")


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


def run_configuration(
    method: str, precision: str, channels_last: bool, args: argparse.Namespace, device: torch.device
) -> dict[str, float]:
    """Train ``warmup + steps`` steps of one method in one configuration; return its figures."""
    model_class, config_path = METHODS[method]
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
        choices=CONFIGS,
        default=["fp32", "mixed-cl"],
        help="fp32, fp32-cl, mixed, mixed-cl (cl = channels_last; default: fp32 mixed-cl)",
    )
    parser.add_argument(
        "--precision",
        default="bf16-mixed",
        choices=["bf16-mixed", "16-mixed"],
        help="the mixed precision of the 'mixed' configurations (default: bf16-mixed; 16-mixed for GPUs without bf16)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run every (method, configuration) pair, print the table and return its rows."""
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise SystemExit("error: --steps and --batch-size must be >= 1, --warmup >= 0")
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
    print("FRE trains the same network as SML (DeepLabV3+ with cross-entropy): its training throughput is SML's.")
    rows: list[dict[str, Any]] = []
    for method in args.methods:
        baseline = None
        for config in args.configs:
            precision = "32-true" if config.startswith("fp32") else args.precision
            channels_last = config.endswith("-cl")
            with warnings.catch_warnings():
                # The untimed post-hoc fit after training sees one random batch, so most classes are
                # never predicted and the statistics warn; and there is no validation loop on purpose.
                warnings.filterwarnings("ignore", message=".*(never predicted|fewer than|no `val_dataloader`).*")
                figures = run_configuration(method, precision, channels_last, args, device)
            if config == "fp32":
                baseline = figures["images_per_s"]
            row = {"method": method, "config": config, "precision": precision, "channels_last": channels_last}
            row.update(figures)
            row["speedup"] = figures["images_per_s"] / baseline if baseline else math.nan
            rows.append(row)
            print(f"  done: {method} {config} ({figures['images_per_s']:.2f} images/s)", flush=True)

    print()
    print("| method | config | precision | channels_last | images/s | ms/step | vs fp32 | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        speedup = f"{row['speedup']:.2f}x" if math.isfinite(row["speedup"]) else "n/a"
        peak = f"{row['peak_gib']:.1f}" if math.isfinite(row["peak_gib"]) else "n/a"
        print(
            f"| {row['method']} | {row['config']} | {row['precision']} | {row['channels_last']} | "
            f"{row['images_per_s']:.2f} | {row['ms_per_step']:.1f} | {speedup} | {peak} |"
        )
    return rows


if __name__ == "__main__":
    main()

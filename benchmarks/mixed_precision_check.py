"""Mixed precision against fp32: a short ``fit`` and ``test`` of every method in both, metrics side by side.

Runs ``python main.py compare``'s machinery (``main.compare``: the demo configs,
SML segmenter trained, FRE scoring that network, the dual decoder fine-tuned from it, every
method tested with the evaluation callback) once in fp32 (``32-true``) and once in
``--precision`` (``bf16-mixed`` by default), with the same seed and data, into
``<output-dir>/fp32`` and ``<output-dir>/<precision>``. Training is not bitwise reproducible
across precisions, so "equal" means "within the run-to-run spread": ``--seed-runs`` more fp32
runs with other seeds (``seed_everything`` 1, 2, ...) measure that spread on the same device.
For the precision alone, one checkpoint scored in both, see ``precision_scoring_check.py``.

    python benchmarks/mixed_precision_check.py                   # one GPU: demo configs, bf16-mixed, 1 seed run
    python benchmarks/mixed_precision_check.py --precision 16-mixed --epochs 10
    python benchmarks/mixed_precision_check.py --device cpu --data-root /tmp/sh-tiny --image-size 64 96 \\
        --synthetic-counts 12 4 6 --epochs 1 --seed-runs 0 --threads 1 \\
        --override=--trainer.limit_train_batches=2 --override=--trainer.limit_val_batches=1   # a CPU smoke run

On ``cuda`` the trainer preset is ``configs/trainer/gpu.yaml`` (cuDNN benchmark) and, unless
``--channels-last false``, every method runs with ``channels_last`` in both precisions, as the
real-data configs do; only the precision differs between the two runs. The table lists, for
every score of every network, AUPR, AUROC, FPR95 and mIoU in fp32 and in mixed precision, their
difference, and the largest difference between the fp32 run and a seed run.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import parse_bool, print_device_header, select_device  # noqa: E402
from datamodules.streethazards import SyntheticConfig  # noqa: E402
from datamodules.synthetic import write_synthetic_streethazards  # noqa: E402
from main import compare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = SyntheticConfig()  # the embedded set's sizes, which the demo configs train on
KEYS = (("aupr", "AUPR"), ("auroc", "AUROC"), ("fpr95", "FPR95"), ("miou", "mIoU"))


def base_overrides(args: argparse.Namespace, device: torch.device) -> list[str]:
    """CLI arguments shared by every run: device preset, data, epochs and the user's extras."""
    preset = "gpu" if device.type == "cuda" else "cpu"
    overrides = [
        f"--config={REPO / 'configs' / 'trainer' / f'{preset}.yaml'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if device.type == "cuda" and device.index is not None:
        overrides.append(f"--trainer.devices=[{device.index}]")
    if args.channels_last:
        overrides.append("--model.init_args.channels_last=true")
    if args.data_root is not None:
        overrides.append(f"--data.root={args.data_root}")
    if args.image_size is not None:
        overrides.append(f"--data.image_size=[{args.image_size[0]}, {args.image_size[1]}]")
        overrides.append("--data.train_crop_size=null")  # the demo's crops are for its 128x224 images
    if args.num_workers is not None:
        overrides.append(f"--data.num_workers={args.num_workers}")
    if args.epochs is not None:
        overrides.append(f"--trainer.max_epochs={args.epochs}")
    return overrides + list(args.override)


def run(name: str, precision: str, seed: int | None, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One comparison (fit + test of every method) at ``precision``; its records."""
    overrides = base_overrides(args, device) + [f"--trainer.precision={precision}"]
    if seed is not None:
        overrides.append(f"--seed_everything={seed}")
    print(f"=== {name}: precision {precision}" + (f", seed {seed}" if seed is not None else ""), flush=True)
    return compare(
        str(Path(args.output_dir) / name),
        methods=args.methods,
        overrides=overrides,
        reuse_checkpoints=False,  # every run trains afresh: a stale run of other settings must not count
        num_examples=1,
        base_config=str(REPO / "configs" / "demo.yaml"),
        method_config_dir=str(REPO / "configs" / "method" / "demo"),
    )


def _fmt(value: float, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu (default: cuda)")
    parser.add_argument(
        "--precision", default="bf16-mixed", choices=["bf16-mixed", "16-mixed"], help="compared with 32-true"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="max_epochs of the trained methods (default: configs')"
    )
    parser.add_argument(
        "--output-dir", default="outputs/mixed_precision", help="runs go to <dir>/fp32, <dir>/<precision>"
    )
    parser.add_argument(
        "--image-size", type=int, nargs=2, metavar=("H", "W"), default=None, help="training size (default: configs')"
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="dataset folder (default: the configs' embedded one); a missing folder gets a synthetic dataset",
    )
    parser.add_argument(
        "--synthetic-counts",
        type=int,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        default=(EMBEDDED.num_train, EMBEDDED.num_val, EMBEDDED.num_test),
        help="images of a synthetic dataset written to a missing --data-root (default: the embedded set's, "
        f"{EMBEDDED.num_train} {EMBEDDED.num_val} {EMBEDDED.num_test})",
    )
    parser.add_argument("--seed-runs", type=int, default=1, help="extra fp32 runs with seeds 1..N (default: 1)")
    parser.add_argument(
        "--channels-last", type=parse_bool, default=None, help="true/false (default: true on cuda, false on cpu)"
    )
    parser.add_argument("--num-workers", type=int, default=None, help="data loader workers (default: configs')")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra CLI argument for every run (repeatable), e.g. --override=--trainer.limit_train_batches=2",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="methods compared (default: compare's; 'all': every method)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run fp32, mixed precision and the seed runs; print the table; return the records and differences."""
    args = build_parser().parse_args(argv)
    device = select_device(args.device, args.threads)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if args.data_root is not None and not Path(args.data_root).exists():
        size = tuple(args.image_size) if args.image_size is not None else (EMBEDDED.height, EMBEDDED.width)
        print(f"writing a synthetic dataset ({'/'.join(map(str, args.synthetic_counts))} images) to {args.data_root}")
        write_synthetic_streethazards(args.data_root, *args.synthetic_counts, image_size=size, seed=EMBEDDED.seed)

    fp32 = run("fp32", "32-true", None, args, device)
    mixed = run(args.precision, args.precision, None, args, device)
    seeds = [run(f"fp32-seed{k}", "32-true", k, args, device) for k in range(1, args.seed_runs + 1)]

    by_method = [{r["method"]: r for r in records} for records in (fp32, mixed, *seeds)]
    rows = []
    for record in fp32:
        name = record["method"]
        row: dict[str, Any] = {"method": name}
        for key, _ in KEYS:
            a, b = record[key], by_method[1][name][key]
            row[key] = (a, b, b - a)
            spreads = [abs(other[name][key] - a) for other in by_method[2:]]
            spreads = [x for x in spreads if math.isfinite(x)]
            row[f"{key}_seed_spread"] = max(spreads) if spreads else math.nan
        rows.append(row)

    print()
    print_device_header(device)
    print(
        f"fp32 (32-true) vs {args.precision}, channels_last={args.channels_last}; seed spread: the largest "
        f"|fp32 seed k - fp32| over {args.seed_runs} run(s) with other seeds"
    )
    print("| score@network | metric | fp32 | mixed | mixed - fp32 | seed spread |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for key, label in KEYS:
            a, b, diff = row[key]
            spread = row[f"{key}_seed_spread"]
            print(f"| {row['method']} | {label} | {_fmt(a)} | {_fmt(b)} | {_fmt(diff, signed=True)} | {_fmt(spread)} |")
    print()
    for key, label in KEYS:
        diffs = [(abs(row[key][2]), row[f"{key}_seed_spread"]) for row in rows if math.isfinite(row[key][2])]
        worst = max((d for d, _ in diffs), default=math.nan)
        line = f"{label}: largest |mixed - fp32| {_fmt(worst)}"
        if args.seed_runs > 0:
            within = sum(d <= s for d, s in diffs)
            spread = max((s for _, s in diffs if math.isfinite(s)), default=math.nan)
            line += f", largest seed spread {_fmt(spread)}; within its own score's seed spread: {within}/{len(diffs)}"
        print(line)
    # Primary records only: a network's baselines repeat its training time.
    train = {
        name: sum(r["train_time_s"] for r in records if r["method"] == r["network"])
        for name, records in (("fp32", fp32), (args.precision, mixed))
    }
    print("training time (s, all methods): " + ", ".join(f"{k} {v:.1f}" for k, v in train.items()))
    return {"rows": rows, "fp32": fp32, "mixed": mixed, "seeds": seeds, "train_time_s": train}


if __name__ == "__main__":
    main()

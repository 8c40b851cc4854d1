"""One checkpoint scored in fp32 and in mixed precision: metrics and score maps side by side.

``mixed_precision_check.py`` trains twice, so its differences mix the precision with training
noise. This script takes one trained checkpoint and runs ``main.py test`` on it twice on the same
device and data, once in true fp32 (``32-true`` with TF32 off for convolutions and matmuls) and
once in ``--precision`` (``bf16-mixed`` by default); only the arithmetic differs. It prints, for
every score, AUPR, AUROC and FPR95 in both and their difference, mIoU likewise, and on the first
``--images`` test images the pixel-level agreement: the closed-set prediction (argmax) agreement
and, per score, the largest and mean absolute difference in units of the fp32 score's standard
deviation.

    python benchmarks/precision_scoring_check.py --method sml \\
        --checkpoint outputs/streethazards/sml/run/checkpoints/last.ckpt      # one GPU, real data
    python benchmarks/precision_scoring_check.py --method sml --checkpoint CKPT --device cpu \\
        --base-config configs/demo.yaml --method-config configs/method/demo/sml.yaml \\
        --override=--trainer.limit_test_batches=2                              # a CPU smoke run

A checkpoint written by ``fit`` carries its post-hoc statistics (SML, FRE, kNN bank, prototypes),
so both runs use the same ones; a checkpoint without them has them fitted in each precision, which
the output says.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_device_header, select_device, tf32  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METRICS = (("aupr", "AUPR"), ("auroc", "AUROC"), ("fpr95", "FPR95"))


class OutputRecorder(L.Callback):
    """Keeps the logits' argmax and every score of the first ``limit`` test images, on the CPU."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.predictions: list[torch.Tensor] = []
        self.scores: dict[str, list[torch.Tensor]] = {}
        self.count = 0

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.count >= self.limit or not isinstance(outputs, dict):
            return
        take = min(self.limit - self.count, batch["image"].shape[0])
        self.predictions.append(outputs["logits"][:take].float().argmax(1).cpu())
        for name, score in outputs["scores"].items():
            self.scores.setdefault(name, []).append(score[:take].float().cpu())
        self.count += take


def run_test(precision: str, args: argparse.Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    """``main.py test --ckpt_path`` of the checkpoint at ``precision``; its results and recorded outputs."""
    from main import cli_main

    preset = "gpu" if device.type == "cuda" else "cpu"
    recorder = {"class_path": f"{OutputRecorder.__module__}.OutputRecorder", "init_args": {"limit": args.images}}
    if OutputRecorder.__module__ == "__main__":  # run as a script: the CLI imports it by its package path
        recorder["class_path"] = "benchmarks.precision_scoring_check.OutputRecorder"
    argv = [
        "test",
        f"--config={args.base_config}",
        f"--config={args.method_config}",
        f"--config={REPO / 'configs' / 'trainer' / f'{preset}.yaml'}",
        f"--ckpt_path={args.checkpoint}",
        f"--trainer.precision={precision}",
        f"--trainer.default_root_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.callbacks+={json.dumps(recorder)}",
        *args.override,
    ]
    if device.type == "cuda" and device.index is not None:
        argv.append(f"--trainer.devices=[{device.index}]")
    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI also reads sys.argv
    # the fp32 reference is true fp32: TF32 off (cuDNN allows it by default on Ampere and newer)
    try:
        with tf32(False if precision == "32-true" else None):
            cli = cli_main(argv)
    finally:
        sys.argv = saved_argv
    callbacks = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    model = cli.model
    return {
        "results": callbacks["AnomalyEvaluation"].results["test"],
        "recorder": callbacks["OutputRecorder"],
        # test fits missing statistics at its start: then each precision fitted its own
        "statistics_in_checkpoint": not model.needs_posthoc or bool(_checkpoint_has_statistics(args.checkpoint)),
    }


def _checkpoint_has_statistics(path: str) -> bool:
    from lightning_modules.checkpoints import read_checkpoint

    state = read_checkpoint(path).get("state_dict", {})
    flags = [value for key, value in state.items() if key.endswith("posthoc_fitted")]
    return bool(flags) and all(bool(flag) for flag in flags)


def pixel_agreement(fp32: OutputRecorder, mixed: OutputRecorder) -> dict[str, Any]:
    """Argmax agreement and, per score, max/mean |mixed - fp32| in units of the fp32 score's std."""
    out: dict[str, Any] = {"images": fp32.count}
    if not fp32.predictions:
        return out
    a, b = torch.cat(fp32.predictions), torch.cat(mixed.predictions)
    out["argmax_agreement"] = float((a == b).double().mean())
    out["scores"] = {}
    for name, parts in fp32.scores.items():
        x, y = torch.cat(parts).double(), torch.cat(mixed.scores[name]).double()
        finite = torch.isfinite(x) & torch.isfinite(y)
        scale = x[finite].std().item() if finite.any() else math.nan
        diff = (x - y)[finite].abs()
        out["scores"][name] = {
            "max_abs_diff_in_std": diff.max().item() / scale if scale > 0 else math.nan,
            "mean_abs_diff_in_std": diff.mean().item() / scale if scale > 0 else math.nan,
            "non_finite_differ": int((torch.isfinite(x) != torch.isfinite(y)).sum()),
        }
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by main.py fit")
    parser.add_argument("--method", required=True, help="its method's short name (sml, fre, dual_decoder, ...)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu (default: cuda)")
    parser.add_argument(
        "--precision", default="bf16-mixed", choices=["bf16-mixed", "16-mixed"], help="compared with 32-true"
    )
    parser.add_argument(
        "--base-config", default=str(REPO / "configs" / "streethazards.yaml"), help="default: the real-data base"
    )
    parser.add_argument("--method-config", default=None, help="default: configs/method/<method>.yaml")
    parser.add_argument("--images", type=int, default=8, help="test images compared pixel by pixel (default: 8)")
    parser.add_argument("--output-dir", default="outputs/precision_scoring", help="<dir>/<precision>/ logs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--override", action="append", default=[], help="extra main.py argument for both runs (repeatable)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.method_config is None:
        args.method_config = str(REPO / "configs" / "method" / f"{args.method}.yaml")
    device = select_device(args.device, args.threads)
    runs = {
        precision: run_test(precision, args, device, Path(args.output_dir) / precision)
        for precision in ("32-true", args.precision)
    }
    fp32, mixed = runs["32-true"]["results"], runs[args.precision]["results"]
    agreement = pixel_agreement(runs["32-true"]["recorder"], runs[args.precision]["recorder"])

    print()
    print_device_header(device)
    same = "from the checkpoint" if runs["32-true"]["statistics_in_checkpoint"] else "fitted in each precision"
    print(
        f"{args.method}: {args.checkpoint} tested in 32-true (TF32 off) and {args.precision}; "
        f"{fp32['num_images']} test images; post-hoc statistics {same}"
    )
    print("| score | metric | fp32 | mixed | mixed - fp32 |")
    print("|---|---|---|---|---|")
    largest: dict[str, float] = {}
    for name, values in fp32["scores"].items():
        for key, label in METRICS:
            a, b = values.get(key, math.nan), mixed["scores"].get(name, {}).get(key, math.nan)
            print(f"| {name} | {label} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
            if math.isfinite(b - a):
                largest[label] = max(largest.get(label, 0.0), abs(b - a))
    a, b = fp32["segmentation"]["miou"], mixed["segmentation"]["miou"]
    print(f"| closed set | mIoU | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    largest["mIoU"] = abs(b - a)
    print()
    if "argmax_agreement" in agreement:
        print(
            f"pixels of the first {agreement['images']} images: closed-set prediction agrees on "
            f"{100 * agreement['argmax_agreement']:.3f}%"
        )
        for name, values in agreement["scores"].items():
            print(
                f"  {name}: |mixed - fp32| max {values['max_abs_diff_in_std']:.4f}, mean "
                f"{values['mean_abs_diff_in_std']:.5f} fp32 standard deviations"
                + (f"; {values['non_finite_differ']} pixels finite in only one" if values["non_finite_differ"] else "")
            )
    summary = ", ".join(f"{label} {value:.4f}" for label, value in largest.items())
    print(f"largest |mixed - fp32| over every score: {summary}")
    return {"fp32": fp32, "mixed": mixed, "agreement": agreement, "largest": largest}


if __name__ == "__main__":
    main()

"""``python main.py compare``: train (or reuse), fit, test and compare every method on one dataset.

Each method runs from its own config through the same CLI as ``main.py fit/test`` (so what the
comparison measures is exactly what a user gets). The results go to ``--output_dir``:

- ``comparison.json``: one record per method and per extra score (baselines on the same
  network, SML on the dual decoder's semantic logits), with pooled and per-image metrics, mIoU,
  train and test wall time and the checkpoint;
- ``comparison.md``: the same as a table;
- ``comparison.png``: PR and ROC curves of every record, and a row of example heatmaps per method;
- ``<method>/run/``: each method's TensorBoard logs, checkpoints and ``metrics.json``.

A method listed in ``reuse_segmenter`` (FRE by default) is not trained: it scores the network
trained for another method (SML), as FRE is a post-hoc scorer of a plain segmenter. A method
listed in ``init_from`` is trained, starting from another method's trained network (its
``init_checkpoint``); the demo starts the dual decoder from the SML segmenter this way.
Completed methods are reused on a second run (``reuse_checkpoints``), resumed if interrupted.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from callbacks.io import atomic_open, atomic_write_json, atomic_write_text
from datamodules.labels import ANOMALY_INDEX, IMAGE_MEAN, IMAGE_STD, colorize

DEFAULT_METHODS = {
    "sml": "configs/demo/sml.yaml",
    "fre": "configs/demo/fre.yaml",
    "dual_decoder": "configs/demo/dual_decoder.yaml",
}
TABLE_KEYS = ("aupr", "auroc", "fpr95", "aupr_per_image", "auroc_per_image", "fpr95_per_image")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="main.py compare",
        description="Train (or reuse), fit and test every method on the same data; write one table and one figure.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A comparison config (configs/compare*.yaml).")
    parser.add_argument("--output_dir", type=str, default="outputs/compare", help="Where results and runs go.")
    parser.add_argument(
        "--methods", type=dict[str, str], default=DEFAULT_METHODS, help="Method name -> its fit/test config."
    )
    parser.add_argument(
        "--reuse_segmenter",
        type=dict[str, str],
        default={"fre": "sml"},
        help="Method -> the method whose trained network it scores instead of training its own.",
    )
    parser.add_argument(
        "--init_from",
        type=dict[str, str],
        default={"dual_decoder": "sml"},
        help="Method -> the method whose trained network initializes its training (its init_checkpoint).",
    )
    parser.add_argument(
        "--overrides",
        type=list[str],
        default=[],
        help="Extra CLI arguments for every method, e.g. ['--trainer.max_epochs=2'].",
    )
    parser.add_argument(
        "--reuse_checkpoints", type=bool, default=True, help="Resume or reuse runs found in output_dir."
    )
    parser.add_argument("--num_examples", type=int, default=2, help="Example images in the heatmap rows.")
    return parser


def _method_args(config: str, name: str, output_dir: Path, overrides: Sequence[str]) -> list[str]:
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(output_dir), "name": name, "version": "run"},
    }
    return [
        "--config",
        config,
        f"--trainer.default_root_dir={output_dir / name}",
        f"--trainer.logger={json.dumps(logger)}",
        *overrides,
    ]


def _records_of(name: str, results: dict[str, Any], extra: dict[str, Any], listed: Collection[str] = ()) -> list[dict]:
    """One record per score of a method's test results; extra scores named in ``listed`` are skipped."""
    records = []
    primary = results["primary_score"]
    for score, values in results["scores"].items():
        if score != primary and score in listed:
            continue
        record = {
            "method": name if score == primary else f"{score}@{name}",
            "network": name,
            "score": score,
            **{key: values.get(key, math.nan) for key in TABLE_KEYS},
            "miou": results["segmentation"]["miou"],
            "anomaly_fraction": results["anomaly_fraction"],
            "num_classes": results["num_classes"],
            **extra,
        }
        records.append(record)
    return records


@torch.no_grad()
def _examples(model: Any, datamodule: Any, count: int) -> list[dict[str, np.ndarray]]:
    """The first ``count`` test images with anomalies, with the method's primary score."""
    examples: list[dict[str, np.ndarray]] = []
    model.eval()
    for batch in datamodule.test_dataloader():
        for i in range(batch["image"].shape[0]):
            if len(examples) >= count:
                return examples
            if not bool((batch["mask"][i] == ANOMALY_INDEX).any()):
                continue
            image = batch["image"][i : i + 1].to(model.device)
            output = model.segment(image)
            score = output.scores[output.primary_score_name]
            if score.shape[-2:] != image.shape[-2:]:
                score = torch.nn.functional.interpolate(score[:, None], size=image.shape[-2:], mode="bilinear")[:, 0]
            mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGE_STD).view(3, 1, 1)
            rgb = ((batch["image"][i] * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            examples.append({"image": rgb, "mask": batch["mask"][i].numpy(), "score": score[0].float().cpu().numpy()})
    return examples


def run_method(
    name: str,
    config: str,
    output_dir: Path,
    overrides: Sequence[str],
    reuse: bool,
    init_checkpoint: str | None,
    train: bool = True,
) -> dict[str, Any]:
    """Fit (if ``train``; starting from ``init_checkpoint`` if given) and test one method; return its results."""
    from main import cli_main

    args = _method_args(config, name, output_dir, overrides)
    if init_checkpoint is not None:
        args.append(f"--model.init_args.init_checkpoint={init_checkpoint}")
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads sys.argv too; it holds compare's options
    try:
        cli = cli_main(args, run=False)
    finally:
        sys.argv = argv
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    evaluation = next(cb for cb in trainer.callbacks if type(cb).__name__ == "AnomalyEvaluation")
    checkpoint_dir = output_dir / name / "run" / "checkpoints"
    last = checkpoint_dir / "last.ckpt"

    train_time = 0.0
    if train:
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if reuse and last.is_file() else None)
        train_time = time.perf_counter() - start
    start = time.perf_counter()
    trainer.test(model, datamodule=datamodule, verbose=False)
    test_time = time.perf_counter() - start
    results = evaluation.results["test"]
    evaluation.release("test")  # the histograms (64 MiB per score) are no longer needed
    return {
        "results": results,
        "curves": evaluation.curves.get("test", {}),
        "train_time_s": train_time,
        "test_time_s": test_time,
        "checkpoint": str(last) if last.is_file() else init_checkpoint,
        "metrics_file": str(evaluation.metrics_path) if evaluation.metrics_path else None,
        "model": model,
        "datamodule": datamodule,
    }


def format_table(records: list[dict[str, Any]]) -> str:
    header = "| method | AUPR | AUROC | FPR95 | AUPR/img | AUROC/img | FPR95/img | mIoU | train s | test s |"
    lines = [header, "|" + "---|" * 10]

    def fmt(value: Any, digits: int = 3) -> str:
        return (
            "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"
        )

    for r in records:
        lines.append(
            f"| {r['method']} | {fmt(r['aupr'])} | {fmt(r['auroc'])} | {fmt(r['fpr95'])} | "
            f"{fmt(r['aupr_per_image'])} | {fmt(r['auroc_per_image'])} | {fmt(r['fpr95_per_image'])} | "
            f"{fmt(r['miou'])} | {fmt(r['train_time_s'], 0)} | {fmt(r['test_time_s'], 0)} |"
        )
    return "\n".join(lines)


def plot_comparison(
    records: list[dict[str, Any]], curves: dict[str, dict[str, Any]], examples: dict[str, list[dict]], path: Path
) -> None:
    """PR and ROC curves of every record, then one row of example heatmaps per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in examples if examples[m]]
    shown = examples[methods[0]] if methods else []  # every method scores the same test images
    columns = max(2, len(shown))
    # Curves on top, then the inputs, their ground truth and one row of heatmaps per method; each
    # example image keeps its column, so a method's heatmap sits under the image it scores.
    heights = [1.6] + [1.0] * (2 + len(methods)) if shown else [1.6]
    fig, axes = plt.subplots(
        len(heights), columns, figsize=(4.0 * columns, 2.1 * sum(heights)),
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )  # fmt: skip
    pr_ax, roc_ax = axes[0, 0], axes[0, 1]
    for record in records:
        curve = curves.get(record["method"])
        if not curve:
            continue
        style = "-" if record["method"] == record["network"] else ":"
        pr_ax.plot(curve["recall"], curve["precision"], style, label=f"{record['method']} ({record['aupr']:.3f})")
        roc_ax.plot(curve["fpr"], curve["tpr"], style, label=f"{record['method']} ({record['auroc']:.3f})")
    fraction = records[0]["anomaly_fraction"] if records else math.nan
    if math.isfinite(fraction):
        pr_ax.axhline(fraction, color="grey", lw=0.8, ls="--", label=f"chance ({fraction:.3f})")
    pr_ax.set(title="Precision-recall (pooled)", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    roc_ax.set(title="ROC (pooled)", xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1))
    roc_ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    pr_ax.legend(fontsize=6)
    roc_ax.legend(fontsize=6)
    for ax in axes[0, 2:]:
        ax.axis("off")
    for col in range(columns):
        for row in range(1, len(heights)):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if col >= len(shown):
                axes[row, col].axis("off")
    for col, example in enumerate(shown):
        anomaly = example["mask"] == ANOMALY_INDEX
        axes[1, col].imshow(example["image"])
        axes[1, col].set_title(f"test image {col + 1}", fontsize=8)
        axes[2, col].imshow(colorize(example["mask"]))
        axes[2, col].set_title("ground truth (anomaly cyan)", fontsize=8)
        for row, method in enumerate(methods, start=3):
            # fixed scale per method: the 1st-99th percentile over its examples
            values = np.concatenate([e["score"].ravel() for e in examples[method]])
            lo, hi = np.percentile(values, [1, 99])
            ax = axes[row, col]
            ax.imshow(examples[method][col]["score"], cmap="inferno", vmin=lo, vmax=hi)
            if anomaly.any():  # outline of the true anomaly, to judge the heatmap against
                ax.contour(anomaly.astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_title(f"{method} score (cyan: true anomaly)", fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def compare(
    output_dir: str,
    methods: dict[str, str],
    reuse_segmenter: dict[str, str],
    overrides: Sequence[str] = (),
    reuse_checkpoints: bool = True,
    num_examples: int = 2,
    init_from: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run the comparison and write its three files; return the records."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, config in methods.items():
        if not Path(config).is_file():
            raise FileNotFoundError(f"compare: config of method '{name}' not found: {config}")
    init_from = dict(init_from or {})
    for name, source in reuse_segmenter.items():
        if name in methods and source not in methods:
            raise ValueError(f"compare: '{name}' reuses the network of '{source}', which is not in --methods")
    for name, source in init_from.items():
        if name in reuse_segmenter:
            raise ValueError(f"compare: '{name}' is in both --reuse_segmenter and --init_from; pick one")
        if name in methods and (source not in methods or source in init_from or source in reuse_segmenter):
            raise ValueError(
                f"compare: '{name}' starts from the network of '{source}', which is not a method trained "
                f"from scratch in --methods (--init_from '{{}}' trains '{name}' from scratch)"
            )
    # methods that provide a network for others run first
    order = sorted(methods, key=lambda m: m in reuse_segmenter or m in init_from)
    records: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    examples: dict[str, list[dict]] = {}
    runs: dict[str, dict[str, Any]] = {}
    for name in order:
        source = reuse_segmenter.get(name)
        start_from = init_from.get(name)
        init_checkpoint = runs[source or start_from]["checkpoint"] if (source or start_from) else None
        note = f", scoring the network of {source}" if source else ""
        note += f", starting from the network of {start_from}" if start_from else ""
        print(f"compare: {name} ({methods[name]}){note}")
        run = run_method(name, methods[name], out, overrides, reuse_checkpoints, init_checkpoint, train=source is None)
        runs[name] = run
        extra = {
            "train_time_s": run["train_time_s"],
            "test_time_s": run["test_time_s"],
            "checkpoint": run["checkpoint"],
            "metrics_file": run["metrics_file"],
            "config": methods[name],
            "initialized_from": start_from,
        }
        # Baselines of a network (MSP, ...) are listed once, with the method that trained it;
        # scores only this method computes (e.g. FRE's unsmoothed fre_raw) are listed with it.
        listed = runs[source]["results"]["scores"] if source else ()
        method_records = _records_of(name, run["results"], extra, listed)
        records.extend(method_records)
        for record in method_records:
            if record["score"] in run["curves"]:
                curves[record["method"]] = run["curves"][record["score"]]
        examples[name] = _examples(run["model"], run["datamodule"], num_examples)

    rank = {name: i for i, name in enumerate(methods)}
    primary = sorted((r for r in records if r["method"] == r["network"]), key=lambda r: rank[r["network"]])
    records = primary + [r for r in records if r["method"] != r["network"]]
    atomic_write_json(out / "comparison.json", {"records": records, "methods": methods})
    table = format_table(records)
    fraction = records[0]["anomaly_fraction"] if records else math.nan
    atomic_write_text(
        out / "comparison.md",
        f"# Method comparison\n\nTest split, anomaly pixel fraction {fraction:.4f}; "
        f"{records[0]['num_classes'] if records else '?'} known classes. Pooled metrics over all test pixels; "
        "`/img`: mean over test images with anomalies (StreetHazards reference protocol). "
        "`score@network`: another score of that network.\n\n" + table + "\n",
    )
    plot_comparison(records, curves, examples, out / "comparison.png")
    print(table)
    print(f"compare: wrote {out / 'comparison.json'}, {out / 'comparison.md'}, {out / 'comparison.png'}")
    return records


def compare_main(argv: Sequence[str]) -> int:
    cfg = build_parser().parse_args(list(argv))
    compare(
        cfg.output_dir,
        dict(cfg.methods),
        dict(cfg.reuse_segmenter),
        list(cfg.overrides),
        cfg.reuse_checkpoints,
        cfg.num_examples,
        dict(cfg.init_from),
    )
    return 0


if __name__ == "__main__":
    sys.exit(compare_main(sys.argv[1:]))

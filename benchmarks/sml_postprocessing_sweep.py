"""Choose SML's post-processing on held-out images with anomalies, never on the test split.

    python benchmarks/sml_postprocessing_sweep.py --ckpt outputs/compare/sml/run/checkpoints/last.ckpt

SML's boundary suppression and dilated smoothing are sized in pixels. The published values
(boundary width 4 in 4 steps, a 7x7 Gaussian at dilation 6, whose taps span 37 pixels) were set
for Cityscapes-size images; on the embedded default's 128x224 images the smoothing alone spans
over a quarter of the image height, which washes out small anomalies. This script scores one
trained SML segmenter with every combination of ``--boundary-widths`` (0 = no suppression; width
``w`` is suppressed in ``w`` steps, as the published 4 in 4) and ``--dilations`` (0 = no
smoothing; 7x7 Gaussian, sigma 1) and prints pooled AUPR, AUROC and FPR95 for each, plus the
grid point with the best ``--select`` metric and the config lines that use it.

The images it is scored on must not be the test split the results are reported on. By default
they are a held-out synthetic set written with another seed (``--heldout-seed``, 300 test images
at the embedded default's 180x320), which shares no image with the embedded default; with
``--eval-root`` any dataset in the StreetHazards layout whose ``--eval-split`` has anomalies.
SML's class statistics come from the checkpoint when it carries them (``fit`` stores them in
``last.ckpt``), otherwise they are fitted on the training split of ``--root``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import select_device  # noqa: E402
from callbacks.evaluation import resize_to  # noqa: E402
from callbacks.metrics import AnomalyMetrics  # noqa: E402
from datamodules.io import atomic_write_json  # noqa: E402
from datamodules.labels import NUM_CLASSES  # noqa: E402
from datamodules.streethazards import (  # noqa: E402
    DEFAULT_ROOT,
    StreetHazardsDataError,
    StreetHazardsDataModule,
    prepare_batch,
)
from datamodules.synthetic import write_synthetic_streethazards  # noqa: E402
from lightning_modules.checkpoints import CheckpointError, load_checkpoint_file  # noqa: E402
from lightning_modules.scoring.sml import sml_anomaly_score  # noqa: E402
from lightning_modules.sml import SMLSegmenter  # noqa: E402

PUBLISHED = (4, 6)  # (boundary width, dilation) of the SML paper
SELECT_METRICS = {"aupr": max, "auroc": max, "fpr95": min}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint of an SMLSegmenter (e.g. its last.ckpt)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="dataset whose training split fits the statistics")
    parser.add_argument("--eval-root", default=None, help="dataset to score on (default: a held-out synthetic set)")
    parser.add_argument("--eval-split", choices=("test", "val"), default="test")
    parser.add_argument("--heldout-seed", type=int, default=1, help="seed of the held-out synthetic set")
    parser.add_argument("--heldout-images", type=int, default=300)
    parser.add_argument("--heldout-size", type=int, nargs=2, default=(180, 320), metavar=("H", "W"))
    parser.add_argument("--heldout-dir", default="outputs/sml-sweep", help="where held-out sets are written")
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 224), metavar=("H", "W"))
    parser.add_argument("--boundary-widths", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--dilations", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6])
    parser.add_argument("--select", choices=sorted(SELECT_METRICS), default="aupr")
    parser.add_argument("--num-bits", type=int, default=20, help="histogram resolution (AnomalyMetrics)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the table to this JSON file")
    args = parser.parse_args(argv)
    if any(w < 0 for w in args.boundary_widths) or any(d < 0 for d in args.dilations):
        parser.error("--boundary-widths and --dilations must be >= 0 (0 turns the step off)")
    if args.heldout_images < 1:
        parser.error(f"--heldout-images must be >= 1, got {args.heldout_images}")
    return args


def postprocessing(boundary_width: int, dilation: int) -> dict[str, object]:
    """SMLSegmenter arguments for one grid point."""
    return {
        "boundary_suppression": boundary_width > 0,
        "boundary_width": max(boundary_width, 1),
        "boundary_iterations": max(boundary_width, 1),
        "dilated_smoothing": dilation > 0,
        "dilation": max(dilation, 1),
    }


def config_lines(boundary_width: int, dilation: int) -> list[str]:
    """The lines of the ``model.init_args.sml`` block that select this grid point."""
    lines = [f"boundary_suppression: {str(boundary_width > 0).lower()}"]
    if boundary_width > 0:
        lines += [f"boundary_width: {boundary_width}", f"boundary_iterations: {boundary_width}"]
    lines.append(f"dilated_smoothing: {str(dilation > 0).lower()}")
    if dilation > 0:
        lines.append(f"dilation: {dilation}")
    return lines


def load_segmenter(path: str) -> SMLSegmenter:
    checkpoint = load_checkpoint_file(path)
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    try:
        model = SMLSegmenter(**hparams)
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError, KeyError) as error:
        raise CheckpointError(
            f"checkpoint '{path}' is not an SMLSegmenter checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]})"
        ) from error
    return model.eval()


def eval_root(args: argparse.Namespace) -> Path:
    if args.eval_root is not None:
        return Path(args.eval_root)
    height, width = args.heldout_size
    root = Path(args.heldout_dir) / f"heldout-seed{args.heldout_seed}-{args.heldout_images}test-{height}x{width}"
    if not root.exists():
        if args.heldout_seed == 0:
            print("warning: --heldout-seed 0 is the embedded default's seed: its test images are the test split's")
        write_synthetic_streethazards(
            root, 0, 0, args.heldout_images, image_size=(height, width), seed=args.heldout_seed
        )
    return root


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    device = select_device(args.device, args.threads)
    model = load_segmenter(args.ckpt).to(device)
    data_kwargs = {
        "image_size": tuple(args.image_size),
        "ignore_unlabeled": model.num_classes == NUM_CLASSES - 1,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
    }
    if bool(model.posthoc_fitted):
        print(f"SML statistics: from {args.ckpt}")
    else:
        print(f"SML statistics: fitting on the training split of {args.root}")
        model.fit_posthoc(StreetHazardsDataModule(root=args.root, **data_kwargs).posthoc_dataloader())

    root = eval_root(args)
    data = StreetHazardsDataModule(root=str(root), **data_kwargs)
    data.setup("test" if args.eval_split == "test" else "validate")
    loader = data.test_dataloader() if args.eval_split == "test" else data.val_dataloader()

    grid = list(itertools.product(args.boundary_widths, args.dilations))
    metrics = {point: AnomalyMetrics(num_bits=args.num_bits).to(device) for point in grid}
    start = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            batch = prepare_batch(batch, device)  # uint8 from the loader: normalized on the device
            image, mask = batch["image"], batch["mask"]
            logits = model(image)
            for point, metric in metrics.items():
                means, stds = model.sml.means.float(), model.sml.stds.float()
                score = sml_anomaly_score(logits, means, stds, **postprocessing(*point))
                metric.update(resize_to(score, mask.shape[-2:]), mask)
    results = []
    for (width, dilation), metric in metrics.items():
        values = metric.compute()
        results.append({"boundary_width": width, "dilation": dilation, **values})
    seconds = time.perf_counter() - start

    fraction = results[0]["anomaly_fraction"]
    if not fraction > 0:
        raise SystemExit(f"error: the {args.eval_split} split of {root} has no anomaly pixels to score")
    usable = [r for r in results if math.isfinite(r[args.select])]
    best = SELECT_METRICS[args.select](usable, key=lambda r: r[args.select])
    print(
        f"scored {len(loader.dataset)} {args.eval_split} images of {root} at {args.image_size[0]}x{args.image_size[1]} "
        f"in {seconds:.0f} s; anomaly fraction {fraction:.4f}"
    )
    print("\n| boundary width | dilation | AUPR | AUPR / fraction | AUROC | FPR95 | |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        point = (r["boundary_width"], r["dilation"])
        tags = ", ".join(t for t, on in (("published", point == PUBLISHED), ("selected", r is best)) if on)
        print(
            f"| {r['boundary_width'] or 'off'} | {r['dilation'] or 'off'} | {r['aupr']:.3f} | "
            f"{r['aupr'] / fraction:.1f}x | {r['auroc']:.3f} | {r['fpr95']:.3f} | {tags} |"
        )
    print(f"\nselected by {args.select}: boundary width {best['boundary_width']}, dilation {best['dilation']}")
    print(
        "model.init_args:\n  sml:\n"
        + "\n".join(f"    {line}" for line in config_lines(best["boundary_width"], best["dilation"]))
    )
    report = {
        "checkpoint": str(args.ckpt),
        "eval_root": str(root),
        "eval_split": args.eval_split,
        "num_images": len(loader.dataset),
        "image_size": list(args.image_size),
        "select": args.select,
        "selected": {"boundary_width": best["boundary_width"], "dilation": best["dilation"]},
        "results": results,
    }
    if args.json:
        atomic_write_json(args.json, report)
    return report


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, StreetHazardsDataError) as error:
        sys.exit(f"error: {error}")

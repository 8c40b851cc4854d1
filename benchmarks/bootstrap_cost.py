"""What the bootstrap intervals add to a demo test pass: ``main.py test`` with and without them.

The demo's test pass (``configs/demo.yaml`` + ``configs/method/demo/<method>.yaml``: 300 synthetic
test images at 180x320, evaluated at 128x224, batch 8) runs through the same CLI as ``main.py
test`` with ``--evaluation.bootstrap_samples`` 0 and 1000, alternately, ``--repeats`` times each;
the network is randomly initialised (a forward pass costs the same whatever the weights) and its
post-hoc statistics are fitted in an untimed warm-up. Reported:

- the wall time of each ``trainer.test`` (median over the repeats) and the difference of the
  medians as a share of the run without intervals;
- the time spent inside the bootstrap code itself in the runs with intervals (per-image
  summaries in every ``update``, resampling and intervals in every ``compute``, the summaries
  file), measured by timing those functions: a steadier figure on a shared machine, where two
  runs of a minute differ by more than the bootstrap costs.

    python benchmarks/bootstrap_cost.py                       # sml (5 scores), 300 test images, 2 repeats
    python benchmarks/bootstrap_cost.py --method fre --repeats 3
    python benchmarks/bootstrap_cost.py --num-test 40 --num-train 4 --repeats 1   # a quick look

The dataset is written once to ``--data-root`` (default: a folder under /tmp named after its size);
its writing is not timed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_device_header  # noqa: E402
from callbacks import evaluation as evaluation_module  # noqa: E402
from callbacks.metrics import anomaly as anomaly_module  # noqa: E402
from callbacks.metrics import segmentation as segmentation_module  # noqa: E402
from datamodules.synthetic import write_synthetic_streethazards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Stopwatch:
    """Accumulates the time spent in wrapped functions (not re-entrant: nested calls count once)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.depth = 0

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - start

        return timed


def instrument(watch: Stopwatch) -> None:
    """Time the bootstrap's own code: per-image summaries, resampling and intervals, the summaries file."""
    targets = [
        (anomaly_module, "image_sketches_sorted"),  # per-image sketches, CPU path of update()
        (anomaly_module, "image_sketches"),  # the same on a device
        (anomaly_module.AnomalyMetrics, "_add_images"),  # keeping the per-image summaries
        (anomaly_module.AnomalyMetrics, "_intervals"),  # gathering, ordering, resampling (compute)
        (segmentation_module.SegmentationMetrics, "_interval"),
        (evaluation_module.AnomalyEvaluation, "_write_image_summaries"),
    ]
    for owner, name in targets:
        setattr(owner, name, watch.wrap(getattr(owner, name)))


def cli_args(args: argparse.Namespace, root: Path, out: Path) -> list[str]:
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(out), "name": args.method, "version": "run"},
    }
    return [
        f"--config={REPO / 'configs' / 'demo.yaml'}",
        f"--config={REPO / 'configs' / 'method' / 'demo' / f'{args.method}.yaml'}",
        f"--trainer.default_root_dir={out / args.method}",
        f"--trainer.logger={json.dumps(logger)}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--data.root={root}",
        f"--data.num_workers={args.num_workers}",
    ]


def prepare_dataset(args: argparse.Namespace) -> tuple[Path, float | None]:
    root = Path(args.data_root or Path(tempfile.gettempdir()) / f"streethazards-bootstrap-{args.num_test}test")
    if root.exists():
        return root, None
    start = time.perf_counter()
    write_synthetic_streethazards(root, args.num_train, 2, args.num_test, image_size=(180, 320), workers=2)
    return root, time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="sml", help="demo method config (default: sml, 5 scores)")
    parser.add_argument("--num-test", type=int, default=300, help="test images (default: 300, the demo's)")
    parser.add_argument("--num-train", type=int, default=16, help="training images for the statistics (default: 16)")
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each setting (default: 2)")
    parser.add_argument("--num-workers", type=int, default=2, help="data loader workers (default: 2, the demo's)")
    parser.add_argument("--data-root", default=None, help="dataset folder, written if missing (default: /tmp)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.samples < 1:
        raise SystemExit("error: --repeats and --samples must be >= 1")
    root, written = prepare_dataset(args)
    print_device_header(torch.device("cpu"))
    note = f"written in {written:.1f} s, not timed" if written is not None else "reused"
    print(
        f"data: {root} ({args.num_test} test images at 180x320, evaluated at 128x224; {note}); "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    from main import cli_main

    watch = Stopwatch()
    instrument(watch)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(never predicted|too few|fewer than|num_workers).*")
        saved_argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            cli = cli_main(cli_args(args, root, Path(tmp)), run=False)
        finally:
            sys.argv = saved_argv
        trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
        evaluation = next(cb for cb in trainer.callbacks if type(cb).__name__ == "AnomalyEvaluation")
        trainer.limit_test_batches = 2  # untimed warm-up: fits the post-hoc statistics
        evaluation.bootstrap_samples = 0
        trainer.test(model, datamodule=datamodule, verbose=False)
        trainer.limit_test_batches = 1.0
        walls: dict[int, list[float]] = {0: [], args.samples: []}
        inside: list[float] = []
        intervals: dict[str, Any] = {}
        num_scores = 0
        for _ in range(args.repeats):
            for samples in (0, args.samples):
                evaluation.bootstrap_samples = samples
                watch.seconds = 0.0
                start = time.perf_counter()
                trainer.test(model, datamodule=datamodule, verbose=False)
                walls[samples].append(time.perf_counter() - start)
                if samples:
                    inside.append(watch.seconds)
                    results = evaluation.results["test"]
                    intervals = results["scores"][results["primary_score"]]
                    num_scores = len(results["scores"])
                evaluation.release("test")
    without, with_ = statistics.median(walls[0]), statistics.median(walls[args.samples])
    own = statistics.median(inside)
    result = {
        "method": args.method,
        "scores": num_scores,
        "images": args.num_test,
        "samples": args.samples,
        "without_s": without,
        "with_s": with_,
        "difference_share": (with_ - without) / without,
        "bootstrap_s": own,
        "bootstrap_share": own / without,
        "runs_without_s": walls[0],
        "runs_with_s": walls[args.samples],
    }
    print()
    columns = ("method", "scores", "test images", "resamples", "test s without", "test s with", "difference")
    print("| " + " | ".join((*columns, "bootstrap code s")) + " |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.method} | {num_scores} | {args.num_test} | {args.samples} | {without:.1f} | {with_:.1f} | "
        f"{100 * result['difference_share']:+.1f}% | {own:.2f} ({100 * result['bootstrap_share']:.1f}% of the "
        "test without) |"
    )
    print(f"runs without: {', '.join(f'{w:.1f}' for w in walls[0])} s; with: "
          f"{', '.join(f'{w:.1f}' for w in walls[args.samples])} s; "
          f"{args.method} aupr_ci {intervals.get('aupr_ci')}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()

"""kNN scoring: search speed (torch vs faiss) and the effect of its options on held-out images.

Search speed (default): random features shaped like the demo's decoder output (256 channels on
the 32x56 grid of a 128x224 image) searched against banks of ``--bank-sizes`` rows, k = 3, with
this project's torch search (``lightning_modules.knn.nearest_distances``) and, when the
``faiss`` package is importable, faiss's exact ``IndexFlatL2`` on the same threads; prints
milliseconds per image (median over ``--repeats``) and whether faiss found the same neighbours.

    python benchmarks/knn_scoring.py --threads 1
    python benchmarks/knn_scoring.py --device cuda --bank-sizes 100000 --feature-size 180 320

Options on held-out images (``--ckpt``): one trained segmenter (any segmenter-based checkpoint,
e.g. SML's last.ckpt) gets a memory bank from the training split of ``--root`` for the ``--base``
options and for each variation ``--vary KEY=V1,V2`` (one key at a time), then every variant
scores a held-out synthetic set written with another seed (never the test split), as in
``benchmarks/sml_postprocessing_sweep.py``. Prints AUPR, AUROC, FPR95 and the kNN search time
per image of each variant, and the time of the whole ``segment()`` of the base variant.

    python benchmarks/knn_scoring.py --ckpt outputs/compare/sml/run/checkpoints/last.ckpt \\
        --base bank_size=2048 pixels_per_image=32 --vary bank_size=512,1024,4096 k=1,10 normalize=true
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_device_header, select_device, synchronize  # noqa: E402
from callbacks.evaluation import resize_to  # noqa: E402
from callbacks.metrics import AnomalyMetrics  # noqa: E402
from datamodules.labels import NUM_CLASSES  # noqa: E402
from datamodules.streethazards import DEFAULT_ROOT, StreetHazardsDataModule, prepare_batch  # noqa: E402
from datamodules.synthetic import write_synthetic_streethazards  # noqa: E402
from lightning_modules.checkpoints import load_checkpoint_file  # noqa: E402
from lightning_modules.knn import KNNSegmenter, nearest_distances  # noqa: E402

CHANNELS = 256


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch (and faiss) CPU threads")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    # search speed
    p.add_argument("--bank-sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--images", type=int, default=8, help="images per timed search")
    p.add_argument("--feature-size", type=int, nargs=2, default=(32, 56), metavar=("h", "w"))
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=2048)
    # held-out options
    p.add_argument("--ckpt", default=None, help="a segmenter checkpoint: compare kNN options on held-out images")
    p.add_argument("--root", default=DEFAULT_ROOT, help="dataset whose training split fills the banks")
    p.add_argument("--base", nargs="*", default=[], metavar="KEY=VALUE", help="KNNSegmenter options of the base")
    p.add_argument("--vary", nargs="*", default=[], metavar="KEY=V1,V2", help="one key varied at a time")
    p.add_argument("--heldout-seed", type=int, default=1)
    p.add_argument("--heldout-images", type=int, default=300)
    p.add_argument("--heldout-size", type=int, nargs=2, default=(180, 320), metavar=("H", "W"))
    p.add_argument("--heldout-dir", default="outputs/sml-sweep", help="where held-out sets are written (shared)")
    p.add_argument("--image-size", type=int, nargs=2, default=(128, 224), metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--num-bits", type=int, default=20)
    return p.parse_args(argv)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up, and its last result."""
    result = fn()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def search_speed(args: argparse.Namespace, device: torch.device) -> None:
    try:
        import faiss
    except ImportError:
        faiss = None
        print("faiss: not installed (pip install faiss-cpu) - torch only")
    if faiss is not None and args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    h, w = args.feature_size
    queries = torch.randn(args.images * h * w, CHANNELS, generator=g)
    print(f"{args.images} images of {h}x{w} features ({CHANNELS} channels), k = {args.k}; ms per image (median)")
    print("\n| bank rows | torch | faiss IndexFlatL2 | faiss / torch | largest distance difference |")
    print("|---|---|---|---|---|")
    for size in args.bank_sizes:
        bank = torch.randn(size, CHANNELS, generator=g)
        q, b = queries.to(device), bank.to(device)
        torch_s, dist = timed(lambda q=q, b=b: nearest_distances(q, b, args.k, args.chunk_size), device, args.repeats)
        row = f"| {size} | {torch_s / args.images * 1e3:.1f} |"
        if faiss is None or device.type != "cpu":
            print(row + " - | - | - |")
            continue
        index = faiss.IndexFlatL2(CHANNELS)
        index.add(bank.numpy())
        faiss_s, (squared, _) = timed(lambda index=index: index.search(queries.numpy(), args.k), device, args.repeats)
        faiss_dist = torch.from_numpy(squared).clamp_min(0).sqrt()
        error = float((faiss_dist - dist.cpu()).abs().max())
        print(f"{row} {faiss_s / args.images * 1e3:.1f} | {faiss_s / torch_s:.2f} | {error:.1e} |")


def parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def variants(base: list[str], vary: list[str]) -> list[dict[str, Any]]:
    """The base options, then the base with one key changed for each value of each ``--vary``."""
    options = {key: parse_value(value) for key, value in (item.split("=", 1) for item in base)}
    out = [dict(options)]
    for item in vary:
        key, values = item.split("=", 1)
        out += [{**options, key: parse_value(value)} for value in values.split(",")]
    return out


def heldout_root(args: argparse.Namespace) -> Path:
    height, width = args.heldout_size
    root = Path(args.heldout_dir) / f"heldout-seed{args.heldout_seed}-{args.heldout_images}test-{height}x{width}"
    if not root.exists():
        size = (height, width)
        write_synthetic_streethazards(root, 0, 0, args.heldout_images, image_size=size, seed=args.heldout_seed)
    return root


def heldout_options(args: argparse.Namespace, device: torch.device) -> None:
    hparams = load_checkpoint_file(args.ckpt).get("hyper_parameters", {})
    segmenter = {k: hparams[k] for k in ("encoder_name", "output_stride", "num_classes") if k in hparams}
    configs = variants(args.base, args.vary)
    models = []
    for options in configs:
        model = KNNSegmenter(encoder_weights=None, init_checkpoint=args.ckpt, **segmenter, **options)
        models.append(model.to(device).eval())
    shared = models[0].net
    for model in models[1:]:
        model.net = shared  # one network: each variant only differs in its bank and scoring
    data_kwargs = {
        "image_size": tuple(args.image_size),
        "ignore_unlabeled": models[0].num_classes == NUM_CLASSES - 1,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
    }
    layers = sorted({m.hparams.feature_layer for m in models})
    by_layer = {layer: next(m for m in models if m.hparams.feature_layer == layer) for layer in layers}

    start = time.perf_counter()
    with torch.no_grad():
        for batch in StreetHazardsDataModule(root=args.root, **data_kwargs).posthoc_dataloader():
            keys = KNNSegmenter._image_keys(batch)
            mask = batch["mask"].to(device)
            features = {layer: m.features_and_logits(batch["image"].to(device))[0] for layer, m in by_layer.items()}
            for model in models:
                model.accumulate_features(features[model.hparams.feature_layer], mask, keys)
        for model in models:
            model.finalize_posthoc(0)
            model.posthoc_fitted.fill_(True)
    print(f"banks filled in {time.perf_counter() - start:.0f} s")

    data = StreetHazardsDataModule(root=str(heldout_root(args)), **data_kwargs)
    data.setup("test")
    metrics = [AnomalyMetrics(num_bits=args.num_bits).to(device) for _ in models]
    search = [0.0] * len(models)
    segment_seconds, images = 0.0, 0
    with torch.no_grad():
        for batch in data.test_dataloader():
            batch = prepare_batch(batch, device)  # uint8 from the loader: normalized on the device
            image, mask = batch["image"], batch["mask"]
            synchronize(device)
            start = time.perf_counter()
            models[0].segment(image)
            synchronize(device)
            segment_seconds += time.perf_counter() - start
            images += image.shape[0]
            features = {layer: m.features_and_logits(image)[0] for layer, m in by_layer.items()}
            for i, model in enumerate(models):
                synchronize(device)
                start = time.perf_counter()
                score = model.knn_score(features[model.hparams.feature_layer], tuple(image.shape[-2:]))
                synchronize(device)
                search[i] += time.perf_counter() - start
                metrics[i].update(resize_to(score, mask.shape[-2:]), mask)
    print(
        f"{images} held-out images at {args.image_size[0]}x{args.image_size[1]}; base variant's segment() "
        f"(forward, kNN, upsampling, baselines): {segment_seconds / images * 1e3:.1f} ms/image"
    )
    print("\n| options | bank rows | AUPR | AUPR / fraction | AUROC | FPR95 | kNN ms/image |")
    print("|---|---|---|---|---|---|---|")
    for options, model, metric, seconds in zip(configs, models, metrics, search, strict=True):
        values = metric.compute()
        label = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        lift = values["aupr"] / values["anomaly_fraction"]
        print(
            f"| {label} | {model.bank.shape[0]} | {values['aupr']:.3f} | {lift:.1f}x "
            f"| {values['auroc']:.3f} | {values['fpr95']:.3f} | {seconds / images * 1e3:.1f} |"
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = select_device(args.device, args.threads)
    print_device_header(device)
    if args.ckpt is None:
        search_speed(args, device)
    else:
        heldout_options(args, device)


if __name__ == "__main__":
    main()

"""Throughput and memory of ``AnomalyMetrics`` against the scikit-learn evaluation it replaces.

Three measurements on synthetic StreetHazards-sized images (720 x 1280, anomaly blobs in most
images, a band of ignore pixels):

1. ``AnomalyMetrics`` update + compute over ``--pixels`` pixels (pooled AUPR/AUROC/FPR95 with
   their error bounds and the per-image protocol together), in pixels per second;
2. scikit-learn on a ``--sklearn-pixels`` sample (the same images the metric also evaluates):
   ``average_precision_score`` + ``roc_auc_score`` on the pooled pixels, and the per-image loop
   of the reference StreetHazards code (AP, AUROC and FPR95 for each image with anomalies); the
   metric's values on that sample are compared with scikit-learn's;
3. streaming ``--stream`` pixels (default 2e8 and 1e9) through ``AnomalyMetrics`` in image-sized
   chunks, with resident memory (and CUDA memory) sampled along the way: it stays flat.

Scores come from a small pool of pre-generated batches that is cycled, so the timings measure
the metric rather than the random number generator. ``--scores normal`` (default): N(0, 1), +2 on
anomalies; ``--scores saturating``: confidences saturating towards 1, ``1 - 10**-u`` with ``u``
uniform in [0, 6] (+0.8 on anomalies), the case a uniform binning gets wrong.

    python benchmarks/metrics_throughput.py                      # CPU, or CUDA when available
    python benchmarks/metrics_throughput.py --device cuda --stream 2e8,1e9,1.4e9
    python benchmarks/metrics_throughput.py --scores saturating --stream ''

"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.metrics import AnomalyMetrics  # noqa: E402

HEIGHT, WIDTH = 720, 1280
ANOMALY, IGNORE, NUM_CLASSES = 13, 255, 13


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def make_batch(generator: torch.Generator, batch_size: int, kind: str = "normal") -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [B, H, W] float32 and labels [B, H, W] int64 resembling a StreetHazards test batch."""
    blocks = torch.randint(0, NUM_CLASSES, (batch_size, HEIGHT // 40, WIDTH // 40), generator=generator)
    mask = blocks.repeat_interleave(40, dim=1).repeat_interleave(40, dim=2)
    scores = torch.randn(batch_size, HEIGHT, WIDTH, generator=generator)
    for image in range(batch_size):
        if torch.rand((), generator=generator) < 0.85:  # most test images contain an anomaly
            h = int(torch.randint(40, 160, (), generator=generator))
            w = int(torch.randint(60, 320, (), generator=generator))
            top = int(torch.randint(0, HEIGHT - h, (), generator=generator))
            left = int(torch.randint(0, WIDTH - w, (), generator=generator))
            mask[image, top : top + h, left : left + w] = ANOMALY
            scores[image, top : top + h, left : left + w] += 2.0
    mask[:, -8:] = IGNORE  # e.g. the ego vehicle's bonnet
    if kind == "saturating":
        exponent = torch.rand(scores.shape, generator=generator, dtype=torch.float64) * 6.0
        exponent += 0.8 * (mask == ANOMALY)
        scores = (1.0 - 10.0**-exponent).float()
    return scores, mask


def make_pool(
    num_batches: int, batch_size: int, seed: int, kind: str = "normal"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [make_batch(generator, batch_size, kind) for _ in range(num_batches)]


def reference_fpr95(labels: np.ndarray, scores: np.ndarray) -> float:
    """The StreetHazards reference code's per-image FPR95: recall closest to 0.95, lowest such threshold.

    Over the distinct thresholds from the highest down to the first with full recall.
    """
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    full = int(np.argmax(tpr >= 1.0))
    distance = np.abs(tpr[1 : full + 1] - 0.95)
    closest = np.flatnonzero(distance == distance.min())[-1] + 1  # ties: the lowest threshold
    return float(fpr[closest])


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------
def current_rss_mib() -> float:
    """Resident set size now (Linux /proc), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mib()


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_metric(
    pool: list, num_images: int, device: torch.device, num_bits: int, checkpoints: int = 0
) -> tuple[dict, float, list[tuple[int, float, float]]]:
    """Stream ``num_images`` images through a fresh metric; return results, seconds, memory samples."""
    metric = AnomalyMetrics(anomaly_index=ANOMALY, ignore_index=IGNORE, num_bits=num_bits).to(device)
    batch_size = pool[0][0].shape[0]
    device_pool = [(s.to(device), m.to(device)) for s, m in pool]
    num_batches = -(-num_images // batch_size)
    marks = {int(round(num_batches * k / checkpoints)) - 1 for k in range(1, checkpoints + 1)} if checkpoints else set()
    samples = []
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    done = 0
    for step in range(num_batches):
        scores, mask = device_pool[step % len(device_pool)]
        take = min(batch_size, num_images - done)
        metric.update(scores[:take], mask[:take])
        done += take
        if step in marks:
            synchronize(device)
            cuda_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            samples.append((done * HEIGHT * WIDTH, current_rss_mib(), cuda_mib))
    result = metric.compute()
    synchronize(device)
    return result, time.perf_counter() - start, samples


def sklearn_reference(pool: list, num_images: int) -> tuple[dict, float, float]:
    """Pooled AP + AUROC and the per-image loop of the reference code; returns values and seconds."""
    images = []
    for scores, mask in pool:
        for i in range(scores.shape[0]):
            if len(images) < num_images:
                images.append((scores[i].numpy().ravel(), mask[i].numpy().ravel()))
    valid = [m != IGNORE for _, m in images]
    pooled_scores = np.concatenate([s[v] for (s, _), v in zip(images, valid, strict=True)])
    pooled_labels = np.concatenate([m[v] == ANOMALY for (_, m), v in zip(images, valid, strict=True)])

    start = time.perf_counter()
    pooled = {
        "aupr": average_precision_score(pooled_labels, pooled_scores),
        "auroc": roc_auc_score(pooled_labels, pooled_scores),
    }
    pooled_seconds = time.perf_counter() - start
    fpr, tpr, _ = roc_curve(pooled_labels, pooled_scores, drop_intermediate=False)  # reference only, untimed
    pooled["fpr95"] = float(fpr[np.argmax(tpr >= 0.95)])

    start = time.perf_counter()
    per_image = {"aupr": [], "auroc": [], "fpr95": []}
    for (scores, mask), keep in zip(images, valid, strict=True):
        labels = mask[keep] == ANOMALY
        if labels.all() or not labels.any():
            continue
        values = scores[keep]
        per_image["aupr"].append(average_precision_score(labels, values))
        per_image["auroc"].append(roc_auc_score(labels, values))
        per_image["fpr95"].append(reference_fpr95(labels, values))
    per_image_seconds = time.perf_counter() - start
    values = {**pooled, **{f"{k}_per_image": float(np.mean(v)) for k, v in per_image.items()}}
    return values, pooled_seconds, per_image_seconds


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), line, *(fmt.format(*r) for r in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pixels", type=float, default=5e7, help="pixels for the AnomalyMetrics throughput run")
    parser.add_argument("--sklearn-pixels", type=float, default=6e6, help="pixels of the scikit-learn sample")
    parser.add_argument(
        "--stream", type=str, default="2e8,1e9", help="comma-separated pixel counts to stream ('' to skip)"
    )
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4, help="images per update")
    parser.add_argument("--num-bits", type=int, default=22, help="AnomalyMetrics histogram bits")
    parser.add_argument("--scores", choices=("normal", "saturating"), default="normal", help="score distribution")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    image_pixels = HEIGHT * WIDTH
    pool = make_pool(num_batches=4, batch_size=args.batch_size, seed=args.seed, kind=args.scores)

    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({platform.processor()})")
        + f", torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, num_bits {args.num_bits}"
        + f", scores {args.scores}"
    )
    print(f"images {HEIGHT}x{WIDTH} = {image_pixels} pixels, batch {args.batch_size}\n")

    # Warm-up: allocations, page faults of the histogram, CUDA kernels.
    run_metric(pool, args.batch_size, device, args.num_bits)

    # 1 + 2: throughput against scikit-learn
    sk_images = max(1, int(round(args.sklearn_pixels / image_pixels)))
    sk_values, sk_pooled_s, sk_image_s = sklearn_reference(pool, sk_images)
    sample_values, _, _ = run_metric(pool[: -(-sk_images // args.batch_size)], sk_images, device, args.num_bits)
    metric_images = max(1, int(round(args.pixels / image_pixels)))
    _, metric_s, _ = run_metric(pool, metric_images, device, args.num_bits)

    sk_pixels, metric_pixels = sk_images * image_pixels, metric_images * image_pixels
    ours = metric_pixels / metric_s
    sk_total = sk_pixels / (sk_pooled_s + sk_image_s)
    rows = [
        [
            "AnomalyMetrics update+compute (all outputs)",
            f"{metric_pixels:.3g}",
            f"{metric_s:.2f}",
            f"{ours / 1e6:.1f}",
            "1.0",
        ],
        [
            "sklearn pooled AP + AUROC",
            f"{sk_pixels:.3g}",
            f"{sk_pooled_s:.2f}",
            f"{sk_pixels / sk_pooled_s / 1e6:.2f}",
            f"{ours / (sk_pixels / sk_pooled_s):.1f}",
        ],
        [
            "sklearn per-image AP + AUROC + FPR95 loop",
            f"{sk_pixels:.3g}",
            f"{sk_image_s:.2f}",
            f"{sk_pixels / sk_image_s / 1e6:.2f}",
            f"{ours / (sk_pixels / sk_image_s):.1f}",
        ],
        [
            "sklearn both (same outputs)",
            f"{sk_pixels:.3g}",
            f"{sk_pooled_s + sk_image_s:.2f}",
            f"{sk_total / 1e6:.2f}",
            f"{ours / sk_total:.1f}",
        ],
    ]
    print("Throughput")
    print(table(rows, ["method", "pixels", "seconds", "Mpx/s", "AnomalyMetrics speedup"]))
    print(
        "\nAgreement on the scikit-learn sample (|AnomalyMetrics - sklearn|): "
        + ", ".join(f"{k} {abs(sample_values[k] - v):.1e}" for k, v in sk_values.items())
    )
    print(
        "Error bounds reported by AnomalyMetrics on that sample: "
        + ", ".join(f"{k} {sample_values[f'{k}_error_bound']:.1e}" for k in ("aupr", "auroc", "fpr95"))
    )

    # 3: streaming memory
    targets = [float(v) for v in args.stream.split(",") if v.strip()]
    if targets:
        rows = []
        for target in targets:
            images = int(-(-target // image_pixels))
            gc.collect()
            rows.append(
                [f"{target:.3g}", "0 (before)", f"{current_rss_mib():.0f}", f"{peak_rss_mib():.0f}", "", "", ""]
            )
            _, seconds, samples = run_metric(pool, images, device, args.num_bits, checkpoints=4)
            for pixels, rss, cuda_mib in samples:
                rows.append(
                    [
                        f"{target:.3g}",
                        f"{pixels:.3g}",
                        f"{rss:.0f}",
                        f"{peak_rss_mib():.0f}",
                        "-" if np.isnan(cuda_mib) else f"{cuda_mib:.0f}",
                        f"{seconds:.1f}" if pixels == samples[-1][0] else "",
                        f"{images * image_pixels / seconds / 1e6:.1f}" if pixels == samples[-1][0] else "",
                    ]
                )
        print(
            "\nStreaming memory (RSS includes the interpreter, torch, scikit-learn and the pre-generated"
            " score pool; peak RSS is the process-wide high-water mark)"
        )
        print(table(rows, ["stream", "after pixels", "RSS MiB", "peak RSS MiB", "CUDA peak MiB", "seconds", "Mpx/s"]))


if __name__ == "__main__":
    main()

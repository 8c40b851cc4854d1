"""Evaluation, visualisation and atomic-write callbacks, end to end on a tiny stand-in method.

References are computed independently in the tests: scikit-learn for AUPR/AUROC, NumPy from the
definitions for FPR95, mIoU and the false-positive breakdown, matplotlib for the colormap.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path

import lightning as L
import matplotlib
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from test_metrics_reference import reference_fpr_at_recall
from torch.utils.data import DataLoader, Dataset

from callbacks.evaluation import AnomalyEvaluation, load_image_summaries, resize_to
from callbacks.metrics import AnomalyMetrics, NegativeScoreHistogram
from callbacks.metrics import functional as functional
from callbacks.metrics.functional import false_positive_breakdown
from callbacks.metrics.functional import layout_tensors as device_layout
from callbacks.metrics.functional import rebin_tensors as device_rebin
from callbacks.metrics.functional.bootstrap import image_id, paired_comparison
from callbacks.protocol import EvaluationOptionError
from callbacks.visualization import (
    AnomalyHeatmapLogger,
    apply_colormap,
    colormap_lut,
    denormalize,
    label_lut,
    make_grid,
    outcome_overlay,
)
from datamodules.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text
from datamodules.labels import CLASS_NAMES, IMAGE_MEAN, IMAGE_STD, PALETTE, colorize
from lightning_modules.base import AnomalySegmentationModule, MethodOutput

H, W, STRIDE, N_IMAGES, BATCH = 12, 16, 2, 6, 2
ANOMALY, IGNORE = 13, 255


# ------------------------------------------------------------------------------------------------ stand-ins
class ToyMethod(AnomalySegmentationModule):
    """A 1x1 convolution on a 2x-downsampled image; the own score is the downsampled red channel."""

    method_name = "toy"

    def __init__(self, num_classes: int = 13, class_names: tuple[str, ...] | None = None) -> None:
        super().__init__(num_classes=num_classes)
        self.head = nn.Conv2d(3, num_classes, 1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_classes, 3, 1, 1, generator=g))
            self.head.bias.copy_(torch.randn(num_classes, generator=g))
        if class_names is not None:
            self.class_names = class_names

    def segment(self, image: torch.Tensor) -> MethodOutput:
        x = F.avg_pool2d(image, STRIDE)
        logits = self.head(x)
        return MethodOutput(logits, {"red": x[:, 0], "msp": 1 - logits.softmax(1).amax(1)})


class ToyData(Dataset):
    """Random labels; images 0-3 hold an anomaly block that raises the red channel; some ignore pixels."""

    def __init__(self, anomalies: bool = True, num_classes: int = 13, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mask = torch.randint(0, num_classes, (N_IMAGES, H, W), generator=g)
        if anomalies:
            self.mask[:4, 3:7, 4:10] = ANOMALY
            self.mask[1, 0:2, 12:16] = ANOMALY
        self.mask[:, 0, :3] = IGNORE
        self.image = torch.randn(N_IMAGES, 3, H, W, generator=g)
        self.image[:, 0] += 1.5 * (self.mask == ANOMALY)

    def __len__(self) -> int:
        return N_IMAGES

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image[i], "mask": self.mask[i], "name": f"img{i:03d}"}


def loader(data: Dataset) -> DataLoader:
    return DataLoader(data, batch_size=BATCH)


def make_trainer(root: Path, callbacks: list, logger=None, **kwargs) -> L.Trainer:
    # default_root_dir: without a logger, results (metrics.json) go to trainer.log_dir, which is
    # then default_root_dir; Lightning's default, the working directory, is the repository.
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        default_root_dir=root,
        logger=logger if logger is not None else TensorBoardLogger(root),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def reference_outputs(model: ToyMethod, data: ToyData) -> dict[str, np.ndarray]:
    """The method's outputs resized to the label grid, computed here without the callbacks."""
    model.eval()
    with torch.no_grad():
        out = model.segment(data.image)
        logits = F.interpolate(out.logits, size=(H, W), mode="bilinear", align_corners=False)
        scores = {
            name: F.interpolate(s[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0].numpy()
            for name, s in out.scores.items()
        }
    return {"preds": logits.argmax(1).numpy(), "mask": data.mask.numpy(), **scores}


def fpr_at_95(y: np.ndarray, s: np.ndarray) -> float:
    """FPR at the highest threshold whose TPR reaches 0.95 (integer comparison 100 TP >= 95 P)."""
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    positives = int(y.sum())
    tp = np.round(tpr * positives).astype(np.int64)
    return float(fpr[np.argmax(100 * tp >= 95 * positives)])


def reference_anomaly(mask: np.ndarray, score: np.ndarray) -> dict[str, float]:
    valid = mask != IGNORE
    y, s = (mask == ANOMALY)[valid], score[valid].astype(np.float64)
    per_image = []
    for m, sc in zip(mask, score, strict=True):
        v = m != IGNORE
        yi = (m == ANOMALY)[v]
        if 0 < yi.sum() < yi.size:
            per_image.append(
                # Per image: the StreetHazards reference code's FPR95 rule (closest recall, lowest threshold).
                (average_precision_score(yi, sc[v]), roc_auc_score(yi, sc[v]), reference_fpr_at_recall(yi, sc[v]))
            )
    means = np.mean(per_image, axis=0)
    return {
        "aupr": average_precision_score(y, s),
        "auroc": roc_auc_score(y, s),
        "fpr95": fpr_at_95(y, s),
        "aupr_per_image": means[0],
        "auroc_per_image": means[1],
        "fpr95_per_image": means[2],
        "num_images_per_image": len(per_image),
    }


def reference_miou(preds: np.ndarray, mask: np.ndarray, num_classes: int) -> tuple[float, np.ndarray, float]:
    known = mask < num_classes
    t, p = mask[known].astype(np.int64), preds[known].astype(np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (t, p), 1)
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return float(np.nanmean(iou)), iou, float(tp.sum() / confusion.sum())


def events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def decode(acc: EventAccumulator, tag: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string)).convert("RGB"))


def panel(grid: np.ndarray, k: int, columns: int, padding: int = 4) -> np.ndarray:
    r, c = divmod(k, columns)
    top, left = padding + r * (H + padding), padding + c * (W + padding)
    return grid[top : top + H, left : left + W]


# ------------------------------------------------------------------------------------------------ one test run
@pytest.fixture(scope="module")
def test_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("test_run")
    evaluation = AnomalyEvaluation()
    heatmaps = AnomalyHeatmapLogger(every_n_batches=2, max_images=1)
    model, data = ToyMethod(), ToyData()
    trainer = make_trainer(root, [evaluation, heatmaps])
    logged = trainer.test(model, loader(data))[0]
    return {
        "trainer": trainer,
        "evaluation": evaluation,
        "heatmaps": heatmaps,
        "logged": logged,
        "reference": reference_outputs(model, data),
        "data": data,
        "metrics": json.loads(Path(evaluation.metrics_path).read_text()),
    }


def test_logged_metrics_match_independent_references(test_run):
    logged, ref = test_run["logged"], test_run["reference"]
    mask = ref["mask"]
    for name in ("red", "msp"):
        expected = reference_anomaly(mask, ref[name])
        for key in ("aupr", "auroc", "fpr95", "aupr_per_image", "auroc_per_image", "fpr95_per_image"):
            # Logged values went through float32; the binned pooled metrics agree with sklearn to 1e-4.
            assert logged[f"test/{name}/{key}"] == pytest.approx(expected[key], abs=1e-4), (name, key)
    for key in ("aupr", "auroc", "fpr95", "aupr_per_image", "auroc_per_image", "fpr95_per_image"):
        assert logged[f"test/{key}"] == logged[f"test/red/{key}"]

    direct = AnomalyMetrics()
    direct.update(torch.from_numpy(ref["red"]), torch.from_numpy(mask))
    values = direct.compute()
    for key in ("aupr", "auroc", "fpr95", "threshold95"):
        assert logged[f"test/red/{key}"] == pytest.approx(values[key], rel=1e-6)

    miou, iou, accuracy = reference_miou(ref["preds"], mask, 13)
    assert logged["test/miou"] == pytest.approx(miou, rel=1e-6)
    assert logged["test/pixel_accuracy"] == pytest.approx(accuracy, rel=1e-6)
    assert logged["test/anomaly_fraction"] == pytest.approx((mask == ANOMALY).sum() / (mask != IGNORE).sum())
    assert miou > 0.0


def test_metrics_json_content(test_run):
    doc, ref = test_run["metrics"], test_run["reference"]
    text = Path(test_run["evaluation"].metrics_path).read_text()
    json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    for key in (
        "method",
        "primary_score",
        "split",
        "num_images",
        "num_classes",
        "class_names",
        "checkpoint",
        "aupr",
        "auroc",
        "fpr95",
        "aupr_per_image",
        "auroc_per_image",
        "fpr95_per_image",
        "miou",
        "segmentation",
        "anomaly_fraction",
        "scores",
        "false_positives_at_threshold95",
        "protocol",
    ):
        assert key in doc, key
    card = doc["protocol"]
    assert card["pooled"]["fpr95_rule"] == "first_reaching" and card["per_image"]["fpr95_rule"] == "closest_recall"
    assert card["class_set"] == list(CLASS_NAMES) and card["test_time_augmentation"] == "none"
    assert "not a StreetHazards datamodule" in card["evaluation_resolution"]
    assert doc["method"] == "toy" and doc["primary_score"] == "red"
    assert doc["split"] == "test" and doc["num_images"] == N_IMAGES and doc["num_classes"] == 13
    assert doc["class_names"] == list(CLASS_NAMES) and doc["checkpoint"] is None
    assert list(doc["scores"]) == ["red", "msp"]
    expected = reference_anomaly(ref["mask"], ref["red"])
    for key in ("aupr", "auroc", "fpr95", "aupr_per_image", "auroc_per_image", "fpr95_per_image"):
        assert doc[key] == pytest.approx(expected[key], abs=1e-4)
        assert doc["scores"]["red"][key] == doc[key]
    assert doc["scores"]["red"]["num_images_per_image"] == expected["num_images_per_image"] == 4
    miou, iou, accuracy = reference_miou(ref["preds"], ref["mask"], 13)
    assert doc["miou"] == pytest.approx(miou, abs=1e-12)
    assert doc["segmentation"]["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    got_iou = [doc["segmentation"]["iou"][name] for name in CLASS_NAMES]
    np.testing.assert_allclose(np.array(got_iou, dtype=np.float64), iou, atol=1e-12)
    assert doc["anomaly_fraction"] == pytest.approx((ref["mask"] == ANOMALY).sum() / (ref["mask"] != IGNORE).sum())
    assert doc["num_valid_pixels"] == int((ref["mask"] != IGNORE).sum())
    assert not any(p.name.endswith(".tmp") for p in Path(test_run["evaluation"].metrics_path).parent.iterdir())


def test_bootstrap_intervals_in_metrics_json_tensorboard_and_the_summaries_file(test_run):
    doc, evaluation = test_run["metrics"], test_run["evaluation"]
    assert doc["bootstrap"]["samples"] == 1000 and doc["bootstrap"]["seed"] == 0
    assert doc["bootstrap"]["num_images"] == N_IMAGES and doc["bootstrap"]["level"] == 0.95
    for key in ("aupr", "auroc", "fpr95", "aupr_per_image", "auroc_per_image", "fpr95_per_image", "miou"):
        low, high = doc[f"{key}_ci"]
        assert low <= doc[key] <= high, key
    for name in ("red", "msp"):
        intervals = [key for key in doc["scores"][name] if key.endswith("_ci")]
        assert len(intervals) == 7, intervals
    # TensorBoard: every interval as two scalars, for each score and (without the score) the primary
    acc = events(test_run["trainer"].logger.log_dir)
    scalars = set(acc.Tags()["scalars"])
    assert {"test/aupr_ci_low", "test/aupr_ci_high", "test/miou_ci_low", "test/msp/auroc_per_image_ci_high"} <= scalars
    assert acc.Scalars("test/red/fpr95_ci_high")[-1].value == pytest.approx(doc["fpr95_ci"][1], rel=1e-6)
    # The per-image summaries beside metrics.json give back the same intervals (what compare pairs with).
    data = load_image_summaries(evaluation.image_summaries_path)
    assert evaluation.image_summaries_path.parent == Path(evaluation.metrics_path).parent
    ids = sorted(image_id(f"img{i:03d}") for i in range(N_IMAGES))
    assert data["scores"]["red"]["image_id"].tolist() == ids and data["segmentation"]["image_id"].tolist() == ids
    summaries, values = {}, {}
    for name in ("red", "msp"):
        summaries[name] = {
            **data["scores"][name],
            "confusion_image_id": data["segmentation"]["image_id"],
            "confusion": data["segmentation"]["confusion"],
        }
        values[name] = {key: doc["scores"][name][key] for key in ("aupr", "auroc", "fpr95")} | {"miou": doc["miou"]}
    again = paired_comparison(summaries, values, samples=1000, seed=0, keys=("aupr", "auroc", "fpr95", "miou"))
    for name in ("red", "msp"):
        for key in ("aupr", "auroc", "fpr95"):
            assert again["intervals"][name][key] == pytest.approx(tuple(doc["scores"][name][f"{key}_ci"]), abs=1e-12)
    assert again["intervals"]["red"]["miou"] == pytest.approx(tuple(doc["miou_ci"]), abs=1e-12)


def test_false_positive_breakdown_matches_numpy(test_run):
    doc, ref = test_run["metrics"], test_run["reference"]
    report = doc["false_positives_at_threshold95"]
    mask, score = ref["mask"], ref["red"]
    assert report["score"] == "red"
    assert report["threshold95"] == doc["scores"]["red"]["threshold95"]
    # The breakdown is exact at `threshold`, the histogram bin edge at or below threshold95.
    threshold = np.float32(report["threshold"])
    assert report["threshold"] <= report["threshold95"]
    assert report["threshold95"] - report["threshold"] <= 2.0**-6 * abs(report["threshold95"])
    negative = (mask != IGNORE) & (mask != ANOMALY)
    flagged = negative & (score >= threshold)
    assert report["false_positives"] == flagged.sum()
    for key, classes in (("by_ground_truth_class", mask), ("by_predicted_class", ref["preds"])):
        rows = report[key]
        fp = np.bincount(classes[flagged], minlength=13)
        neg = np.bincount(classes[negative], minlength=13)
        assert [rows[name]["false_positives"] for name in CLASS_NAMES] == fp.tolist()
        assert [rows[name]["negatives"] for name in CLASS_NAMES] == neg.tolist()
        fractions = np.array([rows[name]["fraction"] for name in CLASS_NAMES])
        np.testing.assert_allclose(fractions, fp / fp.sum(), atol=1e-15)
        assert fractions.sum() == pytest.approx(1.0, abs=1e-12)
        rates = np.array([rows[name]["false_positive_rate"] for name in CLASS_NAMES], dtype=np.float64)
        np.testing.assert_allclose(rates, np.where(neg > 0, fp / np.maximum(neg, 1), np.nan), atol=1e-15)


def test_tensorboard_scalars_images_and_curves(test_run):
    trainer, evaluation, heatmaps = test_run["trainer"], test_run["evaluation"], test_run["heatmaps"]
    acc = events(trainer.logger.log_dir)
    tags = acc.Tags()
    assert {"test/aupr", "test/miou", "test/red/fpr95", "test/msp/aupr"} <= set(tags["scalars"])
    assert acc.Scalars("test/aupr")[-1].value == pytest.approx(test_run["logged"]["test/aupr"], rel=1e-6)
    # every_n_batches=2 over 3 batches of 2, one image each: images 0 and 4.
    assert {"test/heatmap/img000", "test/heatmap/img004", "test/curves"} <= set(tags["images"])
    assert "test/heatmap/img002" not in tags["images"]
    figure = decode(acc, "test/curves")
    assert figure.shape[0] > 100 and figure.shape[1] > 100 and figure.std() > 0

    # PR curves: the raw counts written are the metric's own, global ones.
    for name in ("red", "msp"):
        stored = tensor_util.make_ndarray(acc.Tensors(f"test/pr_curve/{name}")[-1].tensor_proto)
        raw = evaluation.curves["test"][name]["pr_curve_raw"]
        direct = evaluation.test_metrics[name].pr_curve_counts()
        assert stored.shape == (6, raw["num_thresholds"]) and raw["num_thresholds"] > 2
        for row, key in enumerate(
            (
                "true_positive_counts",
                "false_positive_counts",
                "true_negative_counts",
                "false_negative_counts",
                "precision",
                "recall",
            )
        ):
            np.testing.assert_allclose(stored[row], raw[key], rtol=1e-6, err_msg=key)
            np.testing.assert_array_equal(raw[key], direct[key])
        # Increasing thresholds: true positives never grow.
        assert np.all(np.diff(stored[0]) <= 0)
    assert heatmaps.scales.keys() == {"toy"}


def test_heatmap_grid_panels(test_run):
    trainer, evaluation, heatmaps = test_run["trainer"], test_run["evaluation"], test_run["heatmaps"]
    ref, data = test_run["reference"], test_run["data"]
    grid = decode(events(trainer.logger.log_dir), "test/heatmap/img000")
    # Five panels of the label size in a 3-column grid with 4-pixel padding.
    assert grid.shape == (2 * H + 3 * 4, 3 * W + 4 * 4, 3)

    mean, std = np.array(IMAGE_MEAN)[:, None, None], np.array(IMAGE_STD)[:, None, None]
    rgb = np.round(np.clip(data.image[0].numpy() * std + mean, 0, 1) * 255).transpose(1, 2, 0)
    np.testing.assert_allclose(panel(grid, 0, 3), rgb, atol=1)
    np.testing.assert_array_equal(panel(grid, 1, 3), colorize(ref["mask"][0]))
    np.testing.assert_array_equal(panel(grid, 2, 3), colorize(ref["preds"][0]))

    # Fixed scale from the first logged batch (image 0 only): its 1% and 99% quantiles.
    score = ref["red"][0]
    low, high = np.quantile(score.astype(np.float64), [0.01, 0.99])
    assert heatmaps.scales["toy"] == pytest.approx((low, high), rel=1e-6)
    lut = np.round(matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    levels = np.round(np.clip((score - low) / (high - low), 0, 1) * 255).astype(int)
    heat = panel(grid, 3, 3).astype(int)
    # A level may differ by one where (s - low) / (high - low) lands on a rounding boundary.
    assert np.abs(heat - lut[levels]).max() <= 3
    assert np.mean(np.all(heat == lut[levels], axis=-1)) > 0.95

    threshold = evaluation.threshold95("test")
    assert threshold is not None and threshold == evaluation.results["test"]["threshold95"]
    flagged, mask = score >= threshold, ref["mask"][0]
    expected = rgb.astype(np.float64)
    for region, colour in (
        (flagged & (mask == ANOMALY), (0, 255, 0)),
        (flagged & (mask != ANOMALY) & (mask != IGNORE), (255, 0, 0)),
        (~flagged & (mask == ANOMALY), (0, 128, 255)),
    ):
        expected[region] = 0.4 * expected[region] + 0.6 * np.array(colour)
    np.testing.assert_allclose(panel(grid, 4, 3), np.round(expected), atol=1)
    assert (flagged & (mask == ANOMALY)).any()


def _float_path_grids(image, mask, logits, score, size, labels, lut, scale, threshold) -> list[np.ndarray]:
    """Grids as AnomalyHeatmapLogger drew them when it held float32 images and int64 labels."""
    with torch.no_grad():
        image = resize_to(denormalize(image), size).clamp(0.0, 1.0)
        small_mask = F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].long()
        pred = resize_to(logits.float(), size).argmax(dim=1)
        score = resize_to(score.float(), size)
    grids = []
    for i in range(image.shape[0]):
        rgb = np.round(image[i].permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)
        m = small_mask[i].numpy()
        panels = [rgb, labels[m.clip(0, 255)], labels[pred[i].numpy().clip(0, 255)]]
        panels.append(apply_colormap(score[i], *scale, lut))
        panels.append(outcome_overlay(rgb, score[i].numpy() >= threshold, m, ANOMALY, IGNORE))
        grids.append(make_grid(panels, columns=3))
    return grids


def test_heatmap_captures_are_compact_capped_and_drawn_as_from_float_copies(tmp_path):
    """max_captures=3 with 2 images from each of 3 batches: images 0, 1 and 2 are captured, the
    rest not. Each is held as uint8 image and labels plus the float32 score (9 bytes per pixel),
    and its grid equals the one drawn from float32/int64 copies. Panels of 8x11 (panel_width=11)
    so that the image and the score are resampled."""
    evaluation = AnomalyEvaluation(per_class_false_positives=False)
    heatmaps = AnomalyHeatmapLogger(every_n_batches=1, max_images=2, max_captures=3, panel_width=11)

    class Held(L.Callback):
        def on_test_epoch_end(self, trainer, pl_module):
            self.captures = list(heatmaps._pending["test"])

    held, model, data = Held(), ToyMethod(), ToyData()
    trainer = make_trainer(tmp_path, [evaluation, heatmaps, held])
    trainer.test(model, loader(data))

    assert [c.tag for c in held.captures] == [f"test/heatmap/img{i:03d}" for i in range(3)]
    for capture in held.captures:
        assert (capture.rgb.dtype, capture.mask.dtype, capture.pred.dtype) == (torch.uint8,) * 3
        assert capture.score.dtype == torch.float32 and capture.rgb.shape == (8, 11, 3)
        assert capture.nbytes == 8 * 11 * 9
    acc = events(trainer.logger.log_dir)
    assert {t for t in acc.Tags()["images"] if "/heatmap/" in t} == {c.tag for c in held.captures}

    threshold = evaluation.threshold95("test")
    assert threshold is not None
    draw = (label_lut(PALETTE, 13), colormap_lut("inferno"), heatmaps.scales["toy"], threshold)
    model.eval()
    expected = []
    for start in (0, 2):  # the loader's batches of 2
        with torch.no_grad():
            out = model.segment(data.image[start : start + 2])
        image, mask = data.image[start : start + 2], data.mask[start : start + 2]
        expected += _float_path_grids(image, mask, out.logits, out.scores["red"], (8, 11), *draw)
    for capture, grid in zip(held.captures, expected[:3], strict=True):
        assert grid.shape == (2 * 8 + 3 * 4, 3 * 11 + 4 * 4, 3)
        np.testing.assert_array_equal(decode(acc, capture.tag), grid, err_msg=capture.tag)


# ------------------------------------------------------------------------------------------------ validation
def test_validation_without_anomalies_skips_anomaly_metrics_quietly(tmp_path):
    evaluation = AnomalyEvaluation()
    heatmaps = AnomalyHeatmapLogger(every_n_batches=1, max_images=1)
    model, data = ToyMethod(), ToyData(anomalies=False)
    trainer = make_trainer(tmp_path, [evaluation, heatmaps])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logged = trainer.validate(model, loader(data))[0]
    assert not [w for w in caught if "AnomalyMetrics" in str(w.message) or "anomaly pixels" in str(w.message)]
    ref = reference_outputs(model, data)
    miou, _, accuracy = reference_miou(ref["preds"], ref["mask"], 13)
    assert logged["val/miou"] == pytest.approx(miou, rel=1e-6)
    assert logged["val/pixel_accuracy"] == pytest.approx(accuracy, rel=1e-6)
    assert not any(key.endswith(("aupr", "auroc", "fpr95")) for key in logged)
    assert evaluation.results["validate"]["scores"] == {} and evaluation.threshold95("validate") is None
    assert evaluation.metrics_path is None  # results files are written after test only
    # No threshold: the heatmap grid has four panels (2 x 2), no overlay.
    acc = events(trainer.logger.log_dir)
    assert {f"val/heatmap/img{i:03d}" for i in (0, 2, 4)} <= set(acc.Tags()["images"])
    assert decode(acc, "val/heatmap/img000").shape == (2 * H + 3 * 4, 2 * W + 3 * 4, 3)


def test_later_validation_epochs_of_a_split_without_anomalies_skip_the_anomaly_histograms(tmp_path):
    """After a validation epoch without anomaly pixels, the next ones do not feed the pooled
    histograms or per-image sorts at all (only the closed-set metrics and pixel counts); if the
    split then holds anomalies, a warning says so and the epoch after scores them again."""
    evaluation = AnomalyEvaluation(per_class_false_positives=False)
    model, clean, dirty = ToyMethod(), ToyData(anomalies=False), ToyData()
    trainer = make_trainer(tmp_path, [evaluation])
    first = trainer.validate(model, loader(clean))[0]
    assert evaluation._no_anomalies == {"validate": True}
    second = trainer.validate(model, loader(clean))[0]
    assert second["val/miou"] == first["val/miou"]
    assert all(
        int(metric.image_count) == 0 and int(metric.counts.sum()) == 0 for metric in evaluation.val_metrics.values()
    )
    with pytest.warns(UserWarning, match="the val split now has 104 anomaly pixels"):
        skipped = trainer.validate(model, loader(dirty))[0]
    assert not any(key.endswith(("aupr", "auroc")) for key in skipped)
    scored = trainer.validate(model, loader(dirty))[0]
    ref = reference_outputs(model, dirty)
    assert scored["val/aupr"] == pytest.approx(reference_anomaly(ref["mask"], ref["red"])["aupr"], abs=1e-4)


def test_a_placeholder_batch_is_not_counted(tmp_path):
    """Under DDP a process without samples evaluates a placeholder batch (datamodules'
    EvaluationShardSampler) only to join the collectives: nothing of it is counted."""
    from datamodules.streethazards import PADDING_KEY

    class WithPlaceholder(ToyData):
        def __getitem__(self, i: int) -> dict:
            return {**super().__getitem__(i), PADDING_KEY: True}

    evaluation = AnomalyEvaluation()
    make_trainer(tmp_path, [evaluation]).test(ToyMethod(), loader(WithPlaceholder()))
    result = evaluation.results["test"]
    assert result["num_images"] == 0 and result["num_valid_pixels"] == 0
    assert all(int(metric.counts.sum()) == 0 for metric in evaluation.test_metrics.values())


def test_validation_with_anomalies_logs_anomaly_metrics(tmp_path):
    evaluation = AnomalyEvaluation(per_class_false_positives=False)
    model, data = ToyMethod(), ToyData()
    logged = make_trainer(tmp_path, [evaluation]).validate(model, loader(data))[0]
    ref = reference_outputs(model, data)
    expected = reference_anomaly(ref["mask"], ref["red"])
    assert logged["val/aupr"] == pytest.approx(expected["aupr"], abs=1e-4)
    assert logged["val/msp/auroc"] == pytest.approx(reference_anomaly(ref["mask"], ref["msp"])["auroc"], abs=1e-4)
    assert evaluation.threshold95("validate") is not None
    assert evaluation.results["validate"]["false_positives_at_threshold95"] is None
    assert evaluation.val_metrics.keys() == {"red", "msp"}


def test_twelve_classes_without_tensorboard(tmp_path):
    """12-class set: class names from the module, results in output_dir, heatmaps as PNG files."""
    names = CLASS_NAMES[1:]
    model = ToyMethod(num_classes=12, class_names=names)
    evaluation = AnomalyEvaluation(output_dir=str(tmp_path / "results"))
    heatmaps = AnomalyHeatmapLogger(every_n_batches=1)
    trainer = make_trainer(tmp_path, [evaluation, heatmaps], logger=CSVLogger(tmp_path))
    trainer.test(model, loader(ToyData(num_classes=12)))
    doc = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert doc["num_classes"] == 12 and doc["class_names"] == list(names)
    assert list(doc["segmentation"]["iou"]) == list(names)
    assert list(doc["false_positives_at_threshold95"]["by_ground_truth_class"]) == list(names)
    # Without a TensorBoard logger the images are still written, as PNG files in the run folder.
    pngs = sorted(p.relative_to(Path(trainer.log_dir)).as_posix() for p in Path(trainer.log_dir).rglob("*.png"))
    assert any(p.startswith("images/test/heatmap/") for p in pngs) and "images/test/curves_step0.png" in pngs


def test_contract_violations_are_reported(tmp_path):
    class NoScores(ToyMethod):
        def test_step(self, batch, batch_idx):
            return self.segment(batch["image"]).logits

    with pytest.raises(ValueError, match="expects validation_step/test_step to return"):
        make_trainer(tmp_path, [AnomalyEvaluation()]).test(NoScores(), loader(ToyData()))


# ------------------------------------------------------------------------------------------------ DDP
class _ListData(Dataset):
    def __init__(self, indices):
        self.data, self.indices = ToyData(), list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.data[self.indices[i]]


@pytest.mark.slow
def test_ddp_results_equal_single_process(tmp_path):
    single = AnomalyEvaluation(output_dir=str(tmp_path / "single"))
    make_trainer(tmp_path / "a", [single]).test(ToyMethod(), loader(ToyData()))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",  # forked: no second import of torch and the project per process
        logger=TensorBoardLogger(tmp_path / "b"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AnomalyEvaluation(output_dir=str(tmp_path / "ddp")), AnomalyHeatmapLogger(every_n_batches=1)],
    )
    trainer.test(ToyMethod(), loader(ToyData()))
    one = json.loads((tmp_path / "single" / "metrics.json").read_text())
    two = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert two["num_images"] == one["num_images"] == N_IMAGES
    for key in ("aupr", "auroc", "fpr95", "aupr_per_image", "auroc_per_image", "fpr95_per_image", "miou"):
        assert two[key] == pytest.approx(one[key], abs=1e-12), key
    # The bootstrap intervals of the primary score and of mIoU: the same resamples of the same images.
    primary = one["primary_score"]
    intervals = [key for key in one["scores"][primary] if key.endswith("_ci")]
    assert len(intervals) == 7 and one["segmentation"]["miou_ci"] == two["segmentation"]["miou_ci"]
    for key in intervals:
        assert two["scores"][primary][key] == one["scores"][primary][key], key
    # msp comes from a softmax over differently composed batches: float32 scores may differ in the last bit,
    # and so may the pixels that share a histogram bin, hence the error bounds (tiny either way).
    bounds = ("aupr_error_bound", "auroc_error_bound", "fpr95_error_bound")
    values_two, values_one = (
        {k: v for k, v in doc["scores"]["msp"].items() if k not in bounds and not k.endswith("_ci")}
        for doc in (two, one)
    )
    assert values_two == pytest.approx(values_one, rel=1e-6)
    for key in intervals:
        assert two["scores"]["msp"][key] == pytest.approx(one["scores"]["msp"][key], rel=1e-6), key
    for key in bounds:
        assert two["scores"]["msp"][key] == pytest.approx(one["scores"]["msp"][key], abs=1e-6)
    assert two["false_positives_at_threshold95"] == one["false_positives_at_threshold95"]
    assert two["segmentation"]["confusion_matrix"] == one["segmentation"]["confusion_matrix"]
    tags = events(str(tmp_path / "b" / "lightning_logs" / "version_0")).Tags()
    assert "test/pr_curve/red" in tags["tensors"] and "test/curves" in tags["images"]


# ------------------------------------------------------------------------------------------------ pure parts
def test_resize_to_matches_interpolate_and_skips_same_size():
    x = torch.randn(2, 5, 6, 8)
    assert resize_to(x, (6, 8)) is x
    expected = F.interpolate(x, size=(12, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_to(x, (12, 16)), expected)
    torch.testing.assert_close(resize_to(x[:, 0], (12, 16)), expected[:, 0])
    assert resize_to(x.to(torch.bfloat16), (12, 16)).dtype == torch.float32


@pytest.mark.parametrize("num_bits", [4, 8, 16])
def test_device_layout_and_rebin_match_functional(num_bits):
    g = torch.Generator().manual_seed(num_bits)
    for _ in range(20):
        lo, hi = sorted(torch.randint(functional.KEY_NEG_INF, functional.KEY_POS_INF, (2,), generator=g).tolist())
        reference = functional.bin_layout(lo, hi, num_bits)
        shift, offset = device_layout(torch.tensor(lo), torch.tensor(hi), num_bits)
        assert (int(shift), int(offset)) == (reference.shift, reference.offset)
        wider = functional.bin_layout(lo - int(torch.randint(0, 1 << 30, (1,), generator=g)), hi, num_bits)
        counts = torch.randint(0, 5, (3, 1 << num_bits), generator=g)
        expected = functional.rebin_counts(counts, reference, wider)
        got = device_rebin(counts, shift, offset, torch.tensor(wider.shift), torch.tensor(wider.offset))
        assert torch.equal(got, expected)
    empty_shift, _ = device_layout(torch.tensor(1 << 31), torch.tensor(-(1 << 31) - 1), num_bits)
    assert int(empty_shift) == 0


def test_negative_histogram_exact_at_bin_edges_and_order_independent():
    g = torch.Generator().manual_seed(3)
    batches = []
    for scale in (0.01, 1.0, 100.0):  # the key range widens from batch to batch: bins must merge exactly
        scores = torch.randn(2, 9, 11, generator=g) * scale
        classes = torch.randint(0, 4, (2, 2, 9, 11), generator=g)
        include = torch.rand(2, 9, 11, generator=g) > 0.2
        batches.append((scores, classes, include))

    forward, backward, merged = (NegativeScoreHistogram(4, num_bits=8) for _ in range(3))
    for b in batches:
        forward.update(*b)
    for b in reversed(batches):
        backward.update(*b)
    part = NegativeScoreHistogram(4, num_bits=8)
    merged.update(*batches[0])
    for b in batches[1:]:
        part.update(*b)
    merged.merge_state(part)
    result = forward.compute()
    assert torch.equal(result["counts"], backward.compute()["counts"])
    assert torch.equal(result["counts"], merged.compute()["counts"])

    layout = forward.layout(result)
    scores = torch.cat([b[0].reshape(-1) for b in batches]).numpy()
    classes = torch.cat([b[1].reshape(2, -1) for b in batches], dim=1).numpy()
    include = torch.cat([b[2].reshape(-1) for b in batches]).numpy()
    for threshold in np.quantile(scores, [0.0, 0.3, 0.9, 0.999]).tolist() + [-1e9, 1e9]:
        index, edge = NegativeScoreHistogram.threshold_bin(threshold, layout)
        assert edge <= threshold
        # Flagging by the bin edge and by the threshold differ only inside the threshold's bin.
        in_bin = include & (scores >= np.float32(edge)) & (scores < np.float32(threshold))
        assert in_bin.sum() <= result["counts"][0, :, min(index, layout.num_bins - 1)].sum()
        flagged = include & (scores >= np.float32(edge))
        for grouping in range(2):
            parts = false_positive_breakdown(result["counts"][grouping], index)
            expected = np.bincount(classes[grouping][flagged], minlength=4)
            np.testing.assert_array_equal(parts["false_positives"], expected)
            np.testing.assert_array_equal(parts["negatives"], np.bincount(classes[grouping][include], minlength=4))


def test_false_positive_breakdown_definitions():
    counts = torch.tensor([[5, 1, 2], [0, 0, 0], [1, 3, 0]])
    parts = false_positive_breakdown(counts, 1)
    np.testing.assert_array_equal(parts["false_positives"], [3, 0, 3])
    np.testing.assert_array_equal(parts["negatives"], [8, 0, 4])
    np.testing.assert_allclose(parts["fraction"], [0.5, 0.0, 0.5])
    np.testing.assert_allclose(parts["false_positive_rate"], [3 / 8, np.nan, 3 / 4])
    assert np.isnan(false_positive_breakdown(counts, 3)["fraction"]).all()  # nothing flagged


def test_visualisation_helpers():
    lut = colormap_lut("magma")
    reference = np.round(matplotlib.colormaps["magma"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(lut, reference)
    labels = np.array([[0, 5, 12], [13, 255, 7]])
    np.testing.assert_array_equal(label_lut(PALETTE, 13)[labels], colorize(labels))
    twelve = label_lut(PALETTE[1:], 12)  # 12-class palette: building is class 0, anomaly stays 13
    assert tuple(twelve[0]) == PALETTE[1] and tuple(twelve[13]) == PALETTE[13] and tuple(twelve[12]) == (255, 255, 255)

    grid = make_grid([np.full((2, 3, 3), k, np.uint8) for k in range(3)], columns=2, padding=1)
    assert grid.shape == (2 * 2 + 3, 2 * 3 + 3, 3)
    assert (grid[1:3, 1:4] == 0).all() and (grid[1:3, 5:8] == 1).all() and (grid[4:6, 1:4] == 2).all()
    assert (grid[4:6, 5:8] == 255).all() and (grid[0] == 255).all()

    rgb = np.zeros((1, 4, 3), np.uint8)
    out = outcome_overlay(rgb, np.array([[True, True, False, True]]), np.array([[13, 2, 13, 255]]), 13, 255, alpha=0.5)
    np.testing.assert_array_equal(out[0], [[0, 128, 0], [128, 0, 0], [0, 64, 128], [0, 0, 0]])


# ------------------------------------------------------------------------------------------------ io
def _temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_atomic_writers_round_trip_without_leftovers(tmp_path):
    target = tmp_path / "deep" / "dir" / "out.json"
    atomic_write_json(
        target,
        {"nan": math.nan, "inf": -math.inf, "np": np.float32(0.5), "t": torch.tensor([1, 2]), "p": tmp_path, "k": (1,)},
    )
    text = target.read_text()
    loaded = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard token {token}"))
    assert loaded == {"nan": None, "inf": None, "np": 0.5, "t": [1, 2], "p": str(tmp_path), "k": [1]}
    atomic_write_text(tmp_path / "a.txt", "héllo")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    state = {"w": torch.arange(5.0), "step": 3}
    atomic_torch_save(state, tmp_path / "c.ckpt")
    loaded_state = torch.load(tmp_path / "c.ckpt")
    assert torch.equal(loaded_state["w"], state["w"]) and loaded_state["step"] == 3
    assert _temp_files(tmp_path) == [] and _temp_files(target.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_writers_keep_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"version": 1})
    # Unserialisable content fails before any file is opened.
    with pytest.raises(TypeError):
        atomic_write_json(path, {"version": 2, "bad": object()})
    assert json.loads(path.read_text()) == {"version": 1}

    # A failure after part of the data reached the disk (fsync fails, e.g. disk full).
    def failing_fsync(fd):
        raise OSError("simulated I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="simulated"):
            atomic_write_text(path, '{"version": 3, "partial": tr')
    assert json.loads(path.read_text()) == {"version": 1}
    assert _temp_files(tmp_path) == []

    # torch.save dying halfway through a checkpoint leaves the previous checkpoint loadable.
    ckpt = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.zeros(3)}, ckpt)
    with pytest.raises(Exception, match="pickle|lambda|local object"):
        atomic_torch_save({"w": torch.ones(1000), "hook": lambda: None}, ckpt)
    assert torch.equal(torch.load(ckpt)["w"], torch.zeros(3))
    assert _temp_files(tmp_path) == []


def test_a_new_epoch_frees_the_previous_epochs_histograms_without_garbage_collection(tmp_path):
    """torchmetrics metrics sit in reference cycles; without an explicit release each validation
    epoch's histograms (state and default, 64 MiB each per score) stayed alive until Python's
    cycle collector ran, measured +550 MB per epoch in a demo fit."""
    import gc
    import weakref

    evaluation = AnomalyEvaluation(per_class_false_positives=False)
    model, data = ToyMethod(), ToyData()
    trainer = make_trainer(tmp_path, [evaluation])
    trainer.validate(model, loader(data))
    first = evaluation.val_metrics["red"]
    tensors = [getattr(first, name) for name in first._defaults] + list(first._defaults.values())
    assert any(t.numel() >= 1 << 22 for t in tensors)  # the histogram and its default
    refs = [weakref.ref(t) for t in tensors]
    del tensors
    gc.disable()
    try:
        trainer.validate(model, loader(data))
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()
    assert evaluation.val_metrics["red"] is not first and evaluation.threshold95("validate") is not None


def test_excluded_scores_are_not_evaluated_and_the_others_are_unchanged(tmp_path, test_run):
    evaluation = AnomalyEvaluation(exclude_scores=["msp", "not_a_score"], operating_points=False)
    trainer = make_trainer(tmp_path, [evaluation], logger=False)
    trainer.test(ToyMethod(), loader(ToyData()), verbose=False)
    scores = evaluation.results["test"]["scores"]
    assert list(scores) == ["red"]
    for key in ("aupr", "auroc", "fpr95", "aupr_per_image"):
        assert scores["red"][key] == test_run["evaluation"].results["test"]["scores"]["red"][key]


def test_excluding_the_methods_own_score_is_refused(tmp_path):
    evaluation = AnomalyEvaluation(exclude_scores=["red"], operating_points=False)
    trainer = make_trainer(tmp_path, [evaluation], logger=False)
    with pytest.raises(EvaluationOptionError, match="own score 'red'"):
        trainer.test(ToyMethod(), loader(ToyData()), verbose=False)
    with pytest.raises(EvaluationOptionError, match="exclude_scores must be a list"):
        AnomalyEvaluation(exclude_scores="msp")

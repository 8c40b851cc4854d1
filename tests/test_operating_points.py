"""Operating points fixed on the calibration split, pixel counts at thresholds, size strata, images.

References are written here independently: brute force over every distinct threshold, and the
size strata from one mask per component (no contingency table).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import main
from callbacks.evaluation import AnomalyEvaluation
from callbacks.image_logging import log_image
from callbacks.metrics import AnomalyMetrics, SizeStrataMetrics, ThresholdCounts
from callbacks.metrics.functional.operating_points import best_f1_threshold, threshold_at_recall
from callbacks.operating_points import OperatingPointEvaluation
from callbacks.protocol import EvaluationOptionError
from datamodules.synthetic import write_synthetic_streethazards
from tests.helpers import callbacks_arg, cli_args

EIGHT = np.ones((3, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------- thresholds
def _scores_and_labels(rng: np.random.Generator, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    labels = np.where(rng.random(n) < 0.1, 13, rng.integers(0, 13, n))
    labels[rng.random(n) < 0.05] = 255
    # few distinct values (ties) so that every histogram bin holds one value
    scores = np.round(rng.normal(size=n) + (labels == 13) * 1.5, 2).astype(np.float32)
    return scores, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_operating_thresholds_match_brute_force(seed: int) -> None:
    scores, labels = _scores_and_labels(np.random.default_rng(seed))
    metric = AnomalyMetrics(num_bits=16)
    metric.update(torch.from_numpy(scores)[None], torch.from_numpy(labels)[None])
    points = metric.operating_points()
    valid = labels != 255
    s, positive = scores[valid].astype(np.float64), labels[valid] == 13
    candidates = np.unique(s)[::-1]
    recall = np.array([(positive & (s >= t)).sum() / positive.sum() for t in candidates])
    f1 = np.array([2 * (positive & (s >= t)).sum() / ((s >= t).sum() + positive.sum()) for t in candidates])

    t95 = threshold_at_recall(points["tp"], points["fp"], points["thresholds"], 0.95)
    expected = candidates[np.argmax(recall >= 0.95)]  # the highest threshold reaching 95%
    assert np.array_equal(s >= t95, s >= expected)
    t_f1, best = best_f1_threshold(points["tp"], points["fp"], points["thresholds"])
    assert best == pytest.approx(f1.max(), abs=1e-12)
    assert np.array_equal(s >= t_f1, s >= candidates[np.argmax(f1)])


def test_threshold_counts_match_numpy() -> None:
    rng = np.random.default_rng(3)
    scores, labels = _scores_and_labels(rng)
    metric = ThresholdCounts([-0.5, 0.0, 1.25])
    for part in np.array_split(np.arange(scores.size), 3):  # streamed in chunks
        metric.update(torch.from_numpy(scores[part])[None], torch.from_numpy(labels[part])[None])
    valid = labels != 255
    for result, t in zip(metric.compute(), [-0.5, 0.0, 1.25], strict=True):
        flagged, positive = (scores >= t) & valid, (labels == 13) & valid
        negative = valid & ~positive
        assert result["tp"] == (flagged & positive).sum() and result["fp"] == (flagged & negative).sum()
        assert result["tpr"] == pytest.approx((flagged & positive).sum() / positive.sum())
        assert result["fpr"] == pytest.approx((flagged & negative).sum() / negative.sum())
        assert result["f1"] == pytest.approx(2 * result["tp"] / (2 * result["tp"] + result["fp"] + result["fn"]))


# --------------------------------------------------------------------------------------- size strata
def _frame(rng: np.random.Generator, height: int = 48, width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Blobs of many sizes (some touching), void stripes, and scores that find some of them."""
    labels = rng.integers(0, 13, (height, width))
    for _ in range(rng.integers(1, 6)):
        h, w = rng.integers(1, 14, 2)
        top, left = rng.integers(0, height - h), rng.integers(0, width - w)
        labels[top : top + h, left : left + w] = 13
    labels[:, rng.integers(0, width)] = 255
    scores = ndimage.gaussian_filter(rng.random((height, width)), 1.5) + (labels == 13) * rng.uniform(0, 0.4)
    return scores.astype(np.float32), labels


def _reference_strata(frames, thresholds, edges):
    """Per bin: components, found (sIoU >= 0.5), pixels, flagged pixels; one mask per component."""
    num_b = len(edges) + 1
    out = {"components": np.zeros(num_b, int), "pixels": np.zeros(num_b, int)}
    out["found"] = np.zeros((len(thresholds), num_b), int)
    out["flagged"] = np.zeros((len(thresholds), num_b), int)
    for scores, labels in frames:
        area = labels.size
        truth, n = ndimage.label(labels == 13, structure=EIGHT)
        void = labels == 255
        for k in range(1, n + 1):
            component = truth == k
            size = int(component.sum())
            b = sum(size >= e * area for e in edges)
            out["components"][b] += 1
            out["pixels"][b] += size
            for t, threshold in enumerate(thresholds):
                flagged = (scores >= threshold) & ~void
                predicted, _ = ndimage.label(flagged, structure=EIGHT)
                touching = [j for j in np.unique(predicted[component]) if j > 0]
                union_pred = np.isin(predicted, touching)
                on_other = union_pred & (labels == 13) & ~component
                inter = (component & union_pred).sum()
                union = union_pred.sum() + size - inter - on_other.sum()
                out["found"][t, b] += inter / union >= 0.5
                out["flagged"][t, b] += (component & (scores >= threshold)).sum()
    return out


def test_size_strata_match_a_per_component_reference() -> None:
    rng = np.random.default_rng(11)
    frames = [_frame(rng) for _ in range(6)]
    thresholds, edges = [0.55, 0.7], [0.002, 0.01, 0.03]
    metric = SizeStrataMetrics(thresholds, edges)
    halves = [SizeStrataMetrics(thresholds, edges) for _ in range(2)]
    for i, (scores, labels) in enumerate(frames):
        batch = torch.from_numpy(scores)[None], torch.from_numpy(labels)[None]
        metric.update(*batch)
        halves[i % 2].update(*batch)
    reference = _reference_strata(frames, thresholds, edges)
    result = metric.compute()
    assert [b["components"] for b in result["bins"]] == reference["components"].tolist()
    assert [b["pixels"] for b in result["bins"]] == reference["pixels"].tolist()
    assert reference["components"].sum() > 6 and (reference["components"] > 0).sum() >= 3
    for t in range(len(thresholds)):
        assert [b["found"][t] for b in result["bins"]] == reference["found"][t].tolist()
        for b, bin_result in enumerate(result["bins"]):
            if reference["pixels"][b]:
                assert bin_result["pixel_tpr"][t] == reference["flagged"][t, b] / reference["pixels"][b]
    halves[0].merge_state(halves[1])  # what the DDP sum gives
    assert halves[0].compute() == result


def test_bad_options_give_one_clear_line() -> None:
    for kwargs, words in (
        ({"size_bins": [0.01, 0.005]}, "strictly increasing"),
        ({"size_bins": []}, "at least one edge"),
        ({"size_bins": [1.5]}, "fractions of the image area"),
        ({"gallery_size": 0}, "gallery_size must be an integer >= 1"),
        ({"oracle_thresholds": -1}, "oracle_thresholds"),
        ({"operating_point": "best"}, "operating point must be one of"),
        ({"min_anomaly_size": -3}, "min_anomaly_size"),
    ):
        with pytest.raises(EvaluationOptionError, match=words) as error:
            AnomalyEvaluation(**kwargs)
        assert "\n" not in str(error.value) and str(error.value).startswith("evaluation.")
    for bad in ([], [float("inf")]):
        with pytest.raises(ValueError, match="finite score thresholds"):
            ThresholdCounts(bad)


def test_no_anomalies_gives_nan_with_a_warning() -> None:
    metric = SizeStrataMetrics([0.5])
    metric.update(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long))
    assert all(b["components"] == 0 and np.isnan(b["component_recall"][0]) for b in metric.compute()["bins"])
    evaluation = OperatingPointEvaluation()
    assert not evaluation.ready  # nothing calibrated: update is a no-op, compute says so
    evaluation.update(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long))


# --------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """A tiny SML run fitted once: data root, output folder, CLI arguments."""
    base = tmp_path_factory.mktemp("operating")
    root = base / "data"
    write_synthetic_streethazards(root, 8, 4, 6, image_size=(64, 96), seed=5)
    out = base / "out"
    args = [*cli_args(root, out, "sml", eval_batch_size=None), "--trainer.limit_train_batches=2"]
    assert main.main(["fit", *args, "--trainer.max_epochs=1"]) == 0
    return root, out, args


def test_thresholds_are_fixed_before_and_without_the_test_split(fitted, tmp_path: Path) -> None:
    root, out, args = fitted
    record = tmp_path / "record.json"
    assert (
        main.main(["test", *args, "--ckpt_path=last", callbacks_arg(("RecordOperatingPoints", {"path": str(record)}))])
        == 0
    )
    seen = json.loads(record.read_text())
    metrics = json.loads((out / "run" / "run" / "metrics.json").read_text())
    operating = metrics["operating_points"]
    # Fixed before the first test batch reached the model, and never changed afterwards.
    assert seen["ready_at_first_test_batch"] and seen["thresholds"] == operating["thresholds"]
    assert seen["test_steps_before_thresholds"] == 0
    assert operating["calibration"]["split"]["images"] == "validation split"
    assert "calibration split" in metrics["protocol"]["operating_points"]

    # The same checkpoint and validation split with another test split (other images and labels)
    # gives the same thresholds: nothing of the test split enters them.
    other = tmp_path / "other"
    shutil.copytree(root, other)
    rng = np.random.default_rng(0)
    for path in (other / "test").rglob("*.png"):
        array = np.asarray(Image.open(path))
        Image.fromarray(rng.permutation(array.reshape(-1, *array.shape[2:])).reshape(array.shape)).save(path)
    other_out = tmp_path / "out"
    other_args = [a.replace(str(root), str(other)).replace(str(out), str(other_out)) for a in args]
    last = out / "run" / "run" / "checkpoints" / "last.ckpt"
    assert main.main(["test", *other_args, f"--ckpt_path={last}"]) == 0
    other_metrics = json.loads((other_out / "run" / "run" / "metrics.json").read_text())
    assert other_metrics["operating_points"]["thresholds"] == operating["thresholds"]
    assert other_metrics["aupr"] != metrics["aupr"]  # the test split did change

    # What the table needs is there: rates, components, strata, gallery, oracle labelled.
    for name in ("tpr95", "best_f1"):
        row = operating["operating_points"][name]
        assert set(row["pixels"]) >= {"tpr", "fpr", "precision", "f1"}
        assert set(row["components"]) >= {"sIoU_gt", "PPV", "F1_mean", "F1_25", "F1_50", "F1_75", "TP_50"}
    assert "oracle" in operating["oracle"]["rule"] and operating["oracle"]["threshold"] is not None
    assert sum(b["components"] for b in operating["size_strata"]["bins"]) > 0
    assert operating["gallery"] and {g["kind"] for g in operating["gallery"]} <= {"false_positives", "missed"}
    images = out / "run" / "run" / "images" / "test"
    assert (images / "gallery").is_dir() and list((images / "gallery").glob("*.png"))
    assert list(images.glob("size_strata_step*.png"))


def test_csv_logger_run_writes_every_image_as_png(fitted, tmp_path: Path) -> None:
    _, out, args = fitted
    csv = json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}})
    last = out / "run" / "run" / "checkpoints" / "last.ckpt"
    assert main.main(["test", *args, f"--trainer.logger={csv}", f"--ckpt_path={last}"]) == 0
    pngs = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")}
    for expected in ("test/curves", "test/size_strata", "test/gallery/false_positives", "test/heatmap/"):
        assert any(expected in p for p in pngs), (expected, sorted(pngs))


# --------------------------------------------------------------------------------------- loggers
def _trainer(tmp_path: Path, logger) -> L.Trainer:  # type: ignore[no-untyped-def]
    return L.Trainer(default_root_dir=tmp_path, logger=logger, accelerator="cpu", devices=1)


IMAGE = np.zeros((12, 20, 3), np.uint8)
IMAGE[:, :10, 0] = 255


def test_tensorboard_logger_receives_the_image(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, logger)
    path = log_image(trainer, "test/gallery/missed", IMAGE, 3, tmp_path / "images")
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "test/gallery/missed" in events.Tags()["images"]
    assert np.array_equal(np.asarray(Image.open(path)), IMAGE) and path.name == "missed_step3.png"


def test_mlflow_logger_receives_the_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to use a local folder

    logger = MLFlowLogger(experiment_name="gallery", tracking_uri=(tmp_path / "mlruns").as_uri())
    log_image(_trainer(tmp_path, logger), "test/gallery/missed", IMAGE, 3, tmp_path / "images")
    stored = list((tmp_path / "mlruns").rglob("missed_step3.png"))
    assert stored and np.array_equal(np.asarray(Image.open(stored[0]))[..., :3], IMAGE)


def test_wandb_offline_logger_receives_the_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="gallery", offline=True, save_dir=str(tmp_path))
    log_image(_trainer(tmp_path, logger), "test/gallery/missed", IMAGE, 3, tmp_path / "images")
    logger.experiment.finish()
    stored = [p for p in (tmp_path / "wandb").rglob("*.png") if "/files/media/images/" in p.as_posix()]
    assert stored and np.array_equal(np.asarray(Image.open(stored[0]))[..., :3], IMAGE)


def test_size_bin_aupr_matches_scikit_learn() -> None:
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(5)
    frames = [_frame(rng) for _ in range(5)]
    edges = [0.002, 0.01, 0.03]
    evaluation = OperatingPointEvaluation(oracle_thresholds=0, size_bins=edges, min_prediction_size=1)
    evaluation.thresholds = {"tpr95": 0.5, "best_f1": 0.6}  # as calibration would have fixed them
    for scores, labels in frames:
        evaluation.update(torch.from_numpy(scores)[None], torch.from_numpy(labels)[None], names=["x"])
    result = evaluation.compute(type("OneProcess", (), {"world_size": 1})())
    negatives = np.concatenate([s[(lab != 13) & (lab != 255)] for s, lab in frames])
    for b, bin_result in enumerate(result["size_strata"]["bins"]):
        positives = []
        for scores, labels in frames:
            truth, n = ndimage.label(labels == 13, structure=EIGHT)
            for k in range(1, n + 1):
                size = (truth == k).sum()
                if sum(size >= e * labels.size for e in edges) == b:
                    positives.append(scores[truth == k])
        if not positives:
            assert bin_result["aupr"] is None or np.isnan(bin_result["aupr"])
            continue
        positives = np.concatenate(positives)
        truth_labels = np.r_[np.ones(positives.size), np.zeros(negatives.size)]
        expected = average_precision_score(truth_labels, np.r_[positives, negatives])
        assert bin_result["aupr"] == pytest.approx(expected, abs=1e-4)
    assert len(result["gallery"]) >= 1

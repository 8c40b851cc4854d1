"""The procedural StreetHazards writer: layout, formats, anomalies, determinism, atomic writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull
from sklearn.metrics import roc_auc_score

from datamodules import synthetic
from datamodules.labels import ANOMALY_INDEX, LABEL_OFFSET, NUM_CLASSES
from datamodules.synthetic import render_scene, scene_rng, write_synthetic_streethazards

SIZE = (90, 160)
COUNTS = {"train": 9, "val": 3, "test": 12}
RAW_ANOMALY = ANOMALY_INDEX + LABEL_OFFSET
# split -> (folder holding the .odgt, index file, subset folder, allowed towns)
LAYOUT = {
    "train": ("train", "train.odgt", "training", {"t1-3"}),
    "val": ("train", "validation.odgt", "validation", {"t4"}),
    "test": ("test", "test.odgt", "test", {"t5"}),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "streethazards"
    returned = write_synthetic_streethazards(
        root, COUNTS["train"], COUNTS["val"], COUNTS["test"], image_size=SIZE, seed=0
    )
    assert returned == root
    return root


def read_index(root: Path, split: str) -> list[dict]:
    folder, index, _, _ = LAYOUT[split]
    records = json.loads((root / folder / index).read_text())
    assert isinstance(records, list)
    return records


def load_split(root: Path, split: str) -> list[tuple[Image.Image, Image.Image]]:
    folder = root / LAYOUT[split][0]
    return [
        (Image.open(folder / r["fpath_img"]), Image.open(folder / r["fpath_segm"])) for r in read_index(root, split)
    ]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- layout and formats
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_index_lists_exactly_the_files_written(dataset: Path, split: str) -> None:
    folder, _, subset, towns = LAYOUT[split]
    records = read_index(dataset, split)
    assert len(records) == COUNTS[split]
    for record in records:
        assert list(record) == ["fpath_img", "fpath_segm", "width", "height"]
        assert (record["width"], record["height"]) == (SIZE[1], SIZE[0])
        image, annotation = Path(record["fpath_img"]), Path(record["fpath_segm"])
        assert not image.is_absolute()
        assert image.parts[:2] == ("images", subset) and annotation.parts[:2] == ("annotations", subset)
        assert image.parts[2] in towns and annotation.parts[2:] == image.parts[2:]
        assert re.fullmatch(r"\d{6}\.png", image.name)
    listed = {r["fpath_img"] for r in records} | {r["fpath_segm"] for r in records}
    on_disk = {
        str(p.relative_to(dataset / folder))
        for kind in ("images", "annotations")
        for p in (dataset / folder / kind / subset).glob("*/*")
    }
    assert listed == on_disk
    if split == "train":  # the release keeps towns 1-3 in one folder named t1-3
        assert {Path(r["fpath_img"]).parts[2] for r in records} == towns


def test_nothing_but_the_dataset_is_left_next_to_it(dataset: Path) -> None:
    assert [p.name for p in dataset.parent.iterdir()] == [dataset.name]
    assert sorted(p.name for p in dataset.iterdir()) == ["synthetic.json", "test", "train"]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_image_and_annotation_formats(dataset: Path, split: str) -> None:
    for image, annotation in load_split(dataset, split):
        assert image.mode == "RGBA" and annotation.mode == "L"
        assert image.size == annotation.size == (SIZE[1], SIZE[0])
        rgba, raw = np.asarray(image), np.asarray(annotation)
        assert (rgba[..., 3] == 255).all()
        assert raw.min() >= 1 and raw.max() <= RAW_ANOMALY
        has_anomaly = (raw == RAW_ANOMALY).any()
        assert has_anomaly == (split == "test")


def test_every_known_class_appears_in_training(dataset: Path) -> None:
    seen = set()
    for _, annotation in load_split(dataset, "train"):
        seen |= set(np.unique(np.asarray(annotation)).tolist())
    assert seen == set(range(LABEL_OFFSET, NUM_CLASSES + LABEL_OFFSET))


def test_scene_geometry_is_a_road_scene(dataset: Path) -> None:
    """Sky (unlabeled) is at the top and the road reaches the bottom of every image."""
    road, unlabeled = 7 + LABEL_OFFSET, 0 + LABEL_OFFSET
    for split in LAYOUT:
        for _, annotation in load_split(dataset, split):
            raw = np.asarray(annotation)
            rows = np.arange(raw.shape[0])[:, None]
            assert (raw[-1] == road).any()
            assert (raw[0] == unlabeled).any()
            assert rows.repeat(raw.shape[1], 1)[raw == road].min() > 0.3 * raw.shape[0]
            assert rows.repeat(raw.shape[1], 1)[raw == unlabeled].max() < 0.55 * raw.shape[0]


def test_test_anomalies_are_separate_objects_of_bounded_size(dataset: Path) -> None:
    for _, annotation in load_split(dataset, "test"):
        anomaly = np.asarray(annotation) == RAW_ANOMALY
        assert 0.001 <= anomaly.mean() <= 0.15
        components, count = ndimage.label(anomaly)  # 4-connectivity
        assert 1 <= count <= 3
        fractions = np.bincount(components.ravel())[1:] / anomaly.size
        assert (fractions >= 0.001).all() and (fractions <= 0.05).all()


def test_anomalies_stand_on_road_or_sidewalk(dataset: Path) -> None:
    """The pixel just below each anomaly's lowest row, in its columns, is mostly ground."""
    ground = {6 + LABEL_OFFSET, 7 + LABEL_OFFSET, 8 + LABEL_OFFSET}
    for _, annotation in load_split(dataset, "test"):
        raw = np.asarray(annotation)
        components, count = ndimage.label(raw == RAW_ANOMALY)
        for k in range(1, count + 1):
            rows, cols = np.nonzero(components == k)
            bottom = rows.max()
            if bottom + 1 >= raw.shape[0]:
                continue
            below = raw[bottom + 1, cols[rows == bottom]]
            assert np.isin(below, list(ground)).mean() >= 0.5


def test_anomalies_are_not_separable_by_colour(dataset: Path) -> None:
    pixels, labels = [], []
    for image, annotation in load_split(dataset, "test"):
        pixels.append(np.asarray(image)[..., :3].reshape(-1, 3).astype(np.float64))
        labels.append(np.asarray(annotation).ravel() == RAW_ANOMALY)
    rgb, is_anomaly = np.concatenate(pixels), np.concatenate(labels)
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    for name, channel in (("R", rgb[:, 0]), ("G", rgb[:, 1]), ("B", rgb[:, 2]), ("grey", grey)):
        auc = roc_auc_score(is_anomaly, channel)
        # A threshold may point either way: its best AUROC is max(auc, 1 - auc).
        assert max(auc, 1.0 - auc) < 0.8, (name, auc)


def test_release_loader_reads_the_dataset(dataset: Path) -> None:
    streethazards = pytest.importorskip("datamodules.streethazards")
    for split in LAYOUT:
        samples = streethazards.list_split(dataset, split)
        assert len(samples) == COUNTS[split]
        rgb = streethazards.load_image(samples[0].image)
        raw = streethazards.load_raw_annotation(samples[0].annotation)
        assert rgb.shape == (*SIZE, 3) and raw.shape == SIZE


# ----------------------------------------------------------------------------- determinism
def test_same_arguments_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    first = all_files(write_synthetic_streethazards(tmp_path / "a", 2, 1, 2, image_size=(72, 128), seed=3))
    again = all_files(write_synthetic_streethazards(tmp_path / "b", 2, 1, 2, image_size=(72, 128), seed=3))
    other = all_files(write_synthetic_streethazards(tmp_path / "c", 2, 1, 2, image_size=(72, 128), seed=4))
    assert first == again
    assert first.keys() == other.keys()
    images = [name for name in first if "/images/" in name]
    assert len(images) == 5
    assert all(first[name] != other[name] for name in images)


def test_an_image_does_not_depend_on_the_other_counts(tmp_path: Path) -> None:
    small = write_synthetic_streethazards(tmp_path / "a", 1, 0, 1, image_size=(72, 128), seed=5)
    large = write_synthetic_streethazards(tmp_path / "b", 4, 2, 3, image_size=(72, 128), seed=5)
    for split in ("train", "test"):
        folder = LAYOUT[split][0]
        first_small, first_large = read_index(small, split)[0], read_index(large, split)[0]
        for key in ("fpath_img", "fpath_segm"):
            assert (small / folder / first_small[key]).read_bytes() == (large / folder / first_large[key]).read_bytes()
    assert read_index(small, "val") == []


def test_render_scene_matches_the_written_file(dataset: Path) -> None:
    record = read_index(dataset, "test")[4]
    rgb, label = render_scene(*SIZE, scene_rng(0, "test", 4), anomalies=True)
    assert rgb.dtype == np.uint8 and rgb.shape == (*SIZE, 3) and label.dtype == np.uint8
    assert np.array_equal(np.asarray(Image.open(dataset / "test" / record["fpath_img"]))[..., :3], rgb)
    assert np.array_equal(np.asarray(Image.open(dataset / "test" / record["fpath_segm"])), label + LABEL_OFFSET)
    _, clean = render_scene(*SIZE, scene_rng(0, "test", 4), anomalies=False)
    assert not (clean == ANOMALY_INDEX).any()


def test_worker_processes_write_the_same_bytes(tmp_path: Path) -> None:
    serial = write_synthetic_streethazards(tmp_path / "a", 2, 1, 2, image_size=(64, 96), seed=1)
    parallel = write_synthetic_streethazards(tmp_path / "b", 2, 1, 2, image_size=(64, 96), seed=1, workers=2)
    assert all_files(serial) == all_files(parallel)


# ----------------------------------------------------------------------------- anomaly shapes
def solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area (pixels as unit squares): 1 for convex shapes."""
    rows, cols = np.nonzero(mask)
    corners = np.concatenate([np.stack([rows + dy, cols + dx], 1) for dy in (-0.5, 0.5) for dx in (-0.5, 0.5)])
    return float(mask.sum() / ConvexHull(corners).volume)


@pytest.mark.parametrize("kind", synthetic._ANOMALY_SHAPES)
def test_anomaly_shapes_are_structured_not_blobs(kind: str) -> None:
    """Stars, rings and crosses are far from convex (unlike pasted polygons / blobs); rings have a hole."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        radius = rng.uniform(5.0, 30.0)
        mask, _, _ = synthetic._rasterize_anomaly(
            kind, radius, rng.uniform(0.75, 1.33), rng.uniform(0, np.pi), rng.random(3), np.zeros(2)
        )
        assert solidity(mask) < 0.87
        if kind == "ring":
            hole = ndimage.binary_fill_holes(mask) & ~mask
            assert hole.sum() > 0.15 * mask.sum()


def test_written_anomalies_are_structured(dataset: Path) -> None:
    for _, annotation in load_split(dataset, "test"):
        components, count = ndimage.label(np.asarray(annotation) == RAW_ANOMALY)
        for k in range(1, count + 1):
            assert solidity(components == k) < 0.9


# ----------------------------------------------------------------------------- writing safely
def test_refuses_a_non_empty_root_and_accepts_an_empty_one(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_synthetic_streethazards(root, 1, 1, 1, image_size=(64, 96))
    assert [p.name for p in root.iterdir()] == ["keep.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    write_synthetic_streethazards(empty, 1, 0, 0, image_size=(64, 96))
    assert (empty / "train" / "train.odgt").is_file()


def test_an_interrupted_write_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = synthetic.render_scene

    def failing(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_scene", failing)
    root = tmp_path / "parent" / "data"
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_streethazards(root, 2, 1, 1, image_size=(64, 96))
    assert not root.exists()
    assert list(root.parent.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_train": -1}, "num_train"),
        ({"num_test": 1.5}, "num_test"),
        ({"seed": -2}, "seed"),
        ({"image_size": (32, 320)}, "too small"),
        ({"image_size": (90,)}, "height, width"),
        ({"workers": -1}, "workers"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict, message: str) -> None:
    arguments = {"num_train": 1, "num_val": 1, "num_test": 1, "image_size": (64, 96), "seed": 0} | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        write_synthetic_streethazards(tmp_path / "data", **arguments)
    assert not (tmp_path / "data").exists()


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cli"
    argv = [str(root), "--num-train", "2", "--num-val", "1", "--num-test", "1", "--height", "64"]
    assert synthetic.main([*argv, "--width", "96", "--seed", "2", "--workers", "1"]) == 0
    assert "wrote 4 images (64x96)" in capsys.readouterr().out
    assert len(read_index(root, "train")) == 2 and len(read_index(root, "test")) == 1
    with pytest.raises(SystemExit):  # exists now: a clear argparse error, not a traceback
        synthetic.main([*argv, "--width", "96"])
    assert "not an empty folder" in capsys.readouterr().err

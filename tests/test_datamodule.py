"""The StreetHazards datamodule on a hand-made dataset in the released layout."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_index, write_release_sample
from PIL import Image
from scipy.ndimage import binary_dilation

from datamodules.labels import ANOMALY_INDEX, CLASS_NAMES, IGNORE_INDEX, IMAGE_MEAN, IMAGE_STD
from datamodules.streethazards import (
    DEFAULT_ROOT,
    StreetHazardsDataError,
    StreetHazardsDataModule,
    StreetHazardsDataset,
    SyntheticConfig,
    default_num_workers,
    list_split,
    load_image,
    train_augmentation,
)


def denormalize(image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def expected_raw(k: int, modulo: int, shape: tuple[int, int] = (24, 40)) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return 1 + (rows + cols + k) % modulo


def make_dm(root: Path, **kwargs) -> StreetHazardsDataModule:
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 2)
    return StreetHazardsDataModule(root=str(root), **kwargs)


def test_loads_release_layout_with_label_shift(release_root: Path) -> None:
    dm = make_dm(release_root, train_augment=False)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.datasets["train"]) == 4 and len(dm.datasets["val"]) == 2 and len(dm.datasets["test"]) == 3

    shipped = next(iter(dm.test_dataloader()))  # uint8 through the loader, normalized on the device
    assert shipped["image"].dtype == torch.uint8 and shipped["mask"].dtype == torch.uint8
    batch = dm.on_after_batch_transfer(shipped, 0)
    assert batch["image"].shape == (2, 3, 24, 40) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (2, 24, 40) and batch["mask"].dtype == torch.long
    for k in range(2):
        np.testing.assert_array_equal(batch["mask"][k].numpy(), expected_raw(k, 14) - 1)
        # red channel encodes the raw label: image and mask come from the same file pair
        np.testing.assert_array_equal(denormalize(batch["image"][k])[..., 0], expected_raw(k, 14) * 10)
    assert int(batch["mask"].max()) == ANOMALY_INDEX
    assert dm.num_classes == 13 and dm.class_names == CLASS_NAMES and len(dm.palette) == 14


def test_training_split_never_has_anomaly_and_val_is_clean(release_root: Path) -> None:
    dm = make_dm(release_root, train_augment=False)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    np.testing.assert_array_equal(batch["mask"][0].numpy(), expected_raw(0, 13) - 1)


def test_ignore_unlabeled_gives_twelve_classes(release_root: Path) -> None:
    dm = make_dm(release_root, ignore_unlabeled=True, train_augment=False)
    dm.setup("test")
    mask = dm.datasets["test"][0]["mask"].numpy()
    raw = expected_raw(0, 14)
    expected = np.where(raw == 1, IGNORE_INDEX, np.where(raw == 14, ANOMALY_INDEX, raw - 2))
    np.testing.assert_array_equal(mask, expected)
    assert dm.num_classes == 12 and dm.class_names[0] == "building" and len(dm.palette) == 13


def test_resize_on_load(release_root: Path) -> None:
    dm = make_dm(release_root, image_size=(12, 20), train_augment=False)
    dm.setup("fit")
    item = dm.datasets["val"][0]
    assert item["image"].shape == (3, 12, 20) and item["mask"].shape == (12, 20)
    # nearest-neighbour: every label value is one of the originals, never an interpolated one
    assert set(np.unique(item["mask"].numpy())) <= set(np.unique(expected_raw(0, 13) - 1))


def test_scan_fallback_when_index_missing(release_root: Path) -> None:
    (release_root / "test" / "test.odgt").unlink()
    write_release_sample(release_root, "test", "100", np.zeros((24, 40, 3), np.uint8), expected_raw(0, 14), town="t6")
    samples = list_split(release_root, "test")
    assert len(samples) == 4
    assert {s.image.parent.name for s in samples} == {"t5", "t6"}


def test_odgt_json_lines_and_absolute_paths(release_root: Path) -> None:
    index = release_root / "train" / "train.odgt"
    records = json.loads(index.read_text())
    records[0]["fpath_img"] = str(release_root / "train" / records[0]["fpath_img"])
    index.write_text("\n".join(json.dumps(r) for r in records))
    assert len(list_split(release_root, "train")) == 4


def test_images_are_rgba_with_alpha_dropped(release_root: Path) -> None:
    sample = list_split(release_root, "train")[0]
    assert Image.open(sample.image).mode == "RGBA"
    item = StreetHazardsDataset([sample])[0]
    assert item["image"].shape[0] == 3


def test_augmentation_keeps_image_and_mask_aligned() -> None:
    # Left 30% of the scene is class 1 and red, the rest class 2 and blue, with horizontal stripes
    # of class 3 / green: a flip, scale or crop applied to only one of image and mask shows up as
    # pixels whose colour disagrees with their label.
    height, width = 80, 120
    mask = np.full((height, width), 2, np.uint8)
    mask[:, : int(0.3 * width)] = 1
    mask[(np.arange(height) % 20) < 7] = 3  # stripes thick enough to survive downscaling
    colours = np.array([[0, 0, 0], [230, 20, 20], [20, 20, 230], [20, 230, 20]], np.uint8)
    image = colours[mask]
    augment = train_augmentation((48, 80), scale_range=(0.7, 1.5))
    flipped_seen = 0
    for seed in range(30):
        augment.set_random_seed(seed)
        out = augment(image=image, mask=mask)
        img, msk = out["image"].astype(int), out["mask"]
        inside = msk != IGNORE_INDEX
        dominant = np.argmax(img, axis=2)  # 0 red, 1 green, 2 blue
        expected_channel = np.array([-1, 0, 2, 1])[np.where(inside, msk, 0)]
        # skip pixels at label edges, where bilinear image interpolation mixes colours
        edge = np.zeros_like(inside)
        edge[1:-1, 1:-1] = (
            (msk[1:-1, 1:-1] != msk[:-2, 1:-1])
            | (msk[1:-1, 1:-1] != msk[2:, 1:-1])
            | (msk[1:-1, 1:-1] != msk[1:-1, :-2])
            | (msk[1:-1, 1:-1] != msk[1:-1, 2:])
        )
        edge = binary_dilation(edge)  # upscaling blends over more than one pixel
        check = inside & ~edge
        check[[0, -1], :] = False
        check[:, [0, -1]] = False
        assert check.sum() > 100, (seed, np.unique(msk, return_counts=True), img.shape)
        agreement = (dominant[check] == expected_channel[check]).mean()
        assert agreement > 0.98, f"seed {seed}: image and mask disagree on {1 - agreement:.1%} of pixels"
        # a horizontally flipped crop puts class 1 on the right
        cols_class1 = np.nonzero((msk == 1).any(axis=0))[0]
        if cols_class1.size and cols_class1.mean() > img.shape[1] / 2:
            flipped_seen += 1
    assert flipped_seen > 0, "the flip never happened, so the test checked nothing about it"


def test_train_batches_have_crop_size(release_root: Path) -> None:
    dm = make_dm(release_root, image_size=(16, 32))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 32) and batch["mask"].shape == (2, 16, 32)
    assert int(batch["mask"][batch["mask"] != IGNORE_INDEX].max()) < ANOMALY_INDEX


def test_train_crop_size_gives_smaller_training_crops_at_the_same_scale(release_root: Path) -> None:
    dm = make_dm(release_root, image_size=(16, 32), train_crop_size=(8, 12), scale_range=(1.0, 1.0))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 12) and batch["mask"].shape == (2, 8, 12)
    assert next(iter(dm.val_dataloader()))["image"].shape[-2:] == (16, 32)  # evaluation keeps image_size
    # Without scaling, a crop is a window of the resized image: its labels are a 8x12 block of it.
    full = dm.datasets["train"].load(0)[1]
    crop = dm.datasets["train"][0]["mask"].numpy()
    windows = [full[r : r + 8, c : c + 12] for r in range(16 - 7) for c in range(32 - 11)]
    assert any((w == crop).all() or (w[:, ::-1] == crop).all() for w in windows)
    with pytest.raises(StreetHazardsDataError, match="train_crop_size"):
        make_dm(release_root, train_crop_size=(0, 12))
    with pytest.raises(StreetHazardsDataError, match="train_augment"):
        make_dm(release_root, train_crop_size=(8, 12), train_augment=False)


def test_training_batches_are_reproducible_per_seed_and_epoch_whatever_the_workers(release_root: Path) -> None:
    """Shuffling and augmentation (albumentations' own generators, which seed_everything does not
    reach) follow (data.seed, epoch, sample): the same batches with 0 or 2 workers and from a new
    datamodule; the next epoch and another seed differ."""

    def epochs(seed: int, workers: int, count: int = 2) -> list[list[torch.Tensor]]:
        dm = make_dm(release_root, image_size=(16, 32), seed=seed, num_workers=workers, scale_range=(0.5, 2.0))
        dm.setup("fit")
        loader = dm.train_dataloader()
        out = []
        for epoch in range(count):
            loader.sampler.set_epoch(epoch)
            out.append([torch.cat([b["image"].flatten(), b["mask"].flatten().float()]) for b in loader])
        return out

    first = epochs(0, 0)
    for other in (epochs(0, 2), epochs(0, 0)):
        for mine, theirs in zip(first, other, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    assert not torch.equal(torch.cat(first[0]), torch.cat(first[1]))
    assert not torch.equal(torch.cat(first[0]), torch.cat(epochs(1, 0, count=1)[0]))


# ----------------------------------------------------------------------------- bad input
def test_missing_root(tmp_path: Path) -> None:
    dm = make_dm(tmp_path / "nowhere")
    with pytest.raises(StreetHazardsDataError, match="nowhere.*does not exist"):
        dm.setup("fit")


def test_odgt_not_json(release_root: Path) -> None:
    (release_root / "train" / "train.odgt").write_text("[{not json")
    with pytest.raises(StreetHazardsDataError, match=r"train\.odgt: not valid JSON"):
        list_split(release_root, "train")


def test_odgt_record_lacks_field(release_root: Path) -> None:
    write_index(release_root, "train", [{"fpath_img": "images/training/t1-3/000.png"}])
    with pytest.raises(StreetHazardsDataError, match="record 0 lacks the field 'fpath_segm'"):
        list_split(release_root, "train")


def test_listed_file_missing(release_root: Path) -> None:
    records = json.loads((release_root / "test" / "test.odgt").read_text())
    records[1]["fpath_img"] = "images/test/t5/missing.png"
    write_index(release_root, "test", records)
    with pytest.raises(StreetHazardsDataError, match=r"record 1 lists 'images/test/t5/missing\.png'"):
        list_split(release_root, "test")


def test_truncated_png(release_root: Path) -> None:
    sample = list_split(release_root, "train")[0]
    data = sample.image.read_bytes()
    sample.image.write_bytes(data[: len(data) // 2])
    with pytest.raises(StreetHazardsDataError, match=f"{sample.image.name}: unreadable or truncated"):
        StreetHazardsDataset([sample])[0]


def test_not_an_image(release_root: Path) -> None:
    sample = list_split(release_root, "train")[0]
    sample.annotation.write_text("hello")
    with pytest.raises(StreetHazardsDataError, match="unreadable or truncated"):
        StreetHazardsDataset([sample])[0]


def test_size_mismatch(release_root: Path) -> None:
    sample = list_split(release_root, "train")[0]
    Image.fromarray(np.ones((10, 10), np.uint8), mode="L").save(sample.annotation)
    with pytest.raises(StreetHazardsDataError, match="annotation size 10x10 differs from image"):
        StreetHazardsDataset([sample])[0]


def test_label_values_out_of_range(release_root: Path) -> None:
    sample = list_split(release_root, "train")[0]
    Image.fromarray(np.full((24, 40), 20, np.uint8), mode="L").save(sample.annotation)
    with pytest.raises(StreetHazardsDataError, match=r"annotation values \[20\] outside 1\.\.14"):
        StreetHazardsDataset([sample])[0]


def test_label_zero_per_option(release_root: Path) -> None:
    sample = list_split(release_root, "train")[0]
    raw = expected_raw(0, 13)
    raw[0, :5] = 0
    Image.fromarray(raw.astype(np.uint8), mode="L").save(sample.annotation)
    with pytest.raises(StreetHazardsDataError, match=r"values \[0\] outside.*zero_label: ignore"):
        StreetHazardsDataset([sample])[0]
    mask = StreetHazardsDataset([sample], zero_label="ignore")[0]["mask"]
    assert (mask[0, :5] == IGNORE_INDEX).all() and (mask[1:] != IGNORE_INDEX).all()


def test_rgb_annotation_rejected(release_root: Path) -> None:
    sample = list_split(release_root, "train")[0]
    Image.fromarray(np.ones((24, 40, 3), np.uint8)).save(sample.annotation)
    with pytest.raises(StreetHazardsDataError, match="must be a single-channel PNG"):
        StreetHazardsDataset([sample])[0]


def test_empty_split(release_root: Path) -> None:
    write_index(release_root, "val", [])
    with pytest.raises(StreetHazardsDataError, match="split 'val' .* is empty"):
        list_split(release_root, "val")


def test_bad_options(release_root: Path) -> None:
    with pytest.raises(StreetHazardsDataError, match="batch_size"):
        make_dm(release_root, batch_size=0)
    with pytest.raises(StreetHazardsDataError, match="zero_label"):
        StreetHazardsDataset([], zero_label="maybe")
    dm = make_dm(release_root)
    with pytest.raises(StreetHazardsDataError, match="predict_dir"):
        dm.setup("predict")


def test_class_pixel_counts_are_exact_and_cached(
    release_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dm = make_dm(release_root)
    counts = dm.class_pixel_counts()
    expected = sum(np.bincount((expected_raw(k, 13) - 1).ravel(), minlength=13) for k in range(4))
    assert counts == expected.tolist()
    assert len(list((tmp_path / "cache").rglob("class_counts-*.json"))) == 1
    # the second call reads the cache: it no longer needs the annotations
    for sample in list_split(release_root, "train"):
        sample.annotation.write_bytes(b"")
    assert dm.class_pixel_counts() == counts


def test_embedded_default_written_on_first_use_and_checked_against_data_synthetic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    small = SyntheticConfig(num_train=2, num_val=1, num_test=2, height=64, width=96, seed=0)
    dm = StreetHazardsDataModule(synthetic=small, num_workers=0, image_size=(64, 96))
    dm.setup("test")
    assert len(dm.datasets["test"]) == 2
    root = tmp_path / DEFAULT_ROOT
    assert json.loads((root / "synthetic.json").read_text()) == {
        "num_train": 2, "num_val": 1, "num_test": 2, "height": 64, "width": 96, "seed": 0
    }  # fmt: skip
    StreetHazardsDataModule(synthetic=small, num_workers=0).setup("test")  # same values: reused as is

    # Other sizes or another seed than the folder holds: a clear error, never the old data.
    for change, expected in [({"num_test": 3}, "num_test 2 (asked: 3)"), ({"seed": 4}, "seed 0 (asked: 4)")]:
        other = SyntheticConfig(**{**small.__dict__, **change})
        with pytest.raises(StreetHazardsDataError, match=re.escape(expected)) as error:
            StreetHazardsDataModule(synthetic=other, num_workers=0).setup("test")
        assert DEFAULT_ROOT in str(error.value) and "delete that folder" in str(error.value)

    # A folder written before the writer recorded its arguments is checked by its indexes.
    (root / "synthetic.json").unlink()
    StreetHazardsDataModule(synthetic=small, num_workers=0).setup("test")
    other = SyntheticConfig(**{**small.__dict__, "num_train": 5, "width": 128})
    with pytest.raises(StreetHazardsDataError, match=re.escape("num_train 2 (asked: 5), width 96 (asked: 128)")):
        StreetHazardsDataModule(synthetic=other, num_workers=0).prepare_data()


def test_other_roots_are_not_checked_against_data_synthetic(release_root: Path) -> None:
    dm = make_dm(release_root, synthetic=SyntheticConfig(num_test=1000))
    dm.setup("test")
    assert len(dm.datasets["test"]) == 3


# ----------------------------------------------------------------------------- loader speed options
def _contract_batches(dm: StreetHazardsDataModule, loader) -> list[dict]:
    return [dm.on_after_batch_transfer(batch, 0) for batch in loader]


def test_decoders_give_the_same_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (18, 30, 4), dtype=np.uint8)  # alpha below 255 too: dropped, never blended
    images = {
        "rgba.png": Image.fromarray(rgba, "RGBA"),
        "rgb.png": Image.fromarray(rgba[..., :3], "RGB"),
        "grey.png": Image.fromarray(rgba[..., 0], "L"),
        "palette.png": Image.fromarray(rgba[..., :3], "RGB").convert("P"),
        "photo.jpg": Image.fromarray(rgba[..., :3], "RGB"),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
        pil = load_image(tmp_path / name, decoder="pil")
        cv2_decoded = load_image(tmp_path / name, decoder="cv2")
        assert cv2_decoded.shape == pil.shape == (18, 30, 3) and cv2_decoded.dtype == np.uint8, name
        np.testing.assert_array_equal(cv2_decoded, pil, err_msg=name)
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgba[..., :3])
    # what OpenCV cannot read is named by Pillow's message
    data = (tmp_path / "rgba.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(StreetHazardsDataError, match="truncated.png: unreadable or truncated"):
        load_image(tmp_path / "truncated.png", decoder="cv2")
    with pytest.raises(StreetHazardsDataError, match="decoder must be one of"):
        make_dm(tmp_path, decoder="turbo")


@pytest.mark.parametrize("decoder", ["cv2", "pil"])
def test_uint8_batches_normalized_on_the_device_equal_the_workers_normalization(
    release_root: Path, decoder: str
) -> None:
    """Shipping uint8 and normalizing after the transfer gives bit-identical contract batches to
    normalizing in the workers, for every split, augmentation and injection included."""
    from datamodules.streethazards import InjectionConfig

    options = {"image_size": (16, 32), "injection": InjectionConfig(probability=1.0), "decoder": decoder}
    shipped, worker = make_dm(release_root, **options), make_dm(release_root, normalize_on_device=False, **options)
    for dm in (shipped, worker):
        dm.setup("fit")
        dm.setup("test")
    for split in ("train", "val", "test"):
        mine = _contract_batches(shipped, getattr(shipped, f"{split}_dataloader")())
        theirs = _contract_batches(worker, getattr(worker, f"{split}_dataloader")())
        assert len(mine) == len(theirs) > 0
        for a, b in zip(mine, theirs, strict=True):
            assert set(a) == set(b) and ("mask_clean" in a) == (split == "train")
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (split, key)
    raw = next(iter(worker.train_dataloader()))  # normalize_on_device=False: the contract straight away
    assert raw["image"].dtype == torch.float32 and raw["mask_clean"].dtype == torch.long


def test_posthoc_batches_are_normalized_and_can_be_at_the_test_size(release_root: Path) -> None:
    dm = make_dm(release_root, image_size=(12, 20))
    batches = list(dm.posthoc_dataloader())
    assert batches[0]["image"].dtype == torch.float32 and batches[0]["image"].shape[-2:] == (12, 20)
    assert batches[0]["mask"].dtype == torch.long and len(dm.posthoc_dataloader().dataset) == 4
    native = make_dm(release_root, image_size=(12, 20), test_native_resolution=True, posthoc_at_test_size=True)
    assert next(iter(native.posthoc_dataloader()))["image"].shape[-2:] == (24, 40)


def test_decoded_image_cache_hits_misses_and_bound(release_root: Path, tmp_path: Path) -> None:
    from datamodules.streethazards import DecodedImageCache

    cache_dir = tmp_path / "cache"
    plain = make_dm(release_root, image_size=(12, 20), train_augment=False)
    cached = make_dm(release_root, image_size=(12, 20), train_augment=False, cache_dir=str(cache_dir))
    for dm in (plain, cached):
        dm.setup("fit")
    expected = [plain.datasets["train"].load(i) for i in range(4)]
    dataset = cached.datasets["train"]
    for _ in range(2):  # first pass writes, second reads
        for i in range(4):
            image, mask = dataset.load(i)
            np.testing.assert_array_equal(image, expected[i][0])
            np.testing.assert_array_equal(mask, expected[i][1])
    assert (dataset.cache.misses, dataset.cache.hits) == (4, 4)
    assert len(list(cache_dir.rglob("*.npy"))) == 4
    # val shares the folder under other keys (its labels keep the anomaly class)
    cached.datasets["val"].load(0)
    assert len(list(cache_dir.rglob("*.npy"))) == 5

    # a rewritten file is a miss, never a stale hit
    sample = dataset.samples[0]
    raw = expected_raw(0, 13)
    rgb = np.zeros((24, 40, 3), np.uint8)
    write_release_sample(release_root, "train", sample.image.stem, rgb, raw)
    os.utime(sample.image, ns=(1, 1))  # a new modification time even on a coarse-grained clock
    np.testing.assert_array_equal(dataset.load(0)[0], np.zeros((12, 20, 3), np.uint8))

    # bounded: nothing is written beyond max_bytes; workers get a fresh view of the folder
    small = DecodedImageCache(tmp_path / "small", max_bytes=12 * 20 * 4 + 200)
    assert small.put("a" * 40, *expected[0]) and not small.put("b" * 40, *expected[1])
    assert small.get("b" * 40) is None and small.get("a" * 40) is not None
    assert pickle.loads(pickle.dumps(small))._used is None


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # the loader is only built, never iterated
def test_worker_count_from_the_available_cpus(release_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datamodules import streethazards

    assert [default_num_workers(1, cpus) for cpus in (1, 2, 16, 64)] == [0, 1, 15, 16]
    assert default_num_workers(4, cpus=16) == 3  # four training processes on the node share the CPUs
    monkeypatch.setattr(streethazards, "available_cpus", lambda: 6)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    dm = make_dm(release_root, num_workers=None)
    dm.setup("test")
    assert dm.test_dataloader().num_workers == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert dm.loader_workers() == 2
    assert make_dm(release_root, num_workers=3).loader_workers() == 3


def test_predict_on_images_of_their_own_sizes_turns_cudnn_autotuning_off(
    release_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    dm = make_dm(release_root, predict_dir=str(release_root / "test"))
    dm.setup("predict")
    assert torch.backends.cudnn.benchmark is False
    item = dm.datasets["predict"][0]
    assert item["image"].dtype == torch.uint8 and tuple(item["original_size"].tolist()) == (24, 40)
    dm.teardown("predict")
    assert torch.backends.cudnn.benchmark is True
    fixed = make_dm(release_root, predict_dir=str(release_root / "test"), predict_image_size=(12, 20))
    fixed.setup("predict")  # one size: autotuning stays on
    assert torch.backends.cudnn.benchmark is True


# ----------------------------------------------------------------------------- processes and signals
def test_evaluation_shards_cover_every_sample_once_and_an_empty_shard_gets_a_placeholder(release_root: Path) -> None:
    """3 test images on 4 processes: shards [0], [1], [2] and a placeholder for rank 3 (Lightning
    would skip that process's evaluation loop, hooks included, and the others would wait for it in
    their collective compute()); the placeholder batch is the first image marked as padding."""
    from types import SimpleNamespace

    from datamodules.streethazards import EvaluationShardSampler, is_padding

    dm = make_dm(release_root, eval_batch_size=2)
    dm.setup("test")
    shards = []
    for rank in range(4):
        dm.trainer = SimpleNamespace(world_size=4, global_rank=rank)
        loader = dm.test_dataloader()
        assert isinstance(loader.sampler, EvaluationShardSampler)
        batches = list(loader)
        assert len(batches) == 1
        shards.append((batches[0]["name"], is_padding(batches[0])))
    assert shards[:3] == [(["000"], False), (["001"], False), (["002"], False)]
    assert shards[3] == (["000"], True)
    # The post-hoc loader (the module's own loop) gets no placeholder.
    dm.trainer = SimpleNamespace(world_size=8, global_rank=7, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    dm.setup("fit")
    assert list(dm.posthoc_dataloader()) == []


def test_loader_workers_ignore_termination_signals(release_root: Path) -> None:
    """SLURM signals every process of a job step: a loader worker killed by SIGUSR1 or SIGTERM would
    fail the next batch before the training process could stop at a batch boundary."""
    import subprocess
    import time

    dm = make_dm(release_root, num_workers=1, eval_batch_size=1)
    dm.setup("test")
    loader = dm.test_dataloader()
    iterator = iter(loader)
    next(iterator)
    (worker,) = iterator._workers
    for name in ("USR1", "TERM"):  # sent by another process, as SLURM's step daemon does
        subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert worker.is_alive()
    assert [batch["name"] for batch in iterator] == [["001"], ["002"]]
    # SIGTERM from the worker's own process (DataLoader shutdown, multiprocessing at exit, which
    # then waits for the worker) still ends it.
    worker.terminate()
    worker.join(timeout=10)
    assert not worker.is_alive() and worker.exitcode == 0

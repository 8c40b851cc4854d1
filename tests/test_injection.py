"""Anomaly injection: outlier sources, pasting, and reproducibility (datamodules/injection.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch
from PIL import Image

from datamodules.injection import (
    SBD_CLASS_NAMES,
    AnomalyInjector,
    FolderOutlierSource,
    OutlierSource,
    OutlierSourceError,
    ProceduralOutlierSource,
    SBDOutlierSource,
    build_injector,
    injection_rng,
    paste_object,
)
from datamodules.labels import ANOMALY_INDEX, IGNORE_INDEX, NUM_CLASSES

# --------------------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------------------


class ArraySource(OutlierSource):
    """Objects given as arrays: full control of rgb and alpha."""

    def __init__(self, objects: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.objects = objects
        self.calls = 0

    def __len__(self) -> int:
        return len(self.objects)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        return self.objects[index]


class RecolouredSource(OutlierSource):
    """Another source's alpha with a constant colour: pasted pixels become detectable exactly."""

    def __init__(self, source: OutlierSource, colour: tuple[int, int, int]) -> None:
        self.source, self.colour = source, np.asarray(colour, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.source)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rgb, alpha = self.source.get(index)
        return np.broadcast_to(self.colour, rgb.shape).copy(), alpha


def scene(height: int = 60, width: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A black image and a random label map with known classes and ignore pixels."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, NUM_CLASSES, (height, width)).astype(np.uint8)
    mask[rng.random((height, width)) < 0.1] = IGNORE_INDEX
    return np.zeros((height, width, 3), np.uint8), mask


def bbox(region: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _sparse_cell(count: int, shape: tuple[int, int]) -> np.ndarray:
    cell = np.empty((count, 1), dtype=object)
    for i in range(count):
        cell[i, 0] = scipy.sparse.csc_matrix(shape, dtype=np.uint8)
    return cell


def ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


SBD_SHAPE = (48, 64)


def write_sbd_image(root: Path, name: str, instances: list[tuple[np.ndarray, int]], seed: int) -> None:
    """One image of the SBD release: img/<name>.jpg, cls/<name>.mat, inst/<name>.mat.

    The .mat files hold MATLAB structs as in the release (``GTcls``: Segmentation, Boundaries (20
    sparse matrices), CategoriesPresent; ``GTinst``: Segmentation, Boundaries, Categories).
    """
    rgb = np.random.default_rng(seed).integers(0, 256, (*SBD_SHAPE, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "img" / f"{name}.jpg", quality=95)
    inst = np.zeros(SBD_SHAPE, np.uint8)
    cls = np.zeros(SBD_SHAPE, np.uint8)
    for k, (region, category) in enumerate(instances, start=1):
        inst[region] = k
        cls[region] = category
    categories = np.asarray([[c] for _, c in instances], dtype=np.uint8).reshape(-1, 1)
    gt_cls = {
        "Segmentation": cls,
        "Boundaries": _sparse_cell(len(SBD_CLASS_NAMES), SBD_SHAPE),
        "CategoriesPresent": np.unique(categories).reshape(-1, 1),
    }
    gt_inst = {
        "Segmentation": inst,
        "Boundaries": _sparse_cell(len(instances), SBD_SHAPE),
        "Categories": categories,
    }
    scipy.io.savemat(root / "cls" / f"{name}.mat", {"GTcls": gt_cls}, do_compression=True)
    scipy.io.savemat(root / "inst" / f"{name}.mat", {"GTinst": gt_inst}, do_compression=True)


@pytest.fixture()
def sbd_root(tmp_path: Path) -> Path:
    """Three images: 'a' (bird, a 6-pixel bottle, a person), 'b' (a dog) in train; 'c' in val."""
    root = tmp_path / "sbd"
    for sub in ("img", "cls", "inst"):
        (root / sub).mkdir(parents=True)
    bird = ellipse(SBD_SHAPE, 14, 18, 9, 14)
    bottle = np.zeros(SBD_SHAPE, bool)
    bottle[40:43, 5:7] = True
    person = np.zeros(SBD_SHAPE, bool)
    person[8:40, 44:58] = True
    write_sbd_image(root, "2008_000001", [(bird, 3), (bottle, 5), (person, 15)], seed=1)
    dog = ellipse(SBD_SHAPE, 30, 32, 12, 20)
    write_sbd_image(root, "2008_000002", [(dog, 12)], seed=2)
    write_sbd_image(root, "2008_000003", [(ellipse(SBD_SHAPE, 24, 32, 10, 10), 8)], seed=3)
    (root / "train.txt").write_text("2008_000001\n2008_000002\n")
    (root / "val.txt").write_text("2008_000003\n")
    return root


def _rgba_object(height: int, width: int, seed: int) -> np.ndarray:
    """An RGBA cut-out with transparent margins, a soft edge and an opaque core."""
    rng = np.random.default_rng(seed)
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 256, (height, width, 3))
    core = ellipse((height, width), height / 2, width / 2, height / 3, width / 3)
    halo = ellipse((height, width), height / 2, width / 2, height / 3 + 2, width / 3 + 2) & ~core
    rgba[core, 3] = 255
    rgba[halo, 3] = 90
    return rgba


@pytest.fixture()
def rgba_root(tmp_path: Path) -> Path:
    root = tmp_path / "rgba"
    root.mkdir()
    for i, (h, w) in enumerate([(30, 40), (44, 22)]):
        Image.fromarray(_rgba_object(h, w, seed=i), mode="RGBA").save(root / f"obj{i}.png")
    (root / "README.txt").write_text("not an image: ignored")
    return root


@pytest.fixture()
def pairs_root(tmp_path: Path) -> Path:
    root = tmp_path / "pairs"
    (root / "masks").mkdir(parents=True)
    rng = np.random.default_rng(7)
    for name, suffix, (h, w) in [("cone", ".png", (36, 28)), ("crate", ".jpg", (25, 50))]:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{name}{suffix}")
        mask = ellipse((h, w), h / 2, w / 2, h / 2.5, w / 2.5).astype(np.uint8)  # 0/1 values
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


SOURCE_KINDS = ("sbd", "folder_rgba", "folder_pairs", "procedural")


@pytest.fixture(params=SOURCE_KINDS)
def any_source(request: pytest.FixtureRequest, tmp_path: Path) -> OutlierSource:
    if request.param == "sbd":
        return SBDOutlierSource(request.getfixturevalue("sbd_root"), min_pixels=20)
    if request.param == "folder_rgba":
        return FolderOutlierSource(request.getfixturevalue("rgba_root"))
    if request.param == "folder_pairs":
        return FolderOutlierSource(request.getfixturevalue("pairs_root"))
    return ProceduralOutlierSource(seed=3, num_objects=50)


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def _assert_cut_out(rgb: np.ndarray, alpha: np.ndarray) -> None:
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert alpha.shape == rgb.shape[:2] and alpha.dtype in (np.bool_, np.uint8)
    # Cropped to the object: every border row and column touches it.
    assert alpha[0].any() and alpha[-1].any() and alpha[:, 0].any() and alpha[:, -1].any()


def test_every_source_returns_deterministic_cropped_cut_outs(any_source: OutlierSource) -> None:
    assert len(any_source) >= 2
    for index in range(min(len(any_source), 5)):
        rgb, alpha = any_source.get(index)
        _assert_cut_out(rgb, alpha)
        rgb2, alpha2 = any_source[index]
        np.testing.assert_array_equal(rgb, rgb2)
        np.testing.assert_array_equal(alpha, alpha2)
    with pytest.raises(IndexError):
        any_source.get(len(any_source))


def test_sbd_layout_is_readable_by_torchvision(sbd_root: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    seg = torchvision.datasets.SBDataset(sbd_root, image_set="train", mode="segmentation", download=False)
    assert len(seg) == 2
    image, target = seg[0]
    assert image.size == (SBD_SHAPE[1], SBD_SHAPE[0])
    expected = scipy.io.loadmat(sbd_root / "cls" / "2008_000001.mat")["GTcls"][0]["Segmentation"][0]
    np.testing.assert_array_equal(np.asarray(target), expected)
    assert set(np.unique(expected)) == {0, 3, 5, 15}
    _, boundaries = torchvision.datasets.SBDataset(sbd_root, image_set="val", mode="boundaries")[0]
    assert boundaries.shape == (len(SBD_CLASS_NAMES), *SBD_SHAPE)


def test_sbd_instances_are_filtered_and_cut_out_by_their_masks(sbd_root: Path) -> None:
    source = SBDOutlierSource(sbd_root, min_pixels=20)
    # The 6-pixel bottle is too small and the person is excluded by default: bird and dog remain.
    np.testing.assert_array_equal(source.entries, [[0, 1], [1, 1]])
    assert len(SBDOutlierSource(sbd_root, min_pixels=20, exclude_classes=())) == 3
    assert len(SBDOutlierSource(sbd_root, min_pixels=1, exclude_classes=())) == 4
    assert len(SBDOutlierSource(sbd_root, image_set="val", min_pixels=20)) == 1

    for index, name in enumerate(["2008_000001", "2008_000002"]):
        rgb, alpha = source.get(index)
        inst = scipy.io.loadmat(sbd_root / "inst" / f"{name}.mat")["GTinst"][0]["Segmentation"][0]
        image = np.asarray(Image.open(sbd_root / "img" / f"{name}.jpg").convert("RGB"))
        window = bbox(inst == 1)
        np.testing.assert_array_equal(alpha, (inst == 1)[window])
        np.testing.assert_array_equal(rgb, image[window])


def test_sbd_index_cache_is_reused_and_invalidated(sbd_root: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache" / "sbd_train.npz"
    first = SBDOutlierSource(sbd_root, min_pixels=20, cache_file=cache)
    entries = first.entries.copy()
    assert cache.is_file()

    def no_scan(self, position):  # the cached index must not read instance maps
        raise AssertionError("index rebuilt although the cache matches")

    monkeypatch.setattr(SBDOutlierSource, "_image_entries", no_scan)
    np.testing.assert_array_equal(SBDOutlierSource(sbd_root, min_pixels=20, cache_file=cache).entries, entries)
    monkeypatch.undo()
    # Other filters: the cache does not match, the index is rebuilt and the cache overwritten.
    other = SBDOutlierSource(sbd_root, min_pixels=1, exclude_classes=(), cache_file=cache)
    assert len(other) == 4
    monkeypatch.setattr(SBDOutlierSource, "_image_entries", no_scan)
    assert len(SBDOutlierSource(sbd_root, min_pixels=1, exclude_classes=(), cache_file=cache)) == 4


def test_sbd_errors_name_the_path(sbd_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        SBDOutlierSource(missing)
    with pytest.raises(FileNotFoundError, match="test.txt"):
        SBDOutlierSource(sbd_root, image_set="test")

    # The extracted archive one level up: the error points at the right folder.
    release = tmp_path / "release"
    (release / "benchmark_RELEASE" / "dataset").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="benchmark_RELEASE"):
        SBDOutlierSource(release)

    (sbd_root / "inst" / "2008_000002.mat").unlink()
    with pytest.raises(FileNotFoundError, match="2008_000002.mat"):
        len(SBDOutlierSource(sbd_root))

    scipy.io.savemat(sbd_root / "inst" / "2008_000002.mat", {"something": np.zeros(3)})
    with pytest.raises(OutlierSourceError, match=r"2008_000002\.mat.*GTinst"):
        len(SBDOutlierSource(sbd_root))

    (sbd_root / "inst" / "2008_000002.mat").write_bytes(b"not a mat file")
    with pytest.raises(OutlierSourceError, match="2008_000002.mat"):
        len(SBDOutlierSource(sbd_root))

    # An image whose size differs from its instance map: caught when the object is loaded.
    write_sbd_image(sbd_root, "2008_000002", [(ellipse(SBD_SHAPE, 30, 32, 12, 20), 12)], seed=2)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(sbd_root / "img" / "2008_000002.jpg")
    source = SBDOutlierSource(sbd_root, min_pixels=20)
    with pytest.raises(OutlierSourceError, match="2008_000002.jpg"):
        source.get(1)

    (sbd_root / "train.txt").write_text("2008_000003\n")  # only the val image: nothing after the filter
    with pytest.raises(OutlierSourceError, match="no instance"):
        len(SBDOutlierSource(sbd_root, min_pixels=10_000))


def test_folder_rgba_cut_outs(rgba_root: Path) -> None:
    source = FolderOutlierSource(rgba_root)
    assert not source.paired and [p.name for p in source.images] == ["obj0.png", "obj1.png"]
    for index, (h, w) in enumerate([(30, 40), (44, 22)]):
        rgba = _rgba_object(h, w, seed=index)
        rgb, alpha = source.get(index)
        window = bbox(rgba[..., 3] > 0)
        np.testing.assert_array_equal(alpha, rgba[..., 3][window])  # soft alpha kept
        np.testing.assert_array_equal(rgb, rgba[..., :3][window])


def test_folder_image_mask_pairs(pairs_root: Path) -> None:
    source = FolderOutlierSource(pairs_root)
    assert source.paired and [p.name for p in source.images] == ["cone.png", "crate.jpg"]
    for index, name in enumerate(["cone.png", "crate.jpg"]):
        image = np.asarray(Image.open(pairs_root / name).convert("RGB"))
        mask = np.asarray(Image.open(pairs_root / "masks" / f"{Path(name).stem}.png")) > 0
        rgb, alpha = source.get(index)
        np.testing.assert_array_equal(alpha, mask[bbox(mask)])
        np.testing.assert_array_equal(rgb, image[bbox(mask)])


def test_folder_errors_name_the_path(tmp_path: Path, rgba_root: Path, pairs_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        FolderOutlierSource(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OutlierSourceError, match=f"{empty}.*no images"):
        FolderOutlierSource(empty)

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgba_root / "opaque.png")
    with pytest.raises(OutlierSourceError, match=r"opaque\.png has no alpha"):
        FolderOutlierSource(rgba_root)
    (rgba_root / "opaque.png").unlink()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgba_root / "photo.jpg")
    with pytest.raises(OutlierSourceError, match=r"photo\.jpg.*masks/"):
        FolderOutlierSource(rgba_root)
    (rgba_root / "photo.jpg").unlink()
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), mode="RGBA").save(rgba_root / "invisible.png")
    source = FolderOutlierSource(rgba_root)
    with pytest.raises(OutlierSourceError, match=r"invisible\.png.*no object pixel"):
        source.get([p.name for p in source.images].index("invisible.png"))
    (rgba_root / "broken.png").write_bytes(b"\x89PNG\r\n not really")
    with pytest.raises(OutlierSourceError, match=r"broken\.png"):
        FolderOutlierSource(rgba_root)

    Image.fromarray(np.zeros((5, 5), np.uint8)).save(pairs_root / "masks" / "cone.png")
    with pytest.raises(OutlierSourceError, match=r"masks/cone\.png is 5x5 but its image .*cone\.png is 28x36"):
        FolderOutlierSource(pairs_root)
    (pairs_root / "masks" / "cone.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"masks/cone\.png"):
        FolderOutlierSource(pairs_root)


def test_procedural_source_is_seeded_and_varied() -> None:
    source = ProceduralOutlierSource(seed=5, num_objects=40, side_range=(32, 64))
    again = ProceduralOutlierSource(seed=5, num_objects=40, side_range=(32, 64))
    other = ProceduralOutlierSource(seed=6, num_objects=40, side_range=(32, 64))
    shapes = set()
    for index in range(40):
        rgb, alpha = source.get(index)
        _assert_cut_out(rgb, alpha)
        assert alpha.dtype == np.bool_ and max(alpha.shape) <= 64
        rgb2, alpha2 = again.get(index)
        np.testing.assert_array_equal(rgb, rgb2)
        np.testing.assert_array_equal(alpha, alpha2)
        shapes.add(alpha.shape)
        # Textured: more than a handful of colours inside the object.
        assert len(np.unique(rgb[alpha], axis=0)) > 10
    assert len(shapes) > 20
    assert not np.array_equal(source.get(0)[0], other.get(0)[0])
    with pytest.raises(ValueError):
        ProceduralOutlierSource(num_objects=0)


# --------------------------------------------------------------------------------------------------
# Pasting
# --------------------------------------------------------------------------------------------------


def _reference_paste(image, mask, rgb, alpha, top, left, soft):
    """Float64 reference: place the object on a zero-padded canvas, crop the canvas to the image."""
    H, W = mask.shape
    h, w = alpha.shape
    a = alpha.astype(np.float64) / 255.0 if alpha.dtype == np.uint8 else alpha.astype(np.float64)
    canvas_a = np.zeros((H + 2 * h, W + 2 * w))
    canvas_rgb = np.zeros((H + 2 * h, W + 2 * w, 3))
    assert -h <= top <= H and -w <= left <= W  # the object fits on the padded canvas
    canvas_a[top + h : top + 2 * h, left + w : left + 2 * w] = a
    canvas_rgb[top + h : top + 2 * h, left + w : left + 2 * w] = rgb
    a_img = canvas_a[h : h + H, w : w + W]
    rgb_img = canvas_rgb[h : h + H, w : w + W]
    if soft:
        out = a_img[..., None] * rgb_img + (1 - a_img[..., None]) * image
    else:
        out = np.where((a_img > 0.5)[..., None], rgb_img, image)
    return np.rint(out).astype(np.uint8), np.where(a_img > 0.5, ANOMALY_INDEX, mask)


@pytest.mark.parametrize("soft", [False, True])
def test_paste_object_matches_float64_reference_with_clipping(soft: bool) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = rng.integers(0, NUM_CLASSES, (40, 50)).astype(np.uint8)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (17, 23)).astype(np.uint8)
    before = (image.copy(), mask.copy())
    # Inside, across every border and corner, and entirely outside.
    for top, left in [(5, 7), (-8, 10), (30, -12), (-16, -22), (35, 45), (0, 27), (40, 0), (-17, 3)]:
        out_image, out_mask = paste_object(image, mask, rgb, alpha, top, left, soft_alpha=soft)
        ref_image, ref_mask = _reference_paste(image, mask, rgb, alpha, top, left, soft)
        np.testing.assert_array_equal(out_mask, ref_mask)
        diff = np.abs(out_image.astype(int) - ref_image.astype(int))
        # float32 vs float64 may round a .5 differently when blending.
        assert diff.max() <= (1 if soft else 0)
    np.testing.assert_array_equal(image, before[0])
    np.testing.assert_array_equal(mask, before[1])


def test_injection_labels_exactly_the_pasted_pixels(any_source: OutlierSource) -> None:
    """Pasting a constant-colour copy (same alpha, same draws) shows exactly which pixels were pasted."""
    probe = RecolouredSource(any_source, (255, 0, 255))
    image, mask = scene()
    image[:] = (10, 200, 30)
    inputs = (image.copy(), mask.copy())
    for seed in range(6):
        out_image, out_mask, clean = AnomalyInjector(any_source, probability=1.0)(
            image, mask, injection_rng(seed, 0, 0)
        )
        probe_image, probe_mask, _ = AnomalyInjector(probe, probability=1.0)(image, mask, injection_rng(seed, 0, 0))
        pasted = (probe_image != image).any(axis=2)
        assert pasted.any()
        np.testing.assert_array_equal(out_mask, probe_mask)
        np.testing.assert_array_equal(out_mask == ANOMALY_INDEX, pasted)
        np.testing.assert_array_equal(out_mask[~pasted], mask[~pasted])
        np.testing.assert_array_equal(out_image[~pasted], image[~pasted])
        np.testing.assert_array_equal(clean, mask)
        assert out_mask.dtype == mask.dtype
    np.testing.assert_array_equal(image, inputs[0])
    np.testing.assert_array_equal(mask, inputs[1])


def test_probability_zero_changes_nothing_and_returns_copies() -> None:
    injector = AnomalyInjector(ProceduralOutlierSource(num_objects=5), probability=0.0)
    image, mask = scene()
    image[:] = 77
    for seed in range(20):
        out_image, out_mask, clean = injector(image, mask, injection_rng(seed, 1, 2))
        for out, ref in [(out_image, image), (out_mask, mask), (clean, mask)]:
            np.testing.assert_array_equal(out, ref)
            assert not np.shares_memory(out, ref)
        assert not np.shares_memory(out_mask, clean)


def test_probability_one_always_pastes_and_p_is_the_rate() -> None:
    source = ProceduralOutlierSource(num_objects=20, side_range=(16, 32))
    image, mask = scene(24, 32)
    always = AnomalyInjector(source, probability=1.0, max_objects=1)
    assert all((always(image, mask, injection_rng(0, 0, i))[1] == ANOMALY_INDEX).any() for i in range(40))
    sometimes = AnomalyInjector(source, probability=0.3, max_objects=1)
    n = 400
    hits = sum((sometimes(image, mask, injection_rng(1, 0, i))[1] == ANOMALY_INDEX).any() for i in range(n))
    # Binomial(400, 0.3): standard deviation 9.2; 4 sigma.
    assert abs(hits - 0.3 * n) < 4 * np.sqrt(n * 0.3 * 0.7)


def test_number_of_objects_is_uniform_in_one_to_max() -> None:
    alpha = np.ones((6, 6), bool)
    source = ArraySource([(np.full((6, 6, 3), 200, np.uint8), alpha)] * 3)
    injector = AnomalyInjector(source, probability=1.0, max_objects=4)
    image, mask = scene(30, 30)
    counts = []
    for i in range(200):
        source.calls = 0
        injector(image, mask, injection_rng(2, 0, i))
        counts.append(source.calls)
    assert set(counts) == {1, 2, 3, 4}
    assert np.bincount(counts)[1:].min() > 25  # 50 expected each


def _pasted_boxes(injector: AnomalyInjector, shape: tuple[int, int], seeds: range) -> list[np.ndarray]:
    """Crops of the 13-region of single-object injections that do not touch the image border."""
    image, mask = scene(*shape)
    crops = []
    for seed in seeds:
        region = injector(image, mask, injection_rng(seed, 0, 0))[1] == ANOMALY_INDEX
        ys, xs = bbox(region)
        if ys.start > 0 and xs.start > 0 and ys.stop < shape[0] and xs.stop < shape[1]:
            crops.append(region[ys, xs])
    assert len(crops) > 10
    return crops


def test_object_size_is_relative_to_the_shorter_image_side() -> None:
    rect = (np.full((30, 45, 3), 99, np.uint8), np.ones((30, 45), bool))  # aspect 1.5
    injector = AnomalyInjector(
        ArraySource([rect]), probability=1.0, max_objects=1, min_size=0.1, max_size=0.3, aspect_jitter=None
    )
    crops = _pasted_boxes(injector, (200, 320), range(60))
    longer = np.array([max(c.shape) for c in crops])
    assert longer.min() >= 20 and longer.max() <= 60  # 0.1 and 0.3 of the shorter side, 200
    assert longer.min() < 28 and longer.max() > 52  # the whole range is used
    for crop in crops:
        assert crop.all()  # a full rectangle stays full
        assert abs(crop.shape[1] - 1.5 * crop.shape[0]) <= 1.5

    jittered = AnomalyInjector(
        ArraySource([rect]),
        probability=1.0,
        max_objects=1,
        min_size=0.2,
        max_size=0.3,
        aspect_jitter=(0.8, 1.25),
    )
    ratios = np.array([c.shape[1] / c.shape[0] for c in _pasted_boxes(jittered, (200, 320), range(60))])
    assert ratios.min() >= 1.5 * 0.8 - 0.06 and ratios.max() <= 1.5 * 1.25 + 0.06
    assert ratios.max() - ratios.min() > 0.3


@pytest.mark.parametrize("random_flip", [False, True])
def test_random_horizontal_flip(random_flip: bool) -> None:
    # An L shape whose longer side equals the target size, so no resampling touches the layout.
    alpha = np.zeros((20, 12), bool)
    alpha[:, :4] = True
    alpha[-5:, :] = True
    source = ArraySource([(np.full((20, 12, 3), 250, np.uint8), alpha)])
    injector = AnomalyInjector(
        source,
        probability=1.0,
        max_objects=1,
        min_size=0.2,
        max_size=0.2,
        random_flip=random_flip,
        aspect_jitter=None,
    )
    flipped = []
    for crop in _pasted_boxes(injector, (100, 100), range(40)):
        assert np.array_equal(crop, alpha) or np.array_equal(crop, alpha[:, ::-1])
        flipped.append(np.array_equal(crop, alpha[:, ::-1]))
    assert any(flipped) == random_flip and all(flipped) is False


def test_objects_that_vanish_when_shrunk_are_redrawn() -> None:
    # A 1-pixel diagonal in a 200x200 box: area averaging to 10x10 leaves alpha 0.05 everywhere.
    thin = (np.full((200, 200, 3), 9, np.uint8), np.eye(200, dtype=bool))
    solid = (np.full((8, 8, 3), 9, np.uint8), np.ones((8, 8), bool))
    injector = AnomalyInjector(ArraySource([thin, solid]), probability=1.0, max_objects=1, min_size=0.2, max_size=0.2)
    image, mask = scene(50, 50)
    assert all((injector(image, mask, injection_rng(0, 0, i))[1] == ANOMALY_INDEX).any() for i in range(20))
    only_thin = AnomalyInjector(ArraySource([thin]), probability=1.0, max_objects=2, min_size=0.2, max_size=0.2)
    out_image, out_mask, _ = only_thin(image, mask, injection_rng(0, 0, 0))
    np.testing.assert_array_equal(out_mask, mask)  # nothing visible to paste: nothing labelled


# --------------------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------------------


def test_injection_rng_is_a_function_of_seed_epoch_index() -> None:
    draw = injection_rng(3, 1, 7).random(4)
    np.testing.assert_array_equal(draw, injection_rng(3, 1, 7).random(4))
    np.testing.assert_array_equal(draw, np.random.default_rng(np.random.SeedSequence([3, 1, 7])).random(4))
    for other in [(4, 1, 7), (3, 2, 7), (3, 1, 8)]:
        assert not np.array_equal(draw, injection_rng(*other).random(4))
    with pytest.raises(ValueError, match="non-negative"):
        injection_rng(-1, 0, 0)


def test_same_seed_same_output(any_source: OutlierSource) -> None:
    injector = AnomalyInjector(any_source, probability=1.0)
    image, mask = scene()
    outputs = [injector(image, mask, injection_rng(11, 2, 5)) for _ in range(2)]
    for a, b in zip(*outputs, strict=True):
        np.testing.assert_array_equal(a, b)
    different = injector(image, mask, injection_rng(11, 3, 5))
    assert not np.array_equal(outputs[0][1], different[1])


class _InjectedDataset(torch.utils.data.Dataset):
    def __init__(self, injector: AnomalyInjector) -> None:
        self.injector = injector
        self.image, self.mask = scene(32, 48)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask, _ = self.injector(self.image, self.mask, injection_rng(0, 0, index))
        return torch.from_numpy(image), torch.from_numpy(mask)


def test_output_does_not_depend_on_dataloader_workers() -> None:
    dataset = _InjectedDataset(AnomalyInjector(ProceduralOutlierSource(num_objects=30), probability=0.7))
    serial = list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=0))
    parallel = list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2))
    for (image_a, mask_a), (image_b, mask_b) in zip(serial, parallel, strict=True):
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    assert any((m == ANOMALY_INDEX).any() for _, m in serial)


# --------------------------------------------------------------------------------------------------
# Validation and construction
# --------------------------------------------------------------------------------------------------


def test_bad_inputs_and_settings_are_rejected() -> None:
    source = ProceduralOutlierSource(num_objects=3)
    injector = AnomalyInjector(source)
    image, mask = scene(10, 12)
    rng = injection_rng(0, 0, 0)
    with pytest.raises(ValueError, match="uint8"):
        injector(image.astype(np.float32), mask, rng)
    with pytest.raises(ValueError, match="matching the image"):
        injector(image, mask[:, :5], rng)
    for kwargs in [
        {"probability": 1.5},
        {"max_objects": 0},
        {"min_size": 0.3, "max_size": 0.2},
        {"min_size": 0.0},
        {"aspect_jitter": (1.2, 0.8)},
    ]:
        with pytest.raises(ValueError):
            AnomalyInjector(source, **kwargs)
    with pytest.raises(OutlierSourceError, match="no objects"):
        AnomalyInjector(ArraySource([]))
    bad = ArraySource([(np.zeros((4, 5, 3), np.uint8), np.ones((4, 4), bool))])
    with pytest.raises(OutlierSourceError, match=r"ArraySource\.get\(0\)"):
        AnomalyInjector(bad, probability=1.0)(image, mask, rng)


def test_build_injector_from_config(sbd_root: Path, rgba_root: Path) -> None:
    base = {"probability": 0.25, "max_objects": 2, "min_size": 0.1, "max_size": 0.2, "random_flip": False}
    procedural = build_injector(SimpleNamespace(source="procedural", source_root=None, **base), seed=4)
    assert isinstance(procedural.source, ProceduralOutlierSource) and procedural.source.seed == 4
    assert (procedural.probability, procedural.max_objects, procedural.random_flip) == (0.25, 2, False)
    folder = build_injector(SimpleNamespace(source="folder", source_root=str(rgba_root), **base))
    assert isinstance(folder.source, FolderOutlierSource)
    sbd = build_injector(SimpleNamespace(source="sbd", source_root=str(sbd_root), min_pixels=20, **base))
    assert isinstance(sbd.source, SBDOutlierSource) and len(sbd.source) == 2
    with pytest.raises(ValueError, match="source_root"):
        build_injector(SimpleNamespace(source="sbd", source_root=None, **base))
    with pytest.raises(ValueError, match="unknown injection source"):
        build_injector(SimpleNamespace(source="coco", source_root=None, **base))

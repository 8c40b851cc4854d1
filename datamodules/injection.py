"""Anomaly injection: paste outlier objects into training images and label them as anomalies.

Methods that learn an explicit notion of "unknown" (the dual-decoder method, after Sodano et al.,
CVPR 2024, who pasted SBD / PASCAL VOC objects into StreetHazards training images) need training
pixels labelled ``ANOMALY_INDEX``. StreetHazards' training split has none, so objects from an
:class:`OutlierSource` are pasted into each training image with some probability.

Injection works on raw NumPy arrays *before* augmentation and normalization::

    image uint8 [H, W, 3] RGB, mask integer [H, W] (0..12 known, 255 ignore)
        -> injector(image, mask, rng) -> image, mask (13 where pasted), mask_clean (copy of mask)
        -> augmentation -> normalization

Sources (each returns one object cut-out per index, cropped to the object):

- :class:`SBDOutlierSource`: instances of the Semantic Boundaries Dataset, on disk in the layout
  torchvision's ``SBDataset`` uses (never downloaded here).
- :class:`FolderOutlierSource`: a folder of RGBA cut-outs, or of images with binary masks.
- :class:`ProceduralOutlierSource`: irregular polygons and smooth blobs with noise / gradient
  textures; needs no data.

Reproducibility: the dataset derives the generator of each sample with
:func:`injection_rng` from ``(seed, epoch, index)``, so a sample gets the same outliers whichever
dataloader worker loads it.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from datamodules.io import atomic_open
from datamodules.labels import ANOMALY_INDEX

__all__ = [
    "SBD_CLASS_NAMES",
    "SBD_DEFAULT_EXCLUDE",
    "AnomalyInjector",
    "FolderOutlierSource",
    "OutlierSource",
    "OutlierSourceError",
    "ProceduralOutlierSource",
    "SBDOutlierSource",
    "build_injector",
    "injection_rng",
    "paste_object",
]


class OutlierSourceError(ValueError):
    """An outlier source (folder, SBD copy, returned object) is missing or malformed."""


def injection_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator that drives injection for one sample in one epoch.

    ``numpy.random.default_rng(SeedSequence([seed, epoch, index]))``: a function of the triple only,
    so results do not depend on which dataloader worker loads the sample, on the number of workers
    or on the order in which samples are drawn; different epochs paste different objects into the
    same image. All three values must be non-negative integers.
    """
    values = (seed, epoch, index)
    if any(int(v) != v or v < 0 for v in values):
        raise ValueError(f"injection_rng needs non-negative integers, got seed={seed}, epoch={epoch}, index={index}")
    return np.random.default_rng(np.random.SeedSequence([int(v) for v in values]))


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


class OutlierSource(ABC):
    """A finite, indexable collection of object cut-outs.

    ``get(index)`` returns ``(rgb, alpha)``: ``rgb`` uint8 ``[h, w, 3]`` and ``alpha`` ``[h, w]``,
    either bool (hard mask) or uint8 0..255 (soft; a pixel belongs to the object where
    ``alpha / 255 > 0.5``). ``get`` is deterministic in ``index`` and crops to the object's
    bounding box. Sources are pickled into dataloader workers, so they keep no open files.
    """

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.get(index)

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {n} objects")
        return index % n


def _crop_to_alpha(rgb: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both arrays to the bounding box of ``alpha > 0``; ``alpha`` must have such a pixel."""
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return rgb[window], alpha[window]


def _open_image(path: Path, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise OutlierSourceError(f"{path}: cannot read {what} ({error})") from None
    return image


# SBD uses the 20 PASCAL VOC classes; category ids are 1-based.
SBD_CLASS_NAMES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
# Road users that StreetHazards labels as known classes (pedestrian, car) or that a model could
# fairly count as them: pasting them as "anomalies" would teach the model to flag pedestrians and
# vehicles. Ids: bicycle 2, bus 6, car 7, motorbike 14, person 15.
SBD_DEFAULT_EXCLUDE: tuple[int, ...] = (2, 6, 7, 14, 15)

_SBD_LAYOUT = (
    "expected the Semantic Boundaries Dataset as torchvision's SBDataset lays it out: "
    "ROOT/img/<name>.jpg, ROOT/inst/<name>.mat (GTinst struct with Segmentation and Categories) and "
    "ROOT/<image_set>.txt listing the names (the 'benchmark_RELEASE/dataset' folder of benchmark.tgz)"
)


def _mat_struct_field(mat: dict[str, Any], struct: str, name: str, path: Path) -> np.ndarray:
    """``mat[struct].<name>`` of a MATLAB struct read by ``scipy.io.loadmat`` with default options.

    loadmat returns a struct as a (1, 1) record array whose fields are object arrays; torchvision
    reads ``mat["GTcls"][0]["Segmentation"][0]``, the same element as here.
    """
    record = mat.get(struct)
    if not isinstance(record, np.ndarray) or record.dtype.names is None or name not in record.dtype.names:
        raise OutlierSourceError(f"{path}: expected a MATLAB struct '{struct}' with a field '{name}'")
    cell = np.asarray(record[name]).reshape(-1)
    if cell.size != 1:
        raise OutlierSourceError(f"{path}: '{struct}' is a struct array of {cell.size}; expected one struct")
    return np.asarray(cell[0])


class SBDOutlierSource(OutlierSource):
    """Object instances of the Semantic Boundaries Dataset (Hariharan et al., ICCV 2011).

    Reads the layout of torchvision's ``SBDataset`` (``root/img/*.jpg``, ``root/inst/*.mat``,
    ``root/{train,val,train_noval}.txt``); nothing is downloaded. Each instance of the instance
    maps (``GTinst.Segmentation``: 0 background, k = k-th instance, class
    ``GTinst.Categories[k-1]``) is one object, cut out by its mask and cropped to its bounding box.

    Indexing: ``len`` and ``get`` work on a flat index of ``(image, instance id)`` pairs that keep
    instances with at least ``min_pixels`` pixels and a class not in ``exclude_classes``. Building it
    reads every instance map of the split once (about 1 ms per file: ~10 s for the 8,498 images
    of ``train``), so it is built lazily on first use and kept in memory; with ``cache_file`` it is
    also saved there (``.npz``) and reused by later runs while the split list and filters are
    unchanged. Call :meth:`build_index` (``AnomalyInjector`` does, via ``len``) in the main process
    so that dataloader workers inherit the index instead of rebuilding it.

    Args:
        root: folder with ``img/``, ``inst/`` and the split lists.
        image_set: ``train``, ``val`` or ``train_noval`` (the name of the split list file).
        min_pixels: instances smaller than this (in the original image) are skipped.
        exclude_classes: SBD category ids (1..20, see ``SBD_CLASS_NAMES``) never used as outliers;
            the default drops road users that StreetHazards knows (see ``SBD_DEFAULT_EXCLUDE``).
        cache_file: optional ``.npz`` path for the instance index.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_set: str = "train",
        min_pixels: int = 1000,
        exclude_classes: Iterable[int] = SBD_DEFAULT_EXCLUDE,
        cache_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.image_set = image_set
        self.min_pixels = int(min_pixels)
        self.exclude_classes = tuple(sorted({int(c) for c in exclude_classes}))
        self.cache_file = Path(cache_file) if cache_file is not None else None
        if self.min_pixels < 1:
            raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
        bad = [c for c in self.exclude_classes if not 1 <= c <= len(SBD_CLASS_NAMES)]
        if bad:
            raise ValueError(f"exclude_classes must be SBD category ids 1..{len(SBD_CLASS_NAMES)}, got {bad}")

        if not self.root.is_dir():
            raise FileNotFoundError(f"SBD folder {self.root} does not exist; {_SBD_LAYOUT}")
        nested = self.root / "benchmark_RELEASE" / "dataset"
        hint = f" (found {nested}: pass that folder as root)" if nested.is_dir() else ""
        for sub in ("img", "inst"):
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(f"SBD folder {self.root} has no '{sub}/' folder{hint}; {_SBD_LAYOUT}")
        split_file = self.root / f"{image_set}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"SBD split list {split_file} not found{hint}; {_SBD_LAYOUT}")
        self.names: tuple[str, ...] = tuple(
            line.strip() for line in split_file.read_text().splitlines() if line.strip()
        )
        if not self.names:
            raise OutlierSourceError(f"SBD split list {split_file} is empty")
        self._entries: np.ndarray | None = None  # int64 [N, 2]: (position in names, instance id)

    def _image_path(self, name: str) -> Path:
        return self.root / "img" / f"{name}.jpg"

    def _inst_path(self, name: str) -> Path:
        return self.root / "inst" / f"{name}.mat"

    def _load_instances(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Instance map ``[H, W]`` and per-instance category ids ``[K]`` of one image."""
        from scipy.io import loadmat  # scipy ships with albumentations / scikit-learn

        path = self._inst_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"SBD instance file {path} not found (listed in {self.image_set}.txt)")
        try:
            mat = loadmat(path)
        except Exception as error:  # scipy raises several unrelated types for broken files
            raise OutlierSourceError(f"{path}: cannot read MATLAB file ({error})") from None
        segmentation = _mat_struct_field(mat, "GTinst", "Segmentation", path)
        categories = _mat_struct_field(mat, "GTinst", "Categories", path).reshape(-1)
        if segmentation.ndim != 2 or not np.issubdtype(segmentation.dtype, np.integer):
            raise OutlierSourceError(
                f"{path}: GTinst.Segmentation must be a 2-D integer array, got {segmentation.dtype} "
                f"{segmentation.shape}"
            )
        if categories.size and not np.issubdtype(categories.dtype, np.number):
            raise OutlierSourceError(f"{path}: GTinst.Categories must be numeric, got {categories.dtype}")
        return segmentation, categories.astype(np.int64)

    def _image_entries(self, position: int) -> np.ndarray:
        """Instance ids of image ``names[position]`` that pass the size and class filters."""
        name = self.names[position]
        if not self._image_path(name).is_file():
            raise FileNotFoundError(f"SBD image {self._image_path(name)} not found (listed in {self.image_set}.txt)")
        segmentation, categories = self._load_instances(name)
        # Values beyond the listed instances (none in the release) are not instances.
        counts = np.bincount(segmentation.ravel().astype(np.int64), minlength=categories.size + 1)
        counts = counts[1 : categories.size + 1]
        keep = (counts >= self.min_pixels) & ~np.isin(categories, self.exclude_classes)
        return np.flatnonzero(keep) + 1

    def _cache_key(self) -> dict[str, np.ndarray]:
        return {
            "names": np.asarray(self.names, dtype=str),
            "min_pixels": np.asarray(self.min_pixels),
            "exclude_classes": np.asarray(self.exclude_classes, dtype=np.int64),
        }

    def _read_cache(self) -> np.ndarray | None:
        if self.cache_file is None or not self.cache_file.is_file():
            return None
        try:
            with np.load(self.cache_file, allow_pickle=False) as data:
                key = self._cache_key()
                if all(np.array_equal(data[k], v) for k, v in key.items()):
                    return np.asarray(data["entries"], dtype=np.int64).reshape(-1, 2)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or from another version: rebuild and overwrite
        return None

    def _write_cache(self, entries: np.ndarray) -> None:
        assert self.cache_file is not None
        # Write-then-rename (unique temporary names): several DDP ranks may build the index at once.
        with atomic_open(self.cache_file, "wb") as handle:
            np.savez(handle, entries=entries, **self._cache_key())

    def build_index(self) -> None:
        """Scan the split's instance maps (or read ``cache_file``) unless already done."""
        if self._entries is not None:
            return
        entries = self._read_cache()
        if entries is None:
            per_image = [self._image_entries(i) for i in range(len(self.names))]
            positions = np.repeat(np.arange(len(self.names)), [ids.size for ids in per_image])
            ids = np.concatenate(per_image) if per_image else np.zeros(0, dtype=np.int64)
            entries = np.stack([positions, ids], axis=1).astype(np.int64).reshape(-1, 2)
            if self.cache_file is not None:
                self._write_cache(entries)
        if entries.shape[0] == 0:
            raise OutlierSourceError(
                f"SBD folder {self.root} ({self.image_set}.txt): no instance has >= {self.min_pixels} pixels "
                f"outside the excluded classes {list(self.exclude_classes)}"
            )
        self._entries = entries

    @property
    def entries(self) -> np.ndarray:
        """``[N, 2]`` int64: (position in ``names``, instance id) of every usable instance."""
        self.build_index()
        assert self._entries is not None
        return self._entries

    def __len__(self) -> int:
        return int(self.entries.shape[0])

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        position, instance = (int(v) for v in self.entries[self._check_index(index)])
        name = self.names[position]
        segmentation, _ = self._load_instances(name)
        image_path = self._image_path(name)
        rgb = np.asarray(_open_image(image_path, "SBD image").convert("RGB"))
        if rgb.shape[:2] != segmentation.shape:
            raise OutlierSourceError(
                f"{image_path} is {rgb.shape[1]}x{rgb.shape[0]} but its instance map "
                f"{self._inst_path(name)} is {segmentation.shape[1]}x{segmentation.shape[0]}"
            )
        alpha = segmentation == instance
        if not alpha.any():
            raise OutlierSourceError(
                f"{self._inst_path(name)}: instance {instance} is gone (was the dataset changed after "
                f"the index{f' {self.cache_file}' if self.cache_file else ''} was built?)"
            )
        return _crop_to_alpha(rgb, alpha)


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class FolderOutlierSource(OutlierSource):
    """Object cut-outs from a flat folder, in one of two conventions.

    - **RGBA cut-outs** (no ``masks/`` subfolder): every ``*.png`` in ``root`` has an alpha channel
      (RGBA, LA, or a palette with transparency); the object is where ``alpha > 127`` and the
      alpha is kept as soft alpha. Other image files (``.jpg``) are an error in this mode.
    - **Image + mask pairs** (``root/masks/`` exists): every image ``root/<stem>.{png,jpg,jpeg}``
      has a mask ``root/masks/<stem>.png`` of the same size; the mask is binary, any non-zero
      value marks the object (so 0/1 and 0/255 masks both work). Images are read as RGB.

    Files are listed (sorted by name) and their headers checked when the source is created, so a
    missing mask, a size mismatch or a PNG without alpha fails before training starts. Objects are
    cropped to their mask's bounding box.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"outlier folder {self.root} does not exist; expected RGBA *.png cut-outs, or images with "
                "binary masks in a masks/ subfolder"
            )
        mask_dir = self.root / "masks"
        self.paired = mask_dir.is_dir()
        images = sorted(p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        if not images:
            raise OutlierSourceError(
                f"outlier folder {self.root} has no images (*.png, *.jpg, *.jpeg); expected RGBA *.png "
                "cut-outs, or images with binary masks in a masks/ subfolder"
            )
        stems = [p.stem for p in images]
        duplicates = sorted({s for s in stems if stems.count(s) > 1})
        if self.paired and duplicates:
            raise OutlierSourceError(
                f"outlier folder {self.root}: several images share the stem(s) {duplicates[:5]}, so "
                "their masks in masks/ would be ambiguous"
            )
        self.images: tuple[Path, ...] = tuple(images)
        self.masks: tuple[Path, ...] | None = None
        if self.paired:
            masks = tuple(mask_dir / f"{p.stem}.png" for p in images)
            missing = [str(m) for m in masks if not m.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"outlier folder {self.root}: {len(missing)} image(s) have no mask, e.g. {missing[:3]} "
                    "(convention: masks/<image stem>.png)"
                )
            for image_path, mask_path in zip(images, masks, strict=True):
                image_size = _open_header(image_path, "outlier image").size
                mask_size = _open_header(mask_path, "outlier mask").size
                if image_size != mask_size:
                    raise OutlierSourceError(
                        f"outlier mask {mask_path} is {mask_size[0]}x{mask_size[1]} but its image "
                        f"{image_path} is {image_size[0]}x{image_size[1]}"
                    )
            self.masks = masks
        else:
            for path in images:
                if path.suffix.lower() != ".png":
                    raise OutlierSourceError(
                        f"{path}: without a masks/ subfolder in {self.root} every outlier must be an RGBA "
                        "*.png (or add masks/<stem>.png for each image)"
                    )
                header = _open_header(path, "outlier cut-out")
                if not _has_alpha(header):
                    raise OutlierSourceError(
                        f"{path} has no alpha channel (mode {header.mode}); an outlier cut-out needs "
                        f"RGBA, or put a binary mask for it in {mask_dir}/"
                    )

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._check_index(index)
        path = self.images[index]
        if self.masks is None:
            rgba = np.asarray(_open_image(path, "outlier cut-out").convert("RGBA"))
            rgb, alpha = rgba[..., :3], rgba[..., 3]
            where, what = path, "alpha channel"
            visible = alpha > 127
        else:
            rgb = np.asarray(_open_image(path, "outlier image").convert("RGB"))
            mask = np.asarray(_open_image(self.masks[index], "outlier mask").convert("L"))
            if mask.shape != rgb.shape[:2]:  # the files changed after the header check
                raise OutlierSourceError(
                    f"outlier mask {self.masks[index]} is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{path} is {rgb.shape[1]}x{rgb.shape[0]}"
                )
            alpha = visible = mask > 0
            where, what = self.masks[index], "mask"
        if not visible.any():
            raise OutlierSourceError(f"{where}: the {what} marks no object pixel")
        return _crop_to_alpha(rgb, alpha)


def _open_header(path: Path, what: str) -> Image.Image:
    """Open without decoding pixels (size and mode only)."""
    try:
        with Image.open(path) as image:
            return image
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise OutlierSourceError(f"{path}: cannot read {what} ({error})") from None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


class ProceduralOutlierSource(OutlierSource):
    """Random irregular polygons and smooth blobs with noise / gradient textures; needs no data.

    Object ``index`` is generated from ``SeedSequence([seed, index])``, so it is the same in every
    process. Shapes: irregular polygons (5-12 vertices at random angles and radii, often concave)
    or blobs (a thresholded, smoothly upsampled random field with a radial falloff). Textures:
    multi-octave value noise mapped to random colours, a linear gradient at a random angle, a
    radial gradient, or a flat random colour; each with random per-pixel grain.

    These deliberately exclude the structured shapes and periodic textures of the synthetic test
    anomalies (``datamodules/synthetic.py``: rings, stars, crosses, checkerboards, stripes, dots),
    so a model trained with this source is not tested on what it was trained on.

    Args:
        seed: seed of the whole collection.
        num_objects: ``len`` of the source (objects are generated on demand, nothing is stored).
        side_range: range of the longer side of the generated canvas in pixels (the injector
            rescales objects anyway; this only sets how much texture detail they carry).
    """

    def __init__(self, seed: int = 0, num_objects: int = 10_000, side_range: tuple[int, int] = (64, 160)) -> None:
        if num_objects < 1:
            raise ValueError(f"num_objects must be >= 1, got {num_objects}")
        if not 8 <= side_range[0] <= side_range[1]:
            raise ValueError(f"side_range must satisfy 8 <= low <= high, got {side_range}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.seed = int(seed)
        self.num_objects = int(num_objects)
        self.side_range = (int(side_range[0]), int(side_range[1]))

    def __len__(self) -> int:
        return self.num_objects

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._check_index(index)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, index]))
        long_side = int(rng.integers(self.side_range[0], self.side_range[1] + 1))
        short_side = max(8, round(long_side * rng.uniform(0.4, 1.0)))
        height, width = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
        alpha = _random_polygon(rng, height, width) if rng.random() < 0.5 else _random_blob(rng, height, width)
        rgb = _random_texture(rng, height, width)
        return _crop_to_alpha(rgb, alpha)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a ``cells``-sized random grid upsampled with bicubic interpolation."""
    grid = rng.random((cells, cells), dtype=np.float32)
    field = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    low, high = float(field.min()), float(field.max())
    return (field - low) / max(high - low, 1e-6)


def _random_polygon(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    vertices = int(rng.integers(5, 13))
    angles = np.sort(rng.uniform(0.0, 2 * np.pi, vertices))
    radii = rng.uniform(0.3, 1.0, vertices)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    points = np.stack([cx + radii * cx * np.cos(angles), cy + radii * cy * np.sin(angles)], axis=1)
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=255)
    alpha = np.asarray(canvas) > 0
    if not alpha.any():  # degenerate (all vertices nearly collinear): fall back to the centre pixel
        alpha[round(cy), round(cx)] = True
    return alpha


def _random_blob(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r2 = ((yy - (height - 1) / 2) / (height / 2)) ** 2 + ((xx - (width - 1) / 2) / (width / 2)) ** 2
    noise = _smooth_noise(rng, height, width, int(rng.integers(3, 7))) * 2 - 1
    # The falloff is 1 at the centre and the noise amplitude < 0.65, so the centre is always inside.
    return (1 - r2) + rng.uniform(0.3, 0.6) * noise > 0.35


def _random_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    colours = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:  # value noise, two octaves, mapped through a three-colour ramp
        t = 0.65 * _smooth_noise(rng, height, width, int(rng.integers(3, 8)))
        t += 0.35 * _smooth_noise(rng, height, width, int(rng.integers(10, 24)))
        t = t[..., None]
        rgb = np.where(
            t < 0.5,
            colours[0] + (colours[1] - colours[0]) * 2 * t,
            colours[1] + (colours[2] - colours[1]) * (2 * t - 1),
        )
    elif kind == 1:  # linear gradient at a random angle
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        proj = xx * np.cos(theta) + yy * np.sin(theta)
        t = ((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6))[..., None]
        rgb = colours[0] * (1 - t) + colours[1] * t
    elif kind == 2:  # radial gradient from a random centre
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        dist = np.hypot(yy - cy, xx - cx)
        t = (dist / max(float(dist.max()), 1e-6))[..., None]
        rgb = colours[0] * (1 - t) + colours[1] * t
    else:  # flat colour
        rgb = np.broadcast_to(colours[0], (height, width, 3))
    grain = rng.normal(0.0, rng.uniform(0.0, 12.0), (height, width, 3)).astype(np.float32)
    return np.clip(np.rint(rgb + grain), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Pasting
# --------------------------------------------------------------------------------------------------


def _alpha_to_float(alpha: np.ndarray) -> np.ndarray:
    """bool -> {0, 1}; uint8 -> value / 255; floats must already lie in [0, 1]."""
    if alpha.dtype == np.bool_:
        return alpha.astype(np.float32)
    if alpha.dtype == np.uint8:
        return alpha.astype(np.float32) / 255.0
    if np.issubdtype(alpha.dtype, np.floating):
        return np.clip(alpha.astype(np.float32), 0.0, 1.0)
    raise OutlierSourceError(f"alpha must be bool, uint8 or float, got {alpha.dtype}")


def _paste_into(
    image: np.ndarray,
    mask: np.ndarray,
    rgb: np.ndarray,
    alpha: np.ndarray,
    top: int,
    left: int,
    soft_alpha: bool,
) -> None:
    """In-place version of :func:`paste_object` on arrays the caller owns; ``alpha`` is float [0, 1]."""
    height, width = mask.shape
    h, w = alpha.shape
    # Intersection of the object's box with the image, in image and in object coordinates.
    y0, y1 = max(top, 0), min(top + h, height)
    x0, x1 = max(left, 0), min(left + w, width)
    if y0 >= y1 or x0 >= x1:
        return
    window = (slice(y0, y1), slice(x0, x1))
    obj_window = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
    a = alpha[obj_window]
    inside = a > 0.5
    if soft_alpha:
        a3 = a[..., None]
        blended = a3 * rgb[obj_window].astype(np.float32) + (1 - a3) * image[window].astype(np.float32)
        image[window] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    else:
        image[window][inside] = rgb[obj_window][inside]
    mask[window][inside] = ANOMALY_INDEX


def paste_object(
    image: np.ndarray,
    mask: np.ndarray,
    rgb: np.ndarray,
    alpha: np.ndarray,
    top: int,
    left: int,
    soft_alpha: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Composite one object at its final size into copies of ``image`` and ``mask``.

    The object's pixel ``(i, j)`` lands on image pixel ``(top + i, left + j)``; the parts outside
    the image are clipped (``top``/``left`` may be negative). With ``a`` the alpha in [0, 1]
    (bool -> {0, 1}, uint8 -> value / 255):

    - hard alpha (default): ``image = rgb`` where ``a > 0.5``, unchanged elsewhere;
    - ``soft_alpha``: ``image = round(a * rgb + (1 - a) * image)`` wherever ``a > 0``;
    - in both cases ``mask = ANOMALY_INDEX`` exactly where ``a > 0.5``.

    Args:
        image: uint8 ``[H, W, 3]``. mask: integer ``[H, W]``.
        rgb: uint8 ``[h, w, 3]``. alpha: ``[h, w]`` bool, uint8 or float.

    Returns:
        New ``(image, mask)``; the inputs are not modified.
    """
    _check_image_and_mask(image, mask)
    rgb, alpha_f = _check_object(rgb, alpha, "paste_object")
    image, mask = image.copy(), mask.copy()
    _paste_into(image, mask, rgb, alpha_f, int(top), int(left), soft_alpha)
    return image, mask


def _check_image_and_mask(image: np.ndarray, mask: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be a uint8 array [H, W, 3], got {getattr(image, 'dtype', type(image))} "
            f"{getattr(image, 'shape', '')}"
        )
    if not isinstance(mask, np.ndarray) or mask.shape != image.shape[:2] or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(
            f"mask must be an integer array [H, W] matching the image {image.shape[:2]}, got "
            f"{getattr(mask, 'dtype', type(mask))} {getattr(mask, 'shape', '')}"
        )


def _check_object(rgb: Any, alpha: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a cut-out; returns ``rgb`` uint8 and ``alpha`` as float32 in [0, 1]."""
    rgb, alpha = np.asarray(rgb), np.asarray(alpha)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise OutlierSourceError(f"{where}: object rgb must be uint8 [h, w, 3], got {rgb.dtype} {rgb.shape}")
    if alpha.shape != rgb.shape[:2]:
        raise OutlierSourceError(f"{where}: object alpha {alpha.shape} does not match its rgb {rgb.shape[:2]}")
    return rgb, _alpha_to_float(alpha)


class AnomalyInjector:
    """Pastes outlier objects into a training sample and labels them ``ANOMALY_INDEX``.

    For each sample, with probability ``probability``, ``n ~ U{1..max_objects}`` objects are drawn
    uniformly from ``source`` and pasted one after another (later ones on top). Per object:

    1. optional horizontal flip (probability 1/2, ``random_flip``);
    2. optional aspect jitter: the width/height ratio is multiplied by a log-uniform factor in
       ``aspect_jitter`` (area kept);
    3. scaling so that the object's **longer side** is ``s * min(H, W)`` pixels with
       ``s ~ U(min_size, max_size)`` (relative to the image's *shorter* side, so a 0.25 object
       fits inside the image in both directions whatever the aspect ratio). Resampling uses
       premultiplied alpha (area averaging when shrinking, bilinear when enlarging), so colours
       from outside the object do not bleed into its edge;
    4. placement: a random object pixel (``alpha > 0.5``) lands on a uniformly random image
       pixel, so every pasted object shows at least that pixel while the rest may be clipped at
       the image border;
    5. compositing as in :func:`paste_object` (hard alpha by default).

    ``mask`` gets ``ANOMALY_INDEX`` exactly where a pasted object has ``alpha > 0.5`` (including
    over ignore pixels); ``mask_clean`` is a copy of the input label. An object that shrinks to no
    pixel with ``alpha > 0.5`` is redrawn (up to ``max_attempts`` times). The random draws come
    from the ``rng`` argument only: see :func:`injection_rng`.

    Creating the injector calls ``len(source)``, which builds a lazy source index (SBD) in the
    calling process, before dataloader workers start.
    """

    def __init__(
        self,
        source: OutlierSource,
        probability: float = 0.5,
        max_objects: int = 3,
        min_size: float = 0.05,
        max_size: float = 0.25,
        random_flip: bool = True,
        aspect_jitter: tuple[float, float] | None = (0.8, 1.25),
        soft_alpha: bool = False,
        max_attempts: int = 10,
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must lie in [0, 1], got {probability}")
        if int(max_objects) != max_objects or max_objects < 1:
            raise ValueError(f"max_objects must be an integer >= 1, got {max_objects}")
        if not 0.0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        if aspect_jitter is not None and not 0.0 < aspect_jitter[0] <= aspect_jitter[1]:
            raise ValueError(f"aspect_jitter must be (low, high) with 0 < low <= high, got {aspect_jitter}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if len(source) < 1:
            raise OutlierSourceError(f"{type(source).__name__} holds no objects")
        self.source = source
        self.probability = float(probability)
        self.max_objects = int(max_objects)
        self.min_size = float(min_size)
        self.max_size = float(max_size)
        self.random_flip = bool(random_flip)
        self.aspect_jitter = None if aspect_jitter is None else (float(aspect_jitter[0]), float(aspect_jitter[1]))
        self.soft_alpha = bool(soft_alpha)
        self.max_attempts = int(max_attempts)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={type(self.source).__name__}[{len(self.source)}], "
            f"probability={self.probability}, max_objects={self.max_objects}, min_size={self.min_size}, "
            f"max_size={self.max_size}, random_flip={self.random_flip}, aspect_jitter={self.aspect_jitter}, "
            f"soft_alpha={self.soft_alpha})"
        )

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns new ``(image, mask, mask_clean)``; the inputs are never modified.

        Args:
            image: uint8 ``[H, W, 3]`` RGB. mask: integer ``[H, W]`` labels (any integer dtype, kept).
            rng: the sample's generator, e.g. ``injection_rng(seed, epoch, index)``.
        """
        _check_image_and_mask(image, mask)
        image_out, mask_out, mask_clean = image.copy(), mask.copy(), mask.copy()
        if rng.random() >= self.probability:
            return image_out, mask_out, mask_clean
        target_side = min(mask.shape)
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            for _attempt in range(self.max_attempts):
                index = int(rng.integers(len(self.source)))
                rgb, alpha = self._transform(index, target_side, rng)
                inside = np.flatnonzero(alpha > 0.5)
                if inside.size:
                    break
            else:
                continue  # every attempt vanished when shrunk: paste nothing for this slot
            # Anchor a random object pixel on a random image pixel.
            anchor = int(inside[rng.integers(inside.size)])
            ay, ax = divmod(anchor, alpha.shape[1])
            y, x = int(rng.integers(mask.shape[0])), int(rng.integers(mask.shape[1]))
            _paste_into(image_out, mask_out, rgb, alpha, y - ay, x - ax, self.soft_alpha)
        return image_out, mask_out, mask_clean

    def _transform(self, index: int, target_side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Object ``index`` flipped, jittered and resized: rgb uint8 [h, w, 3], alpha float32 [h, w]."""
        rgb, alpha = _check_object(*self.source.get(index), where=f"{type(self.source).__name__}.get({index})")
        if not (alpha > 0).any():
            raise OutlierSourceError(f"{type(self.source).__name__}.get({index}) returned an empty alpha")
        rgb, alpha = _crop_to_alpha(rgb, alpha)
        # Draw every random number whatever the options' outcome, so the stream stays aligned.
        flip = rng.random() < 0.5
        log_ratio = rng.uniform(*np.log(self.aspect_jitter)) if self.aspect_jitter is not None else 0.0
        side = rng.uniform(self.min_size, self.max_size) * target_side
        if self.random_flip and flip:
            rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
        h, w = alpha.shape
        stretch = np.exp(log_ratio / 2)  # width * stretch, height / stretch: ratio * exp(log_ratio)
        height_f, width_f = h / stretch, w * stretch
        scale = side / max(height_f, width_f)
        new_h, new_w = max(1, round(height_f * scale)), max(1, round(width_f * scale))
        if (new_h, new_w) == (h, w):
            return np.ascontiguousarray(rgb), np.ascontiguousarray(alpha)
        # Premultiplied alpha: resample (rgb * a, a), then divide, so background colours inside the
        # crop's box do not leak into the object's edge.
        rgba = np.concatenate([rgb.astype(np.float32) * alpha[..., None], alpha[..., None]], axis=2)
        shrink = new_h * new_w < h * w
        rgba = cv2.resize(
            np.ascontiguousarray(rgba),
            (new_w, new_h),
            interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
        ).reshape(new_h, new_w, 4)
        alpha_new = np.clip(rgba[..., 3], 0.0, 1.0)
        rgb_new = rgba[..., :3] / np.maximum(alpha_new, 1e-6)[..., None]
        return np.clip(np.rint(rgb_new), 0, 255).astype(np.uint8), alpha_new


def build_injector(config: Any, seed: int = 0) -> AnomalyInjector:
    """An :class:`AnomalyInjector` from the datamodule's injection settings.

    Reads ``config.source`` ('procedural', 'folder' or 'sbd'), ``config.source_root`` (folder and
    sbd), ``probability``, ``max_objects``, ``min_size``, ``max_size``, ``random_flip``; optional
    attributes, when present: ``image_set``, ``min_pixels``, ``exclude_classes``, ``cache_file``
    (sbd), ``aspect_jitter``, ``soft_alpha``. ``seed`` seeds the procedural source.
    """
    kind = str(config.source).lower()
    root = getattr(config, "source_root", None)
    if kind in ("folder", "sbd") and not root:
        raise ValueError(f"injection source '{kind}' needs source_root (a folder)")
    source: OutlierSource
    if kind == "procedural":
        source = ProceduralOutlierSource(seed=seed)
    elif kind == "folder":
        source = FolderOutlierSource(root)
    elif kind == "sbd":
        options = {
            k: getattr(config, k)
            for k in ("image_set", "min_pixels", "exclude_classes", "cache_file")
            if getattr(config, k, None) is not None
        }
        source = SBDOutlierSource(root, **options)
    else:
        raise ValueError(f"unknown injection source '{config.source}'; expected 'procedural', 'folder' or 'sbd'")
    extra = {k: getattr(config, k) for k in ("aspect_jitter", "soft_alpha") if hasattr(config, k)}
    return AnomalyInjector(
        source,
        probability=config.probability,
        max_objects=config.max_objects,
        min_size=config.min_size,
        max_size=config.max_size,
        random_flip=config.random_flip,
        **extra,
    )

"""StreetHazards as released: folder layout, ``.odgt`` indexes, label shift, augmentation.

Layout (relative to ``root``)::

    train/train.odgt        train/images/training/<town>/*.png   train/annotations/training/<town>/*.png
    train/validation.odgt   train/images/validation/<town>/*.png train/annotations/validation/<town>/*.png
    test/test.odgt          test/images/test/<town>/*.png        test/annotations/test/<town>/*.png

Image PNGs are RGBA (the 4th channel is dropped); annotation PNGs are single-channel with raw values
1..14, shifted by -1 on load (0 unlabeled ... 12 traffic sign, 13 anomaly). With
``ignore_unlabeled=True`` unlabeled pixels become 255 and the 12 remaining known classes move down
by one (0 building ... 11 traffic sign) while the anomaly stays 13, so the data contract
(known < 13, anomaly 13, ignore 255) holds for both class sets.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from datamodules.io import atomic_write_text
from datamodules.labels import (
    ANOMALY_INDEX,
    CLASS_NAMES,
    IGNORE_INDEX,
    IMAGE_MEAN,
    IMAGE_STD,
    LABEL_OFFSET,
    NUM_CLASSES,
    PALETTE,
    RAW_LABEL_MAX,
    RAW_LABEL_MIN,
)

log = logging.getLogger(__name__)

# Decoding and resizing happen in dataloader workers; OpenCV's own thread pool would oversubscribe.
cv2.setNumThreads(0)

#: Where the embedded synthetic dataset lives (relative to the working directory) when no
#: ``root`` is configured. It is written on first use.
DEFAULT_ROOT = "data/streethazards-synthetic"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class StreetHazardsDataError(ValueError):
    """A dataset file or option is wrong; the message names it and says what is wrong."""


@dataclass(frozen=True)
class SplitLayout:
    """Where one split lives inside the dataset root."""

    name: str
    folder: str  # split folder under root, holds the .odgt
    index_file: str
    subset: str  # folder under images/ and annotations/

    def index_path(self, root: Path) -> Path:
        return root / self.folder / self.index_file


SPLITS: dict[str, SplitLayout] = {
    "train": SplitLayout("train", "train", "train.odgt", "training"),
    "val": SplitLayout("val", "train", "validation.odgt", "validation"),
    "test": SplitLayout("test", "test", "test.odgt", "test"),
}


@dataclass(frozen=True)
class Sample:
    image: Path
    annotation: Path | None


# ----------------------------------------------------------------------------- indexing
def _resolve(path_str: str, candidates: Sequence[Path]) -> Path | None:
    path = Path(path_str)
    if path.is_absolute():
        return path if path.is_file() else None
    for base in candidates:
        if (base / path).is_file():
            return base / path
    return None


def read_odgt(index_path: Path, root: Path) -> list[Sample]:
    """Read an ``.odgt`` index: a JSON array of records (JSON lines are accepted too).

    Record paths are resolved relative to the index's folder, then the dataset root, so both
    the released files and indexes written by other tools load.
    """
    text = index_path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as array_error:
        try:  # the ADE20K-style toolkits write one JSON object per line
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise StreetHazardsDataError(
                f"{index_path}: not valid JSON ({array_error.msg} at line {array_error.lineno}, "
                f"column {array_error.colno}); expected a JSON array of records with "
                "'fpath_img' and 'fpath_segm'"
            ) from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise StreetHazardsDataError(f"{index_path}: expected a JSON array of records, got {type(records).__name__}")

    bases = [index_path.parent, root, root / index_path.parent.name]
    samples = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise StreetHazardsDataError(f"{index_path}: record {i} is not a JSON object")
        for key in ("fpath_img", "fpath_segm"):
            if key not in record:
                raise StreetHazardsDataError(f"{index_path}: record {i} lacks the field '{key}'")
        resolved = []
        for key in ("fpath_img", "fpath_segm"):
            found = _resolve(str(record[key]), bases)
            if found is None:
                tried = ", ".join(str(b / record[key]) for b in bases)
                raise StreetHazardsDataError(
                    f"{index_path}: record {i} lists '{record[key]}' ({key}), which does not exist (tried {tried})"
                )
            resolved.append(found)
        samples.append(Sample(resolved[0], resolved[1]))
    return samples


def scan_split(root: Path, layout: SplitLayout) -> list[Sample]:
    """List a split by scanning every town folder, pairing images and annotations by name."""
    image_dir = root / layout.folder / "images" / layout.subset
    annotation_dir = root / layout.folder / "annotations" / layout.subset
    samples = []
    for image in sorted(p for p in image_dir.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES):
        annotation = annotation_dir / image.parent.name / (image.stem + ".png")
        if not annotation.is_file():
            raise StreetHazardsDataError(f"{image}: no annotation found at {annotation}")
        samples.append(Sample(image, annotation))
    return samples


def list_split(root: str | os.PathLike[str], split: str) -> list[Sample]:
    """The samples of ``split`` ('train', 'val' or 'test'): from its ``.odgt`` or by scanning."""
    root = Path(root)
    if split not in SPLITS:
        raise StreetHazardsDataError(f"unknown split '{split}'; expected one of {sorted(SPLITS)}")
    if not root.is_dir():
        raise StreetHazardsDataError(
            f"StreetHazards root '{root}' does not exist. Download the dataset "
            f"(`python main.py download --root {root}`), extract the archives there by hand, or leave "
            f"`data.root` at its default '{DEFAULT_ROOT}' to use the embedded synthetic dataset."
        )
    layout = SPLITS[split]
    index = layout.index_path(root)
    if index.is_file():
        samples = read_odgt(index, root)
        source = str(index)
    else:
        samples = scan_split(root, layout)
        source = f"{root / layout.folder / 'images' / layout.subset}/*/ (no {index.name} found)"
    if not samples:
        raise StreetHazardsDataError(f"split '{split}' of '{root}' is empty: no samples in {source}")
    return samples


# ----------------------------------------------------------------------------- decoding
#: Image decoders. OpenCV decodes the released 720x1280 RGBA PNGs about 1.5x faster than Pillow
#: (``benchmarks/loader_throughput.py``) and gives the same pixels; Pillow remains as an option
#: and is what names the problem whenever OpenCV cannot read a file.
DECODERS = ("cv2", "pil")
# RGB straight from the decoder (OpenCV >= 4.11; older versions convert from BGR), EXIF
# orientation ignored as Pillow does.
_CV2_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_CV2_FLAGS = (cv2.IMREAD_COLOR if _CV2_RGB is None else _CV2_RGB) | cv2.IMREAD_IGNORE_ORIENTATION


def _open_png(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # PIL decodes lazily; force it so a truncated file fails here
    except FileNotFoundError:
        raise StreetHazardsDataError(f"{path}: file does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise StreetHazardsDataError(f"{path}: unreadable or truncated image ({error})") from None
    return image


def check_decoder(decoder: str) -> str:
    if decoder not in DECODERS:
        raise StreetHazardsDataError(f"decoder must be one of {', '.join(DECODERS)}, got '{decoder}'")
    return decoder


def load_image(path: Path, decoder: str = "cv2") -> np.ndarray:
    """RGB uint8 [H, W, 3]; the released PNGs are RGBA and the alpha channel is dropped.

    Any colour type (grey, palette, RGB, RGBA, with or without alpha) gives 8-bit RGB with either
    decoder. A file OpenCV cannot read (missing, truncated, not an image) goes to Pillow, which
    reads it or raises ``StreetHazardsDataError`` saying what is wrong.
    """
    if decoder == "cv2" and os.path.isfile(path):  # a missing file would make OpenCV print a warning
        image = cv2.imread(os.fspath(path), _CV2_FLAGS)
        if image is not None and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            return image if _CV2_RGB is not None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    image = _open_png(path)
    if image.mode not in ("RGBA", "RGB"):
        image = image.convert("RGB")
    return np.array(image)[..., :3].copy()  # writable and contiguous, for torch.from_numpy


def load_raw_annotation(path: Path) -> np.ndarray:
    """Raw annotation values uint8 [H, W] (1..14 in a valid file)."""
    annotation = _open_png(path)
    if annotation.mode not in ("L", "P", "I", "I;16"):
        raise StreetHazardsDataError(
            f"{path}: annotation must be a single-channel PNG (mode L), got mode {annotation.mode}"
        )
    raw = np.asarray(annotation)
    if raw.dtype != np.uint8:
        if raw.max(initial=0) > 255 or raw.min(initial=0) < 0:
            raise StreetHazardsDataError(f"{path}: annotation values outside 0..255")
        raw = raw.astype(np.uint8)
    return raw


def label_lookup(ignore_unlabeled: bool) -> np.ndarray:
    """A 256-entry table from raw annotation value to training label (255 marks invalid values).

    Raw 0 maps to 255; whether a 0 is allowed in an annotation is checked on load (``zero_label``).
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for raw in range(RAW_LABEL_MIN, RAW_LABEL_MAX + 1):
        lut[raw] = raw - LABEL_OFFSET
    if ignore_unlabeled:
        lut[RAW_LABEL_MIN] = IGNORE_INDEX
        lut[RAW_LABEL_MIN + 1 : RAW_LABEL_MAX] -= 1  # building..traffic sign -> 0..11
    return lut


# ----------------------------------------------------------------------------- tensors
#: Batch entries that hold labels: uint8 from the loaders, ``long`` in the data contract.
MASK_KEYS = ("mask", "mask_clean")
_NORMALIZATION: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _image_tensor(image: np.ndarray) -> Tensor:
    """uint8 [H, W, 3] array -> uint8 [3, H, W] tensor (a view: no copy of a contiguous array)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def normalize_image(image: Tensor) -> Tensor:
    """uint8 RGB [..., 3, H, W] -> float32 ImageNet-normalized, on the tensor's own device.

    The same operations, in the same order, as the loaders applied per image before images were
    shipped as uint8, so a CPU run gives bit-identical inputs to what it gave then.
    """
    device = image.device
    if device not in _NORMALIZATION:  # made once per device: no host-to-device copy per batch
        mean = torch.tensor(IMAGE_MEAN, device=device).view(3, 1, 1)
        std = torch.tensor(IMAGE_STD, device=device).view(3, 1, 1)
        _NORMALIZATION[device] = (mean, std)
    mean, std = _NORMALIZATION[device]
    return image.float().div_(255.0).sub_(mean).div_(std)


def prepare_batch(batch: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """A loader's batch in the data contract, on ``device`` (where it is, when ``None``).

    The datamodule's loaders ship ``image`` as uint8 [B, 3, H, W] and the masks as uint8 (a
    quarter and an eighth of the bytes); this makes ``image`` ImageNet-normalized float32 and the
    masks ``long``, after the move, so the work runs on the accelerator. Entries already in the
    contract (float images, long masks) pass unchanged. ``StreetHazardsDataModule`` calls it in
    ``on_after_batch_transfer``; code that iterates a loader itself calls it on each batch.
    """
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            if device is not None:
                value = value.to(device, non_blocking=True)
            if value.dtype == torch.uint8:
                if key == "image":
                    value = normalize_image(value)
                elif key in MASK_KEYS:
                    value = value.long()
        out[key] = value
    return out


class DeviceBatches:
    """Iterates ``loader`` and yields each batch ``prepare_batch``-ed on ``device``.

    For loops outside the Trainer (the post-hoc pass): they move batches themselves and would
    otherwise receive the loaders' uint8 images. ``dataset`` and ``len`` are the loader's.
    """

    def __init__(self, loader: DataLoader, device: torch.device | str | None = None) -> None:
        self.loader, self.device = loader, device
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield prepare_batch(batch, self.device)


# ----------------------------------------------------------------------------- cache
class DecodedImageCache:
    """Decoded, checked, label-mapped and resized samples as ``.npy`` files in ``folder``.

    One file per sample holds uint8 [H, W, 4]: RGB and the training label, exactly what
    ``StreetHazardsDataset.load`` returns, so reading it replaces a PNG decode, the label checks
    and the resize (about 1 ms against 40 for a 720x1280 PNG). The key covers the image and
    annotation paths, their sizes and modification times, the resize and the label mapping: a
    changed file or option is a miss, never a stale hit. Files are written atomically; a cache
    shared by many workers (or runs) is safe to read while it is written. The total is bounded by
    ``max_bytes``: each process rescans the folder every ``rescan_every`` writes and stops writing
    once the folder holds ``max_bytes``, so workers writing at once can overshoot it by at most
    ``rescan_every`` files each. Nothing is evicted; delete the folder to clear it.
    """

    VERSION = 1
    SUFFIX = ".npy"

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int, rescan_every: int = 32) -> None:
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.rescan_every = rescan_every
        self._used: int | None = None  # bytes in the folder as this process last saw it
        self._writes_since_scan = 0
        self.hits = self.misses = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_used"], state["_writes_since_scan"] = None, 0  # each worker scans for itself
        return state

    def key(self, sample: Sample, image_size: tuple[int, int] | None, lut: np.ndarray) -> str:
        parts = [str(self.VERSION), repr(image_size), lut.tobytes().hex()]
        for path in (sample.image, sample.annotation):
            assert path is not None
            stat = os.stat(path)
            parts += [os.path.abspath(path), str(stat.st_size), str(stat.st_mtime_ns)]
        return hashlib.sha1("\0".join(parts).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / (key + self.SUFFIX)

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            stacked = np.load(self._path(key), allow_pickle=False)
        except (OSError, ValueError):  # absent, or unreadable: decode again (and rewrite)
            self.misses += 1
            return None
        if stacked.dtype != np.uint8 or stacked.ndim != 3 or stacked.shape[2] != 4:
            self.misses += 1
            return None
        self.hits += 1
        return np.ascontiguousarray(stacked[..., :3]), np.ascontiguousarray(stacked[..., 3])

    def used_bytes(self) -> int:
        if not self.folder.is_dir():
            return 0
        return sum(entry.stat().st_size for entry in self.folder.glob(f"*/*{self.SUFFIX}"))

    def put(self, key: str, image: np.ndarray, mask: np.ndarray) -> bool:
        """Store one sample unless the cache is full; whether it was stored."""
        if self._used is None or self._writes_since_scan >= self.rescan_every:
            self._used, self._writes_since_scan = self.used_bytes(), 0
        stacked = np.concatenate([image, mask[..., None]], axis=2)
        if self._used + stacked.nbytes > self.max_bytes:
            return False
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as handle:
                np.save(handle, stacked, allow_pickle=False)
            os.replace(temporary, path)
        except OSError as error:  # a full or read-only disk must not stop training
            temporary.unlink(missing_ok=True)
            log.warning("decoded-image cache: could not write %s (%s); reading PNGs instead", path, error)
            self.max_bytes = 0
            return False
        self._used += stacked.nbytes + 128
        self._writes_since_scan += 1
        return True


def train_augmentation(
    crop_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0), color_jitter: float = 0.3
) -> A.Compose:
    """Random scale, crop to ``crop_size``, horizontal flip, colour jitter.

    Geometric transforms interpolate images bilinearly and masks with nearest neighbour; padding
    fills masks with the ignore index so padded pixels never train.
    """
    height, width = crop_size
    return A.Compose(
        [
            A.RandomScale(
                scale_limit=(scale_range[0] - 1.0, scale_range[1] - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            ),
            A.PadIfNeeded(
                min_height=height,
                min_width=width,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=IGNORE_INDEX,
            ),
            A.RandomCrop(height=height, width=width),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.05, p=0.8),
        ],
        additional_targets={"mask_clean": "mask"},
    )


Injector = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray, np.ndarray]]


class StreetHazardsDataset(Dataset):
    """One split of StreetHazards; items are dicts in the data contract.

    ``image`` float [3, H, W] (ImageNet-normalized), ``mask`` long [H, W], ``name`` the file stem,
    and with an ``injector`` also ``mask_clean`` (the label before outliers were pasted). With
    ``normalize=False``, ``image`` is uint8 RGB [3, H, W] and the masks uint8, for
    ``prepare_batch`` to finish on the device. ``decoder``: 'cv2' or 'pil' (``load_image``);
    ``cache``: an optional ``DecodedImageCache`` of what ``load`` returns.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: tuple[int, int] | None = None,
        ignore_unlabeled: bool = False,
        zero_label: str = "error",
        anomaly_to_ignore: bool = False,
        augment: A.Compose | None = None,
        injector: Injector | None = None,
        seed: int = 0,
        normalize: bool = True,
        decoder: str = "cv2",
        cache: DecodedImageCache | None = None,
    ) -> None:
        if zero_label not in ("error", "ignore"):
            raise StreetHazardsDataError(f"zero_label must be 'error' or 'ignore', got '{zero_label}'")
        self.decoder = check_decoder(decoder)
        self.normalize = normalize
        self.cache = cache
        self.samples = list(samples)
        self.image_size = tuple(image_size) if image_size is not None else None
        self.zero_label = zero_label
        self.lut = label_lookup(ignore_unlabeled)
        if anomaly_to_ignore:
            self.lut[RAW_LABEL_MAX] = IGNORE_INDEX
        self.augment = augment
        self.injector = injector
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded, checked, label-shifted and resized arrays: RGB uint8 [H,W,3], labels uint8 [H,W]."""
        if self.cache is None:
            return self._decode(index)
        key = self.cache.key(self.samples[index], self.image_size, self.lut)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        image, mask = self._decode(index)
        self.cache.put(key, image, mask)
        return image, mask

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        image = load_image(sample.image, self.decoder)
        assert sample.annotation is not None
        raw = load_raw_annotation(sample.annotation)
        if raw.shape != image.shape[:2]:
            raise StreetHazardsDataError(
                f"{sample.annotation}: annotation size {raw.shape[1]}x{raw.shape[0]} differs from image "
                f"{sample.image} ({image.shape[1]}x{image.shape[0]})"
            )
        low, high = int(raw.min()), int(raw.max())
        if high > RAW_LABEL_MAX or (low < RAW_LABEL_MIN and self.zero_label == "error"):
            bad = np.unique(raw[(raw > RAW_LABEL_MAX) | (raw < RAW_LABEL_MIN)])
            hint = " (set data.zero_label: ignore to treat 0 as ignore)" if bad.min() == 0 else ""
            raise StreetHazardsDataError(
                f"{sample.annotation}: annotation values {bad.tolist()[:10]} outside "
                f"{RAW_LABEL_MIN}..{RAW_LABEL_MAX}{hint}"
            )
        mask = self.lut[raw]
        if self.image_size is not None and image.shape[:2] != self.image_size:
            height, width = self.image_size
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        # EpochShuffleSampler encodes the epoch in the index so that injection is reproducible per
        # (seed, epoch, sample) whichever worker loads it, and persistent workers need no state.
        epoch, index = divmod(index, len(self.samples))
        image, mask = self.load(index)
        item: dict[str, Any] = {"name": self.samples[index].image.stem}
        mask_clean = None
        if self.injector is not None:
            from datamodules.injection import injection_rng

            rng = injection_rng(self.seed, epoch, index)
            image, mask, mask_clean = self.injector(image, mask, rng)
        if self.augment is not None:
            # albumentations draws from its own generators, which neither seed_everything nor the
            # workers' seeding reach: unseeded, no two runs trained on the same crops and jitter.
            generator = augmentation_rng(self.seed, epoch, index)
            self.augment.set_random_state(generator, random.Random(int(generator.integers(1 << 62))))
            targets = {"image": image, "mask": mask}
            if mask_clean is not None:
                targets["mask_clean"] = mask_clean
            out = self.augment(**targets)
            image, mask, mask_clean = out["image"], out["mask"], out.get("mask_clean")
        item["image"] = _image_tensor(image)
        item["mask"] = torch.from_numpy(np.ascontiguousarray(mask))
        if mask_clean is not None:
            item["mask_clean"] = torch.from_numpy(np.ascontiguousarray(mask_clean))
        return prepare_batch(item) if self.normalize else item


def augmentation_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch, a function of the triple only
    (independent of workers and order, like ``injection_rng``, from which its stream differs)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index), 1]))


class EpochShuffleSampler(Sampler[int]):
    """Shuffles like ``RandomSampler`` and yields ``epoch * n + index``.

    The dataset recovers ``(epoch, index)`` with ``divmod``; seeding anything per epoch then needs
    no state in (persistent) workers. Lightning calls ``set_epoch`` before each training epoch, so a
    resumed run sees the same epochs as an uninterrupted one; without it, each new iteration
    counts as the next epoch.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        offset = self.epoch * self.num_samples
        self.epoch += 1
        yield from (offset + i for i in torch.randperm(self.num_samples, generator=generator).tolist())


#: The batch entry that marks a placeholder batch (see :class:`EvaluationShardSampler`).
PADDING_KEY = "padding"
#: The index a :class:`EvaluationShardSampler` gives a process whose share is empty.
PLACEHOLDER_INDEX = -1


def is_padding(batch: Any) -> bool:
    """Whether ``batch`` is the placeholder of a process that has no sample of an evaluation split.

    Such a batch holds a copy of the split's first sample; evaluation, heatmaps, predictions and
    post-hoc statistics must not count it.
    """
    return isinstance(batch, Mapping) and PADDING_KEY in batch


class EvaluationShardSampler(DistributedSampler):
    """Process ``rank``'s share of an evaluation split: samples ``rank, rank + W, ...`` of ``W`` processes.

    Every sample is evaluated exactly once over all processes (Lightning's default distributed
    sampler pads the shards by repeating samples, which would count them twice in the metrics).
    A process whose share is empty (fewer samples than processes, e.g. one test image on two
    GPUs) gets one placeholder index instead, which :class:`WithPlaceholder` turns into a batch
    marked by :data:`PADDING_KEY`: Lightning skips an evaluation loop without batches altogether
    (its hooks included), so that process would miss the collective ``compute()`` of the others and
    they would wait for it forever. A ``DistributedSampler`` so that Lightning leaves it in place.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, placeholder: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        size = len(dataset)  # type: ignore[arg-type]
        self.indices = list(range(rank, size, num_replicas)) or ([PLACEHOLDER_INDEX] if size and placeholder else [])
        self.num_samples = len(self.indices)
        self.total_size = size

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


class WithPlaceholder(Dataset):
    """``dataset`` whose item :data:`PLACEHOLDER_INDEX` is its first item marked as padding."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        if index == PLACEHOLDER_INDEX:
            return {**self.dataset[0], PADDING_KEY: True}
        return self.dataset[index]


def ignore_termination_signals(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: workers ignore SIGUSR1, and SIGTERM unless their process sends it.

    Schedulers signal every process of a job (SLURM signals the whole job step, loader workers
    included). The training process decides when to stop (``callbacks.guards.PreemptionCheckpoint``
    saves at a batch boundary); a worker ended by the signal would make the next batch fail first.
    SIGTERM is still how the training process itself ends its workers (``DataLoader`` shutdown,
    and ``multiprocessing`` at interpreter exit, which then waits for them): it is blocked and a
    thread takes it with ``sigwaitinfo``, exiting when the parent sent it and dropping it otherwise
    (where ``sigwaitinfo`` is missing, SIGTERM keeps torch's default). Workers also end with their
    process (they watch it) and on SIGKILL. Lightning's worker seeding (``seed_everything(workers=
    True)``) is kept: it is applied here as Lightning would.
    """
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_exit_on_sigterm_from_parent, name="sigterm-from-parent", daemon=True).start()
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


def _exit_on_sigterm_from_parent() -> None:
    parent = os.getppid()
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


class _SkipFirstBatches:
    """Index batches of ``loader`` whose next iteration starts ``loader.skip_batches`` batches in."""

    def __init__(self, batches: Iterable[list[int]], loader: ResumableDataLoader) -> None:
        self.batches, self.loader = batches, loader

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the skip is taken when the first batch is drawn, not when iter() is called
        # (with workers, an iterator made and dropped before training would otherwise take it).
        skip, self.loader.skip_batches = self.loader.skip_batches, 0
        yield from itertools.islice(self.batches, skip, None)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose first iteration starts ``skip_batches`` batches in (later ones at 0).

    The skipped batches are drawn as index lists and dropped, so their images are never loaded.
    It skips after sampling and batching, so it also holds when Lightning puts its distributed
    sampler in (it re-creates the loader with the same ``skip_batches``): each process skips its
    own first batches.
    """

    def __init__(self, *args: Any, skip_batches: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_batches = int(skip_batches)

    @property
    def _index_sampler(self) -> Any:
        # What DataLoader iterators draw index batches from (read when an iterator is created).
        batches = super()._index_sampler
        return _SkipFirstBatches(batches, self) if self.skip_batches else batches


class ImageFolderDataset(Dataset):
    """Images of any size from a folder, for ``predict``; no labels."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        image_size: tuple[int, int] | None = None,
        normalize: bool = True,
        decoder: str = "cv2",
    ) -> None:
        self.decoder = check_decoder(decoder)
        self.normalize = normalize
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise StreetHazardsDataError(f"predict_dir '{self.folder}' does not exist or is not a folder")
        self.paths = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise StreetHazardsDataError(f"predict_dir '{self.folder}' contains no .png/.jpg images")
        self.image_size = tuple(image_size) if image_size is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        image = load_image(path, self.decoder)
        height, width = image.shape[:2]
        if self.image_size is not None and image.shape[:2] != self.image_size:
            image = cv2.resize(image, (self.image_size[1], self.image_size[0]), interpolation=cv2.INTER_LINEAR)
        item = {
            "image": _image_tensor(image),
            "name": str(path.relative_to(self.folder).with_suffix("")),
            "original_size": torch.tensor([height, width]),
        }
        return prepare_batch(item) if self.normalize else item


# ----------------------------------------------------------------------------- datamodule
def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (set by SLURM, taskset, containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_workers(processes_per_node: int = 1, cpus: int | None = None) -> int:
    """Loader workers per process: the node's available CPUs shared among its training processes,
    less one for each process itself, at most 16 (0 on a single CPU: load in the process)."""
    cpus = available_cpus() if cpus is None else cpus
    return max(0, min(16, cpus // max(1, processes_per_node) - 1))


@dataclass
class SyntheticConfig:
    """Size of the embedded synthetic dataset written when ``root`` is the default and missing."""

    num_train: int = 200
    num_val: int = 40
    num_test: int = 300
    height: int = 180
    width: int = 320
    seed: int = 0


@dataclass
class InjectionConfig:
    """Outlier pasting for methods that train on injected anomalies (``datamodules.injection``).

    ``source``: 'procedural' (needs nothing), 'folder' (RGBA cut-outs or image+mask pairs in
    ``source_root``) or 'sbd' (the Semantic Boundaries Dataset in torchvision's layout at
    ``source_root``; never downloaded implicitly).
    """

    source: str = "procedural"
    source_root: str | None = None
    probability: float = 0.5
    max_objects: int = 3
    min_size: float = 0.05
    max_size: float = 0.25
    random_flip: bool = True


#: The calibration split's outliers: the procedural source, pasted into every validation image.
CALIBRATION_DEFAULT = InjectionConfig(source="procedural", probability=1.0)
#: Offset of the calibration split's injection seed from ``data.seed`` (other draws than training's).
CALIBRATION_SEED_OFFSET = 1_000_003


class StreetHazardsDataModule(L.LightningDataModule):
    """StreetHazards (or the embedded synthetic copy) as a LightningDataModule.

    Args:
        root: dataset folder in the released layout. The default is the embedded synthetic dataset,
            written there on first use.
        image_size: (height, width) to resize to on load for training and validation; ``None``
            keeps the native 720x1280. Training crops of this size are taken after random scaling
            (``train_crop_size`` for smaller ones).
        train_crop_size: (height, width) of the training crops; ``None``: ``image_size``. Smaller
            crops make a training step cheaper at the same scale (the network still sees objects
            at the evaluation resolution); a crop larger than the (scaled) image is padded with the
            ignore label, as with scale augmentation. Needs ``train_augment``.
        test_image_size: resize for the test split; ``None`` uses ``image_size``.
        test_native_resolution: evaluate the test split at its native resolution regardless of
            ``image_size`` / ``test_image_size`` (the published protocol).
        batch_size: training batch size; ``eval_batch_size`` for validation/test/predict
            (defaults to ``batch_size``).
        num_workers: dataloader workers per process; ``None`` (the default): ``default_num_workers``,
            from the CPUs this process may use (its affinity mask, which SLURM and containers set)
            shared among the node's training processes.
        ignore_unlabeled: False: 13 classes (reference protocol, unlabeled is class 0); True:
            unlabeled becomes 255 and 12 classes remain.
        zero_label: raw annotation value 0 is not part of the release; 'error' rejects it,
            'ignore' maps it to 255.
        train_augment: random scale/crop, horizontal flip and colour jitter on the training split.
        scale_range: random scale factors for augmentation.
        injection: paste outlier objects into training images (``mask`` gets 13 there,
            ``mask_clean`` keeps the original label); ``None`` disables.
        calibration: outliers pasted into the validation images (every image, deterministic per
            image, at the test resolution) to give the *calibration split*, on which evaluation
            fixes its operating thresholds before it reads the test split
            (:meth:`calibration_dataloader`); ``None`` disables it (no operating points then).
        seed: seed of the training split's shuffling, augmentation and anomaly injection (each a
            function of seed, epoch and sample, independent of the number of workers).
        predict_dir: folder of images for ``predict``; images of any size.
        predict_image_size: resize for ``predict``; ``None`` keeps each image's size (batch size 1).
        synthetic: size of the embedded dataset written when ``root`` is the default.
        decoder: 'cv2' (OpenCV, the faster) or 'pil' (Pillow) for the image PNGs/JPEGs.
        normalize_on_device: the loaders ship uint8 images and masks and the batch is normalized
            (float32, ImageNet mean/std; masks to ``long``) after it reaches the device, in
            ``on_after_batch_transfer``: a quarter of the bytes through worker IPC, pinning and
            host-to-device copies, and no float work on the CPUs. ``False``: the workers normalize.
        cache_dir: keep decoded, resized training and validation samples there (``.npy``, uint8;
            720x1280 -> 512x896 is 1.8 MB a sample, 11 GB for both splits) and read them instead of
            the PNGs from the second epoch on; ``None`` disables. Local disk or ``/dev/shm``;
            shared safely by workers and runs; see ``DecodedImageCache``.
        cache_max_gb: bound on the cache folder's size; samples beyond it are decoded every time.
        posthoc_at_test_size: fit post-hoc statistics (SML, FRE, kNN bank, prototypes) on training
            images at the test split's size (``test_image_size`` / native) rather than at
            ``image_size``: the statistics then describe the resolution they are applied at.
    """

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        image_size: tuple[int, int] | None = None,
        test_image_size: tuple[int, int] | None = None,
        test_native_resolution: bool = False,
        train_crop_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        ignore_unlabeled: bool = False,
        zero_label: str = "error",
        train_augment: bool = True,
        scale_range: tuple[float, float] = (0.5, 2.0),
        injection: InjectionConfig | None = None,
        calibration: InjectionConfig | None = CALIBRATION_DEFAULT,
        seed: int = 0,
        predict_dir: str | None = None,
        predict_image_size: tuple[int, int] | None = None,
        synthetic: SyntheticConfig | None = None,
        decoder: str = "cv2",
        normalize_on_device: bool = True,
        cache_dir: str | None = None,
        cache_max_gb: float = 32.0,
        posthoc_at_test_size: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise StreetHazardsDataError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise StreetHazardsDataError(f"data.num_workers must be >= 0 (or null: from the CPUs), got {num_workers}")
        if decoder not in DECODERS:
            raise StreetHazardsDataError(f"data.decoder must be one of {', '.join(DECODERS)}, got '{decoder}'")
        if cache_max_gb < 0:
            raise StreetHazardsDataError(f"data.cache_max_gb must be >= 0, got {cache_max_gb}")
        self.root = Path(root)
        self.image_size = tuple(image_size) if image_size is not None else None
        self.test_image_size = tuple(test_image_size) if test_image_size is not None else self.image_size
        if test_native_resolution:
            self.test_image_size = None
        self.train_crop_size = tuple(train_crop_size) if train_crop_size is not None else None
        if self.train_crop_size is not None:
            if len(self.train_crop_size) != 2 or min(self.train_crop_size) < 1:
                raise StreetHazardsDataError(
                    f"data.train_crop_size must be (height, width) >= 1, got {list(train_crop_size)}"
                )
            if not train_augment:
                raise StreetHazardsDataError("data.train_crop_size needs data.train_augment (the crops are part of it)")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.ignore_unlabeled = ignore_unlabeled
        self.zero_label = zero_label
        self.train_augment = train_augment
        self.scale_range = tuple(scale_range)
        self.injection = injection
        self.calibration = calibration
        self.seed = seed
        self.predict_dir = predict_dir
        self.predict_image_size = predict_image_size
        self.synthetic = synthetic or SyntheticConfig()
        self.decoder = decoder
        self.normalize_on_device = normalize_on_device
        self.cache = DecodedImageCache(cache_dir, int(cache_max_gb * 2**30)) if cache_dir else None
        self.posthoc_at_test_size = posthoc_at_test_size
        self.datasets: dict[str, Dataset] = {}
        self._resume_at: dict[str, int] | None = None
        self._cudnn_benchmark: bool | None = None  # trainer.benchmark, while predict turns it off
        self._logged_workers: int | None = None

    # -- what models and callbacks need to know
    @property
    def num_classes(self) -> int:
        return NUM_CLASSES - 1 if self.ignore_unlabeled else NUM_CLASSES

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES[1:] if self.ignore_unlabeled else CLASS_NAMES

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        """Colours of the known classes (in this class set's order), then the anomaly colour."""
        known = PALETTE[1:NUM_CLASSES] if self.ignore_unlabeled else PALETTE[:NUM_CLASSES]
        return (*known, PALETTE[ANOMALY_INDEX])

    # -- data preparation
    def is_embedded_default(self) -> bool:
        return os.path.normpath(str(self.root)) == os.path.normpath(DEFAULT_ROOT)

    def check_embedded_default(self) -> None:
        """Refuse an embedded default folder written with other sizes or seed than ``data.synthetic``.

        Without this, changing ``data.synthetic`` (or upgrading to a version with other defaults)
        would silently keep using the old folder. Folders written before the writer recorded its
        arguments are checked by their ``.odgt`` record counts and image size.
        """
        from datamodules.synthetic import PARAMETERS_FILE, read_synthetic_parameters

        wanted = asdict(self.synthetic)
        found = read_synthetic_parameters(self.root)
        if found is None:
            found = {}
            for key, split in SPLITS.items():
                try:
                    records = json.loads(split.index_path(self.root).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    return  # not a folder this writer made; list_split reports what is wrong with it
                found[f"num_{key}"] = len(records)
                if records and isinstance(records[0], dict):
                    found.setdefault("height", records[0].get("height"))
                    found.setdefault("width", records[0].get("width"))
        differences = [
            f"{key} {found[key]} (asked: {wanted[key]})" for key in wanted if key in found and found[key] != wanted[key]
        ]
        if differences:
            raise StreetHazardsDataError(
                f"the embedded synthetic dataset at '{self.root}' was written with {', '.join(differences)}; "
                f"delete that folder to have it written again with data.synthetic's values, or set "
                f"data.synthetic to match ({self.root / PARAMETERS_FILE} or its .odgt indexes say what it holds)"
            )

    def prepare_data(self) -> None:
        if not self.is_embedded_default():
            return
        if self.root.exists():
            self.check_embedded_default()
        else:
            from datamodules.synthetic import write_synthetic_streethazards

            cfg = self.synthetic
            log.warning(
                "Writing the embedded synthetic StreetHazards dataset to %s "
                "(%d train, %d val, %d test at %dx%d)",
                self.root, cfg.num_train, cfg.num_val, cfg.num_test, cfg.height, cfg.width,
            )  # fmt: skip
            write_synthetic_streethazards(
                self.root,
                cfg.num_train,
                cfg.num_val,
                cfg.num_test,
                image_size=(cfg.height, cfg.width),
                seed=cfg.seed,
            )

    def _dataset(self, split: str, **kwargs: Any) -> StreetHazardsDataset:
        return StreetHazardsDataset(
            list_split(self.root, split),
            ignore_unlabeled=self.ignore_unlabeled,
            zero_label=self.zero_label,
            normalize=not self.normalize_on_device,
            decoder=self.decoder,
            **kwargs,
        )

    def _build_injector(self) -> Injector | None:
        if self.injection is None:
            return None
        from datamodules.injection import build_injector

        return build_injector(self.injection, seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        # A process that skipped prepare_data (e.g. a bare setup call) writes or checks here.
        self.prepare_data()
        if stage in (None, "fit"):
            augment = train_augmentation(self._crop_size(), self.scale_range) if self.train_augment else None
            self.datasets["train"] = self._dataset(
                "train",
                image_size=self.image_size,
                augment=augment,
                injector=self._build_injector(),
                anomaly_to_ignore=True,
                seed=self.seed,
                cache=self.cache,
            )
        if stage in (None, "fit", "validate"):
            self.datasets["val"] = self._dataset("val", image_size=self.image_size, cache=self.cache)
        if stage in (None, "test"):
            self.datasets["test"] = self._dataset("test", image_size=self.test_image_size)
            # A set without validation images (e.g. a held-out test set) has no calibration split.
            if self.calibration is not None and self._has_split("val"):
                from datamodules.injection import build_injector

                seed = self.seed + CALIBRATION_SEED_OFFSET
                self.datasets["calibration"] = self._dataset(
                    "val",
                    image_size=self.test_image_size,
                    injector=build_injector(self.calibration, seed=seed),
                    seed=seed,
                )
        if stage == "predict":
            if self.predict_dir is None:
                raise StreetHazardsDataError("predict needs data.predict_dir: a folder of images")
            self.datasets["predict"] = ImageFolderDataset(
                self.predict_dir, self.predict_image_size, normalize=not self.normalize_on_device, decoder=self.decoder
            )
            if self.predict_image_size is None and torch.backends.cudnn.benchmark:
                # Images keep their own sizes: cuDNN would autotune again for every new one.
                log.info("predict on images of their own sizes: cuDNN autotuning (trainer.benchmark) is off for it")
                self._cudnn_benchmark, torch.backends.cudnn.benchmark = True, False

    def teardown(self, stage: str) -> None:
        if stage == "predict" and self._cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark, self._cudnn_benchmark = self._cudnn_benchmark, None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalize on the device the batch was moved to (see ``normalize_on_device``)."""
        return prepare_batch(batch) if isinstance(batch, Mapping) else batch

    def _crop_size(self) -> tuple[int, int]:
        if self.train_crop_size is not None:
            return self.train_crop_size
        if self.image_size is not None:
            return self.image_size
        image = load_image(list_split(self.root, "train")[0].image)
        return image.shape[0], image.shape[1]

    # -- loaders
    def loader_workers(self) -> int:
        """``num_workers``, or when it is ``None`` the count ``default_num_workers`` gives for this node."""
        if self.num_workers is not None:
            return self.num_workers
        trainer = getattr(self, "trainer", None)
        processes = trainer.num_devices if trainer is not None else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        workers = default_num_workers(processes)
        if self._logged_workers != workers:
            self._logged_workers = workers
            log.info(
                "data.num_workers: %d per process (%d CPUs available, %d process(es) on this node)",
                workers, available_cpus(), processes,
            )  # fmt: skip
        return workers

    def _loader_options(self) -> dict[str, Any]:
        workers = self.loader_workers()
        return {
            "num_workers": workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": workers > 0,
            # Its own generator: creating an iterator draws nothing from the global RNG, so the
            # workers' seeds do not depend on what the model drew before (nor the reverse).
            "generator": torch.Generator().manual_seed(self.seed),
            "worker_init_fn": ignore_termination_signals,
        }

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **self._loader_options(), **kwargs)

    def _eval_sampler(self, dataset: Dataset, placeholder: bool = True) -> DistributedSampler | None:
        """Under DDP each sample is evaluated exactly once: Lightning's default distributed sampler
        pads the last batch by repeating samples, which would count them twice in the metrics. With
        ``placeholder``, a process without samples gets a placeholder (:class:`EvaluationShardSampler`)."""
        trainer = getattr(self, "trainer", None)  # LightningDataModule.trainer, set by the Trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        return EvaluationShardSampler(dataset, trainer.world_size, trainer.global_rank, placeholder=placeholder)

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        drop_last = len(dataset) > self.batch_size
        # Shuffling, augmentation and injection all follow (data.seed, epoch, sample).
        sampler = EpochShuffleSampler(len(dataset), seed=self.seed)
        skip = 0
        if self._resume_at is not None:
            # Lightning creates the resumed epoch's iterator before it calls set_epoch.
            sampler.set_epoch(self._resume_at["epoch"])
            skip, self._resume_at = self._resume_at["batches_done"], None
            if skip:
                # Lightning cannot see that this loader resumes within the epoch.
                warnings.filterwarnings("ignore", message="You.re resuming from a checkpoint that ended before")
        return ResumableDataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last, skip_batches=skip,
            **self._loader_options(),
        )  # fmt: skip

    # -- where training stood, in every checkpoint, so that a resumed fit sees the batches of an
    # uninterrupted one. Lightning restores a datamodule's state before it builds the training
    # loader; its own stateful-loader path restores after, which is too late whenever
    # configure_optimizers asks for trainer.estimated_stepping_batches (that builds the loader).
    def state_dict(self) -> dict[str, int]:
        """``epoch`` and ``batches_done`` (batches of it whose training step ran) of a running fit."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        epoch, done = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:  # the epoch is over: resume at the next one
            epoch, done = epoch + 1, 0
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = dict(state) if state else None

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.datasets["val"])

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.datasets["test"])

    def _eval_loader(self, dataset: Dataset, batch_size: int | None = None, placeholder: bool = True) -> DataLoader:
        sampler = self._eval_sampler(dataset, placeholder)
        if sampler is not None and placeholder:
            dataset = WithPlaceholder(dataset)
            sampler.dataset = dataset
        return self._loader(dataset, batch_size or self.eval_batch_size, shuffle=False, sampler=sampler)

    def _has_split(self, split: str) -> bool:
        try:
            return bool(list_split(self.root, split))
        except StreetHazardsDataError:
            return False

    def calibration_dataloader(self) -> DataLoader | None:
        """The calibration split: validation images with pasted outliers (``data.calibration``), at
        the test resolution, sharded without repeats; ``None`` when disabled or not set up."""
        dataset = self.datasets.get("calibration")
        # No placeholder: the calibration pass is the evaluation's own loop (an empty shard scores nothing).
        return self._eval_loader(dataset, placeholder=False) if dataset is not None else None

    def calibration_card(self) -> dict[str, Any] | None:
        """What the calibration split is, for result files."""
        if self.calibration is None:
            return None
        return {
            "images": "validation split",
            "outliers": asdict(self.calibration),
            "seed": self.seed + CALIBRATION_SEED_OFFSET,
            "image_size": list(self.test_image_size) if self.test_image_size is not None else "native",
        }

    def predict_dataloader(self) -> DataLoader:
        dataset = self.datasets["predict"]
        batch_size = self.eval_batch_size if self.predict_image_size is not None else 1
        return self._eval_loader(dataset, batch_size)

    def posthoc_dataloader(self) -> DataLoader | DeviceBatches:
        """The training split without augmentation or injection, sharded without repeats.

        Post-hoc statistics (SML, FRE, prototypes) are fitted on it after training, at
        ``image_size`` or, with ``posthoc_at_test_size``, at the test split's size. The fit
        iterates it outside the Trainer's batch transfer, so with ``normalize_on_device`` its
        batches come moved to the trainer's device (the CPU without a trainer) and normalized.
        """
        size = self.test_image_size if self.posthoc_at_test_size else self.image_size
        dataset = self._dataset("train", image_size=size, anomaly_to_ignore=True)
        # No placeholder: the post-hoc fit is the module's own loop, which handles an empty shard.
        loader = self._eval_loader(dataset, placeholder=False)
        if not self.normalize_on_device:
            return loader
        trainer = getattr(self, "trainer", None)
        return DeviceBatches(loader, trainer.strategy.root_device if trainer is not None else None)

    def class_pixel_counts(self) -> list[int]:
        """Pixels per known class over the training split (at ``image_size``), cached on disk.

        Used for class-weighted cross-entropy. The cache key covers the root, the class set, the
        resize and the list of files, so a changed dataset is counted again.
        """
        samples = list_split(self.root, "train")
        key = json.dumps(
            [str(self.root.resolve()), self.ignore_unlabeled, self.image_size, [str(s.image) for s in samples]]
        )
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streethazards-anomaly"
        cache = cache_dir / f"class_counts-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        dataset = StreetHazardsDataset(
            samples,
            self.image_size,
            self.ignore_unlabeled,
            self.zero_label,
            anomaly_to_ignore=True,
            decoder=self.decoder,
        )
        loader = DataLoader(
            _MaskOnly(dataset), batch_size=1, num_workers=self.loader_workers(), collate_fn=lambda items: items[0]
        )
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for mask in loader:
            counts += np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=256)[: self.num_classes]
        atomic_write_text(cache, json.dumps(counts.tolist()))
        return counts.tolist()


class _MaskOnly(Dataset):
    def __init__(self, dataset: StreetHazardsDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.dataset.load(index)[1]

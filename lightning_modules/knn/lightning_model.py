"""DeepLabV3+ scored by the distance of each pixel's feature to its nearest training-pixel features."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.base import MethodOutput
from lightning_modules.knn.functional import (
    REDUCTIONS,
    image_seed,
    knn_score_map,
    pixel_priorities,
    prune_rows,
    resize_labels_nearest,
    select_rows,
)
from lightning_modules.registry import register_method
from lightning_modules.segmenter import DeepLabV3PlusSegmenter

log = logging.getLogger(__name__)

#: The post-hoc accumulators: the bank's features, each row's priority and its class.
BANK_BUFFERS = ("bank", "bank_priorities", "bank_labels")


@register_method("knn", scores_network_of="sml")
class KNNSegmenter(DeepLabV3PlusSegmenter):
    """DeepLabV3+ whose pixel features are scored by their k-nearest-neighbour distance to training pixels.

    After training (or on a segmenter loaded with ``init_checkpoint``), one pass over the
    training split fills a memory bank: from every image, ``pixels_per_image`` labelled pixels
    chosen at random by a generator seeded with the image's name (so the bank does not depend on
    the number of processes or the order of the images), then ``bank_size`` of those rows over
    the whole split, again by their seeded priorities. The bank is a buffer, saved in the checkpoint.
    The defaults are the official code's (k = 3, mean distance, 100,000 rows, raw features); the
    configs normalise (measured in ``lightning_modules/knn/README.md``).

    Args (besides the segmenter's, see ``DeepLabV3PlusSegmenter``):
        k: neighbours per pixel (the official code's default: 3).
        reduction: 'mean' of the ``k`` distances (the official code's) or 'kth' (the k-th distance).
        feature_layer: 'decoder' (the DeepLabV3+ decoder output, 256 channels at 1/4 resolution)
            or 'encoder<i>' (encoder stage ``i``, e.g. 'encoder4': 1/16 resolution).
        normalize: L2-normalise features (bank and queries) before measuring distances; the
            official code does not.
        pixels_per_image: pixels drawn from each training image (at feature resolution).
        bank_size: rows kept in the bank over the whole split (None: every drawn pixel).
        class_balanced: draw pixels class by class (each class present gets an equal share,
            per image and over the split), so that rare classes are represented; the official
            code draws uniformly.
        seed: seed of the subsample.
        chunk_size: queries per block of the search (memory ``chunk_size x bank_size`` floats).
    """

    def __init__(
        self,
        k: int = 3,
        reduction: str = "mean",
        feature_layer: str = "decoder",
        normalize: bool = False,
        pixels_per_image: int = 40,
        bank_size: int | None = 100_000,
        class_balanced: bool = False,
        seed: int = 0,
        chunk_size: int = 2048,
        **segmenter_kwargs: Any,
    ) -> None:
        super().__init__(**segmenter_kwargs)
        for name, value in (("k", k), ("pixels_per_image", pixels_per_image), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be an integer >= 1, got {value!r}")
        if bank_size is not None and (isinstance(bank_size, bool) or not isinstance(bank_size, int) or bank_size < k):
            raise ValueError(f"model.bank_size must be None or an integer >= k ({k}), got {bank_size!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"model.reduction must be one of {REDUCTIONS}, got '{reduction}'")
        if feature_layer not in self.net.feature_layers():
            raise ValueError(f"model.feature_layer must be one of {self.net.feature_layers()}, got {feature_layer!r}")
        channels = self.net.feature_channels(feature_layer)
        self.register_buffer("bank", torch.zeros(0, channels))
        self.register_buffer("bank_priorities", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("bank_labels", torch.zeros(0, dtype=torch.long))
        for name in BANK_BUFFERS:
            self.declare_posthoc_accumulator(name, "cat")

    # ----------------------------------------------------------------- features
    def features_and_logits(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """(features of ``feature_layer`` ``[B, C, h, w]`` for the unpadded image, logits ``[B, K, H, W]``)."""
        return self.forward_layer(image, self.hparams.feature_layer)

    def _rows(self, features: Tensor) -> Tensor:
        """``[B, C, h, w] -> [B, h*w, C]`` float32 rows, normalised with ``normalize``."""
        rows = features.float().flatten(2).transpose(1, 2)
        return F.normalize(rows, dim=2) if self.hparams.normalize else rows

    # ----------------------------------------------------------------- fitting
    @staticmethod
    def _image_keys(batch: Mapping[str, Any]) -> list[str]:
        """Each image's identity: its name, or a digest of its pixels when the batch has no names."""
        names = batch.get("name")
        if names is not None and not isinstance(names, str) and len(names) == batch["image"].shape[0]:
            return [str(name) for name in names]
        images = batch["image"].detach().float().cpu().contiguous()
        return ["sha:" + hashlib.blake2b(image.numpy().tobytes(), digest_size=16).hexdigest() for image in images]

    def update_posthoc(self, batch: Mapping[str, Tensor], pass_index: int) -> None:
        features, _ = self.features_and_logits(batch["image"])
        self.accumulate_features(features, batch["mask"], self._image_keys(batch))

    def accumulate_features(self, features: Tensor, mask: Tensor, keys: Sequence[str]) -> None:
        """Add the drawn pixels of a batch's features ``[B, C, h, w]`` (labels ``mask [B, H, W]``,
        image identities ``keys``) to the bank accumulators."""
        hp = self.hparams
        labels = resize_labels_nearest(mask, tuple(features.shape[-2:])).flatten(1)
        rows = self._rows(features)
        banks, priorities, classes = [self.bank], [self.bank_priorities], [self.bank_labels]
        for b, key in enumerate(keys):
            drawn = pixel_priorities(labels.shape[1], image_seed(hp.seed, key)).to(labels.device)
            valid = (labels[b] < self.num_classes).nonzero().squeeze(1)
            balance = labels[b, valid] if hp.class_balanced else None
            keep = valid[select_rows(drawn[valid], balance, hp.pixels_per_image)]
            banks.append(rows[b, keep])
            priorities.append(drawn[keep])
            classes.append(labels[b, keep])
        self.bank, self.bank_priorities, self.bank_labels = torch.cat(banks), torch.cat(priorities), torch.cat(classes)
        if hp.bank_size is not None and self.bank.shape[0] > 2 * hp.bank_size:
            self._keep(prune_rows(self.bank_priorities, self._balance_labels(), hp.bank_size))

    def _balance_labels(self) -> Tensor | None:
        return self.bank_labels if self.hparams.class_balanced else None

    def _keep(self, index: Tensor) -> None:
        self.bank = self.bank[index]
        self.bank_priorities = self.bank_priorities[index]
        self.bank_labels = self.bank_labels[index]

    def finalize_posthoc(self, pass_index: int) -> None:
        hp = self.hparams
        count = self.bank.shape[0] if hp.bank_size is None else hp.bank_size
        # Selecting (and ordering) by priority makes the bank the same sequence of rows on any
        # number of processes, although the processes' rows arrive concatenated in rank order.
        self._keep(select_rows(self.bank_priorities, self._balance_labels(), count))
        if self.bank.shape[0] < hp.k:
            raise RuntimeError(
                f"kNN memory bank: {self.bank.shape[0]} labelled training pixels were found, fewer than k = {hp.k}; "
                "is the training split empty or entirely ignore (255)?"
            )
        per_class = torch.bincount(self.bank_labels, minlength=self.num_classes).tolist()
        log.info("kNN memory bank: %d rows of %d channels; rows per class %s", *self.bank.shape, per_class)

    # ----------------------------------------------------------------- scoring
    def scoring_options(self) -> dict[str, Any]:
        hp = self.hparams
        options = {name: hp[name] for name in ("k", "reduction", "feature_layer", "normalize", "class_balanced")}
        options["bank_rows"] = int(self.bank.shape[0])
        return {**super().scoring_options(), "knn": options}

    def knn_score(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        """Score ``[B, H, W]`` at ``size``: kNN distances at feature resolution, upsampled bilinearly."""
        hp = self.hparams
        score = knn_score_map(features.float(), self.bank, hp.k, hp.reduction, hp.normalize, hp.chunk_size)
        return F.interpolate(score[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def segment(self, image: Tensor) -> MethodOutput:
        features, logits = self.features_and_logits(image)
        with torch.autocast(device_type=image.device.type, enabled=False):
            if self.bank.shape[0] < self.hparams.k:  # validation during fit, before the bank is filled
                score = logits.new_zeros((image.shape[0], *image.shape[-2:]), dtype=torch.float32)
            else:
                score = self.knn_score(features, tuple(image.shape[-2:]))
        return MethodOutput(logits, {"knn": score, **self.baseline_scores(logits)})

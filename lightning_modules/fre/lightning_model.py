"""DeepLabV3+ scored by the Feature Reconstruction Error of its decoder features (PCA subspaces)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.base import MethodOutput
from lightning_modules.fre.functional import (
    SCORING_MODES,
    accumulate_class_moments,
    accumulate_error_moments,
    batch_quota,
    class_reconstruction_errors,
    error_statistics,
    fit_subspaces,
    reconstruction_error,
    resize_labels,
    sample_class_pixels,
    standardize_errors,
)
from lightning_modules.registry import register_method
from lightning_modules.scoring.postprocessing import dilated_smoothing
from lightning_modules.segmenter import DeepLabV3PlusSegmenter

log = logging.getLogger(__name__)


@register_method("fre", scores_network_of="sml")
class FRESegmenter(DeepLabV3PlusSegmenter):
    """DeepLabV3+ whose pixel features are scored by their PCA reconstruction error.

    A per-pixel, class-conditional variant of FRE (Ndiour et al., BMVC 2023) on the trained
    segmenter's features; ``lightning_modules/fre/README.md`` lists how it differs from the
    published one-class FRE and which options come closest to it.

    After training (or on a segmenter loaded with ``init_checkpoint``), one pass over the
    training split accumulates per-class feature moments in float64 (a seeded subsample of at
    most ``max_pixels_per_class`` pixels per class, spread over the pass), sums them across
    processes and fits the subspaces; with ``standardize`` a second pass collects each class's
    training error mean and std. Means, bases, ranks and error statistics are buffers, so a
    checkpoint carries them.

    Args (besides the segmenter's, see ``DeepLabV3PlusSegmenter``):
        mode: 'predicted' (subspace of the predicted class), 'min' (best subspace) or 'global'
            (one subspace for all pixels).
        explained_variance: keep the fewest components explaining this share of the variance.
        n_components: a fixed number of components instead (overrides ``explained_variance``).
        max_pixels_per_class: fitting budget per class, over the whole pass.
        min_pixels: classes with fewer fitting pixels use the global subspace (default: more
            pixels than feature channels, or than ``n_components``).
        standardize: divide each class's error by its training mean/std before comparing classes.
        seed: seed of the pixel subsample.
        smoothing_dilation: smooth the score map with SML's dilated 7x7 Gaussian
            (:func:`lightning_modules.scoring.postprocessing.dilated_smoothing`) at this dilation; ``None`` (the
            default) scores as published, unsmoothed. When set, the unsmoothed score is also
            reported, as ``fre_raw``, so the effect of the smoothing stays visible.
        feature_layer: the features modelled: 'decoder' (the decoder output before the
            segmentation head, 256 channels at 1/4 resolution; the default) or 'encoder<i>'
            (encoder stage ``i``; 'encoder3' is the ResNet ``layer3`` that published FRE reads).
    """

    #: Options under which the post-hoc fit sees the same pixels on any number of processes (each
    #: process otherwise draws its own subsample): used by the 1-vs-2-process equality test.
    POSTHOC_EXACT_OPTIONS = {"max_pixels_per_class": 10**9}

    def __init__(
        self,
        mode: str = "predicted",
        explained_variance: float = 0.95,
        n_components: int | None = None,
        max_pixels_per_class: int = 200_000,
        min_pixels: int | None = None,
        standardize: bool = True,
        seed: int = 0,
        smoothing_dilation: int | None = None,
        feature_layer: str = "decoder",
        **segmenter_kwargs: Any,
    ) -> None:
        super().__init__(**segmenter_kwargs)
        if smoothing_dilation is not None and (isinstance(smoothing_dilation, bool) or smoothing_dilation < 1):
            raise ValueError(f"model.smoothing_dilation must be None or an integer >= 1, got {smoothing_dilation!r}")
        if mode not in SCORING_MODES:
            raise ValueError(f"model.mode must be one of {SCORING_MODES}, got '{mode}'")
        if not 0.0 < explained_variance <= 1.0:
            raise ValueError(f"model.explained_variance must be in (0, 1], got {explained_variance}")
        if feature_layer not in self.net.feature_layers():
            raise ValueError(f"model.feature_layer must be one of {self.net.feature_layers()}, got {feature_layer!r}")
        k = self.num_classes
        c = self.net.feature_channels(feature_layer)
        num_subspaces = 1 if mode == "global" else k
        self.feature_channels = c
        # moment accumulators (fitting pass 1) and error accumulators (pass 2)
        self.register_buffer("moment_sums", torch.zeros(k, c, dtype=torch.float64))
        self.register_buffer("moment_outer", torch.zeros(k, c, c, dtype=torch.float64))
        self.register_buffer("moment_counts", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("error_sums", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("error_sq_sums", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("error_counts", torch.zeros(k, dtype=torch.float64))
        # fitted parameters; the bases' rank dimension is resized by fitting and by loading
        self.register_buffer("subspace_means", torch.zeros(num_subspaces, c, dtype=torch.float64))
        self.register_buffer("subspace_bases", torch.zeros(num_subspaces, c, 0, dtype=torch.float64))
        self.register_buffer("subspace_ranks", torch.zeros(num_subspaces, dtype=torch.long))
        self.register_buffer("error_mean", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("error_std", torch.ones(k, dtype=torch.float64))
        for name in ("moment_sums", "moment_outer", "moment_counts"):
            self.declare_posthoc_accumulator(name, "sum", pass_index=0)
        if standardize:
            for name in ("error_sums", "error_sq_sums", "error_counts"):
                self.declare_posthoc_accumulator(name, "sum", pass_index=1)
        # the bases' rank dimension is set by fitting and by loading a checkpoint
        self._resizable_buffers = ("subspace_bases",)
        self._batches_total: int | None = None
        self._batches_seen = 0
        self._budget = max_pixels_per_class
        self._generator: torch.Generator | None = None

    # ----------------------------------------------------------------- fitting
    # Pass 0 accumulates the per-class feature moments and fits the subspaces; pass 1 (with
    # ``standardize``) accumulates each class's training errors against its fitted subspace.
    def start_posthoc_pass(self, pass_index: int, num_batches: int | None) -> None:
        self._batches_total = num_batches
        self._batches_seen = 0
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        # Every process draws its own subsample of its own shard.
        self._generator = torch.Generator().manual_seed(self.hparams.seed * 1009 + rank)
        self._budget = -(-self.hparams.max_pixels_per_class // world)

    def _features_and_labels(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        features, _ = self.forward_layer(batch["image"], self.hparams.feature_layer)
        labels = resize_labels(batch["mask"], tuple(features.shape[-2:]))
        labels = torch.where(labels < self.num_classes, labels, torch.full_like(labels, -1))
        return features.float(), labels

    def update_posthoc(self, batch: Mapping[str, Tensor], pass_index: int) -> None:
        features, labels = self._features_and_labels(batch)
        if pass_index == 0:
            batches_left = None
            if self._batches_total is not None:
                batches_left = max(1, self._batches_total - self._batches_seen)
            quota = batch_quota(self._budget - self.moment_counts, batches_left)
            keep = sample_class_pixels(labels.cpu(), quota.cpu(), self.num_classes, self._generator).to(labels.device)
            accumulate_class_moments(
                features,
                labels.masked_fill(~keep, -1),
                self.num_classes,
                self.moment_sums,
                self.moment_outer,
                self.moment_counts,
            )
            self._batches_seen += 1
        else:
            errors = self._errors_against(features, labels.clamp(min=0))
            accumulate_error_moments(
                errors, labels, self.num_classes, self.error_sums, self.error_sq_sums, self.error_counts
            )

    def finalize_posthoc(self, pass_index: int) -> None:
        hp = self.hparams
        if pass_index == 0:
            means, bases, ranks = fit_subspaces(
                self.moment_sums,
                self.moment_outer,
                self.moment_counts,
                explained_variance=hp.explained_variance,
                n_components=hp.n_components,
                mode="global" if hp.mode == "global" else "per_class",
                min_pixels=hp.min_pixels,
                class_names=self._class_names(),
            )
            self.subspace_means = means.to(self.subspace_means)
            self.subspace_bases = bases.to(self.subspace_means)
            self.subspace_ranks = ranks.to(self.subspace_ranks.device)
            log.info("FRE subspace ranks: %s", ranks.tolist())
        else:
            mean, std = error_statistics(
                self.error_sums, self.error_sq_sums, self.error_counts, class_names=self._class_names()
            )
            self.error_mean.copy_(mean)
            self.error_std.copy_(std)

    def _class_names(self) -> list[str] | None:
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        names = getattr(datamodule, "class_names", None)
        return list(names) if names is not None and len(names) == self.num_classes else None

    # ----------------------------------------------------------------- scoring
    def _errors_against(self, features: Tensor, class_index: Tensor) -> Tensor:
        """Reconstruction error of each pixel against the subspace of ``class_index`` (or the global one)."""
        means, bases = self.subspace_means.float(), self.subspace_bases.float()
        if self.hparams.mode == "global":
            return reconstruction_error(features, means, bases, mode="global")
        return reconstruction_error(features, means, bases, class_index, mode="predicted")

    def fre_score(self, features: Tensor, logits: Tensor, size: tuple[int, int]) -> Tensor:
        hp = self.hparams
        features = features.float()
        pred = resize_labels(logits.argmax(dim=1), tuple(features.shape[-2:]))
        if hp.mode == "min":
            means, bases = self.subspace_means.float(), self.subspace_bases.float()
            errors = class_reconstruction_errors(features, means, bases)
            if hp.standardize:
                errors = standardize_errors(errors, self.error_mean.float(), self.error_std.float())
            score = errors.amin(dim=1)
        else:
            score = self._errors_against(features, pred)
            if hp.standardize:
                score = standardize_errors(score, self.error_mean.float(), self.error_std.float(), pred)
        return F.interpolate(score[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def segment(self, image: Tensor) -> MethodOutput:
        features, logits = self.forward_layer(image, self.hparams.feature_layer)
        with torch.autocast(device_type=image.device.type, enabled=False):
            score = self.fre_score(features, logits.float(), tuple(image.shape[-2:]))
            dilation = self.hparams.smoothing_dilation
            if dilation is None:
                return MethodOutput(logits, {"fre": score, **self.baseline_scores(logits)})
            smoothed = dilated_smoothing(score, dilation=dilation)
        return MethodOutput(logits, {"fre": smoothed, "fre_raw": score, **self.baseline_scores(logits)})

"""Evaluation callback: closed-set and anomaly metrics for validation and test, and the results file.

The callback only relies on the method contract (``lightning_modules/base.py``): every
``validation_step``/``test_step`` returns ``{"logits": [B, K, h, w], "scores": {name: [B, h, w]}}``,
the first score being the method's own and the rest baselines. Outputs at a lower resolution
than the label are resized bilinearly (``align_corners=False``) before they are scored, so
every method is evaluated on the label grid.

Metrics are torchmetrics ``Metric`` objects living on the module's device that reduce
themselves across processes in ``compute()``; the values are therefore logged with
``sync_dist=False``. What this module adds per batch (resizing, image/pixel counts, the
per-class false-positive histogram) stays on the device; the pooled histograms of every score and
protocol preset are updated together (``AnomalyMetrics.update_many``), which reads two integers per
histogram back to the host in one copy per batch (NaN scores, and whether the bin layout must
grow; a second copy in the batches where it grows).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torchmetrics import Metric

from callbacks.metrics import AnomalyMetrics, NegativeScoreHistogram, SegmentationMetrics, SplitCounts
from callbacks.metrics.anomaly import CI_KEYS, PER_IMAGE_FIELDS, check_num_bits
from callbacks.metrics.functional import BinLayout, false_positive_breakdown
from callbacks.metrics.functional.bootstrap import (
    BOOTSTRAP_LEVEL,
    check_bootstrap_samples,
    check_bootstrap_seed,
    image_id,
)
from callbacks.metrics.size_strata import DEFAULT_SIZE_BINS
from callbacks.operating_points import OPERATING_POINTS, OperatingPointEvaluation
from callbacks.protocol import EvaluationOptionError, ProtocolPreset, protocol_card, resolve_presets
from datamodules.io import atomic_write_bytes, atomic_write_json
from datamodules.labels import ANOMALY_INDEX, CLASS_NAMES, IGNORE_INDEX
from datamodules.streethazards import is_padding
from lightning_modules.scoring.test_time_augmentation import TestTimeAugmentation, TTAOptions

__all__ = [
    "AnomalyEvaluation",
    "false_positive_report",
    "load_image_summaries",
    "resize_to",
]

#: Metrics of the primary score that are also logged without the score name (``test/aupr``).
PRIMARY_KEYS: tuple[str, ...] = (
    "aupr",
    "auroc",
    "fpr95",
    "aupr_per_image",
    "auroc_per_image",
    "fpr95_per_image",
)
#: Metrics logged per score as ``<stage>/<score>/<key>``; every key goes into ``metrics.json``.
LOGGED_KEYS: tuple[str, ...] = (*PRIMARY_KEYS, "threshold95")
#: With the bootstrap, each interval ``<key>_ci`` is also logged as ``<key>_ci_low`` and ``<key>_ci_high``.
CI_SUFFIXES = ("_ci_low", "_ci_high")

_STAGE_PREFIX = {"validate": "val", "test": "test"}


# --------------------------------------------------------------------------------------- pure functions
def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinearly resize ``[B, C, h, w]`` or ``[B, h, w]`` to ``size = (H, W)`` (``align_corners=False``).

    Returns the input unchanged when it already has that size; otherwise a float32 tensor
    (half-precision outputs are upcast first so CPU and GPU results agree).
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if x.dim() == 3:
        return resize_to(x.unsqueeze(1), size).squeeze(1)
    if x.dim() != 4:
        raise ValueError(f"expected a [B, C, h, w] or [B, h, w] tensor, got shape {tuple(x.shape)}")
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)


@dataclass
class _StageState:
    """The metrics of one stage's epoch (created at its first batch)."""

    num_classes: int
    score_names: tuple[str, ...]
    segmentation: SegmentationMetrics
    counts: SplitCounts
    anomaly: dict[str, AnomalyMetrics]
    negatives: NegativeScoreHistogram | None = None
    #: What the method averaged over at test time (its protocol card line).
    test_time_augmentation: str = "none"
    #: Anomaly metrics are not accumulated this epoch (the previous epoch of the stage had no anomaly pixels).
    skip_anomaly: bool = False
    #: Per protocol preset: the preset, the class indices it makes void, and its own metrics per
    #: score (``None`` when the default metrics already hold its values).
    protocols: dict[str, tuple[ProtocolPreset, Tensor, dict[str, AnomalyMetrics] | None]] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return self.score_names[0]

    def release(self) -> None:
        """Free the metric states now instead of whenever Python's cycle collector runs.

        torchmetrics ``Metric`` objects sit in reference cycles (their wrapped ``update`` and
        ``compute`` refer back to them), so dropping the last reference does not free them: in
        a fit, each validation epoch's histograms (64 MiB per score) piled up, measured +550 MB
        per epoch on the demo until a full collection happened to run.
        """
        metrics: list[Metric] = [self.segmentation, self.counts, *self.anomaly.values()]
        for _, _, own in self.protocols.values():
            metrics.extend((own or {}).values())
        if self.negatives is not None:
            metrics.append(self.negatives)
        for metric in metrics:
            # The state and its default (the zeros ``reset`` copies) are each histogram-sized.
            for name in list(metric._defaults):
                setattr(metric, name, torch.empty(0))
                metric._defaults[name] = torch.empty(0)
            metric._cache = None
            metric._computed = None
            if hasattr(metric, "_image_summary"):  # the bootstrap's host copy of the per-image summaries
                metric._image_summary = None


# --------------------------------------------------------------------------------------- the callback
class AnomalyEvaluation(L.Callback):
    """Closed-set and anomaly metrics for validation and test; ``metrics.json`` after test.

    Logged at the end of each epoch (``<p>`` is ``val`` or ``test``):

    - ``<p>/miou``, ``<p>/pixel_accuracy`` (confusion matrix over the known classes; anomaly and
      ignore pixels excluded);
    - for every score ``s``: ``<p>/s/aupr``, ``auroc``, ``fpr95``, ``threshold95`` and the
      per-image variants (mean over images that contain anomalies, the reference protocol);
    - for the primary score, the same without the score name: ``<p>/aupr``, ...;
    - ``<p>/anomaly_fraction``;
    - on test with ``bootstrap_samples > 0``, the 95% bootstrap interval of each headline value:
      ``<p>/s/<key>_ci_low`` and ``<p>/s/<key>_ci_high`` for every key of
      :data:`~callbacks.metrics.anomaly.CI_KEYS` (pooled AUPR, AUROC, FPR95 and the per-image
      means), the same without the score name for the primary score, and ``<p>/miou_ci_low``,
      ``<p>/miou_ci_high``.

    **Intervals over test images** (``test`` only; validation keeps no per-image state): every
    ``AnomalyMetrics`` and the ``SegmentationMetrics`` of a test run keep per-image summaries
    (9 KiB per image and score, 1.3 KiB for the confusion matrix) and resample the test images
    ``bootstrap_samples`` times with replacement, seeded by ``bootstrap_seed``; ``metrics.json``
    gets ``<key>_ci`` = ``[low, high]`` next to every headline value and a ``bootstrap`` block, and
    the summaries are written to ``image_summaries_filename`` beside it (keyed by a hash of each
    image's name, for paired comparisons between methods in ``compare``). Images are identified
    by the batch's ``name`` entry, so 1 and 2 processes give the same intervals.

    Anomaly metrics are skipped in validation when the split holds no anomaly pixel
    (StreetHazards' validation split has none: the decision uses an exact, synchronised pixel
    count, so nothing warns), and from then on not even accumulated in that stage's later epochs
    (the pixel counts still are: should anomalies appear, a warning says so and the next epoch
    scores them again); on test they are always computed, and ``AnomalyMetrics`` warns if they
    are undefined. Non-finite values are not logged; in ``metrics.json`` they are ``null``.

    Under DDP a process whose shard of the split is empty (fewer images than processes) evaluates
    one placeholder batch (``datamodules.streethazards.is_padding``), which is not counted, so that
    it joins the collective ``compute()`` of the others.

    Per-class false positives: with ``per_class_false_positives``, the primary score of every
    negative (known-class) pixel is also histogrammed per ground-truth class and per predicted
    class (:class:`NegativeScoreHistogram`, ``false_positive_bits`` bits per class). At the end,
    the false positives at the primary score's 95%-TPR threshold (the split's own threshold, the
    operating point of FPR95) are split by class. The histogram is coarser than the metric's, so
    the breakdown is exact at the lower edge of the bin holding ``threshold95``; that edge is
    reported as ``threshold`` next to ``threshold95`` (equal when the threshold falls on a bin
    boundary), together with the false-positive total at it.

    Args:
        output_dir: Where ``metrics.json`` goes; ``None`` means ``trainer.log_dir``.
        per_class_false_positives: Record the per-class false-positive breakdown (above).
        false_positive_bits: ``log2`` of the bins per class of that histogram; its state is
            ``2 * K * 2**bits`` int64 (13.6 MB for K=13 at the default 16).
        metrics_filename: Name of the results file inside ``output_dir``.
        curve_points: Points kept of each PR/ROC curve in :attr:`curves`.
        protocols: protocol presets computed besides the default metrics (names of
            :data:`callbacks.protocol.PRESETS`, e.g. ``densehybrid``, ``mask2anomaly``, or mappings
            of :class:`~callbacks.protocol.ProtocolPreset` fields); ``metrics.json`` gets their
            AUPR, AUROC and FPR95 under ``protocols.<name>`` with the preset's card. A preset with
            void classes, or pooled over images with anomalies only, keeps its own histograms
            (68 MiB per score).
        protocol_scores: ``'primary'`` (the method's own score) or ``'all'`` scores under the presets.
        num_bits: ``log2`` of each pooled histogram's sub-bin budget (16..28; state
            ``2**(num_bits + 4)`` bytes per score and protocol, 64 MiB at the default 22). Every
            result carries its error bounds; fewer bits suit small test sets.
        test_time_augmentation: ``{scales: [...], flip: bool}``: ``test`` and ``predict`` average
            the method's logits and every score over these views of each image
            (:class:`~lightning_modules.scoring.test_time_augmentation.TestTimeAugmentation`;
            default: one view). Set on the module when a test or predict run starts, so it also
            applies to a checkpoint (whose own options win over the command line); recorded in
            ``scoring_options`` and the protocol card. Validation stays one view.
        operating_points: before the first test batch is scored, fix thresholds on the calibration
            split (validation images with pasted outliers, ``data.calibration``): 95% TPR and best
            pixel F1; then report at them on test the pixel TPR/FPR/precision/F1, SegmentMeIfYouCan's
            component metrics, the size strata and a failure gallery, plus the component metrics
            at an oracle threshold (:class:`~callbacks.operating_points.OperatingPointEvaluation`;
            ``metrics.json`` key ``operating_points``).
        oracle_thresholds: thresholds at evenly spaced calibration recalls evaluated besides the
            two operating points; the oracle is the best of them on test.
        min_prediction_size, min_anomaly_size: the component metrics' size filters in pixels at the
            evaluation resolution; ``None`` scales the benchmark's 500 and 100 (at 720x1280) by area.
        size_bins: size-bin edges as fractions of the image area, increasing (default 0.05%, 0.2%,
            0.8%, 3.2%: 461..29491 pixels at 720x1280).
        gallery_size: images with the largest false-positive area, and largest missed components,
            kept for the failure gallery (at ``operating_point``).
        operating_point: the operating point of the gallery: ``tpr95`` or ``best_f1``.
        bootstrap_samples: resamples of the test images for the 95% intervals (0: none, and no
            per-image state is kept).
        bootstrap_seed: seed of the resamples; the same seed resamples the same images in every
            method, which is what makes ``compare``'s paired differences paired.
        image_summaries_filename: name of the per-image summaries file (NumPy ``.npz``) written beside
            ``metrics.json`` when the bootstrap is on.
        exclude_scores: score names left out of the anomaly metrics (never the method's own,
            first, score). ``compare`` passes the scores another row already evaluated on the same
            network (e.g. the MSP/MaxLogit/entropy/energy baselines of the SML segmenter in the FRE
            and kNN runs, which score that network): the same numbers again cost a third of a test pass.

    After an epoch, :attr:`results` holds the values per stage (``"validate"``, ``"test"``),
    :attr:`curves` the PR/ROC curves and TensorBoard PR-curve counts per stage and score (global
    across processes), and :attr:`test_metrics`/:attr:`val_metrics` the ``AnomalyMetrics`` objects
    themselves (until the next epoch of that stage starts). Their ``curves()`` is a collective
    under DDP; callbacks that run on rank 0 only should read :attr:`curves` instead.

    Several dataloaders in one stage are pooled into one set of metrics. ``num_images`` counts
    what the loaders delivered: a distributed sampler that pads shards by repeating samples
    counts those twice (the StreetHazards datamodule uses one that does not).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        per_class_false_positives: bool = True,
        false_positive_bits: int = 16,
        metrics_filename: str = "metrics.json",
        curve_points: int = 1000,
        protocols: Sequence[str | dict[str, Any]] = (),
        protocol_scores: str = "primary",
        num_bits: int = 22,
        test_time_augmentation: TTAOptions | None = None,
        operating_points: bool = True,
        oracle_thresholds: int = 8,
        min_prediction_size: int | None = None,
        min_anomaly_size: int | None = None,
        size_bins: Sequence[float] = DEFAULT_SIZE_BINS,
        gallery_size: int = 4,
        operating_point: str = "tpr95",
        bootstrap_samples: int = 1000,
        bootstrap_seed: int = 0,
        image_summaries_filename: str = "image_summaries.npz",
        exclude_scores: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if isinstance(exclude_scores, str) or not all(isinstance(name, str) for name in exclude_scores):
            raise EvaluationOptionError(
                f"evaluation.exclude_scores must be a list of score names, got {exclude_scores!r}"
            )
        self.exclude_scores = frozenset(exclude_scores)
        try:
            self.test_time_augmentation = TestTimeAugmentation.from_options(test_time_augmentation)
        except ValueError as error:
            raise EvaluationOptionError(str(error)) from None
        try:
            self.num_bits = check_num_bits(num_bits)
        except ValueError as error:
            raise EvaluationOptionError(f"evaluation.{error}") from None
        try:
            self.bootstrap_samples = check_bootstrap_samples(bootstrap_samples)
            self.bootstrap_seed = check_bootstrap_seed(bootstrap_seed)
        except ValueError as error:
            raise EvaluationOptionError(f"evaluation.{error}") from None
        self.image_summaries_filename = image_summaries_filename
        self.image_summaries_path: Path | None = None
        # Unknown presets, rules or classes fail here, before any training; the class set is
        # checked again against the run's classes at the first batch.
        self.protocols = list(protocols)
        resolve_presets(self.protocols, CLASS_NAMES)
        if protocol_scores not in ("primary", "all"):
            raise ValueError(f"evaluation.protocol_scores must be 'primary' or 'all', got '{protocol_scores}'")
        self.protocol_scores = protocol_scores
        try:
            self.operating_points = (
                OperatingPointEvaluation(
                    oracle_thresholds,
                    min_prediction_size,
                    min_anomaly_size,
                    size_bins,
                    gallery_size,
                    operating_point,
                    num_bits=self.num_bits,
                )
                if operating_points
                else None
            )
        except ValueError as error:
            raise EvaluationOptionError(f"evaluation.{error}") from None
        self.output_dir = output_dir
        self.per_class_false_positives = per_class_false_positives
        self.false_positive_bits = int(false_positive_bits)
        self.metrics_filename = metrics_filename
        self.curve_points = int(curve_points)
        self.results: dict[str, dict[str, Any]] = {}
        self.curves: dict[str, dict[str, dict[str, Any]]] = {}
        self.metrics_path: Path | None = None
        self._states: dict[str, _StageState] = {}
        #: Per stage: its last epoch saw no anomaly pixel (see ``_finish``).
        self._no_anomalies: dict[str, bool] = {}

    # ------------------------------------------------------------------ accessors for other callbacks
    @property
    def test_metrics(self) -> dict[str, AnomalyMetrics]:
        """The test ``AnomalyMetrics`` per score name (primary first); empty before a test batch."""
        state = self._states.get("test")
        return dict(state.anomaly) if state is not None else {}

    @property
    def val_metrics(self) -> dict[str, AnomalyMetrics]:
        """The validation ``AnomalyMetrics`` per score name (primary first)."""
        state = self._states.get("validate")
        return dict(state.anomaly) if state is not None else {}

    def threshold95(self, stage: str) -> float | None:
        """The primary score's 95%-TPR threshold from ``stage``'s last epoch; ``None`` if not finite."""
        value = self.results.get(stage, {}).get("threshold95")
        return float(value) if value is not None and math.isfinite(value) else None

    # ------------------------------------------------------------------ lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            # The logged values are already reduced across processes (torchmetrics did it), so
            # Lightning's advice to pass sync_dist=True does not apply to them; silence it for
            # exactly these keys, leaving the warning intact for anything else logged.
            base = ("miou", "pixel_accuracy", "anomaly_fraction", *LOGGED_KEYS)
            intervals = tuple(key + suffix for key in (*CI_KEYS, "miou") for suffix in CI_SUFFIXES)
            keys = "|".join((*base, *intervals))
            warnings.filterwarnings(
                "ignore",
                message=rf"It is recommended to use `self\.log\('(val|test)/([^/']+/)?({keys})'",
                category=PossibleUserWarning,
            )

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.tta = self.test_time_augmentation

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.tta = self.test_time_augmentation

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.release("validate")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.release("test")
        # After the module's on_test_start (post-hoc statistics fitted) and before any test batch
        # is scored: the thresholds are fixed without the test split.
        if self.operating_points is not None:
            self.operating_points.calibrate(trainer, pl_module)

    def release(self, stage: str) -> None:
        """Free ``stage``'s metric objects ('validate' or 'test'); ``results`` and ``curves`` stay."""
        state = self._states.pop(stage, None)
        if state is not None:
            state.release()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._update("validate", pl_module, outputs, batch)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update("test", pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish("validate", trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish("test", trainer, pl_module)

    # ------------------------------------------------------------------ accumulation
    def _create(
        self, pl_module: L.LightningModule, num_classes: int, names: tuple[str, ...], stage: str = "test"
    ) -> _StageState:
        if not names:
            raise ValueError("AnomalyEvaluation: the method returned no anomaly scores")
        ignore_index = int(getattr(pl_module, "ignore_index", IGNORE_INDEX))
        anomaly_index = int(getattr(pl_module, "anomaly_index", ANOMALY_INDEX))
        device = pl_module.device
        bootstrap = self._bootstrap_options(stage)
        return _StageState(
            num_classes=num_classes,
            score_names=names,
            segmentation=SegmentationMetrics(
                num_classes, ignore_index=ignore_index, anomaly_index=anomaly_index, **bootstrap
            ).to(device),
            counts=SplitCounts(ignore_index, anomaly_index).to(device),
            anomaly={
                name: AnomalyMetrics(
                    anomaly_index=anomaly_index, ignore_index=ignore_index, num_bits=self.num_bits, **bootstrap
                ).to(device)
                for name in names
            },
            negatives=(
                NegativeScoreHistogram(num_classes, num_groupings=2, num_bits=self.false_positive_bits).to(device)
                if self.per_class_false_positives
                else None
            ),
            protocols=self._create_protocols(pl_module, num_classes, names, anomaly_index, ignore_index, bootstrap),
            test_time_augmentation=_tta_text(pl_module) if stage == "test" else "none",
        )

    def _bootstrap_options(self, stage: str) -> dict[str, int]:
        """The metrics' bootstrap arguments: intervals on test only (validation keeps no per-image state)."""
        samples = self.bootstrap_samples if stage == "test" else 0
        return {"bootstrap_samples": samples, "bootstrap_seed": self.bootstrap_seed}

    def _create_protocols(
        self,
        pl_module: L.LightningModule,
        num_classes: int,
        names: tuple[str, ...],
        anomaly_index: int,
        ignore_index: int,
        bootstrap: dict[str, int] | None = None,
    ) -> dict[str, tuple[ProtocolPreset, Tensor, dict[str, AnomalyMetrics] | None]]:
        class_names = _class_names(pl_module.trainer, pl_module, num_classes)
        scores = names if self.protocol_scores == "all" else names[:1]
        protocols = {}
        for preset in resolve_presets(self.protocols, class_names, CLASS_NAMES):
            void = [class_names.index(c) for c in preset.void_classes if c in class_names]
            void_index = torch.tensor(void, dtype=torch.long, device=pl_module.device)
            own = bool(void) or (preset.aggregation == "pooled" and preset.images == "with_anomalies")
            metrics = (
                {
                    score: AnomalyMetrics(
                        anomaly_index=anomaly_index,
                        ignore_index=ignore_index,
                        num_bits=self.num_bits,
                        **(bootstrap or {}),
                    ).to(pl_module.device)
                    for score in scores
                }
                if own
                else None
            )
            protocols[preset.name] = (preset, void_index, metrics)
        return protocols

    def _update(self, stage: str, pl_module: L.LightningModule, outputs: Any, batch: Any) -> None:
        logits, scores = _unpack_outputs(outputs)
        if self.exclude_scores:
            scores = self._without_excluded(scores)
        if not isinstance(batch, Mapping) or "mask" not in batch:
            raise ValueError("AnomalyEvaluation needs dict batches with a 'mask' [B, H, W] entry")
        mask: Tensor = batch["mask"]
        names = tuple(scores)
        state = self._states.get(stage)
        if state is None:
            state = self._states[stage] = self._create(pl_module, int(logits.shape[1]), names, stage)
            state.skip_anomaly = self._no_anomalies.get(stage, False)
        elif names != state.score_names:
            raise ValueError(f"the method's score names changed within an epoch: {state.score_names} then {names}")
        if is_padding(batch):
            return  # a process without samples evaluates a placeholder so that it joins the collectives

        size = mask.shape[-2:]
        ids = _image_ids(batch, mask.shape[0]) if state.segmentation.bootstrap_samples else None
        preds = resize_to(logits, size).argmax(dim=1)
        state.segmentation.update(preds, mask, image_ids=ids)
        state.counts.update(mask)
        if state.skip_anomaly:
            return
        resized = {name: resize_to(score, size).float() for name, score in scores.items()}
        # Every pooled histogram of the batch at once: one wait for the device in all (two when a
        # layout grows), instead of one per score and protocol.
        updates = [(state.anomaly[name], score, mask, ids) for name, score in resized.items()]
        for preset, void_index, own in state.protocols.values():
            if own is None:
                continue
            ignore = torch.full_like(mask, state.counts.ignore_index)
            protocol_mask = torch.where(torch.isin(mask, void_index), ignore, mask) if void_index.numel() else mask
            if preset.images == "with_anomalies":
                has_anomaly = (mask == state.counts.anomaly_index).flatten(1).any(dim=1).view(-1, 1, 1)
                protocol_mask = torch.where(has_anomaly, protocol_mask, ignore)
            updates.extend((metric, resized[name], protocol_mask, ids) for name, metric in own.items())
        AnomalyMetrics.update_many(updates)
        if stage == "test" and self.operating_points is not None:
            images = batch.get("image")
            if images is not None and tuple(images.shape[-2:]) != tuple(size):
                images = resize_to(images, size)
            self.operating_points.update(resized[state.primary], mask, images, batch.get("name"))
        if state.negatives is not None:
            anomaly_index = state.counts.anomaly_index
            known = (mask >= 0) & (mask < state.num_classes) & (mask != anomaly_index)
            state.negatives.update(resized[state.primary], torch.stack([mask, preds]), known)

    def _without_excluded(self, scores: dict[str, Tensor]) -> dict[str, Tensor]:
        primary = next(iter(scores), None)
        if primary in self.exclude_scores:
            raise EvaluationOptionError(
                f"evaluation.exclude_scores names the method's own score '{primary}'; only further scores "
                f"({', '.join(list(scores)[1:]) or 'none here'}) can be left out"
            )
        return {name: score for name, score in scores.items() if name not in self.exclude_scores}

    # ------------------------------------------------------------------ epoch end
    def _finish(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir is a collective under DDP: every rank asks, before any early return.
        output_dir = Path(self.output_dir or trainer.log_dir or ".") if stage == "test" else None
        state = self._states.get(stage)
        if state is None:
            return
        prefix = _STAGE_PREFIX[stage]

        def log(name: str, value: float | None, prog_bar: bool = False) -> None:
            if value is not None and math.isfinite(value):
                pl_module.log(name, float(value), on_step=False, on_epoch=True, sync_dist=False, prog_bar=prog_bar)

        def log_interval(name: str, interval: Sequence[float] | None) -> None:
            for suffix, value in zip(CI_SUFFIXES, interval or (), strict=False):
                log(name + suffix, value)

        # Every compute()/curves() below reduces across processes: all ranks run them in this order.
        segmentation = state.segmentation.compute()
        counts = state.counts.compute()
        log(f"{prefix}/miou", segmentation["miou"], prog_bar=True)
        log(f"{prefix}/pixel_accuracy", segmentation["pixel_accuracy"])
        log_interval(f"{prefix}/miou", segmentation.get("miou_ci"))

        anomaly: dict[str, dict[str, float]] = {}
        protocols: dict[str, dict[str, Any]] = {}
        curves: dict[str, dict[str, Any]] = {}
        if stage == "validate":
            # A split without anomaly pixels (StreetHazards' validation split) is not scored in the
            # next epochs of this stage: every score's histograms and per-image sorts are skipped.
            self._no_anomalies[stage] = counts["anomaly_pixels"] == 0
        if state.skip_anomaly:
            if counts["anomaly_pixels"] > 0:  # the split changed since the epoch that had none
                rank_zero_warn(
                    f"AnomalyEvaluation: the {prefix} split now has {counts['anomaly_pixels']} anomaly pixels (the "
                    "previous epoch had none, so this epoch did not accumulate anomaly metrics); they are computed "
                    "again from the next epoch"
                )
        elif counts["anomaly_pixels"] > 0 or stage == "test":
            for name, metric in state.anomaly.items():
                anomaly[name] = metric.compute()
                if 0 < counts["anomaly_pixels"] < counts["valid_pixels"]:
                    curves[name] = {
                        **metric.curves(self.curve_points),
                        "pr_curve_raw": metric.pr_curve_counts(),
                    }
                for key in LOGGED_KEYS:
                    log(f"{prefix}/{name}/{key}", anomaly[name].get(key))
                for key in CI_KEYS:
                    log_interval(f"{prefix}/{name}/{key}", anomaly[name].get(f"{key}_ci"))
            for key in PRIMARY_KEYS:
                log(f"{prefix}/{key}", anomaly[state.primary].get(key), prog_bar=key == "aupr")
            for key in CI_KEYS:
                log_interval(f"{prefix}/{key}", anomaly[state.primary].get(f"{key}_ci"))
            protocols = self._protocol_results(state, anomaly)
            for protocol, values in protocols.items():
                for key, value in values["scores"][state.primary].items():
                    if key.endswith("_ci"):
                        log_interval(f"{prefix}/{protocol}/{key}", value)
                    else:
                        log(f"{prefix}/{protocol}/{key}", value)
        elif stage == "validate":
            rank_zero_info(
                "AnomalyEvaluation: the validation split has no anomaly pixels; anomaly metrics skipped (and not "
                "accumulated in the next validation epochs)"
            )
        anomaly_fraction = counts["anomaly_pixels"] / counts["valid_pixels"] if counts["valid_pixels"] else math.nan
        log(f"{prefix}/anomaly_fraction", anomaly_fraction)

        class_names = _class_names(trainer, pl_module, state.num_classes)
        threshold = anomaly.get(state.primary, {}).get("threshold95", math.nan)
        breakdown = None
        if state.negatives is not None:
            histogram = state.negatives.compute()
            layout = state.negatives.layout(histogram)
            if math.isfinite(threshold) and layout is not None:
                breakdown = {
                    "score": state.primary,
                    **false_positive_report(histogram["counts"], layout, threshold, class_names),
                }

        self.results[stage] = {
            "method": str(getattr(pl_module, "method_name", type(pl_module).__name__)),
            "primary_score": state.primary,
            "scoring_options": pl_module.scoring_options() if hasattr(pl_module, "scoring_options") else {},
            "split": prefix,
            "num_images": counts["images"],
            "num_classes": state.num_classes,
            "class_names": class_names,
            "segmentation": {
                "miou": segmentation["miou"],
                **({"miou_ci": segmentation["miou_ci"]} if "miou_ci" in segmentation else {}),
                "pixel_accuracy": segmentation["pixel_accuracy"],
                "iou": dict(zip(class_names, segmentation["iou"], strict=True)),
                "confusion_matrix": segmentation.get("confusion_matrix"),
            },
            "num_valid_pixels": counts["valid_pixels"],
            "num_anomaly_pixels": counts["anomaly_pixels"],
            "anomaly_fraction": anomaly_fraction,
            "threshold95": threshold,
            "scores": anomaly,
            "false_positives_at_threshold95": breakdown,
            "protocol": _protocol_card_of(trainer, class_names, state.test_time_augmentation),
            "protocols": protocols,
        }
        if state.segmentation.bootstrap_samples:
            self.results[stage]["bootstrap"] = {
                "samples": self.bootstrap_samples,
                "seed": self.bootstrap_seed,
                "level": BOOTSTRAP_LEVEL,
                "num_images": counts["images"],
                "interval": "percentile, over test images resampled with replacement",
                "image_summaries": self.image_summaries_filename,
            }
        if stage == "test" and self.operating_points is not None:
            operating = self.operating_points.compute(trainer)
            self.results[stage]["operating_points"] = operating
            self.results[stage]["protocol"]["operating_points"] = _operating_points_card(operating)
            for name, row in (operating.get("operating_points") or {}).items():
                for key in ("tpr", "fpr", "precision", "f1"):
                    log(f"{prefix}/{name}/{key}", row["pixels"][key])
                for key in ("F1_mean", "sIoU_gt", "PPV"):
                    log(f"{prefix}/{name}/component_{key}", row["components"][key])
            strata = operating.get("size_strata")
            for b, bin_result in enumerate(strata["bins"] if strata else []):
                log(f"{prefix}/size_bin{b}/aupr", bin_result["aupr"])
                for t, name in enumerate(OPERATING_POINTS):
                    log(f"{prefix}/size_bin{b}/{name}/component_recall", bin_result["component_recall"][t])
        self.curves[stage] = curves
        if stage == "test" and output_dir is not None:
            self._write_metrics(trainer, output_dir, self.results[stage])
            if state.segmentation.bootstrap_samples:
                self._write_image_summaries(trainer, output_dir, state)

    def _protocol_results(self, state: _StageState, anomaly: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
        """Each preset's card and, per score, its AUPR, AUROC and FPR95 (a collective under DDP)."""
        results = {}
        names = state.score_names if self.protocol_scores == "all" else state.score_names[:1]
        applied_tta = state.test_time_augmentation
        for name, (preset, _, own) in state.protocols.items():
            scores = {}
            for score in own if own is not None else names:
                values = own[score].compute() if own is not None else anomaly[score]
                scores[score] = {key: values[source] for key, source in preset.result_keys.items()}
                for key, source in preset.result_keys.items():
                    if f"{source}_ci" in values:
                        scores[score][f"{key}_ci"] = values[f"{source}_ci"]
                images = "num_images_per_image" if preset.aggregation == "per_image" else None
                scores[score]["num_images"] = values[images] if images else None
                scores[score]["anomaly_fraction"] = values["anomaly_fraction"]
            results[name] = {"card": preset.card(applied_tta), "scores": scores}
        return results

    def _write_metrics(self, trainer: L.Trainer, output_dir: Path, results: dict[str, Any]) -> None:
        path = output_dir / self.metrics_filename
        self.metrics_path = path
        if not trainer.is_global_zero:
            return
        primary = results["scores"].get(results["primary_score"], {})
        document = {
            "method": results["method"],
            "primary_score": results["primary_score"],
            "split": results["split"],
            "num_images": results["num_images"],
            "num_classes": results["num_classes"],
            "class_names": results["class_names"],
            "scoring_options": results["scoring_options"],
            "checkpoint": trainer.ckpt_path,
            # Headline numbers: the primary score under both protocols, and closed-set mIoU.
            **{key: primary.get(key, math.nan) for key in PRIMARY_KEYS},
            **{f"{key}_ci": primary[f"{key}_ci"] for key in PRIMARY_KEYS if f"{key}_ci" in primary},
            "miou": results["segmentation"]["miou"],
            **({"miou_ci": results["segmentation"]["miou_ci"]} if "miou_ci" in results["segmentation"] else {}),
            **({"bootstrap": results["bootstrap"]} if "bootstrap" in results else {}),
            "segmentation": results["segmentation"],
            "anomaly_fraction": results["anomaly_fraction"],
            "num_valid_pixels": results["num_valid_pixels"],
            "num_anomaly_pixels": results["num_anomaly_pixels"],
            "scores": results["scores"],
            "false_positives_at_threshold95": results["false_positives_at_threshold95"],
            "protocol": results["protocol"],
            "protocols": results["protocols"],
            "operating_points": results.get("operating_points"),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(path, document)
        rank_zero_info(f"AnomalyEvaluation: wrote {path}")

    def _write_image_summaries(self, trainer: L.Trainer, output_dir: Path, state: _StageState) -> None:
        """The per-image summaries every interval was computed from (rank 0; every rank holds all images)."""
        path = output_dir / self.image_summaries_filename
        self.image_summaries_path = path
        if not trainer.is_global_zero:
            return
        arrays: dict[str, np.ndarray] = {}
        for name, metric in state.anomaly.items():
            summary = metric.image_summary()
            if summary is None:
                continue
            arrays[f"{name}.image_id"] = summary["image_id"]
            arrays[f"{name}.values"] = summary["values"]
            arrays[f"{name}.neg_sketch"] = np.stack(summary["neg_sketch"], axis=1)
            arrays[f"{name}.pos_sketch"] = np.stack(summary["pos_sketch"], axis=1)
        segmentation = state.segmentation.image_summary()
        if segmentation is not None:
            arrays["segmentation.image_id"] = segmentation["image_id"]
            arrays["segmentation.confusion"] = segmentation["confusion"]
        meta = {
            "format": 1,
            "scores": list(state.anomaly),
            "primary_score": state.primary,
            "per_image_fields": list(PER_IMAGE_FIELDS),
            "bootstrap_samples": self.bootstrap_samples,
            "bootstrap_seed": self.bootstrap_seed,
            "image_id": "first 8 bytes of BLAKE2b of the image name (63 bits); -1: no name",
        }
        arrays["meta"] = np.array(json.dumps(meta))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # uncompressed: the sketch keys hardly compress, and writing stays fast
        atomic_write_bytes(path, buffer.getvalue())
        rank_zero_info(f"AnomalyEvaluation: wrote {path}")


def load_image_summaries(path: str | Path) -> dict[str, Any]:
    """Read a file of :meth:`AnomalyEvaluation._write_image_summaries`: what ``compare`` pairs methods with.

    Returns ``meta`` (a dict), ``scores`` (per score: ``image_id``, ``values``, ``neg_sketch`` and
    ``pos_sketch`` as ``(keys, below, upto)``) and ``segmentation`` (``image_id``, ``confusion``)
    or ``None``.
    """
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    scores = {}
    for name in meta["scores"]:
        if f"{name}.image_id" not in arrays:
            continue
        neg, pos = arrays[f"{name}.neg_sketch"], arrays[f"{name}.pos_sketch"]
        scores[name] = {
            "image_id": arrays[f"{name}.image_id"],
            "values": arrays[f"{name}.values"],
            "neg_sketch": tuple(neg[:, field] for field in range(3)),
            "pos_sketch": tuple(pos[:, field] for field in range(3)),
        }
    segmentation = None
    if "segmentation.image_id" in arrays:
        segmentation = {"image_id": arrays["segmentation.image_id"], "confusion": arrays["segmentation.confusion"]}
    return {"meta": meta, "scores": scores, "segmentation": segmentation}


def _operating_points_card(operating: Mapping[str, Any]) -> str:
    """The protocol card's line on where the operating thresholds come from."""
    calibration = operating.get("calibration")
    if not operating.get("thresholds") or calibration is None:
        return "none (no calibration split)"
    split = calibration.get("split") or {}
    outliers = split.get("outliers", {})
    return (
        "thresholds fixed before the test split on the calibration split: the "
        f"{split.get('images', 'validation split')} with {outliers.get('source', '?')} outliers pasted "
        f"(probability {outliers.get('probability', '?')}, seed {split.get('seed', '?')}); 95% TPR and best pixel "
        "F1 there; the oracle row is chosen on the test split"
    )


def _tta_text(pl_module: L.LightningModule) -> str:
    tta = getattr(pl_module, "tta", None)
    return tta.describe() if tta is not None and hasattr(tta, "describe") else "none"


def _protocol_card_of(trainer: L.Trainer, class_names: Sequence[str], tta: str = "none") -> dict[str, Any]:
    """The run's protocol card (:func:`callbacks.protocol.protocol_card`) from its datamodule's settings."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "test_image_size"):
        size = datamodule.test_image_size
    else:
        size = "the test dataloader's label grid (not a StreetHazards datamodule)"
    return protocol_card(
        class_names,
        ignore_unlabeled=getattr(datamodule, "ignore_unlabeled", None),
        test_image_size=size,
        test_time_augmentation=tta,
    )


def false_positive_report(
    counts: Tensor, layout: BinLayout, threshold: float, class_names: Sequence[str]
) -> dict[str, Any]:
    """Per-class split of the false positives at ``threshold`` from a :class:`NegativeScoreHistogram`.

    ``counts`` ``[2, K, nbins]`` (groupings: ground-truth class, predicted class) in ``layout``.
    Pixels count as flagged when ``score >= threshold_used``, the lower edge of the histogram bin
    holding ``threshold`` (see :meth:`NegativeScoreHistogram.threshold_bin`).
    """
    index, edge = NegativeScoreHistogram.threshold_bin(threshold, layout)
    report: dict[str, Any] = {"threshold95": float(threshold), "threshold": edge}
    for grouping, key in enumerate(("by_ground_truth_class", "by_predicted_class")):
        parts = false_positive_breakdown(counts[grouping], index)
        report["false_positives"] = float(parts["false_positives"].sum())
        report[key] = {
            name: {
                "fraction": float(parts["fraction"][k]),
                "false_positives": int(parts["false_positives"][k]),
                "negatives": int(parts["negatives"][k]),
                "false_positive_rate": float(parts["false_positive_rate"][k]),
            }
            for k, name in enumerate(class_names)
        }
    return report


# --------------------------------------------------------------------------------------- helpers
def _unpack_outputs(outputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
    if not isinstance(outputs, Mapping) or "logits" not in outputs or "scores" not in outputs:
        raise ValueError(
            "AnomalyEvaluation expects validation_step/test_step to return "
            "{'logits': [B, K, h, w], 'scores': {name: [B, h, w]}}, got "
            f"{type(outputs).__name__}{' with keys ' + str(list(outputs)) if isinstance(outputs, Mapping) else ''}"
        )
    logits, scores = outputs["logits"], outputs["scores"]
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, K, h, w], got shape {tuple(logits.shape)}")
    if not isinstance(scores, Mapping):
        raise ValueError(f"scores must be a dict of name -> [B, h, w] tensors, got {type(scores).__name__}")
    return logits, dict(scores)


def _image_ids(batch: Mapping[str, Any], size: int) -> list[int] | None:
    """Ids of the batch's images from their ``name`` entry (``None`` without names)."""
    names = batch.get("name")
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if len(names) != size:
        return None
    return [image_id(str(name)) for name in names]


def _class_names(trainer: L.Trainer, pl_module: L.LightningModule, num_classes: int) -> list[str]:
    """The datamodule's (or module's) class names when they fit the class count, else CLASS_NAMES[:K]."""
    for owner in (getattr(trainer, "datamodule", None), pl_module):
        names = getattr(owner, "class_names", None)
        if names is not None and len(names) == num_classes:
            return [str(name) for name in names]
    if num_classes <= len(CLASS_NAMES):
        return list(CLASS_NAMES[:num_classes])
    return [f"class_{k}" for k in range(num_classes)]

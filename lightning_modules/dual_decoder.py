"""Dual-decoder open-world segmentation, after Sodano et al., "Open-World Semantic Segmentation
Including Class Similarity" (CVPR 2024; reference code: github.com/PRBonn/ContMAV).

One encoder feeds two decoders:

* the **semantic decoder** gives closed-set logits ``f`` (``K`` per pixel). Besides weighted
  cross-entropy it is trained with a *feature loss* that pulls the logit vector of a pixel of
  class ``k`` towards that class's mean logit vector ``mu_k`` (its "mean activation vector"),
  standardized by the class's per-dimension standard deviation ``sigma_k``. ``mu``/``sigma``
  are statistics of the true-positive pixels of the previous epoch.
* the **contrastive decoder** gives an embedding ``e`` (``D`` per pixel). The objectosphere loss
  pushes ``||e||^2`` above ``xi`` for known pixels and towards 0 for (pasted) anomaly pixels; a
  prototype-contrastive loss makes the per-class mean direction of ``e`` match its own class
  prototype and not the others.

Anomaly score (higher = more anomalous), with ``z_kd = (f_d - mu_kd) / sigma_kd``::

    s_sem = 1 - max_k exp(-1/2 sum_d z_kd^2)      # no class Gaussian explains the logits
    s_con = max(0, 1 - ||e||^2 / xi)               # embedding inside the objectosphere
    score = (s_sem + s_con) / 2

Conventions shared by every function here:

* ``target`` is a long tensor ``[B, H, W]``; values ``0..K-1`` are known classes, anything else
  (the anomaly index 13, the ignore index 255) is not a known class.
* Statistics are pure streaming functions: ``accumulate_*`` return updated float64
  accumulators (their inputs are not modified), so a module can keep them as buffers, sum them
  across processes and ``finalize``/``update`` at the end of an epoch.
* A class whose statistics do not exist yet is marked by ``class_valid=False`` (semantic
  statistics) or by an all-zero prototype row (contrastive prototypes). Such classes are left
  out of the losses and of the score, so epoch 0 needs no special case: its feature and
  contrastive losses are exactly zero (with a graph, so ``backward`` and DDP still work).

Loss weights of the reference training script, for orientation (``train.py``):
``0.9 * CE + 0.1 * feature + 0.5 * objectosphere + 0.5 * contrastive``; objectosphere with
``xi = 1`` and the unknown term weighted 10x; contrastive temperature 0.1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3PlusDecoder
from torch import Tensor, nn

from callbacks.checkpointing import load_network_weights
from datamodules.labels import ANOMALY_INDEX, IGNORE_INDEX, NUM_CLASSES
from lightning_modules.base import AnomalySegmentationModule, MethodOutput
from lightning_modules.baselines import baseline_scores
from lightning_modules.segmenter import build_encoder
from lightning_modules.sml import SMLStatistics

__all__ = [
    "DualDecoderNet",
    "semantic_feature_loss",
    "objectosphere_loss",
    "contrastive_prototype_loss",
    "accumulate_semantic_stats",
    "finalize_semantic_stats",
    "accumulate_embedding_sums",
    "update_prototypes",
    "semantic_anomaly_score",
    "contrastive_anomaly_score",
    "dual_decoder_anomaly_score",
    "DualDecoderSegmenter",
    "segmenter_to_dual_decoder_state",
]


# --------------------------------------------------------------------------------------- network
class DualDecoderNet(nn.Module):
    """Shared encoder, a semantic and a contrastive DeepLabV3+ decoder.

    ``forward(x [B, 3, H, W]) -> (logits [B, K, H, W], embedding [B, D, H, W])``, both bilinearly
    upsampled to the input resolution. The encoder with DeepLabV3+ needs height and width
    divisible by its output stride (16 by default); other sizes are replicate-padded at the
    bottom/right to the next multiple and the outputs cropped back, so any size works.

    Note: the ASPP image-pooling branch has a BatchNorm on a 1x1 map, so training mode needs a
    batch of at least 2 (as for smp's own DeepLabV3+).

    Args:
        num_classes: ``K``, closed-set classes of the semantic head.
        embedding_dim: ``D`` of the contrastive head; ``None`` means ``D = K`` as in the paper.
        encoder_name: any segmentation-models-pytorch encoder name.
        encoder_weights: ``None`` (random) or the encoder's pretrained weights, e.g. "imagenet".
        encoder_output_stride: 16 (default) or 8 (dilated, more memory).
        decoder_channels, decoder_atrous_rates, decoder_aspp_separable, decoder_aspp_dropout:
            passed to each ``DeepLabV3PlusDecoder`` (smp's DeepLabV3+ defaults).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        embedding_dim: int | None = None,
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        encoder_output_stride: int = 16,
        decoder_channels: int = 256,
        decoder_atrous_rates: Sequence[int] = (12, 24, 36),
        decoder_aspp_separable: bool = True,
        decoder_aspp_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if encoder_output_stride not in (8, 16):
            raise ValueError(f"encoder_output_stride must be 8 or 16, got {encoder_output_stride}")
        self.num_classes = num_classes
        self.embedding_dim = num_classes if embedding_dim is None else embedding_dim
        self.encoder = build_encoder(encoder_name, encoder_weights, output_stride=encoder_output_stride)

        def make_decoder() -> DeepLabV3PlusDecoder:
            return DeepLabV3PlusDecoder(
                encoder_channels=self.encoder.out_channels,
                encoder_depth=5,
                out_channels=decoder_channels,
                atrous_rates=tuple(decoder_atrous_rates),
                output_stride=encoder_output_stride,
                aspp_separable=decoder_aspp_separable,
                aspp_dropout=decoder_aspp_dropout,
            )

        self.semantic_decoder = make_decoder()
        self.contrastive_decoder = make_decoder()
        self.semantic_head = nn.Conv2d(decoder_channels, num_classes, kernel_size=1)
        self.contrastive_head = nn.Conv2d(decoder_channels, self.embedding_dim, kernel_size=1)

    @property
    def size_divisor(self) -> int:
        """Input height and width must be multiples of this (``forward`` pads to it)."""
        return int(self.encoder.output_stride)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 4:
            raise ValueError(f"DualDecoderNet expects images [B, C, H, W], got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % self.size_divisor, (-width) % self.size_divisor
        if pad_h or pad_w:
            # Replicate rather than zero padding: no artificial edge next to the border pixels.
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        features = self.encoder(x)
        logits = self.semantic_head(self.semantic_decoder(features))
        embedding = self.contrastive_head(self.contrastive_decoder(features))
        size = x.shape[-2:]
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        embedding = F.interpolate(embedding, size=size, mode="bilinear", align_corners=False)
        return logits[..., :height, :width], embedding[..., :height, :width]


def segmenter_to_dual_decoder_state(
    segmenter_state: Mapping[str, Tensor], contrastive_head: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Map a DeepLabV3+ state dict (smp keys under ``model.``) onto :class:`DualDecoderNet` keys.

    The segmenter's decoder initializes both decoders: the semantic one continues what it was
    trained for, and the contrastive one starts from features that already separate the
    classes. ``contrastive_head`` (the target's own, usually random) is kept.
    """
    out: dict[str, Tensor] = {}
    for key, value in segmenter_state.items():
        if key.startswith("model.encoder."):
            out["encoder." + key[len("model.encoder.") :]] = value
        elif key.startswith("model.decoder."):
            rest = key[len("model.decoder.") :]
            out["semantic_decoder." + rest] = value
            out["contrastive_decoder." + rest] = value  # load_state_dict copies: sharing is fine
        elif key.startswith("model.segmentation_head.0."):
            out["semantic_head." + key[len("model.segmentation_head.0.") :]] = value
    out.update({"contrastive_head." + key: value for key, value in contrastive_head.items()})
    return out


# --------------------------------------------------------------------------------------- helpers
def _upcast(x: Tensor) -> Tensor:
    """float32 for half/bfloat16 (and float32) input; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def _known(target: Tensor, num_classes: int) -> Tensor:
    return (target >= 0) & (target < num_classes)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 (still attached to the graph) where ``mask`` is empty.

    ``torch.where`` rather than a multiplication so that non-finite values outside the mask
    cannot leak in; no boolean indexing, so no host-device synchronisation.
    """
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1).to(values.dtype)


# ----------------------------------------------------------------------------------------- losses
def semantic_feature_loss(
    logits: Tensor,
    target: Tensor,
    class_means: Tensor,
    class_stds: Tensor,
    class_valid: Tensor | None = None,
    true_positives_only: bool = True,
) -> Tensor:
    """Standardized squared distance of semantic features to their class mean.

    With ``f_p = logits[b, :, i, j]`` (the semantic feature is the logit vector, ``D = K``) and
    ``P`` the selected pixels (known class ``k = target_p``, a true positive ``argmax f_p = k``
    unless ``true_positives_only=False``, and ``class_valid[k]``)::

        L = 1/|P| sum_{p in P} 1/K sum_d ((f_pd - mu_kd) / sigma_kd)^2

    The mean over the ``K`` dimensions (not the sum, matching the reference code) keeps the loss
    near 1 for pixels drawn from the class's own distribution, whatever ``K``. ``L = 0`` (with a
    graph) when ``P`` is empty.

    Args:
        logits: ``[B, K, H, W]``, any float dtype (computed in float32, float64 kept).
        target: ``[B, H, W]`` long; values outside ``0..K-1`` are left out.
        class_means, class_stds: ``[K, K]``, previous epoch's statistics (treated as constants;
            stds must be positive, as ``finalize_semantic_stats`` guarantees).
        class_valid: ``[K]`` bool, classes that have statistics; ``None`` means all.
        true_positives_only: select only correctly classified pixels (our default, the pixels the
            statistics come from); ``False`` uses every pixel of the class, as the reference code.
    """
    num_classes = logits.shape[1]
    if class_means.shape != (num_classes, num_classes) or class_stds.shape != class_means.shape:
        raise ValueError(
            f"class_means/class_stds must be [{num_classes}, {num_classes}] for {num_classes} logits, "
            f"got {tuple(class_means.shape)} and {tuple(class_stds.shape)}"
        )
    features = _upcast(logits)
    known = _known(target, num_classes)
    cls = torch.where(known, target, torch.zeros_like(target))
    select = known
    if true_positives_only:
        select = select & (features.argmax(dim=1) == target)
    if class_valid is not None:
        select = select & class_valid.to(device=target.device, dtype=torch.bool)[cls]
    means = class_means.detach().to(features)[cls]  # [B, H, W, K]
    stds = class_stds.detach().to(features)[cls]
    z = (features.movedim(1, -1) - means) / stds
    return _masked_mean(z.square().mean(dim=-1), select)


def objectosphere_loss(
    embedding: Tensor,
    target: Tensor,
    xi: float = 1.0,
    unknown_weight: float = 10.0,
    anomaly_index: int = ANOMALY_INDEX,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Objectosphere loss on squared embedding norms.

    With ``n_p = ||e_p||^2``, ``Kn`` the known pixels (neither anomaly nor ignore) and ``U`` the
    anomaly pixels, each term averaged over its own pixels (as in the reference code, so that the
    few pasted-anomaly pixels are not drowned by the known ones)::

        L = mean_{p in Kn} max(xi - n_p, 0) + unknown_weight * mean_{p in U} n_p

    An empty set contributes 0. ``unknown_weight=10`` is the reference code's factor.

    Args:
        embedding: ``[B, D, H, W]``; computed in float32 (float64 kept).
        target: ``[B, H, W]`` long with ``anomaly_index`` for anomalies, ``ignore_index`` ignored.
        xi: squared-norm radius that known embeddings must exceed.
    """
    sq_norm = _upcast(embedding).square().sum(dim=1)
    unknown = target == anomaly_index
    known = ~unknown & (target != ignore_index)
    known_term = _masked_mean(F.relu(xi - sq_norm), known)
    unknown_term = _masked_mean(sq_norm, unknown)
    return known_term + unknown_weight * unknown_term


def contrastive_prototype_loss(
    embedding: Tensor,
    target: Tensor,
    prototypes: Tensor,
    temperature: float = 0.1,
    per_image: bool = False,
) -> Tensor:
    """Cross-entropy of class-mean embeddings against class prototypes.

    Pixel embeddings are L2-normalized, ``u_p = e_p / ||e_p||``. For every known class ``c``
    present in the batch (or in each image, ``per_image=True``) with pixels ``P_c``::

        q_c = 1/|P_c| sum_{p in P_c} u_p                      # mean unit embedding
        s_cj = q_c . (pi_j / ||pi_j||) / temperature             # = mean cosine(e_p, pi_j) / tau
        L = mean_c [ -log softmax_j(s_cj)[c] ]

    ``q_c`` is deliberately not renormalized (as in the reference code): its dot product with a
    unit prototype is the mean pixel cosine similarity, so the loss also rewards classes whose
    pixels point the same way. Prototypes that are all zero are not initialized yet: they are
    left out of the softmax, and their classes are not queried. ``L = 0`` (with a graph) when no
    class qualifies.

    Args:
        embedding: ``[B, D, H, W]``; computed in float32 (float64 kept), also under autocast.
        target: ``[B, H, W]`` long; values outside ``0..K-1`` are left out.
        prototypes: ``[K, D]`` (constants, e.g. from ``update_prototypes``).
        temperature: ``tau``; 0.1 in the reference code.
        per_image: one query per (image, class) instead of per class over the batch; the
            reference code averages per image.
    """
    batch, dim = embedding.shape[:2]
    num_classes = prototypes.shape[0]
    if prototypes.shape[1] != dim:
        raise ValueError(f"prototypes must be [K, {dim}] for a {dim}-dim embedding, got {tuple(prototypes.shape)}")
    units = F.normalize(_upcast(embedding), dim=1).movedim(1, -1).reshape(-1, dim)
    # Rows of the class table: (image if per_image) x (K classes + one row collecting the pixels
    # of no known class, dropped below). index_add does all classes in one pass over the pixels,
    # without boolean indexing (no host-device synchronisation).
    slots = num_classes + 1
    group = torch.where(_known(target, num_classes), target, torch.full_like(target, num_classes))
    if per_image:
        group = group + torch.arange(batch, device=target.device).view(batch, 1, 1) * slots
    tables = batch if per_image else 1
    sums = units.new_zeros(tables * slots, dim).index_add_(0, group.reshape(-1), units)
    counts = torch.bincount(group.reshape(-1), minlength=tables * slots).to(units.dtype)
    # Drop the collector rows by reshaping (a boolean mask would synchronise with the host).
    sums = sums.view(tables, slots, dim)[:, :num_classes].reshape(-1, dim)
    counts = counts.view(tables, slots)[:, :num_classes].reshape(-1)
    queries = sums / counts.clamp_min(1).unsqueeze(1)
    query_class = torch.arange(num_classes, device=units.device).repeat(tables)

    protos = prototypes.detach().to(units)
    initialized = protos.ne(0).any(dim=1)
    protos = F.normalize(protos, dim=1)
    # Elementwise product instead of a matmul: autocast would run a matmul in bf16.
    sim = (queries.unsqueeze(1) * protos.unsqueeze(0)).sum(dim=-1) / temperature  # [G, K]
    # A finite floor rather than -inf keeps rows with no initialized prototype NaN-free.
    sim = sim.masked_fill(~initialized, torch.finfo(sim.dtype).min)
    valid = (counts > 0) & initialized[query_class]
    per_query = F.cross_entropy(sim, query_class, reduction="none")
    return _masked_mean(per_query, valid)


# ------------------------------------------------------------------------------ epoch statistics
@torch.no_grad()
def accumulate_semantic_stats(
    logits: Tensor, target: Tensor, sums: Tensor, sq_sums: Tensor, counts: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Add one batch's true-positive logit vectors to per-class float64 accumulators.

    For class ``k`` and its true-positive pixels ``TP_k = {p : target_p = k, argmax f_p = k}``:
    ``sums[k] += sum f_p``, ``sq_sums[k] += sum f_p^2`` (elementwise), ``counts[k] += |TP_k|``.

    Args:
        logits: ``[B, K, H, W]`` (detached here).
        target: ``[B, H, W]`` long; values outside ``0..K-1`` are left out.
        sums, sq_sums: ``[K, K]`` float64; counts: ``[K]`` (float64 recommended, any dtype kept).

    Returns:
        New ``(sums, sq_sums, counts)``; the inputs are not modified.
    """
    num_classes = logits.shape[1]
    flat = logits.detach().movedim(1, -1).reshape(-1, num_classes)
    labels = target.reshape(-1)
    tp = _known(labels, num_classes) & (flat.argmax(dim=1) == labels)
    # Non-true-positive pixels go to an extra row K that is dropped: no boolean indexing, so no
    # host-device synchronisation.
    index = torch.where(tp, labels, torch.full_like(labels, num_classes))
    values = flat.to(torch.float64)
    new_sums = values.new_zeros(num_classes + 1, num_classes).index_add_(0, index, values)
    new_sq = values.new_zeros(num_classes + 1, num_classes).index_add_(0, index, values.square())
    new_counts = torch.bincount(index, minlength=num_classes + 1)
    return (
        sums + new_sums[:num_classes].to(sums.dtype),
        sq_sums + new_sq[:num_classes].to(sq_sums.dtype),
        counts + new_counts[:num_classes].to(counts.dtype),
    )


@torch.no_grad()
def finalize_semantic_stats(
    sums: Tensor,
    sq_sums: Tensor,
    counts: Tensor,
    prev_means: Tensor,
    prev_stds: Tensor,
    eps: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """Per-class mean and standard deviation of the accumulated logit vectors.

    ``mu_k = sums_k / n_k`` and ``sigma_k = max(sqrt(sq_sums_k / n_k - mu_k^2), eps)``: the
    population (biased) standard deviation per dimension, as in the reference code, floored at
    ``eps`` so that standardizing never divides by zero. Computed in float64. A class with
    ``n_k = 0`` keeps ``prev_means[k]``/``prev_stds[k]``; the classes with statistics are
    ``class_valid_prev | (counts > 0)``.

    Returns:
        ``(means, stds)``, ``[K, K]``, in the dtypes of ``prev_means``/``prev_stds``.
    """
    n = counts.to(torch.float64).unsqueeze(1)
    seen = n > 0
    mean = sums.to(torch.float64) / n.clamp_min(1)
    var = (sq_sums.to(torch.float64) / n.clamp_min(1) - mean.square()).clamp_min(0)
    std = var.sqrt().clamp_min(eps)
    means = torch.where(seen, mean, prev_means.to(torch.float64))
    stds = torch.where(seen, std, prev_stds.to(torch.float64))
    return means.to(prev_means.dtype), stds.to(prev_stds.dtype)


@torch.no_grad()
def accumulate_embedding_sums(
    embedding: Tensor, target: Tensor, sums: Tensor, counts: Tensor, normalize: bool = True
) -> tuple[Tensor, Tensor]:
    """Add one batch's embeddings of every known pixel to per-class float64 sums.

    ``sums[k] += sum_{p : target_p = k} u_p`` with ``u_p = e_p / ||e_p||`` (``normalize=True``,
    the quantity ``contrastive_prototype_loss`` compares) or ``u_p = e_p``; ``counts[k] += |.|``.
    All ground-truth pixels of a class count, not only true positives: the contrastive decoder
    is not a classifier.

    Args:
        embedding: ``[B, D, H, W]`` (detached here); target: ``[B, H, W]`` long.
        sums: ``[K, D]`` float64; counts: ``[K]``.

    Returns:
        New ``(sums, counts)``; the inputs are not modified.
    """
    num_classes, dim = sums.shape
    flat = embedding.detach().movedim(1, -1).reshape(-1, dim).to(torch.float64)
    if normalize:
        flat = F.normalize(flat, dim=1)
    labels = target.reshape(-1)
    index = torch.where(_known(labels, num_classes), labels, torch.full_like(labels, num_classes))
    new_sums = flat.new_zeros(num_classes + 1, dim).index_add_(0, index, flat)
    new_counts = torch.bincount(index, minlength=num_classes + 1)
    return sums + new_sums[:num_classes].to(sums.dtype), counts + new_counts[:num_classes].to(counts.dtype)


@torch.no_grad()
def update_prototypes(prev: Tensor, sums: Tensor, counts: Tensor, momentum: float = 0.9) -> Tensor:
    """Exponential moving average of the per-class mean embedding, once per epoch.

    With ``m_k = sums_k / counts_k``::

        pi_k <- momentum * pi_k + (1 - momentum) * m_k    if counts_k > 0 and pi_k != 0
        pi_k <- m_k                                       if counts_k > 0 and pi_k == 0 (first epoch)
        pi_k <- pi_k                                      if counts_k == 0

    An all-zero row means "not initialized" (start prototypes as zeros), so a class's first epoch
    with pixels sets its prototype to that epoch's mean instead of shrinking it towards zero.
    ``momentum`` is the weight of the old prototype (0 = no memory). Computed in float64.

    Returns:
        ``[K, D]`` in the dtype of ``prev``.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    old = prev.to(torch.float64)
    n = counts.to(torch.float64).unsqueeze(1)
    mean = sums.to(torch.float64) / n.clamp_min(1)
    fresh = ~old.ne(0).any(dim=1, keepdim=True)
    blended = torch.where(fresh, mean, momentum * old + (1.0 - momentum) * mean)
    return torch.where(n > 0, blended, old).to(prev.dtype)


# ------------------------------------------------------------------------------------------ score
def semantic_anomaly_score(
    logits: Tensor, class_means: Tensor, class_stds: Tensor, class_valid: Tensor | None = None
) -> Tensor:
    """``s_sem = 1 - max_k exp(-1/2 sum_d ((f_d - mu_kd) / sigma_kd)^2)``, shape ``[B, H, W]``.

    Computed in float32 (bf16/fp16 upcast; float64 kept). Classes with ``class_valid=False``
    are left out of the max (no valid class at all gives 1).
    """
    features = _upcast(logits)
    num_classes = features.shape[1]
    if class_means.shape != (num_classes, num_classes) or class_stds.shape != class_means.shape:
        raise ValueError(
            f"class_means/class_stds must be [{num_classes}, {num_classes}] for {num_classes} logits, "
            f"got {tuple(class_means.shape)} and {tuple(class_stds.shape)}"
        )
    means = class_means.to(features).view(num_classes, num_classes, 1, 1)
    inv_stds = class_stds.to(features).reciprocal().view(num_classes, num_classes, 1, 1)
    valid = None if class_valid is None else class_valid.to(device=features.device, dtype=torch.bool)
    # max_k exp(-d_k/2) = exp(-min_k d_k/2). A loop over the K classes keeps memory at one
    # [B, K, H, W] temporary; broadcasting all classes at once costs K times that, and expanding
    # the square into matmuls cancels catastrophically in float32 when sigma is small.
    min_dist = torch.full_like(features[:, 0], float("inf"))
    for k in range(num_classes):
        dist = ((features - means[k]) * inv_stds[k]).square().sum(dim=1)
        if valid is not None:
            dist = torch.where(valid[k], dist, torch.full_like(dist, float("inf")))
        min_dist = torch.minimum(min_dist, dist)
    return 1.0 - torch.exp(-0.5 * min_dist)


def contrastive_anomaly_score(embedding: Tensor, xi: float = 1.0) -> Tensor:
    """``s_con = max(0, 1 - ||e||^2 / xi)``, shape ``[B, H, W]``, in float32 (float64 kept).

    1 at the origin (where the objectosphere loss puts anomalies), 0 on or outside the sphere
    ``||e||^2 = xi`` that known pixels are pushed beyond.
    """
    return (1.0 - _upcast(embedding).square().sum(dim=1) / xi).clamp_min(0.0)


def dual_decoder_anomaly_score(
    logits: Tensor,
    embedding: Tensor,
    class_means: Tensor,
    class_stds: Tensor,
    xi: float = 1.0,
    class_valid: Tensor | None = None,
) -> Tensor:
    """``(s_sem + s_con) / 2``, shape ``[B, H, W]``, higher = more anomalous; see the two parts."""
    s_sem = semantic_anomaly_score(logits, class_means, class_stds, class_valid)
    s_con = contrastive_anomaly_score(embedding, xi)
    return 0.5 * (s_sem + s_con)


# --------------------------------------------------------------------------------------- the method
class DualDecoderSegmenter(AnomalySegmentationModule):
    """Open-world segmenter with a semantic and a contrastive decoder, trained on pasted outliers.

    Training batches need ``mask`` (13 where outliers were pasted) and ``mask_clean`` (the label
    before pasting): use the datamodule's ``injection`` option. Per-class logit means/stds (from
    true-positive pixels) and embedding prototypes are accumulated in float64 buffers during each
    training epoch, summed across processes and turned into the next epoch's statistics at its
    end; they are checkpointed, so a resumed run continues with the same statistics.

    With ``sml_on_semantic`` the SML statistics of the semantic logits are fitted after training
    too, and the evaluation reports SML on this model beside its own score.

    Args (besides the training options of ``AnomalySegmentationModule``):
        encoder_name, encoder_weights: the shared smp encoder (weights: 'imagenet', a local file or None).
        embedding_dim: ``D`` of the contrastive decoder (default ``K``).
        xi: objectosphere radius (squared norm) of known pixels.
        temperature: softmax temperature of the prototype-contrastive loss.
        prototype_momentum: EMA weight of the previous prototypes at each epoch end.
        ce_weight, feature_weight, objectosphere_weight, contrastive_weight: loss weights.
        unknown_weight: weight of the anomaly-pixel term inside the objectosphere loss.
        std_floor: lower bound of the per-class logit std used to standardize the feature loss and
            the score. A class seen on a handful of true-positive pixels has a near-zero std, and
            dividing by it makes the feature loss explode (measured on the demo: mIoU 0.22 instead
            of 0.47 with a floor of 1e-4).
        min_statistics_pixels: a class's epoch statistics are only updated from at least this many
            true-positive pixels; otherwise the previous ones are kept.
        sml_on_semantic: also score with SML on the semantic logits (fitted after training).
        init_checkpoint: start training from the network of a checkpoint: a dual-decoder one
            (weights copied as they are), or a DeepLabV3+ segmenter of SML/FRE (its encoder, its
            decoder into both decoders, its classifier into the semantic head; the contrastive head
            starts random). Epoch statistics and optimizer state are not taken over.
    """

    method_name = "dual_decoder"

    #: Buffers that sum the current epoch's statistics, per process until the epoch ends.
    EPOCH_ACCUMULATORS = ("sem_sums", "sem_sq_sums", "sem_counts", "emb_sums", "emb_counts")

    def __init__(
        self,
        encoder_name: str = "resnet50",
        encoder_weights: str | None = "imagenet",
        embedding_dim: int | None = None,
        xi: float = 1.0,
        temperature: float = 0.1,
        prototype_momentum: float = 0.9,
        ce_weight: float = 0.9,
        feature_weight: float = 0.1,
        objectosphere_weight: float = 0.5,
        contrastive_weight: float = 0.5,
        unknown_weight: float = 10.0,
        std_floor: float = 0.1,
        min_statistics_pixels: int = 64,
        sml_on_semantic: bool = True,
        init_checkpoint: str | None = None,
        channels_last: bool = False,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(**base_kwargs)
        k = self.num_classes
        self.net = DualDecoderNet(k, embedding_dim, encoder_name, encoder_weights)
        if init_checkpoint is not None:
            self.load_network_weights(init_checkpoint)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        d = self.net.embedding_dim
        f64 = torch.float64
        # epoch accumulators
        self.register_buffer("sem_sums", torch.zeros(k, k, dtype=f64))
        self.register_buffer("sem_sq_sums", torch.zeros(k, k, dtype=f64))
        self.register_buffer("sem_counts", torch.zeros(k, dtype=f64))
        self.register_buffer("emb_sums", torch.zeros(k, d, dtype=f64))
        self.register_buffer("emb_counts", torch.zeros(k, dtype=f64))
        # DDP copies rank 0's buffers to every process before each training forward pass
        # (broadcast_buffers, on by default). The accumulators hold each process's own sums until
        # on_train_epoch_end adds them up, so they must not be copied: rank 0's would replace the
        # others' at every step and be counted once per process.
        self._ddp_params_and_buffers_to_ignore = list(self.EPOCH_ACCUMULATORS)
        # statistics of the previous epoch, used by the losses and the score
        self.register_buffer("class_means", torch.zeros(k, k, dtype=f64))
        self.register_buffer("class_stds", torch.ones(k, k, dtype=f64))
        self.register_buffer("class_valid", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("prototypes", torch.zeros(k, d, dtype=f64))
        # post-hoc SML statistics of the semantic logits
        self.sml = SMLStatistics(k)

    def load_network_weights(self, path: str) -> None:
        """Initialize ``net`` from a dual-decoder or a DeepLabV3+ segmenter checkpoint (see ``init_checkpoint``)."""

        def convert(state: dict[str, Tensor]) -> dict[str, Tensor]:
            if any(key.startswith("model.") for key in state):  # a DeepLabV3+ segmenter's network
                return segmenter_to_dual_decoder_state(state, self.net.contrastive_head.state_dict())
            return state

        load_network_weights(self.net, path, "dual-decoder network", convert)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        if self.hparams.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        hp = self.hparams
        mask = batch["mask"]
        clean = batch.get("mask_clean", mask)
        # The semantic decoder learns the known classes only: pasted pixels are ignored there.
        semantic_target = torch.where(mask == self.anomaly_index, torch.full_like(clean, self.ignore_index), clean)
        logits, embedding = self(batch["image"])
        ce = self.segmentation_loss(logits, semantic_target)
        feature = semantic_feature_loss(
            logits, semantic_target, self.class_means.float(), self.class_stds.float(), self.class_valid
        )
        objectosphere = objectosphere_loss(
            embedding, mask, hp.xi, hp.unknown_weight, self.anomaly_index, self.ignore_index
        )
        contrastive = contrastive_prototype_loss(embedding, semantic_target, self.prototypes.float(), hp.temperature)
        loss = (
            hp.ce_weight * ce
            + hp.feature_weight * feature
            + hp.objectosphere_weight * objectosphere
            + hp.contrastive_weight * contrastive
        )
        with torch.no_grad():
            sums, sq_sums, counts = accumulate_semantic_stats(
                logits.detach(), semantic_target, self.sem_sums, self.sem_sq_sums, self.sem_counts
            )
            self.sem_sums.copy_(sums)
            self.sem_sq_sums.copy_(sq_sums)
            self.sem_counts.copy_(counts)
            emb_sums, emb_counts = accumulate_embedding_sums(
                embedding.detach(), semantic_target, self.emb_sums, self.emb_counts
            )
            self.emb_sums.copy_(emb_sums)
            self.emb_counts.copy_(emb_counts)
        batch_size = batch["image"].shape[0]
        self.log_dict(
            {
                "train/loss": loss,
                "train/ce": ce,
                "train/feature": feature,
                "train/objectosphere": objectosphere,
                "train/contrastive": contrastive,
            },
            batch_size=batch_size,
        )
        self.log("train/loss_step", loss, prog_bar=True, logger=False, batch_size=batch_size)
        return loss

    def epoch_accumulators(self) -> list[Tensor]:
        return [getattr(self, name) for name in self.EPOCH_ACCUMULATORS]

    @torch.no_grad()
    def on_train_epoch_end(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for acc in self.epoch_accumulators():
                torch.distributed.all_reduce(acc, op=torch.distributed.ReduceOp.SUM)
        self.update_epoch_statistics()

    @torch.no_grad()
    def update_epoch_statistics(self) -> None:
        """Turn this epoch's (summed) accumulators into the statistics of the next epoch."""
        hp = self.hparams
        enough = self.sem_counts >= hp.min_statistics_pixels
        means, stds = finalize_semantic_stats(
            self.sem_sums,
            self.sem_sq_sums,
            torch.where(enough, self.sem_counts, torch.zeros_like(self.sem_counts)),
            self.class_means,
            self.class_stds,
            eps=hp.std_floor,
        )
        self.class_means.copy_(means)
        self.class_stds.copy_(stds)
        self.class_valid |= enough
        self.prototypes.copy_(
            update_prototypes(self.prototypes, self.emb_sums, self.emb_counts, self.hparams.prototype_momentum)
        )
        for acc in self.epoch_accumulators():
            acc.zero_()

    # ----------------------------------------------------------------- checkpoints within an epoch
    @torch.no_grad()
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Under DDP, store the accumulators summed over all processes (not rank 0's share alone).

        A checkpoint written before an epoch ends (every N steps, on preemption, at validation)
        holds that epoch's partial sums. Each process has its own; the checkpoint gets their sum,
        and ``on_load_checkpoint`` gives it to rank 0 only, so that a resumed run, on any number of
        processes, counts every pixel once. Every process calls this (saving is collective).
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() < 2:
            return
        state = checkpoint["state_dict"]
        for name in self.EPOCH_ACCUMULATORS:
            total = getattr(self, name).detach().clone()
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
            state[name] = total

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Processes other than rank 0 start from zero accumulators (see ``on_save_checkpoint``)."""
        trainer = self._trainer
        if trainer is None or trainer.global_rank == 0:
            return
        state = checkpoint.get("state_dict", {})
        for name in self.EPOCH_ACCUMULATORS:
            if name in state:
                state[name] = torch.zeros_like(state[name])

    # ----------------------------------------------------------------- post-hoc SML on the semantic logits
    @property
    def needs_posthoc(self) -> bool:
        return bool(self.hparams.sml_on_semantic)

    def reset_posthoc(self) -> None:
        self.sml.reset()

    def update_posthoc(self, batch: Mapping[str, Tensor]) -> None:
        self.sml.update(self(batch["image"])[0])

    def posthoc_accumulators(self) -> list[Tensor]:
        return self.sml.accumulators()

    def finalize_posthoc(self) -> None:
        self.sml.finalize()

    # ----------------------------------------------------------------- scoring
    def segment(self, image: Tensor) -> MethodOutput:
        logits, embedding = self(image)
        scores = {
            "dual_decoder": dual_decoder_anomaly_score(
                logits, embedding, self.class_means.float(), self.class_stds.float(), self.hparams.xi, self.class_valid
            )
        }
        if self.hparams.sml_on_semantic:
            scores["sml"] = self.sml.score(logits)
        scores.update(baseline_scores(logits))
        return MethodOutput(logits, scores)

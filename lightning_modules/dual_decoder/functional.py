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

reported as ``-log(1 - score)``: the same ranking of pixels (every metric is unchanged), but
computed in the log domain, where float32 does not tie the pixels that ``score`` rounds to its
maximum (``dual_decoder_anomaly_score``).

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

This file holds the epoch statistics and the score; the network is in ``torch_model.py``,
the losses in ``loss.py``, the LightningModule in ``lightning_model.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "accumulate_embedding_sums",
    "accumulate_semantic_stats",
    "contrastive_anomaly_score",
    "dual_decoder_anomaly_score",
    "finalize_semantic_stats",
    "semantic_anomaly_score",
    "semantic_distance",
    "update_prototypes",
]


# --------------------------------------------------------------------------------------- helpers
def _upcast(x: Tensor) -> Tensor:
    """float32 for half/bfloat16 (and float32) input; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def _known(target: Tensor, num_classes: int) -> Tensor:
    return (target >= 0) & (target < num_classes)


#: Pixels per one-hot matrix product in the epoch statistics (a float64 copy of this many pixels
#: at a time: 14 x 2**18 x 8 bytes = 29 MB of one-hot rows for 13 classes).
STATISTICS_CHUNK_PIXELS = 1 << 18


def _class_sums(values: Tensor, index: Tensor, num_rows: int, normalize: bool = False, squares: bool = False) -> Tensor:
    """Float64 ``out[r] = sum_{i : index_i = r} [v_i, (v_i^2,) 1]`` (the last column counts).

    ``[num_rows, C + 1]``, or ``[num_rows, 2C + 1]`` with ``squares`` (elementwise squares taken
    in float64). ``values`` ``[N, C]`` (any float dtype, rows L2-normalized first with ``normalize``), ``index``
    ``[N]`` in ``0..num_rows-1``. Computed as one-hot matrix products over chunks of
    :data:`STATISTICS_CHUNK_PIXELS` pixels: the sums are reduced inside the matrix product instead
    of one float64 atomic add per pixel and channel into a few addresses (``index_add_``), only one
    chunk is ever copied to float64, and nothing is read back to the host. Float64 products are
    not affected by autocast or TF32.
    """
    rows = torch.arange(num_rows, device=values.device).unsqueeze(1)
    columns = values.shape[1] * (2 if squares else 1) + 1
    out = torch.zeros(num_rows, columns, dtype=torch.float64, device=values.device)
    with torch.autocast(device_type=values.device.type, enabled=False):
        for start in range(0, values.shape[0], STATISTICS_CHUNK_PIXELS):
            part = values[start : start + STATISTICS_CHUNK_PIXELS].to(torch.float64)
            if normalize:
                part = F.normalize(part, dim=1)
            part = torch.cat([part, *([part.square()] if squares else []), part.new_ones(part.shape[0], 1)], dim=1)
            onehot = (index[start : start + STATISTICS_CHUNK_PIXELS].unsqueeze(0) == rows).to(torch.float64)
            out += onehot @ part
    return out


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 (still attached to the graph) where ``mask`` is empty.

    ``torch.where`` rather than a multiplication so that non-finite values outside the mask
    cannot leak in; no boolean indexing, so no host-device synchronisation.
    """
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1).to(values.dtype)


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
    # host-device synchronisation. Squares are taken in float64 (inside _class_sums' chunks).
    index = torch.where(tp, labels, torch.full_like(labels, num_classes))
    table = _class_sums(flat, index, num_classes + 1, squares=True)
    return (
        sums + table[:num_classes, :num_classes].to(sums.dtype),
        sq_sums + table[:num_classes, num_classes : 2 * num_classes].to(sq_sums.dtype),
        counts + table[:num_classes, -1].to(counts.dtype),
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
    flat = embedding.detach().movedim(1, -1).reshape(-1, dim)
    labels = target.reshape(-1)
    index = torch.where(_known(labels, num_classes), labels, torch.full_like(labels, num_classes))
    table = _class_sums(flat, index, num_classes + 1, normalize=normalize)
    return sums + table[:num_classes, :dim].to(sums.dtype), counts + table[:num_classes, -1].to(counts.dtype)


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
def semantic_distance(
    logits: Tensor, class_means: Tensor, class_stds: Tensor, class_valid: Tensor | None = None
) -> Tensor:
    """``d = min_k sum_d ((f_d - mu_kd) / sigma_kd)^2`` over the valid classes, shape ``[B, H, W]``.

    Computed in float32 with autocast off (bf16/fp16 upcast; float64 kept). No valid class at all
    gives ``inf``.
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
    # A loop over the K classes keeps memory at one [B, K, H, W] temporary; broadcasting all
    # classes at once costs K times that, and expanding the square into matmuls cancels
    # catastrophically in float32 when sigma is small.
    min_dist = torch.full_like(features[:, 0], float("inf"))
    with torch.autocast(device_type=features.device.type, enabled=False):
        for k in range(num_classes):
            dist = ((features - means[k]) * inv_stds[k]).square().sum(dim=1)
            if valid is not None:
                dist = torch.where(valid[k], dist, torch.full_like(dist, float("inf")))
            min_dist = torch.minimum(min_dist, dist)
    return min_dist


def semantic_anomaly_score(
    logits: Tensor, class_means: Tensor, class_stds: Tensor, class_valid: Tensor | None = None
) -> Tensor:
    """``s_sem = 1 - max_k exp(-1/2 sum_d ((f_d - mu_kd) / sigma_kd)^2) = 1 - exp(-d / 2)``, ``[B, H, W]``.

    The paper's semantic half, in ``[0, 1]``. In float32 it is exactly 1 for every ``d > 34.7``
    (``exp(-d/2)`` falls below half an ulp of 1), so such pixels tie: the combined score
    :func:`dual_decoder_anomaly_score` does not go through it. Classes with ``class_valid=False``
    are left out of the max (no valid class at all gives 1).
    """
    return -torch.expm1(-0.5 * semantic_distance(logits, class_means, class_stds, class_valid))


def contrastive_anomaly_score(embedding: Tensor, xi: float = 1.0) -> Tensor:
    """``s_con = max(0, 1 - ||e||^2 / xi)``, shape ``[B, H, W]``, in float32 (float64 kept).

    1 at the origin (where the objectosphere loss puts anomalies), 0 on or outside the sphere
    ``||e||^2 = xi`` that known pixels are pushed beyond.
    """
    return (1.0 - _squared_norm(embedding) / xi).clamp_min(0.0)


def _squared_norm(embedding: Tensor) -> Tensor:
    with torch.autocast(device_type=embedding.device.type, enabled=False):
        return _upcast(embedding).square().sum(dim=1)


def dual_decoder_anomaly_score(
    logits: Tensor,
    embedding: Tensor,
    class_means: Tensor,
    class_stds: Tensor,
    xi: float = 1.0,
    class_valid: Tensor | None = None,
) -> Tensor:
    """The paper's ``(s_sem + s_con) / 2`` through an increasing map that does not saturate, ``[B, H, W]``.

    With ``d`` the :func:`semantic_distance` and ``m = min(1, ||e||^2 / xi) = 1 - s_con``::

        1 - (s_sem + s_con) / 2 = (exp(-d / 2) + m) / 2
        score = -log((exp(-d / 2) + m) / 2) = log 2 - logaddexp(-d / 2, log m)

    ``score = -log(1 - (s_sem + s_con) / 2)`` is a strictly increasing function of the paper's
    score, so every threshold and every ranking of pixels is the same (AUPR, AUROC and FPR95 are
    unchanged), but it is computed in the log domain: ``(s_sem + s_con) / 2`` itself is within
    half an ulp of its maximum for ``d > 34.7`` with ``m ~ 0``, where float32 ties every such
    pixel, while here ``score ~ d / 2 + log 2`` keeps them apart. Higher = more anomalous;
    ``score >= 0`` (0 on a class mean outside the sphere), ``+inf`` only with no valid class and
    ``e = 0``. Float32 (float64 kept), autocast off.
    """
    distance = semantic_distance(logits, class_means, class_stds, class_valid)
    inside = (_squared_norm(embedding) / xi).clamp_max(1.0)
    return math.log(2.0) - torch.logaddexp(-0.5 * distance, torch.log(inside.to(distance.dtype)))

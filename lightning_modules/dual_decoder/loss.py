"""The dual decoder's training losses: semantic feature loss, objectosphere, prototype contrastive loss.

Loss weights of the reference training script (ContMAV ``train.py``), for orientation:
``0.9 * CE + 0.1 * feature + 0.5 * objectosphere + 0.5 * contrastive``; objectosphere with
``xi = 1`` and the unknown term weighted 10x; contrastive temperature 0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.labels import ANOMALY_INDEX, IGNORE_INDEX
from lightning_modules.dual_decoder.functional import _known, _masked_mean, _upcast

__all__ = ["contrastive_prototype_loss", "objectosphere_loss", "semantic_feature_loss"]


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
    # A column of ones counts the pixels in the same pass (bincount would synchronise: on CUDA it
    # reads the largest index to size its output, also with minlength).
    with_ones = torch.cat([units, units.new_ones(units.shape[0], 1)], dim=1)
    table = units.new_zeros(tables * slots, dim + 1).index_add_(0, group.reshape(-1), with_ones)
    # Drop the collector rows by reshaping (a boolean mask would synchronise with the host).
    table = table.view(tables, slots, dim + 1)[:, :num_classes].reshape(-1, dim + 1)
    sums, counts = table[:, :dim], table[:, dim]
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

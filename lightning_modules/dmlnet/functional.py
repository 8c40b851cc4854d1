"""DMLNet's metric-learning math (Cen et al., "Deep Metric Learning for Open World Semantic
Segmentation", ICCV 2021; reference code: github.com/Jun-CEN/Open-World-Semantic-Segmentation).

The network maps every pixel to an embedding ``f`` (``D = K`` dimensions) and compares it with
fixed class prototypes ``m_k = T e_k`` (``T`` = 3: the one-hot vector of class ``k`` scaled by
``T``, as the reference code builds them). With the squared Euclidean distances
``d_k = ||f - m_k||^2``:

* closed-set logits are ``-gamma d_k`` (the reference code: ``gamma = 1``), so the prediction is
  the nearest prototype;
* **MMSP**, the metric-based maximum softmax probability, is ``max_k softmax(-gamma d)_k``;
* **EDS**, the Euclidean distance sum, is ``sum_k d_k``. Since
  ``sum_k ||f - m_k||^2 = K ||f - m_bar||^2 + sum_k ||m_k - m_bar||^2`` (``m_bar`` the mean
  prototype), EDS measures how far ``f`` lies from the centre of the prototypes; embeddings of
  unknown objects fall near that centre, so a *low* EDS means *unknown*;
* their **fusion** (the reference evaluation, ``eval_ood_traditional.py``): per image, EDS is
  clipped at ``clip`` (400) and min-max normalized to ``e``, MMSP min-max normalized to ``m``;
  the gate ``g = 1 / (1 + exp(a (e - t)))`` (``a`` = 50, ``t`` = 0.2) trusts EDS where it is
  low and MMSP elsewhere, and the confidence is ``g e + (1 - g) m``.

Every score returned here is an anomaly score ``[B, H, W]``: higher = more anomalous (so
``1 - confidence``, ``-EDS``). Distances and scores are computed in float32 (float64 kept), also
under autocast. The losses are in ``loss.py``, the prototype head in ``torch_model.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.scoring.baselines import msp_score

__all__ = [
    "distance_logits",
    "dmlnet_scores",
    "eds_score",
    "euclidean_distance_sum",
    "fixed_prototypes",
    "fused_score",
    "fusion_gate",
    "minmax_per_image",
    "mmsp_score",
    "nearest_prototype",
    "squared_distances",
]


def _upcast(x: Tensor) -> Tensor:
    """float32 for half/bfloat16/float32 input; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def fixed_prototypes(num_classes: int, magnitude: float = 3.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """The reference code's class prototypes: ``m_k = magnitude * e_k``, a ``[K, K]`` matrix.

    One-hot prototypes keep every pair of classes equally far apart (``sqrt(2) * magnitude``),
    so no class starts closer to another, and they need no training.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not magnitude > 0:
        raise ValueError(f"prototype magnitude must be > 0, got {magnitude}")
    return torch.eye(num_classes, dtype=dtype) * magnitude


def squared_distances(embedding: Tensor, prototypes: Tensor) -> Tensor:
    """``d[b, k, i, j] = ||embedding[b, :, i, j] - prototypes[k]||^2``, ``[B, K, H, W]``.

    Expanded as ``||f||^2 - 2 f.m_k + ||m_k||^2`` so that no ``[B, K, D, H, W]`` difference tensor
    is built (623 MB per 720x1280 image at K = D = 13); the cross term runs with autocast off,
    because a bf16 matmul would quantize distances that the scores rank. Rounding can make the
    expansion slightly negative for ``f`` on a prototype: clamped at 0.

    Args:
        embedding: ``[B, D, H, W]``, any float dtype.
        prototypes: ``[K, D]``.
    """
    if embedding.ndim != 4:
        raise ValueError(f"embedding must be [B, D, H, W], got shape {tuple(embedding.shape)}")
    if prototypes.ndim != 2 or prototypes.shape[1] != embedding.shape[1]:
        raise ValueError(
            f"prototypes must be [K, {embedding.shape[1]}] for a {embedding.shape[1]}-dim embedding, "
            f"got {tuple(prototypes.shape)}"
        )
    f = _upcast(embedding)
    m = prototypes.to(device=f.device, dtype=f.dtype)
    with torch.autocast(device_type=f.device.type, enabled=False):
        cross = torch.einsum("bdhw,kd->bkhw", f, m)
    sq_norm = f.square().sum(dim=1, keepdim=True)
    return (sq_norm - 2.0 * cross + m.square().sum(dim=1).view(1, -1, 1, 1)).clamp_min(0.0)


def distance_logits(distances: Tensor, gamma: float = 1.0) -> Tensor:
    """Closed-set logits ``-gamma * d``, ``[B, K, H, W]``: softmax over them is DMLNet's class posterior."""
    return -gamma * distances


def nearest_prototype(distances: Tensor) -> Tensor:
    """Closed-set prediction: the index of the nearest prototype, ``[B, H, W]`` long."""
    return distances.argmin(dim=1)


def mmsp_score(distances: Tensor, gamma: float = 1.0) -> Tensor:
    """``1 - MMSP = 1 - max_k softmax(-gamma d)_k``, ``[B, H, W]``.

    Evaluated from the non-maximal softmax mass (the shared MSP baseline), so that confident
    pixels do not all round to 0 and tie.
    """
    return msp_score(distance_logits(distances, gamma))


def euclidean_distance_sum(distances: Tensor) -> Tensor:
    """EDS ``= sum_k d_k``, ``[B, H, W]`` (a confidence: low for unknown objects)."""
    return _upcast(distances).sum(dim=1)


def eds_score(distances: Tensor) -> Tensor:
    """Anomaly score ``-EDS``, ``[B, H, W]``, unnormalized so that it is comparable across images."""
    return -euclidean_distance_sum(distances)


def minmax_per_image(x: Tensor) -> Tensor:
    """``(x - min) / (max - min)`` over each image's pixels, ``[B, H, W] -> [B, H, W]`` in [0, 1].

    An image whose values are all equal maps to 0 (the reference divides by zero there, which
    would give NaN scores).
    """
    flat = x.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1)
    high = flat.amax(dim=1).view(-1, 1, 1)
    return (x - low) / (high - low).clamp_min(torch.finfo(x.dtype).tiny)


def fusion_gate(eds_normalized: Tensor, threshold: float = 0.2, sharpness: float = 50.0) -> Tensor:
    """``g = 1 / (1 + exp(sharpness * (e - threshold)))``: near 1 where the normalized EDS is low."""
    return torch.sigmoid(-sharpness * (eds_normalized - threshold))


def fused_score(
    distances: Tensor,
    gamma: float = 1.0,
    clip: float | None = 400.0,
    threshold: float = 0.2,
    sharpness: float = 50.0,
) -> Tensor:
    """DMLNet's fusion of EDS and MMSP as an anomaly score ``1 - (g e + (1 - g) m)``, ``[B, H, W]``.

    ``e`` = per-image min-max normalized ``min(EDS, clip)``, ``m`` = per-image min-max normalized
    MMSP, ``g = fusion_gate(e, threshold, sharpness)``. ``m`` is computed from ``u = 1 - MMSP``
    as ``1 - minmax(u)`` (the same value, without rounding ``MMSP`` near 1). Per-image
    normalization makes the score depend on the rest of the image, as in the reference
    evaluation; ``clip=None`` skips the clip.
    """
    eds = euclidean_distance_sum(distances)
    if clip is not None:
        eds = eds.clamp_max(clip)
    e = minmax_per_image(eds)
    m = 1.0 - minmax_per_image(mmsp_score(distances, gamma))
    g = fusion_gate(e, threshold, sharpness)
    return 1.0 - (g * e + (1.0 - g) * m)


def dmlnet_scores(
    distances: Tensor,
    gamma: float = 1.0,
    clip: float | None = 400.0,
    threshold: float = 0.2,
    sharpness: float = 50.0,
) -> dict[str, Tensor]:
    """DMLNet's own scores by name: the fusion (``dmlnet``), ``mmsp`` and ``eds``."""
    distances = _upcast(distances).detach()
    return {
        "dmlnet": fused_score(distances, gamma, clip, threshold, sharpness),
        "mmsp": mmsp_score(distances, gamma),
        "eds": eds_score(distances),
    }

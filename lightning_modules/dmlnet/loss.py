"""DMLNet's training losses: distance-based cross-entropy (DCE) and the variance loss (VL).

With ``d_k = ||f - m_k||^2`` (``functional.squared_distances``) and ``P`` the pixels of a known
class ``y_p``::

    DCE = 1/|P| sum_{p in P} -log softmax_k(-gamma d_pk)[y_p]
    VL  = 1/|P| sum_{p in P} d_{p, y_p}
    L   = DCE + lambda VL                      # lambda = 0.01 (the reference code's alpha)

DCE pulls a pixel towards its own prototype *relative to* the others; VL pulls it towards its
prototype in absolute terms, which keeps known embeddings off the centre of the prototypes,
where EDS expects the unknown ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dce_loss", "dmlnet_loss", "variance_loss"]


def _known(target: Tensor, num_classes: int) -> Tensor:
    """Pixels of a known class ``0..K-1`` (not the anomaly index 13, not the ignore index 255)."""
    return (target >= 0) & (target < num_classes)


def dce_loss(distances: Tensor, target: Tensor, gamma: float = 1.0, weight: Tensor | None = None) -> Tensor:
    """Distance-based cross-entropy: cross-entropy of the logits ``-gamma d``, over known pixels.

    With class weights it is their weighted mean, as ``F.cross_entropy``'s. No known pixel gives 0
    (with a graph, for backward and DDP) where ``F.cross_entropy`` would give NaN.

    Args:
        distances: ``[B, K, H, W]`` squared distances to the prototypes (float32 or float64).
        target: ``[B, H, W]`` long; values outside ``0..K-1`` (anomaly 13, ignore 255) are left out.
        gamma: the distance scale of the logits (1 in the reference code).
        weight: optional ``[K]`` class weights.
    """
    known = _known(target, distances.shape[1])
    index = torch.where(known, target, torch.zeros_like(target)).unsqueeze(1)
    nll = -F.log_softmax(-gamma * distances, dim=1).gather(1, index).squeeze(1)
    # Weights of 0 on unknown pixels instead of boolean indexing, which would synchronise with the host.
    pixel_weight = known.to(nll.dtype)
    if weight is not None:
        pixel_weight = pixel_weight * weight.to(nll)[index.squeeze(1)]
    return (nll * pixel_weight).sum() / pixel_weight.sum().clamp_min(torch.finfo(nll.dtype).tiny)


def variance_loss(distances: Tensor, target: Tensor) -> Tensor:
    """Mean squared distance of known pixels to their own class prototype (0, with a graph, if none)."""
    known = _known(target, distances.shape[1])
    own = distances.gather(1, torch.where(known, target, torch.zeros_like(target)).unsqueeze(1)).squeeze(1)
    own = own * known  # zero, not dropped: boolean indexing would synchronise with the host
    return own.sum() / known.sum().clamp_min(1)


def dmlnet_loss(
    distances: Tensor,
    target: Tensor,
    gamma: float = 1.0,
    variance_weight: float = 0.01,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(DCE + variance_weight * VL, DCE, VL)`` (see the module docstring)."""
    dce = dce_loss(distances, target, gamma, weight)
    vl = variance_loss(distances, target)
    return dce + variance_weight * vl, dce, vl

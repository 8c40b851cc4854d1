"""The entropy-maximisation outlier-exposure loss (Chan, Rottmann, Gottschalk, ICCV 2021).

With softmax probabilities ``p`` over the ``K`` known classes, known pixels ``P_in`` (label
``y_p``) and pasted outlier pixels ``P_out`` (label 13)::

    l_in(p)  = -log p_{y_p}                         cross-entropy of a known pixel
    l_out(p) = -1/K sum_k log p_k                   cross-entropy to the uniform distribution
             = logsumexp(z) - mean_k z_k            (in logits z; = KL(u || p) + log K)
    L        = 1/|P_in + P_out| ( sum_{P_in} (1 - lambda) l_in + sum_{P_out} lambda l_out )

``l_out`` is smallest, ``log K``, where ``p`` is uniform, i.e. where the entropy is largest:
minimising it teaches the network to be maximally uncertain on outlier pixels, which the entropy
score then reads. ``lambda`` is the paper's ``lambda`` (the official code's ``pareto_alpha``, 0.9).
Void pixels (255) contribute nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["entropy_maximisation_loss"]


def entropy_maximisation_loss(
    logits: Tensor,
    target: Tensor,
    outlier_weight: float = 0.9,
    anomaly_index: int = 13,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(L, mean l_in, mean l_out)`` of the module docstring for one batch.

    The two means are for logging (0 where a batch has no pixel of that kind); ``L`` is what is
    minimised. With class weights ``w`` the known pixels count ``w_{y_p}`` times, in the sum and in
    the normaliser (``F.cross_entropy``'s weighted mean); outlier pixels count once.

    Args:
        logits: ``[B, K, H, W]`` closed-set logits (computed in float32 under mixed precision).
        target: ``[B, H, W]`` long: ``0..K-1`` known, ``anomaly_index`` for pasted outliers,
            anything else (255) void.
        outlier_weight: ``lambda`` in ``[0, 1]``.
        anomaly_index: the label of outlier pixels.
        weight: optional ``[K]`` class weights for the known pixels.

    Example:
        >>> logits = torch.zeros(1, 4, 1, 2)           # uniform softmax over 4 classes
        >>> target = torch.tensor([[[0, 13]]])         # one known pixel, one outlier pixel
        >>> loss, l_in, l_out = entropy_maximisation_loss(logits, target, outlier_weight=0.5)
        >>> round(l_in.item(), 4), round(l_out.item(), 4)   # both log 4
        (1.3863, 1.3863)
    """
    if not 0.0 <= outlier_weight <= 1.0:
        raise ValueError(f"outlier_weight must be in [0, 1], got {outlier_weight}")
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    num_classes = logits.shape[1]
    known = (target >= 0) & (target < num_classes)
    outlier = target == anomaly_index
    log_p = torch.log_softmax(logits, dim=1)
    index = torch.where(known, target, torch.zeros_like(target)).unsqueeze(1)
    l_in = -log_p.gather(1, index).squeeze(1)
    l_out = -log_p.mean(dim=1)
    # Masks as weights, not boolean indexing, which would synchronise with the host.
    w_in = known.to(l_in.dtype)
    if weight is not None:
        w_in = w_in * weight.to(l_in)[index.squeeze(1)]
    w_out = outlier.to(l_in.dtype)
    tiny = torch.finfo(l_in.dtype).tiny
    total = (1.0 - outlier_weight) * (w_in * l_in).sum() + outlier_weight * (w_out * l_out).sum()
    loss = total / (w_in.sum() + w_out.sum()).clamp_min(tiny)
    mean_in = (w_in * l_in).sum() / w_in.sum().clamp_min(tiny)
    mean_out = (w_out * l_out).sum() / w_out.sum().clamp_min(tiny)
    return loss, mean_in.detach(), mean_out.detach()

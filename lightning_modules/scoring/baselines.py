"""Anomaly scores that any segmenter gets for free from its logits: MSP, MaxLogit, entropy, energy.

Pure tensor functions ``logits [B, K, H, W] -> score [B, H, W]``, higher = more anomalous.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_logits(logits: Tensor, name: str = "logits") -> Tensor:
    """Validate ``[B, K, H, W]`` floating logits; upcast half precision to float32."""
    if logits.ndim != 4:
        raise ValueError(f"{name} must have shape [B, K, H, W], got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {logits.dtype}")
    # bf16 / fp16 keep about 3 significant digits: standardizing and smoothing such values in
    # their own precision would quantize the score; float64 input is left as is.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits.detach()


def _softmax_tail(logits: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logits, l_max [B,H,W], e [B,K,H,W], s [B,H,W])``: the checked (upcast) logits,
    ``e_k = exp((l_k - l_max) / T)`` except 0 at the argmax, and ``s = sum_k e_k``, so that
    ``p_max = 1 / (1 + s)`` for the softmax at temperature ``T``. Logits must be finite.

    Keeping the non-maximal mass ``s`` separate avoids ``1 - p_max`` and ``log p_max`` rounding to
    0 for confident pixels (most pixels), which would tie them and blunt AUROC/AUPR. Dividing the
    (non-positive) differences rather than the logits by ``T`` cannot overflow.
    """
    logits = _check_logits(logits)
    l_max, argmax = logits.max(dim=1, keepdim=True)
    shifted = logits - l_max
    if temperature != 1.0:
        shifted = shifted / temperature
    e = torch.exp(shifted).scatter_(1, argmax, 0.0)
    return logits, l_max.squeeze(1), e, e.sum(dim=1)


def msp_score(logits: Tensor) -> Tensor:
    """Maximum softmax probability baseline: ``1 - max_k softmax(logits)_k``, ``[B, H, W]``.

    Evaluated as ``s / (1 + s)`` with ``s = sum_{k != argmax} exp(l_k - l_max)``, which equals
    ``1 - p_max`` exactly and keeps its relative precision when ``p_max`` is close to 1.
    """
    _, _, _, s = _softmax_tail(logits)
    return s / (1.0 + s)


def max_logit_score(logits: Tensor) -> Tensor:
    """Max-logit baseline: ``-max_k logits_k``, ``[B, H, W]``."""
    return -_check_logits(logits).amax(dim=1)


def entropy_score(logits: Tensor) -> Tensor:
    """Softmax entropy ``-sum_k p_k log p_k`` (natural log), ``[B, H, W]``.

    With ``p_k = e_k / (1 + s)`` (see ``_softmax_tail``), ``log p_k = (l_k - l_max) - log1p(s)``,
    hence ``H = log1p(s) + sum_k p_k (l_max - l_k)``: a sum of non-negative terms, with no
    ``log 0`` when probabilities underflow and no cancellation for confident pixels.
    """
    logits, l_max, e, s = _softmax_tail(logits)
    spread = (e * (l_max.unsqueeze(1) - logits)).sum(dim=1)
    return torch.log1p(s) + spread / (1.0 + s)


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy ``E = -T logsumexp_k(logits_k / T)`` (Liu et al., NeurIPS 2020), ``[B, H, W]``.

    In-distribution pixels have lower energy, so ``E`` itself is the anomaly score (higher = more
    anomalous). Evaluated in float32 (half precision upcast) as ``-(l_max + T log1p(s))`` with
    ``s = sum_{k != argmax} exp((l_k - l_max) / T)``: no overflow for large logits or small ``T``,
    and ``log1p`` keeps the small non-maximal mass that ``log(1 + s)`` would round away, which
    would tie confident pixels whose max logit is near 0.
    """
    if isinstance(temperature, bool) or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"energy temperature must be a finite number > 0, got {temperature!r}")
    _, l_max, _, s = _softmax_tail(logits, temperature)
    return -(l_max + temperature * torch.log1p(s))


#: Baseline scores reported beside every segmenter-based method, in table order. Each takes the
#: logits only; the energy's temperature is passed by ``baseline_scores``.
BASELINES = {"msp": msp_score, "maxlogit": max_logit_score, "entropy": entropy_score, "energy": energy_score}


def baseline_scores(logits: Tensor, temperature: float = 1.0) -> dict[str, Tensor]:
    """All baseline scores of ``logits`` by name; ``temperature`` is the energy score's ``T``."""
    scores = {name: fn(logits) for name, fn in BASELINES.items() if name != "energy"}
    scores["energy"] = energy_score(logits, temperature)
    return scores

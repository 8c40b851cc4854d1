"""Feature Reconstruction Error (FRE): PCA subspaces of in-distribution pixel features.

FRE (Ndiour, Ahuja and Tickoo, Intel Labs) models in-distribution features of each class by a
linear subspace fitted with PCA and scores a feature by how badly that subspace reconstructs it.
For a class ``k`` with mean ``mu_k`` and orthonormal principal directions ``B_k`` (``[C, r_k]``)
the score of a feature ``x`` is the L2 norm of the part of ``x - mu_k`` orthogonal to the subspace::

    FRE_k(x) = || (I - B_k B_k^T) (x - mu_k) ||_2

Here the features are the DeepLabV3+ decoder output before the segmentation head (256 channels
at 1/4 of the input resolution), one feature vector per pixel. Three scoring modes:

- ``"predicted"``: each pixel is scored against the subspace of its predicted class;
- ``"min"``: the minimum over all class subspaces (no reliance on the classifier);
- ``"global"``: one subspace fitted on the pooled features of all classes.

Fitting runs in one streaming pass: per-class first and second moments (feature sums, sums of
outer products ``x x^T`` and pixel counts) are accumulated in float64, summed across processes
under DDP (they are plain sums), and turned into population covariances and eigendecompositions
at the end. A seeded per-class pixel subsample keeps the pass cheap and balanced
(:func:`sample_class_pixels`, :func:`batch_quota`).

Optionally, errors are standardized per class, ``(e - m_k) / s_k``, with the mean and standard
deviation of class-``k`` training pixels' errors against subspace ``k``
(:func:`accumulate_error_moments`, :func:`error_statistics`, :func:`standardize_errors`). For the
``"min"`` mode standardize each class's error before taking the minimum::

    standardize_errors(class_reconstruction_errors(f, means, bases), m, s).amin(dim=1)

All functions are pure, device-agnostic and work on CPU and CUDA tensors. Scoring runs in at least
float32 with autocast disabled (bf16 features are upcast) and without TF32, whatever
``torch.set_float32_matmul_precision`` says elsewhere (TF32 cost the scores about 3e-4 relative
precision: ``lightning_modules.precision.full_precision_matmul``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.precision import full_precision_matmul

log = logging.getLogger(__name__)

__all__ = [
    "FREFitWarning",
    "SCORING_MODES",
    "resize_labels",
    "batch_quota",
    "sample_class_pixels",
    "accumulate_class_moments",
    "undersampled_classes",
    "fit_subspaces",
    "class_reconstruction_errors",
    "reconstruction_error",
    "accumulate_error_moments",
    "error_statistics",
    "standardize_errors",
]

SCORING_MODES: tuple[str, ...] = ("predicted", "min", "global")

# Elements of float scratch memory one scoring chunk may use (2**24 float32 = 64 MiB).
_CHUNK_ELEMENTS = 1 << 24


class FREFitWarning(UserWarning):
    """A class had too few pixels to fit its own subspace (or statistics); a fallback is used."""


# --------------------------------------------------------------------------- shapes and helpers
def _as_pixels(features: Tensor) -> Tensor:
    """``[B, C, h, w]`` or ``[N, C]`` -> ``[N, C]`` (one row per pixel)."""
    if features.dim() == 4:
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    if features.dim() == 2:
        return features
    raise ValueError(f"features must be [B, C, h, w] or [N, C], got shape {tuple(features.shape)}")


def _check_labels(features: Tensor, labels: Tensor, what: str = "labels") -> None:
    """Labels must sit on the feature grid: ``[B, h, w]`` for ``[B, C, h, w]``, ``[N]`` for ``[N, C]``."""
    expected = (features.shape[0], *features.shape[2:]) if features.dim() == 4 else features.shape[:1]
    if tuple(labels.shape) != tuple(expected):
        raise ValueError(
            f"{what} of shape {tuple(labels.shape)} do not match features of shape {tuple(features.shape)}: "
            f"expected {tuple(expected)} (resize labels to the feature resolution with resize_labels)"
        )


def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [f"class {k}" for k in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} entries for {num_classes} classes")
    return [f"class {k} ({name})" for k, name in enumerate(class_names)]


def _group_by_class(labels: Tensor, num_classes: int, block: int) -> tuple[Tensor, Tensor]:
    """Lay pixels out as blocks of ``block`` rows that each hold pixels of a single class.

    Sorting pixels by class and cutting every class's run into fixed-size blocks (the last one
    zero-padded) turns per-class matrix products into one batched matmul over blocks, with at
    most ``num_classes * block`` padding rows of wasted work. The number of blocks is the static
    bound ``ceil(N / block) + num_classes`` so no device-to-host synchronisation is needed;
    unused blocks stay empty.

    ``labels``: ``[N]`` int64 in ``[0, num_classes)``.
    Returns ``slot`` (``[N]``, the row of each pixel in the packed ``[num_blocks * block, ...]``
    layout, in the pixels' own order) and ``block_class`` (``[num_blocks]``, the class of each
    block; unused blocks get ``num_classes - 1`` and hold only padding).
    """
    n = labels.shape[0]
    device = labels.device
    counts = torch.zeros(num_classes, dtype=torch.long, device=device)
    counts.index_add_(0, labels, torch.ones_like(labels))
    class_start = torch.cumsum(counts, 0) - counts
    blocks_per_class = (counts + block - 1) // block
    block_end = torch.cumsum(blocks_per_class, 0)
    block_start = block_end - blocks_per_class

    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    rank = torch.arange(n, device=device) - class_start[sorted_labels]  # position within its class
    block_of = block_start[sorted_labels] + torch.div(rank, block, rounding_mode="floor")
    slot = torch.empty_like(order)
    slot[order] = block_of * block + rank % block

    num_blocks = -(-n // block) + num_classes
    block_ids = torch.arange(num_blocks, device=device)
    block_class = torch.searchsorted(block_end, block_ids, right=True).clamp_(max=num_classes - 1)
    return slot, block_class


def _block_size(num_pixels: int, num_classes: int, minimum: int) -> int:
    # About 4 blocks per class on average: padding is at most ~25% of the rows and the batched
    # output ([num_blocks, ...]) stays small.
    return max(minimum, -(-num_pixels // (4 * num_classes)))


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a label map ``[B, H, W]`` to the feature grid ``size = (h, w)``.

    Uses ``nearest-exact`` (the label at each target cell's centre), so for the decoder's 1/4
    resolution every feature pixel takes the label near the middle of its 4x4 input cell.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, H, W], got shape {tuple(labels.shape)}")
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    # Labels (<= 255, or small negatives) are exact in float32.
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")
    return resized[:, 0].to(labels.dtype)


# --------------------------------------------------------------------------- subsampling
def batch_quota(remaining: Tensor, batches_left: int | None = None) -> Tensor:
    """How many pixels of each class to accept from the next batch under a global per-class budget.

    ``remaining``: ``[K]`` pixels each class may still contribute (``budget - counts``, where
    ``counts`` is the moment accumulator, so it is exactly what was accepted so far).

    - ``batches_left`` given (number of batches still to come, this one included): each batch
      gets ``ceil(remaining / batches_left)``, an equal share of what is left. A class absent
      from a batch leaves its share to later batches, so the sample spreads over the whole
      pass instead of being filled by the first batches. Use this when the loader length is known.
    - ``batches_left=None``: greedy, ``quota = remaining``; the first pixels seen fill the
      budget, which is only a uniform sample when the loader is shuffled.

    Either way the quota never exceeds ``remaining``, so the global cap holds exactly. (A true
    reservoir sample is not possible here: accepted pixels are already folded into the moments
    and cannot be taken out again.) Under DDP give every process ``budget / world_size``.
    """
    remaining = remaining.clamp(min=0)
    if batches_left is None:
        return remaining.to(torch.long)
    if batches_left < 1:
        raise ValueError(f"batches_left must be >= 1, got {batches_left}")
    return torch.ceil(remaining.to(torch.float64) / batches_left).to(torch.long)


def sample_class_pixels(
    labels: Tensor,
    quota: Tensor | int,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Seeded uniform subsample of at most ``quota[k]`` pixels of each class ``k``.

    ``labels``: any shape (``[B, h, w]`` or ``[N]``), class indices; values outside
    ``[0, num_classes)`` (ignore index, negatives) are never selected.
    ``quota``: an int for every class, or ``[K]`` per class (e.g. from :func:`batch_quota`).
    ``generator``: drives the choice; the random keys are drawn on the generator's device
    (a CPU generator gives the same subsample on CPU and CUDA).

    Returns a boolean mask shaped like ``labels``. Within each class the kept pixels are a
    uniformly random subset of size ``min(n_k, quota[k])`` (sort by class, then by a uniform
    random key, keep the first ``quota[k]`` of each run). Feed it to
    :func:`accumulate_class_moments` as ``labels.masked_fill(~mask, -1)``.
    """
    flat = labels.reshape(-1).to(torch.long)
    n = flat.shape[0]
    device = flat.device
    if isinstance(quota, int):
        quota = torch.full((num_classes,), quota, dtype=torch.long, device=device)
    quota = quota.to(device=device, dtype=torch.long)
    if quota.shape != (num_classes,):
        raise ValueError(f"quota must be an int or have shape [{num_classes}], got {tuple(quota.shape)}")

    valid = (flat >= 0) & (flat < num_classes)
    group = torch.where(valid, flat, num_classes)  # invalid pixels form one extra, never-kept group
    gen_device = generator.device if generator is not None else device
    keys = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64).to(device)
    # Class index plus a key in [0, 1): one sort orders by class, then randomly within a class.
    order = torch.argsort(group.to(torch.float64) + keys)
    sorted_group = group[order]
    counts = torch.zeros(num_classes + 1, dtype=torch.long, device=device)
    counts.index_add_(0, group, torch.ones_like(group))
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=device) - start[sorted_group]
    quota_ext = torch.cat([quota.clamp(min=0), quota.new_zeros(1)])
    keep_sorted = rank < quota_ext[sorted_group]
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[order] = keep_sorted
    return mask.view(labels.shape)


# --------------------------------------------------------------------------- moments
def _check_moments(sums: Tensor, outer: Tensor, counts: Tensor) -> tuple[int, int]:
    if sums.dim() != 2:
        raise ValueError(f"sums must be [K, C], got shape {tuple(sums.shape)}")
    k, c = sums.shape
    if tuple(outer.shape) != (k, c, c) or tuple(counts.shape) != (k,):
        raise ValueError(
            f"moment shapes disagree: sums {tuple(sums.shape)}, outer {tuple(outer.shape)} "
            f"(expected {(k, c, c)}), counts {tuple(counts.shape)} (expected {(k,)})"
        )
    for name, t in (("sums", sums), ("outer", outer), ("counts", counts)):
        if t.dtype != torch.float64:
            raise TypeError(f"{name} must be float64 (moments are accumulated in double), got {t.dtype}")
    return k, c


@torch.no_grad()
def accumulate_class_moments(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    sums: Tensor,
    outer: Tensor,
    counts: Tensor,
) -> None:
    """Add one batch's per-class feature moments to float64 accumulators, in place.

    ``features``: ``[B, C, h, w]`` or ``[N, C]`` (any float dtype; upcast to float64).
    ``labels``: ``[B, h, w]`` or ``[N]`` on the feature grid; pixels whose label is outside
    ``[0, num_classes)`` (ignore index 255, negatives, e.g. not subsampled) are skipped.
    ``sums`` ``[K, C]``, ``outer`` ``[K, C, C]``, ``counts`` ``[K]``: float64 accumulators::

        sums[k]   += sum_{i: y_i = k} x_i
        outer[k]  += sum_{i: y_i = k} x_i x_i^T
        counts[k] += |{i: y_i = k}|

    Outer products are formed with one batched float64 matmul over class-pure blocks of
    pixels (see ``_group_by_class``), so the work is ``N C^2`` whatever ``K`` is.
    """
    k, c = _check_moments(sums, outer, counts)
    if k != num_classes:
        raise ValueError(f"accumulators have {k} classes, num_classes is {num_classes}")
    _check_labels(features, labels)
    x = _as_pixels(features)
    if x.shape[1] != c:
        raise ValueError(f"features have {x.shape[1]} channels, accumulators {c}")
    y = labels.reshape(-1).to(device=x.device, dtype=torch.long)
    valid = (y >= 0) & (y < num_classes)
    x = x[valid].to(torch.float64)
    y = y[valid]
    n = x.shape[0]
    if n == 0:
        return

    counts.index_add_(0, y, torch.ones(n, dtype=torch.float64, device=y.device))
    sums.index_add_(0, y, x)
    block = _block_size(n, num_classes, minimum=256)
    slot, block_class = _group_by_class(y, num_classes, block)
    packed = x.new_zeros(block_class.shape[0], block, c)
    packed.view(-1, c).index_copy_(0, slot, x)
    outer.index_add_(0, block_class, torch.bmm(packed.transpose(1, 2), packed))


# --------------------------------------------------------------------------- fitting
def _resolve_min_pixels(min_pixels: int | None, n_components: int | None, num_channels: int) -> int:
    if min_pixels is not None:
        return min_pixels
    # A sample of n points spans at most n - 1 directions around its mean: a fixed rank r needs
    # r + 1 points, and the explained-variance rule needs a full-rank covariance (C + 1 points)
    # for the variance ratios to be estimated at all.
    return (n_components if n_components is not None else num_channels) + 1


def undersampled_classes(
    counts: Tensor, n_components: int | None, num_channels: int, min_pixels: int | None = None
) -> Tensor:
    """Boolean ``[K]``: classes with fewer than ``min_pixels`` pixels, which :func:`fit_subspaces`
    replaces by the global subspace. ``min_pixels`` defaults to ``n_components + 1`` for a fixed
    rank and to ``C + 1`` for the explained-variance rule."""
    return counts < _resolve_min_pixels(min_pixels, n_components, num_channels)


def _mean_and_covariance(sums: Tensor, outer: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Batched mean ``S / n`` and population covariance ``O / n - mu mu^T`` (float64)."""
    n = counts.clamp(min=1.0)
    mean = sums / n[:, None]
    cov = outer / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
    return mean, 0.5 * (cov + cov.transpose(1, 2))


def _select_ranks(eigenvalues: Tensor, explained_variance: float, n_components: int | None) -> Tensor:
    """Ranks ``[K]`` from descending eigenvalues ``[K, C]``.

    Explained-variance rule: the fewest leading components whose cumulative share of the total
    variance is ``>= explained_variance``; 0 when the total variance is 0 (all features equal).
    """
    k, c = eigenvalues.shape
    if n_components is not None:
        return torch.full((k,), min(n_components, c), dtype=torch.long, device=eigenvalues.device)
    total = eigenvalues.sum(1, keepdim=True)
    cumulative = torch.cumsum(eigenvalues, 1) / total.clamp(min=torch.finfo(torch.float64).tiny)
    ranks = (cumulative < explained_variance).sum(1) + 1
    return torch.where(total[:, 0] > 0, ranks.clamp(max=c), torch.zeros_like(ranks))


@torch.no_grad()
def fit_subspaces(
    sums: Tensor,
    outer: Tensor,
    counts: Tensor,
    explained_variance: float = 0.95,
    n_components: int | None = None,
    mode: str = "per_class",
    min_pixels: int | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PCA subspaces from accumulated moments.

    ``sums`` ``[K, C]``, ``outer`` ``[K, C, C]``, ``counts`` ``[K]``: float64 moments from
    :func:`accumulate_class_moments` (after the all-reduce under DDP).
    ``explained_variance``: keep the fewest components whose cumulative explained variance
    (eigenvalue share of the trace) is ``>= explained_variance``; ignored when ``n_components``
    fixes the rank instead.
    ``mode``: ``"per_class"``, one subspace per class (for scoring modes ``"predicted"`` and
    ``"min"``); ``"global"``, one subspace from the moments pooled over all classes (``K = 1``).
    ``min_pixels``: classes with fewer pixels are under-sampled (default: ``n_components + 1``,
    or ``C + 1`` for the explained-variance rule; see :func:`undersampled_classes`).

    Per class: ``mu = S / n``, population covariance ``Sigma = O / n - mu mu^T``, eigenvectors by
    ``torch.linalg.eigh`` in float64, sorted by decreasing eigenvalue.

    Fallback: an under-sampled class (including one with no pixels) gets the global mean and
    subspace, fitted on all classes' pooled moments, and a :class:`FREFitWarning` naming it.

    Returns float64 ``means`` ``[K, C]``, ``bases`` ``[K, C, r_max]`` with orthonormal columns
    ``0..ranks[k]-1`` and zeros after (``r_max = max(ranks)``, so scoring is one batched op), and
    int64 ``ranks`` ``[K]``.
    """
    num_classes, num_channels = _check_moments(sums, outer, counts)
    if mode not in ("per_class", "global"):
        raise ValueError(f"mode must be 'per_class' or 'global', got {mode!r}")
    if n_components is not None and n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    if n_components is None and not 0.0 < explained_variance <= 1.0:
        raise ValueError(f"explained_variance must be in (0, 1], got {explained_variance}")
    total = counts.sum()
    if total <= 0:
        raise ValueError("no pixels were accumulated: cannot fit FRE subspaces")

    needed = _resolve_min_pixels(min_pixels, n_components, num_channels)
    g_mean, g_cov = _mean_and_covariance(sums.sum(0, keepdim=True), outer.sum(0, keepdim=True), total[None])
    if total < needed:
        warnings.warn(
            f"FRE: only {int(total)} pixels in total, fewer than the {needed} needed for a well-posed "
            f"{num_channels}-dimensional PCA; the subspaces are poorly determined",
            FREFitWarning,
            stacklevel=2,
        )

    if mode == "global":
        mean, cov = g_mean, g_cov
    else:
        mean, cov = _mean_and_covariance(sums, outer, counts)
        under = counts < needed
        if bool(under.any()):
            names = _class_names(num_classes, class_names)
            listed = ", ".join(f"{names[k]}: {int(counts[k])} px" for k in under.nonzero()[:, 0].tolist())
            warnings.warn(
                f"FRE: too few pixels (< {needed}) to fit a per-class subspace for {listed}; "
                "using the global subspace (pooled over all classes) for these classes",
                FREFitWarning,
                stacklevel=2,
            )
            mean = torch.where(under[:, None], g_mean, mean)
            cov = torch.where(under[:, None, None], g_cov, cov)

    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    eigenvalues = eigenvalues.flip(-1).clamp(min=0.0)  # round-off can make null directions negative
    eigenvectors = eigenvectors.flip(-1)
    ranks = _select_ranks(eigenvalues, explained_variance, n_components)
    r_max = int(ranks.max())
    used = torch.arange(r_max, device=ranks.device)[None, :] < ranks[:, None]
    bases = eigenvectors[:, :, :r_max] * used[:, None, :].to(eigenvectors.dtype)
    return mean, bases, ranks


# --------------------------------------------------------------------------- scoring
def _scoring_inputs(features: Tensor, means: Tensor, bases: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pixels ``[N, C]`` and parameters in the compute dtype (>= float32), all shifted by the
    mean of the class means. The shift leaves every ``x - mu_k`` unchanged; it only keeps the
    expanded squared distances in :func:`_all_class_sq_errors` free of needless cancellation."""
    if means.dim() != 2 or bases.dim() != 3 or bases.shape[:2] != means.shape:
        raise ValueError(f"means must be [K, C] and bases [K, C, r], got {tuple(means.shape)} and {tuple(bases.shape)}")
    x = _as_pixels(features)
    if x.shape[1] != means.shape[1]:
        raise ValueError(f"features have {x.shape[1]} channels, the subspaces {means.shape[1]}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    center = means.mean(0)  # in the parameters' own (float64) precision
    x = x.to(dtype) - center.to(device=x.device, dtype=dtype)
    shifted_means = (means - center).to(device=x.device, dtype=dtype)
    return x, shifted_means, bases.to(device=x.device, dtype=dtype)


def _all_class_sq_errors(x: Tensor, means: Tensor, bases: Tensor) -> Tensor:
    """Squared FRE of pixels ``x`` ``[n, C]`` against every class: ``[n, K]``.

    ``||x - mu||^2 - ||B^T (x - mu)||^2`` (valid because B has orthonormal or zero columns), with
    the distance expanded as ``|x|^2 - 2 x.mu + |mu|^2`` and ``B^T (x - mu) = B^T x - B^T mu`` so
    the work is two matmuls with the constant terms as their bias; clamped at 0 against round-off.
    """
    n = x.shape[0]
    k, c, r = bases.shape
    flat_bases = bases.permute(1, 0, 2).reshape(c, k * r)
    offsets = torch.einsum("kc,kcr->kr", means, bases).reshape(k * r)
    proj2 = torch.linalg.vector_norm(torch.addmm(-offsets, x, flat_bases).view(n, k, r), dim=2).square()
    x2 = torch.linalg.vector_norm(x, dim=1, keepdim=True).square()
    dist2 = torch.addmm(means.square().sum(1), x, means.T, alpha=-2.0).add_(x2)
    return dist2.sub_(proj2).clamp_(min=0.0)


def _predicted_sq_errors(x: Tensor, means: Tensor, bases: Tensor, cls: Tensor) -> Tensor:
    """Squared FRE of pixels ``x`` ``[n, C]`` against the subspace of ``cls`` ``[n]``: ``[n]``.

    Pixels are grouped into class-pure blocks so each block meets one basis in a batched matmul:
    ``N C r`` work instead of ``N C K r`` for scoring against all classes and picking one.
    """
    n, c = x.shape
    k = means.shape[0]
    block = _block_size(n, k, minimum=64)
    slot, block_class = _group_by_class(cls, k, block)
    # Gather rather than scatter (faster on CPU): padding rows repeat pixel 0 and are never read back.
    source = torch.zeros(block_class.shape[0] * block, dtype=torch.long, device=x.device)
    source[slot] = torch.arange(n, device=x.device)
    packed = x.index_select(0, source).view(-1, block, c)
    packed -= means[block_class][:, None, :]  # centre each block on its class mean
    proj = torch.bmm(packed, bases[block_class])
    err2 = torch.linalg.vector_norm(packed, dim=2).square() - torch.linalg.vector_norm(proj, dim=2).square()
    return err2.view(-1)[slot].clamp_(min=0.0)


def _chunks(n: int, pixels_per_chunk: int) -> list[slice]:
    step = max(1, pixels_per_chunk)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _output_shape(features: Tensor) -> tuple[int, ...]:
    """Per-pixel output shape: ``[B, h, w]`` for ``[B, C, h, w]`` features, ``[N]`` for ``[N, C]``."""
    if features.dim() == 4:
        b, _, h, w = features.shape
        return (b, h, w)
    return (features.shape[0],)


def class_reconstruction_errors(
    features: Tensor, means: Tensor, bases: Tensor, chunk_size: int | None = None
) -> Tensor:
    """FRE of every pixel against every class subspace.

    ``features`` ``[B, C, h, w]`` (or ``[N, C]``), ``means`` ``[K, C]``, ``bases`` ``[K, C, r]``
    (zero-padded columns allowed). Returns ``[B, K, h, w]`` (or ``[N, K]``) in the compute dtype
    (float32, or float64 for float64 features). ``chunk_size``: pixels per chunk (default: about
    64 MiB of scratch).
    """
    with torch.autocast(device_type=features.device.type, enabled=False), full_precision_matmul():
        x, m, b = _scoring_inputs(features, means, bases)
        k, _, r = b.shape
        per_chunk = chunk_size or _CHUNK_ELEMENTS // (k * (r + 2))
        err2 = torch.cat([_all_class_sq_errors(x[s], m, b) for s in _chunks(x.shape[0], per_chunk)])
        err = err2.sqrt_()
    if features.dim() == 4:
        bsz, _, h, w = features.shape
        return err.view(bsz, h, w, k).permute(0, 3, 1, 2)
    return err


def reconstruction_error(
    features: Tensor,
    means: Tensor,
    bases: Tensor,
    class_index: Tensor | None = None,
    mode: str = "predicted",
    chunk_size: int | None = None,
) -> Tensor:
    """Feature reconstruction error ``|| (I - B_k B_k^T)(x - mu_k) ||_2`` per pixel.

    ``features``: ``[B, C, h, w]`` (or ``[N, C]``), any float dtype; computed in float32
    (float64 if the features are float64) with autocast off.
    ``means`` ``[K, C]``, ``bases`` ``[K, C, r]``: from :func:`fit_subspaces` (zero-padded
    columns allowed; float64 parameters are cast to the compute dtype).
    ``class_index``: ``[B, h, w]`` (or ``[N]``) class per pixel on the feature grid, values in
    ``[0, K)``; required for ``mode="predicted"``, ignored otherwise.
    ``mode``: ``"predicted"`` (subspace of ``class_index``), ``"min"`` (minimum over the K
    subspaces) or ``"global"`` (the single subspace of a ``K = 1`` fit).
    ``chunk_size``: pixels per chunk (default: about 64 MiB of scratch per chunk).

    Returns ``[B, h, w]`` (or ``[N]``), higher = farther from the in-distribution subspace.
    """
    if mode not in SCORING_MODES:
        raise ValueError(f"mode must be one of {SCORING_MODES}, got {mode!r}")
    if mode == "global" and means.shape[0] != 1:
        raise ValueError(f"mode 'global' needs a single subspace (K = 1), got K = {means.shape[0]}")
    if mode == "predicted":
        if class_index is None:
            raise ValueError("mode 'predicted' needs class_index (the predicted class of every pixel)")
        _check_labels(features, class_index, what="class_index")

    with torch.autocast(device_type=features.device.type, enabled=False), full_precision_matmul():
        x, m, b = _scoring_inputs(features, means, bases)
        k, c, r = b.shape
        n = x.shape[0]
        if mode == "predicted":
            cls = class_index.reshape(-1).to(device=x.device, dtype=torch.long)
            # Scratch per pixel: centred copy + padded block (<= 1.25 C) + projection (r).
            per_chunk = chunk_size or _CHUNK_ELEMENTS // (3 * c + r)
            parts = [_predicted_sq_errors(x[s], m, b, cls[s]) for s in _chunks(n, per_chunk)]
        else:
            per_chunk = chunk_size or _CHUNK_ELEMENTS // (k * (r + 2))
            parts = [_all_class_sq_errors(x[s], m, b).amin(1) for s in _chunks(n, per_chunk)]
        err = torch.cat(parts).sqrt_()
    return err.view(_output_shape(features))


# --------------------------------------------------------------------------- standardization
@torch.no_grad()
def accumulate_error_moments(
    errors: Tensor, labels: Tensor, num_classes: int, sums: Tensor, sq_sums: Tensor, counts: Tensor
) -> None:
    """Add per-class error sums, squared sums and counts (float64 ``[K]`` each), in place.

    ``errors``: ``[B, h, w]`` or ``[N]``; ``labels`` of the same shape, the class each error is
    attributed to (for standardization: a training pixel's class, with its error against that
    class's subspace); values outside ``[0, num_classes)`` are skipped. No host synchronisation.
    """
    if errors.shape != labels.shape:
        raise ValueError(f"errors {tuple(errors.shape)} and labels {tuple(labels.shape)} differ in shape")
    for name, t in (("sums", sums), ("sq_sums", sq_sums), ("counts", counts)):
        if t.dtype != torch.float64 or tuple(t.shape) != (num_classes,):
            raise ValueError(f"{name} must be float64 of shape [{num_classes}], got {t.dtype} {tuple(t.shape)}")
    e = errors.reshape(-1).to(torch.float64)
    y = labels.reshape(-1).to(device=e.device, dtype=torch.long)
    valid = (y >= 0) & (y < num_classes)
    # Invalid pixels are sent to class 0 with weight 0 rather than filtered (no sync on CUDA).
    index = torch.where(valid, y, 0)
    w = valid.to(torch.float64)
    counts.index_add_(0, index, w)
    sums.index_add_(0, index, e * w)
    sq_sums.index_add_(0, index, e.square() * w)


@torch.no_grad()
def error_statistics(
    sums: Tensor,
    sq_sums: Tensor,
    counts: Tensor,
    min_std: float = 1e-6,
    class_names: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-class mean and population standard deviation of the errors (float64 ``[K]``).

    ``mean = S1 / n``, ``std = sqrt(max(S2 / n - mean^2, 0))``, floored at ``min_std`` so that
    standardizing never divides by zero. Classes with fewer than 2 errors fall back to the
    statistics pooled over all classes, with a :class:`FREFitWarning`.
    """
    total = counts.sum()
    if total <= 0:
        raise ValueError("no errors were accumulated: cannot compute standardization statistics")
    n = counts.clamp(min=1.0)
    mean = sums / n
    var = (sq_sums / n - mean.square()).clamp(min=0.0)
    g_mean = sums.sum() / total
    g_var = (sq_sums.sum() / total - g_mean.square()).clamp(min=0.0)
    few = counts < 2
    if bool(few.any()):
        names = _class_names(counts.shape[0], class_names)
        listed = ", ".join(f"{names[k]}: {int(counts[k])}" for k in few.nonzero()[:, 0].tolist())
        warnings.warn(
            f"FRE: fewer than 2 training errors for {listed}; standardizing these classes with the "
            "statistics pooled over all classes",
            FREFitWarning,
            stacklevel=2,
        )
        mean = torch.where(few, g_mean, mean)
        var = torch.where(few, g_var, var)
    return mean, var.sqrt().clamp(min=min_std)


def standardize_errors(errors: Tensor, mean: Tensor, std: Tensor, class_index: Tensor | None = None) -> Tensor:
    """Per-class standardization ``(e - mean[k]) / std[k]``.

    Either ``errors`` ``[B, h, w]`` (or ``[N]``) with ``class_index`` of the same shape giving
    ``k`` per pixel, or ``errors`` with a class axis at dim 1 (``[B, K, h, w]`` or ``[N, K]``, from
    :func:`class_reconstruction_errors`) and ``class_index=None``. Output dtype follows ``errors``.
    """
    mean = mean.to(device=errors.device, dtype=errors.dtype)
    std = std.to(device=errors.device, dtype=errors.dtype)
    if class_index is not None:
        if class_index.shape != errors.shape:
            raise ValueError(f"class_index {tuple(class_index.shape)} and errors {tuple(errors.shape)} differ in shape")
        k = class_index.to(device=errors.device, dtype=torch.long)
        return (errors - mean[k]) / std[k]
    if errors.dim() < 2 or errors.shape[1] != mean.shape[0]:
        raise ValueError(
            f"without class_index, errors need the class axis at dim 1 ({mean.shape[0]} classes), "
            f"got shape {tuple(errors.shape)}"
        )
    view = (1, -1) + (1,) * (errors.dim() - 2)
    return (errors - mean.view(view)) / std.view(view)

"""Test-time augmentation: a method's outputs averaged over rescaled and mirrored views of each image.

Every view is the image resized bilinearly by a scale factor (``align_corners=False``, sides
rounded) and optionally mirrored left-right; the method's ``segment`` runs on it, its logits and
every score map are mirrored back, resized bilinearly to the input's size and averaged over the
views in float32. What is averaged is therefore each score itself, whatever the method: for MSP
that is the mean of the views' MSP, whereas the StreetHazards reference code averages the softmax
over its 5 scales and takes the MSP of that mean (the two differ where views disagree).

Example:
    >>> import torch
    >>> tta = TestTimeAugmentation(scales=(1.0, 0.5), flip=True)
    >>> tta.num_views, tta.views()
    (4, [(1.0, False), (1.0, True), (0.5, False), (0.5, True)])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TTAOptions", "TestTimeAugmentation"]


class TTAOptions(TypedDict, total=False):
    """The config block ``evaluation.test_time_augmentation``; see :class:`TestTimeAugmentation`."""

    scales: list[float]
    flip: bool


@dataclass(frozen=True)
class TestTimeAugmentation:
    """Views of ``scales`` (factors of the input size) times, with ``flip``, the mirrored image."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        scales = tuple(self.scales)
        if not scales:
            raise ValueError("evaluation.test_time_augmentation.scales must name at least one scale")
        for scale in scales:
            number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
            if not (number and math.isfinite(scale) and scale > 0):
                raise ValueError(
                    f"evaluation.test_time_augmentation.scales must be positive numbers, got {list(scales)}"
                )
        object.__setattr__(self, "scales", tuple(float(s) for s in scales))
        object.__setattr__(self, "flip", bool(self.flip))

    @classmethod
    def from_options(cls, options: TTAOptions | None) -> TestTimeAugmentation:
        options = dict(options or {})
        unknown = set(options) - {"scales", "flip"}
        if unknown:
            raise ValueError(
                f"evaluation.test_time_augmentation: unknown option(s) {sorted(unknown)}; expected scales, flip"
            )
        return cls(scales=tuple(options.get("scales", (1.0,))), flip=bool(options.get("flip", False)))

    @property
    def num_views(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    @property
    def is_identity(self) -> bool:
        return self.scales == (1.0,) and not self.flip

    def describe(self) -> str:
        """One line for the protocol card."""
        if self.is_identity:
            return "none"
        flip = " x horizontal flip" if self.flip else ""
        return (
            f"mean over {self.num_views} views: scales {list(self.scales)}{flip}; logits and every score map "
            "resized bilinearly to the input size"
        )

    def views(self) -> list[tuple[float, bool]]:
        return [(scale, mirrored) for scale in self.scales for mirrored in ((False, True) if self.flip else (False,))]

    def __call__(self, segment: Callable[[Tensor], Any], image: Tensor) -> Any:
        """``segment`` (a method's: image -> ``MethodOutput``) averaged over the views of ``image`` ``[B, 3, H, W]``."""
        if self.is_identity:
            return segment(image)
        size = tuple(image.shape[-2:])
        logits_sum: Tensor | None = None
        score_sums: dict[str, Tensor] = {}
        output = None
        for scale, mirrored in self.views():
            view = image
            if scale != 1.0:
                view_size = [max(1, round(side * scale)) for side in size]
                view = F.interpolate(image, size=view_size, mode="bilinear", align_corners=False)
            if mirrored:
                view = view.flip(-1)
            output = segment(view)
            logits = _back(output.logits, size, mirrored)
            logits_sum = logits if logits_sum is None else logits_sum + logits
            for name, score in output.scores.items():
                back = _back(score.unsqueeze(1), size, mirrored).squeeze(1)
                score_sums[name] = back if name not in score_sums else score_sums[name] + back
        assert output is not None and logits_sum is not None
        views = float(self.num_views)
        return type(output)(logits_sum / views, {name: total / views for name, total in score_sums.items()})


def _back(x: Tensor, size: Sequence[int], mirrored: bool) -> Tensor:
    """A view's ``[B, C, h, w]`` output mirrored back and resized to ``size``, in float32 (or wider)."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if mirrored:
        x = x.flip(-1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x

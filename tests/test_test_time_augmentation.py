"""Test-time augmentation: views, their inverse mapping, averaging, options and the protocol card."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.base import MethodOutput
from lightning_modules.scoring.test_time_augmentation import TestTimeAugmentation
from lightning_modules.segmenter import DeepLabV3PlusSegmenter


def _column_weighted(image: torch.Tensor) -> MethodOutput:
    """A method that is not mirror-equivariant: score = channel 0 x column index; 2 logit channels."""
    columns = torch.arange(image.shape[-1], dtype=image.dtype)
    score = image[:, 0] * columns
    return MethodOutput(torch.stack([score, -score], dim=1), {"s": score, "t": 2 * score})


def test_flip_averages_the_view_mapped_back() -> None:
    image = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = TestTimeAugmentation(flip=True)(_column_weighted, image)
    # (x c + mirror(mirror(x) c)) / 2 = x (c + (W - 1 - c)) / 2 = x (W - 1) / 2, whatever c
    expected = image[:, 0] * (image.shape[-1] - 1) / 2
    torch.testing.assert_close(out.scores["s"], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.scores["t"], 2 * expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logits[:, 0], expected, rtol=1e-12, atol=1e-12)


def test_scales_return_to_the_input_size_and_keep_constant_maps() -> None:
    image = torch.full((1, 3, 30, 44), 0.25)
    tta = TestTimeAugmentation(scales=(0.5, 1.0, 1.5, 0.75), flip=True)
    seen: list[tuple[int, int]] = []

    def identity(view: torch.Tensor) -> MethodOutput:
        seen.append(tuple(view.shape[-2:]))
        return MethodOutput(view[:, :2], {"s": view[:, 0]})

    out = tta(identity, image)
    assert sorted(set(seen)) == [(15, 22), (22, 33), (30, 44), (45, 66)] and len(seen) == tta.num_views == 8
    assert out.logits.shape == (1, 2, 30, 44) and out.scores["s"].shape == (1, 30, 44)
    torch.testing.assert_close(out.scores["s"], torch.full((1, 30, 44), 0.25))


def test_identity_is_the_method_itself_and_bad_scales_are_refused() -> None:
    image = torch.rand(1, 3, 4, 4)
    assert TestTimeAugmentation()(_column_weighted, image).scores["s"].equal(_column_weighted(image).scores["s"])
    assert TestTimeAugmentation().describe() == "none"
    for bad in ([], [0.0], [-1.0], [math.inf], [True]):
        with pytest.raises(ValueError, match="scales"):
            TestTimeAugmentation.from_options({"scales": bad})
    with pytest.raises(ValueError, match="unknown option"):
        TestTimeAugmentation.from_options({"scale": [1.0]})


def test_a_segmenter_tests_with_the_evaluations_views_and_records_them() -> None:
    from callbacks.evaluation import AnomalyEvaluation

    model = DeepLabV3PlusSegmenter(num_classes=4, encoder_name="resnet18", encoder_weights=None).eval()
    evaluation = AnomalyEvaluation(test_time_augmentation={"scales": [1.0, 0.5], "flip": True})
    evaluation.on_test_start(None, model)  # what a test run does before its first batch
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tested = model.test_step({"image": image}, 0)
        validated = model.validation_step({"image": image}, 0)
    assert tested["logits"].shape == validated["logits"].shape == (1, 4, 64, 64)
    assert not torch.equal(tested["scores"]["msp"], validated["scores"]["msp"])  # validation: one view
    assert "mean over 4 views" in model.scoring_options()["test_time_augmentation"]

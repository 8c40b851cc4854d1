"""Float32 where mixed precision would cost the scores their resolution (``lightning_modules.precision``).

The bf16-autocast scoring of a trained checkpoint is in ``test_methods_synthetic.py`` (it reuses
that module's trained segmenter).
"""

from __future__ import annotations

import torch

from lightning_modules.precision import float32_head, full_precision_matmul
from lightning_modules.segmenter.torch_model import DeepLabV3Plus


def test_full_precision_matmul_turns_tf32_off_and_restores_the_setting() -> None:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with full_precision_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_float32_head_runs_outside_autocast() -> None:
    conv = torch.nn.Conv2d(4, 3, 1)
    features = torch.randn(1, 4, 5, 6).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(features.float()).dtype == torch.bfloat16  # what autocast alone gives
        out = float32_head(conv, features)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, conv(features.float()))


def test_segmenter_logits_are_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    net = DeepLabV3Plus(13, "resnet18", None).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features, logits = net.forward_features(torch.randn(1, 3, 32, 48))
    assert features.dtype == torch.bfloat16 and logits.dtype == torch.float32

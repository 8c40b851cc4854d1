"""FRESegmenter: fitting from a segmenter's features, scoring, and checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightning_modules.fre import FRESegmenter, resize_labels

K = 4


def tiny(**kwargs) -> FRESegmenter:
    torch.manual_seed(0)
    kwargs.setdefault("min_pixels", 10)
    kwargs.setdefault("n_components", 8)
    return FRESegmenter(num_classes=K, encoder_name="resnet18", encoder_weights=None, **kwargs)


def batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        {"image": torch.randn(2, 3, 64, 64, generator=gen), "mask": torch.randint(0, K, (2, 64, 64), generator=gen)}
        for _ in range(n)
    ]


def test_fitted_subspaces_match_numpy_pca_of_the_decoder_features() -> None:
    model = tiny(standardize=False, max_pixels_per_class=10**9)
    data = batches()
    model.fit_posthoc(data)
    model.eval()
    with torch.no_grad():
        feats = [model.forward_features(b["image"])[0] for b in data]
    labels = [resize_labels(b["mask"], tuple(f.shape[-2:])) for b, f in zip(data, feats, strict=True)]
    x = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in feats]).double().numpy()
    y = torch.cat([lab.reshape(-1) for lab in labels]).numpy()
    for k in range(K):
        xk = x[y == k]
        mean = xk.mean(0)
        cov = (xk - mean).T @ (xk - mean) / len(xk)
        _, vecs = np.linalg.eigh(cov)
        top = vecs[:, ::-1][:, :8]
        np.testing.assert_allclose(model.subspace_means[k].numpy(), mean, rtol=1e-6, atol=1e-8)
        basis = model.subspace_bases[k, :, : int(model.subspace_ranks[k])].numpy()
        np.testing.assert_allclose(basis @ basis.T, top @ top.T, atol=1e-6)


def test_checkpoint_round_trip_restores_subspaces_and_scores(tmp_path: Path) -> None:
    model = tiny()
    model.fit_posthoc(batches())
    model.eval()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "fre.ckpt")
    restored = FRESegmenter.load_from_checkpoint(tmp_path / "fre.ckpt", weights_only=True).eval()
    for name in ("subspace_means", "subspace_bases", "subspace_ranks", "error_mean", "error_std", "posthoc_fitted"):
        torch.testing.assert_close(getattr(restored, name), getattr(model, name), msg=name)
    image = batches(1)[0]["image"]
    with torch.no_grad():
        torch.testing.assert_close(restored.segment(image).scores["fre"], model.segment(image).scores["fre"])


@pytest.mark.parametrize("mode", ["predicted", "min", "global"])
def test_every_mode_scores_at_input_resolution(mode: str) -> None:
    model = tiny(mode=mode)
    model.fit_posthoc(batches(2))
    model.eval()
    with torch.no_grad():
        out = model.segment(torch.randn(1, 3, 40, 72))
    assert out.scores["fre"].shape == (1, 40, 72) and torch.isfinite(out.scores["fre"]).all()
    assert list(out.scores) == ["fre", "msp", "maxlogit", "entropy", "energy"]


def test_bad_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="model.mode"):
        tiny(mode="nearest")


def test_smoothing_dilation_smooths_the_score_and_keeps_the_raw_one() -> None:
    plain = tiny()
    plain.fit_posthoc(batches(2))
    smoothed = tiny(smoothing_dilation=2)
    smoothed.load_state_dict(plain.state_dict())
    image = torch.randn(2, 3, 40, 72, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        raw = plain.eval().segment(image).scores
        out = smoothed.eval().segment(image).scores
    assert list(out) == ["fre", "fre_raw", "msp", "maxlogit", "entropy", "energy"]
    torch.testing.assert_close(out["fre_raw"], raw["fre"])
    # Reference: a 7x7 Gaussian (sigma 1, normalised) with dilation 2 over a replicate-padded map, float64.
    taps = torch.exp(-((torch.arange(7, dtype=torch.float64) - 3) ** 2) / 2)
    kernel = torch.outer(taps, taps) / taps.sum() ** 2
    padded = torch.nn.functional.pad(raw["fre"].double()[:, None], (6, 6, 6, 6), mode="replicate")
    expected = torch.nn.functional.conv2d(padded, kernel[None, None], dilation=2)[:, 0]
    torch.testing.assert_close(out["fre"].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [0, -1, True])
def test_bad_smoothing_dilation_is_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="model.smoothing_dilation"):
        tiny(smoothing_dilation=value)


def test_an_encoder_stage_is_modelled_with_the_published_one_class_options() -> None:
    # Published FRE's closest configuration: one subspace of an encoder stage, unstandardised.
    model = tiny(feature_layer="encoder3", mode="global", standardize=False, max_pixels_per_class=10**9)
    assert model.subspace_means.shape == (1, 128)  # resnet18 layer3: 128 channels at 1/8 resolution
    data = batches()
    model.fit_posthoc(data)
    model.eval()
    with torch.no_grad():
        features, _ = model.net.forward_layer(data[0]["image"], "encoder3")
        assert features.shape[-2:] == (8, 8)
        score = model.segment(data[0]["image"]).scores["fre"]
    assert score.shape == (2, 64, 64) and torch.isfinite(score).all()
    # the global subspace is the PCA of every encoder3 pixel of the fitting pass
    with torch.no_grad():
        rows = torch.cat([model.net.forward_layer(b["image"], "encoder3")[0] for b in data])
    x = rows.permute(0, 2, 3, 1).reshape(-1, 128).double().numpy()
    np.testing.assert_allclose(model.subspace_means[0].numpy(), x.mean(0), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="model.feature_layer"):
        tiny(feature_layer="layer3")

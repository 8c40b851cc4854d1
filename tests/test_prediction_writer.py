"""AnomalyPredictionWriter: score maps and overlays for images of any size, against float64 references.

A stand-in method scores each pixel with the mean of its normalized channels, computed at half
resolution, so every output goes through the resize back to the original size. The references
below recompute the whole chain in float64 NumPy from the image files: the dataset's decoding
and normalization, the half-resolution subsampling, and PyTorch's bilinear resize
(``align_corners=False``) written out from its definition.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import cv2
import lightning as L
import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from callbacks.prediction_writer import (
    FLOAT16_MAX,
    OUTLINE_COLOR,
    AnomalyPredictionWriter,
    blend,
    outline,
    pack_bytes,
    percentile_range,
    to_float16,
    unpack_bytes,
)
from datamodules.labels import IMAGE_MEAN, IMAGE_STD, NUM_CLASSES, colorize
from datamodules.streethazards import StreetHazardsDataModule
from lightning_modules.base import AnomalySegmentationModule, MethodOutput

ALPHA = 0.6  # the writer's default heatmap weight


# --------------------------------------------------------------------------------------- references
def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of 1-D linear interpolation with half-pixel centres
    (``align_corners=False``): source ``(i + 0.5) * n_in / n_out - 0.5``, clamped at 0."""
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), i1), frac)
    return weights


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[h, w, ...]`` -> ``[H, W, ...]``, separable bilinear resize in float64."""
    rows, cols = bilinear_matrix(size[0], x.shape[0]), bilinear_matrix(size[1], x.shape[1])
    return np.einsum("Hh,hw...,Ww->HW...", rows, x.astype(np.float64), cols)


def decode(path: Path) -> np.ndarray:
    """RGB uint8 as the dataset decodes it (PIL; alpha dropped, other modes converted)."""
    image = Image.open(path)
    if image.mode in ("RGB", "RGBA"):
        return np.asarray(image)[..., :3]
    return np.asarray(image.convert("RGB"))


def normalize(rgb: np.ndarray) -> np.ndarray:
    return (rgb.astype(np.float64) / 255.0 - np.asarray(IMAGE_MEAN)) / np.asarray(IMAGE_STD)


def inferno_lut() -> np.ndarray:
    colours = matplotlib.colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3]
    return np.round(colours * 255.0).astype(np.uint8)


def heat_levels(score: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.round(np.clip((score - low) / (high - low), 0.0, 1.0) * 255.0).astype(int)


class Reference:
    """Expected outputs of the stand-in method for one image file, in float64."""

    def __init__(self, path: Path, model_size: tuple[int, int] | None = None, scale: float = 1.0) -> None:
        self.rgb = decode(path)
        self.size = self.rgb.shape[:2]
        seen = self.rgb
        if model_size is not None:  # the datamodule's resize on load
            seen = cv2.resize(self.rgb, (model_size[1], model_size[0]), interpolation=cv2.INTER_LINEAR)
        half = normalize(seen)[::2, ::2].mean(axis=2)
        self.score = scale * resize_bilinear(half, self.size)
        # Logits -(u - k)^2 interpolate to -interp(u^2) + 2k interp(u) - k^2, so the argmax of the
        # resized logits is the class nearest to the resized u.
        self.u = resize_bilinear(ToyMethod.class_coordinate(half), self.size)
        self.prediction = np.clip(np.round(self.u), 0, NUM_CLASSES - 1).astype(int)
        self.unambiguous = np.abs(np.abs(self.u - np.floor(self.u)) - 0.5) > 1e-2
        # The network input shown in panel 1: the decoded image, or the resized one resized back.
        self.input_rgb = resize_bilinear(seen, self.size) if model_size else self.rgb.astype(np.float64)


# --------------------------------------------------------------------------------------- fixtures
class ToyMethod(AnomalySegmentationModule):
    """Scores ``scale * mean(normalized channels)`` and logits ``-(u - k)^2`` at half resolution."""

    method_name = "toy"

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    @staticmethod
    def class_coordinate(mean_channel):  # type: ignore[no-untyped-def]
        return (mean_channel + 2.1) * 2.6  # normalized means in about [-2.1, 2.6] -> [0, 12.2]

    def segment(self, image: torch.Tensor) -> MethodOutput:
        half = image[:, :, ::2, ::2].mean(dim=1)
        u = self.class_coordinate(half)
        k = torch.arange(self.num_classes, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
        logits = -((u[:, None] - k) ** 2)
        score = self.scale * half
        return MethodOutput(logits, {"toy": score, "neg": -score})


IMAGES = {  # name -> (file, height, width, mode)
    "a": ("a.jpg", 50, 70, "RGB"),
    "sub/b": ("sub/b.png", 33, 41, "RGBA"),
    "sub/deep/c": ("sub/deep/c.png", 20, 90, "RGB"),
}


@pytest.fixture
def predict_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for file, height, width, mode in IMAGES.values():
        rows, cols = np.mgrid[0:height, 0:width]
        diagonal = (rows + cols) * 127 // (height + width)
        smooth = np.stack([rows * 255 // height, cols * 255 // width, diagonal], axis=2)
        rgb = np.clip(smooth + rng.integers(-40, 40, smooth.shape), 0, 255).astype(np.uint8)
        if mode == "RGBA":
            rgb = np.concatenate([rgb, rng.integers(0, 256, (height, width, 1), dtype=np.uint8)], axis=2)
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb, mode=mode).save(folder / file)
    return folder


@pytest.fixture
def lightning_log() -> list[str]:
    """Messages of Lightning's logger (it does not propagate to the root logger)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def run_predict(
    root: Path,
    predict_dir: Path,
    writer: AnomalyPredictionWriter,
    model: ToyMethod | None = None,
    return_predictions: bool = False,
    **data,
) -> None:
    datamodule = StreetHazardsDataModule(root=str(root), predict_dir=str(predict_dir), num_workers=0, **data)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[writer],
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.predict(model or ToyMethod(), datamodule=datamodule, return_predictions=return_predictions)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def split_panels(png: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return png[:, :width], png[:, width : 2 * width], png[:, 2 * width :]


def assert_heatmap_panel(
    panel: np.ndarray, ref: Reference, low: float, high: float, where: np.ndarray | None = None
) -> None:
    """Panel 3 (at the pixels ``where``) against the float64 blend; a score within float32 error of
    a level boundary may land in the neighbouring level (adjacent inferno colours differ by <= 5)."""
    expected = (1.0 - ALPHA) * ref.input_rgb + ALPHA * inferno_lut()[heat_levels(ref.score, low, high)]
    error = np.abs(panel.astype(np.float64) - np.round(expected)).max(axis=-1)
    if where is not None:
        error = error[where]
    assert error.max() <= 1 + ALPHA * 5
    assert np.mean(error <= 1) > 0.98


# --------------------------------------------------------------------------------------- pure functions
def test_to_float16_clips_finite_values_and_keeps_nan_inf() -> None:
    inf, nan = np.inf, np.nan
    values = np.array([0.0, 1e-3, -3.14159, 65504.0, 65519.0, 7.0e4, -1.0e9, inf, -inf, nan], np.float32)
    out, clipped = to_float16(values)
    assert out.dtype == np.float16 and clipped
    expected = np.array([0.0, 1e-3, -3.14159, 65504, 65504, 65504, -65504, inf, -inf, nan], np.float16)
    np.testing.assert_array_equal(out, expected)  # NaN compares equal to NaN here

    inside = np.linspace(-6e4, 6e4, 101, dtype=np.float32)
    out, clipped = to_float16(inside)
    assert not clipped
    np.testing.assert_array_equal(out, inside.astype(np.float16))
    assert not to_float16(np.array([np.inf, np.nan], np.float32))[1]  # nothing finite to clip


def test_percentile_range_ignores_non_finite_values() -> None:
    rng = np.random.default_rng(1)
    score = rng.standard_normal((37, 23)).astype(np.float32)
    clean = tuple(np.percentile(score.astype(np.float64), [1, 99]))
    assert percentile_range(score) == pytest.approx(clean, rel=1e-12)
    score[0, :5] = [np.nan, np.inf, -np.inf, 1e30, np.nan]
    finite = score[np.isfinite(score)].astype(np.float64)  # 1e30 is finite and counts; NaN/inf do not
    assert percentile_range(score) == pytest.approx(tuple(np.percentile(finite, [1, 99])), rel=1e-12)
    assert percentile_range(score, (5.0, 50.0)) == pytest.approx(tuple(np.percentile(finite, [5, 50])))
    assert percentile_range(np.full((4, 4), np.nan)) == (0.0, 1.0)
    assert percentile_range(np.full((4, 4), 2.5)) == (2.0, 3.0)


@pytest.mark.parametrize("width", [1, 2, 3])
def test_outline_matches_binary_erosion(width: int) -> None:
    rng = np.random.default_rng(width)
    mask = ndimage.binary_dilation(rng.random((40, 53)) > 0.97, iterations=3)
    mask[:8, :8] = True  # a region touching the image border is closed there
    cross = ndimage.generate_binary_structure(2, 1)
    expected = mask & ~ndimage.binary_erosion(mask, cross, iterations=width, border_value=0)
    result = outline(mask, width)
    np.testing.assert_array_equal(result, expected)
    assert result.any() and (mask & ~result).any()


def test_blend_matches_float64_formula() -> None:
    rng = np.random.default_rng(2)
    a, b = (rng.integers(0, 256, (9, 11, 3), dtype=np.uint8) for _ in range(2))
    for alpha in (0.0, 0.25, 0.6, 1.0):
        expected = np.round((1 - alpha) * a.astype(np.float64) + alpha * b.astype(np.float64))
        # float32 arithmetic may round an exact .5 either way
        assert np.abs(blend(a, b, alpha).astype(np.float64) - expected).max() <= 1
    np.testing.assert_array_equal(blend(a, b, 0.0), a)
    np.testing.assert_array_equal(blend(a, b, 1.0), b)


def test_pack_unpack_bytes_round_trip() -> None:
    g = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(5, 7, generator=g),
        torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),  # 9 bytes: padded
        torch.randn(3, generator=g).half(),
        torch.randint(-(2**40), 2**40, (2, 3), generator=g, dtype=torch.int64),
        torch.randn(4, 6, generator=g).t(),  # non-contiguous
        torch.empty(0, 4),
    ]
    buffer, spans = pack_bytes(tensors)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1 and all(start % 8 == 0 for start, _ in spans)
    for original, restored in zip(tensors, unpack_bytes(buffer, tensors, spans), strict=True):
        assert restored.dtype == original.dtype and restored.shape == original.shape
        assert torch.equal(restored, original)


# --------------------------------------------------------------------------------------- end to end
def test_native_size_outputs(tmp_path: Path, predict_dir: Path, lightning_log: list[str]) -> None:
    out = tmp_path / "out"
    writer = AnomalyPredictionWriter(output_dir=str(out))
    run_predict(tmp_path, predict_dir, writer)

    for name, (file, height, width, _) in IMAGES.items():
        ref = Reference(predict_dir / file)
        score = np.load(out / f"{name}.npy")
        assert score.dtype == np.float16 and score.shape == (height, width)
        np.testing.assert_allclose(score.astype(np.float64), ref.score, rtol=2**-11, atol=1e-5)

        png = read_png(out / f"{name}.png")
        assert png.shape == (height, 3 * width, 3)
        image, prediction, heatmap = split_panels(png, width)
        assert np.abs(image.astype(int) - ref.rgb.astype(int)).max() <= 1  # normalization round trip
        assert ref.unambiguous.mean() > 0.9
        np.testing.assert_array_equal(prediction[ref.unambiguous], colorize(ref.prediction)[ref.unambiguous])
        assert_heatmap_panel(heatmap, ref, *np.percentile(ref.score, [1, 99]))

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = sorted(f"{name}.{suffix}" for name in IMAGES for suffix in ("npy", "png"))
    assert files == expected  # sub-folders mirrored, nothing else (no temporary files) left behind
    assert writer.num_written == len(IMAGES)
    assert any(f"for {len(IMAGES)} images to {out}" in message for message in lightning_log)


def test_resized_input_all_scores_and_chosen_score(tmp_path: Path, predict_dir: Path) -> None:
    """The model sees 24x32 inputs, two per batch (of different original sizes); outputs come back
    at each image's original size. ``score='neg'`` picks the baseline for ``<name>.npy``."""
    out = tmp_path / "out"
    writer = AnomalyPredictionWriter(output_dir=str(out), score="neg", all_scores=True)
    run_predict(tmp_path, predict_dir, writer, predict_image_size=(24, 32), eval_batch_size=2)

    for name, (file, height, width, _) in IMAGES.items():
        ref = Reference(predict_dir / file, model_size=(24, 32))
        maps = {tag: np.load(out / f"{name}{tag}.npy") for tag in ("", ".toy", ".neg")}
        for tag, sign in (("", -1.0), (".toy", 1.0), (".neg", -1.0)):
            assert maps[tag].dtype == np.float16 and maps[tag].shape == (height, width)
            np.testing.assert_allclose(maps[tag].astype(np.float64), sign * ref.score, rtol=2**-11, atol=1e-5)

        png = read_png(out / f"{name}.png")
        assert png.shape == (height, 3 * width, 3)
        image, prediction, heatmap = split_panels(png, width)
        assert np.abs(image.astype(np.float64) - ref.input_rgb).max() <= 1.0
        np.testing.assert_array_equal(prediction[ref.unambiguous], colorize(ref.prediction)[ref.unambiguous])
        ref.score = -ref.score  # the heatmap shows the chosen score
        assert_heatmap_panel(heatmap, ref, *np.percentile(ref.score, [1, 99]))


def test_fixed_heatmap_range_and_threshold_outline(tmp_path: Path, predict_dir: Path) -> None:
    low, high = -0.5, 0.75
    ref = Reference(predict_dir / IMAGES["a"][0])
    # A threshold in a wide gap between scores, so float32 and float64 flag the same pixels.
    values = np.unique(ref.score)
    middle = slice(len(values) // 4, 3 * len(values) // 4)
    gap = np.argmax(np.diff(values[middle])) + middle.start
    threshold = float(values[gap] + values[gap + 1]) / 2.0
    assert values[gap + 1] - values[gap] > 1e-4

    out = tmp_path / "out"
    writer = AnomalyPredictionWriter(str(out), heatmap_range=(low, high), threshold=threshold)
    run_predict(tmp_path, predict_dir, writer)
    _, height, width, _ = IMAGES["a"]
    heatmap = split_panels(read_png(out / "a.png"), width)[2]

    cross = ndimage.generate_binary_structure(2, 1)
    flagged = ref.score >= threshold
    edge = flagged & ~ndimage.binary_erosion(flagged, cross, iterations=1, border_value=0)
    assert edge.any() and (~edge).any()
    np.testing.assert_array_equal(heatmap[edge], np.broadcast_to(OUTLINE_COLOR, heatmap[edge].shape))
    assert not np.all(heatmap[~edge] == OUTLINE_COLOR, axis=-1).any()
    assert_heatmap_panel(heatmap, ref, low, high, where=~edge)


def test_heatmap_range_saturates_outside(tmp_path: Path, predict_dir: Path) -> None:
    """A scale entirely above (below) every score paints each pixel with the first (last) colour."""
    lut = inferno_lut()
    for heatmap_range, level in (((100.0, 101.0), 0), ((-101.0, -100.0), 255)):
        out = tmp_path / f"out{level}"
        writer = AnomalyPredictionWriter(str(out), heatmap_range=heatmap_range, write_threads=0)
        run_predict(tmp_path, predict_dir, writer)
        for name, (file, _, width, _) in IMAGES.items():
            heatmap = split_panels(read_png(out / f"{name}.png"), width)[2].astype(np.float64)
            rgb = decode(predict_dir / file).astype(np.float64)
            expected = (1 - ALPHA) * rgb + ALPHA * lut[level]
            assert np.abs(heatmap - expected).max() <= 1.0


def test_scores_beyond_float16_are_clipped_with_one_warning(tmp_path: Path, predict_dir: Path) -> None:
    out = tmp_path / "out"
    scale = 1e5  # scores up to about 2.6e5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_predict(tmp_path, predict_dir, AnomalyPredictionWriter(str(out), overlay=False), ToyMethod(scale))
    clip_warnings = [w for w in caught if "beyond the float16 range" in str(w.message)]
    assert len(clip_warnings) == 1 and "'toy'" in str(clip_warnings[0].message)

    clipped_any = False
    for name, (file, height, width, _) in IMAGES.items():
        ref = Reference(predict_dir / file, scale=scale)
        score = np.load(out / f"{name}.npy")
        assert score.dtype == np.float16 and score.shape == (height, width) and np.isfinite(score).all()
        expected = np.clip(ref.score, -FLOAT16_MAX, FLOAT16_MAX)
        np.testing.assert_allclose(score.astype(np.float64), expected, rtol=2**-11, atol=1e-5 * scale)
        clipped_any |= bool((np.abs(ref.score) > FLOAT16_MAX).any())
    assert clipped_any
    assert not list(out.rglob("*.png"))  # overlay=False


def test_default_output_dir_and_unknown_score(tmp_path: Path, predict_dir: Path) -> None:
    writer = AnomalyPredictionWriter(overlay=False)
    with pytest.warns(UserWarning, match="return_predictions=False"):  # predictions kept in memory too
        run_predict(tmp_path, predict_dir, writer, return_predictions=True)
    # logger=False: trainer.log_dir is the default_root_dir
    assert writer.output_path == tmp_path / "predictions"
    written = sorted(p.relative_to(writer.output_path).as_posix() for p in writer.output_path.rglob("*.npy"))
    assert written == ["a.npy", "sub/b.npy", "sub/deep/c.npy"]

    with pytest.raises(ValueError, match=r"score 'sml' is not one of this method's scores \['toy', 'neg'\]"):
        run_predict(tmp_path, predict_dir, AnomalyPredictionWriter(str(tmp_path / "x"), score="sml"))
    with pytest.raises(ValueError, match="heatmap_range"):
        AnomalyPredictionWriter(heatmap_range=(1.0, 1.0))


def test_error_in_writer_thread_reaches_predict(tmp_path: Path, predict_dir: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(OSError):  # raised in a writer thread, re-raised by predict
        run_predict(tmp_path, predict_dir, AnomalyPredictionWriter(str(not_a_folder), write_threads=2))
    with pytest.raises(ValueError, match="write_threads"):
        AnomalyPredictionWriter(write_threads=-1)


class _DestroyProcessGroup(L.Callback):
    """Spawned workers otherwise exit with gloo's threads still joinable, which aborts them now
    and then ("terminate called without an active exception", SIGABRT) after all work is done."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_shards(tmp_path: Path, predict_dir: Path) -> None:
    """Two CPU processes (gloo) split the 3 images; the closing line sums both processes' counts,
    so 3 (not 6) shows that each image was written once."""
    out = tmp_path / "out"
    datamodule = StreetHazardsDataModule(root=str(tmp_path), predict_dir=str(predict_dir), num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",  # forked: no second import of torch and the project per process
        logger=False,
        callbacks=[AnomalyPredictionWriter(str(out)), _DestroyProcessGroup()],
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # The forked processes log into a file (capture in this process does not see their output).
    log_file = tmp_path / "rank_zero.log"
    handler = logging.FileHandler(log_file)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        trainer.predict(ToyMethod(), datamodule=datamodule, return_predictions=False)
    finally:
        logger.removeHandler(handler)
        handler.close()

    for name, (file, height, width, _) in IMAGES.items():
        score = np.load(out / f"{name}.npy")
        np.testing.assert_allclose(
            score.astype(np.float64), Reference(predict_dir / file).score, rtol=2**-11, atol=1e-5
        )
        assert read_png(out / f"{name}.png").shape == (height, 3 * width, 3)
    assert len(list(out.rglob("*.npy"))) == len(IMAGES)
    assert f"for {len(IMAGES)} images to {out}" in log_file.read_text()

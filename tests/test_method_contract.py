"""The contract every registered method keeps, checked for each one through the real command line.

Parametrized over the method registry, so a new method is covered without a line of test code:
fit a few steps (post-hoc statistics fitted at the end), test from ``last``, predict, a
checkpoint round trip, and 2 processes fitting the same post-hoc state as 1.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from lightning_modules.registry import discover_methods, methods
from tests.helpers import assert_same_evaluation, checkpoint_dir, cli_args, run_one_and_two_processes

discover_methods()
METHODS = sorted(methods())


def _images(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (50 + 7 * i, 70, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def fitted(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short fit per registered method: its output folder."""
    runs = {}
    for name in METHODS:
        out = tmp_path_factory.mktemp(f"fit-{name}")
        argv = ["fit", *cli_args(data_root, out, method=name), "--trainer.max_epochs=1"]
        assert main.main([*argv, "--trainer.limit_train_batches=2"]) == 0, name
        runs[name] = out
    return runs


@pytest.mark.parametrize("name", METHODS)
def test_fit_fits_posthoc_statistics_into_last(name: str, data_root: Path, fitted: dict[str, Path]) -> None:
    checkpoint = torch.load(checkpoint_dir(fitted[name]) / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["_class_path"].endswith(methods()[name].cls.__name__)
    # A method with post-hoc statistics has them fitted and saved in last.ckpt: never silently skipped.
    model = main.cli_main([*cli_args(data_root, fitted[name], method=name)], run=False).model
    assert bool(checkpoint["state_dict"]["posthoc_fitted"]) == model.needs_posthoc
    for key in model.posthoc_accumulators():
        assert key in checkpoint["state_dict"], key


@pytest.mark.parametrize("name", METHODS)
def test_test_from_last_writes_every_score(name: str, data_root: Path, fitted: dict[str, Path]) -> None:
    out = fitted[name]
    assert main.main(["test", *cli_args(data_root, out, method=name), "--ckpt_path=last"]) == 0
    metrics = json.loads((out / "run" / "run" / "metrics.json").read_text())
    assert metrics["method"] == name and metrics["num_images"] == 7
    assert metrics["primary_score"] == next(iter(metrics["scores"]))
    for score, values in metrics["scores"].items():
        assert 0.0 <= values["auroc"] <= 1.0, score
    assert "scoring_options" in metrics


@pytest.mark.parametrize("name", METHODS)
def test_predict_writes_a_score_map_per_image(
    name: str, data_root: Path, fitted: dict[str, Path], tmp_path: Path
) -> None:
    images = _images(tmp_path / "images")
    argv = ["predict", *cli_args(data_root, fitted[name], method=name), "--ckpt_path=last"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main.main([*argv, f"--data.predict_dir={images}"]) == 0
    # predictions are written, not also kept in memory (the CLI's default)
    assert not [w for w in caught if "return_predictions" in str(w.message)]
    written = sorted((fitted[name] / "run" / "run" / "predictions").rglob("*.npy"))
    assert [p.stem for p in written] == ["img0", "img1"]
    assert np.load(written[1]).shape == (57, 70)


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_round_trip_gives_the_same_scores(name: str, fitted: dict[str, Path], tmp_path: Path) -> None:
    import lightning as L

    cls = methods()[name].cls
    first = cls.load_from_checkpoint(checkpoint_dir(fitted[name]) / "last.ckpt", weights_only=True).eval()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(first)
    trainer.save_checkpoint(tmp_path / "again.ckpt")
    second = cls.load_from_checkpoint(tmp_path / "again.ckpt", weights_only=True).eval()
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one, two = first.segment(image), second.segment(image)
    assert one.scores.keys() == two.scores.keys()
    for score in one.scores:
        assert torch.equal(one.scores[score], two.scores[score]), score


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_posthoc_state_on_two_processes_equals_one(name: str, data_root: Path, tmp_path: Path) -> None:
    """``test`` of an untrained network fits the post-hoc statistics; 2 gloo processes must fit
    what 1 process fits (sums to float64 rounding, memory banks as the same set of rows) and
    evaluate the 7 test images to the same metrics (pooled ones within their error bounds)."""
    model = main.cli_main([*cli_args(data_root, tmp_path / "probe", method=name)], run=False).model
    if not model.needs_posthoc:
        pytest.skip(f"{name} has no post-hoc statistics")
    extra = [f"--model.init_args.{key}={value}" for key, value in getattr(model, "POSTHOC_EXACT_OPTIONS", {}).items()]
    # Histograms fine enough to hold every calibration score as its own bin: the operating
    # thresholds are then scores, not bin edges of a layout that depends on how processes merged.
    extra.append("--evaluation.num_bits=20")
    runs = run_one_and_two_processes(name, data_root, extra, tmp_path)
    one, (rank0, rank1) = runs[1]["buffers"][0], runs[2]["buffers"]
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key}: the processes disagree"
    for key, (reduction, _) in model._posthoc_accumulators.items():
        if reduction == "cat":
            rows_one = sorted(map(tuple, one[key].reshape(len(one[key]), -1).tolist()))
            rows_two = sorted(map(tuple, rank0[key].reshape(len(rank0[key]), -1).tolist()))
            assert rows_one == rows_two, key
        else:
            torch.testing.assert_close(rank0[key], one[key], rtol=1e-10, atol=1e-9, msg=key)
    assert bool(rank0["posthoc_fitted"]) and bool(one["posthoc_fitted"])
    assert_same_evaluation(runs[1]["metrics"], runs[2]["metrics"], exact_scores=())


@pytest.mark.parametrize("name", METHODS)
def test_energy_is_computed_at_the_configured_temperature(name: str, data_root: Path, tmp_path: Path) -> None:
    from lightning_modules.scoring.baselines import energy_score

    args = [*cli_args(data_root, tmp_path, method=name), "--model.init_args.energy_temperature=3.0"]
    model = main.cli_main(args, run=False).model.eval()
    assert model.scoring_options()["energy_temperature"] == 3.0
    with torch.no_grad():
        output = model.segment(torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0)))
    if "energy" in output.scores:
        torch.testing.assert_close(output.scores["energy"], energy_score(output.logits, 3.0))

"""End to end through main.py: fit, resume, test, compare, and the CLI's handling of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import main
from datamodules.synthetic import write_synthetic_streethazards
from tests.helpers import REPO, cli_args, method_config_args


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "streethazards"
    write_synthetic_streethazards(root, 12, 4, 6, image_size=(64, 96), seed=3)
    return root


def tiny_args(root: Path, out: Path, method: str = "sml", name: str = "run") -> list[str]:
    return [*cli_args(root, out, method, name=name, eval_batch_size=None), "--trainer.limit_train_batches=2"]


def last_checkpoint(out: Path, name: str = "run") -> dict:
    return torch.load(out / name / "run" / "checkpoints" / "last.ckpt", weights_only=True)


def test_fit_interrupted_after_one_epoch_resumes_to_same_step_count(tiny_root: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main.main(["fit", *tiny_args(tiny_root, straight), "--trainer.max_epochs=2"]) == 0
    # the interrupted run: stops after one epoch, then `--ckpt_path last` continues it
    assert main.main(["fit", *tiny_args(tiny_root, resumed), "--trainer.max_epochs=1"]) == 0
    assert last_checkpoint(resumed)["global_step"] == 2
    assert main.main(["fit", *tiny_args(tiny_root, resumed), "--trainer.max_epochs=2", "--ckpt_path=last"]) == 0
    assert last_checkpoint(resumed)["global_step"] == last_checkpoint(straight)["global_step"] == 4
    assert last_checkpoint(resumed)["epoch"] == last_checkpoint(straight)["epoch"]
    # the re-saved last.ckpt carries the fitted SML statistics
    state = last_checkpoint(resumed)["state_dict"]
    assert bool(state["posthoc_fitted"]) and state["sml.counts"].sum() > 0

    assert main.main(["test", *tiny_args(tiny_root, resumed), "--ckpt_path=last"]) == 0
    metrics = json.loads((resumed / "run" / "run" / "metrics.json").read_text())
    assert metrics["method"] == "sml" and metrics["split"] == "test" and metrics["num_images"] == 6
    assert set(metrics["scores"]) == {"sml", "msp", "maxlogit", "entropy", "energy"}
    assert metrics["checkpoint"].endswith("last.ckpt")


def test_compare_end_to_end_writes_three_files(tiny_root: Path, tmp_path: Path) -> None:
    overrides = [
        f"--data.root={tiny_root}",
        "--data.image_size=[64, 96]",
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--evaluation.num_bits=16",
    ]
    out = tmp_path / "compare"
    # The defaults of configs/compare.yaml: every registered method, networks shared as registered.
    records = main.compare(
        str(out),
        overrides=overrides,
        num_examples=1,
        base_config=str(REPO / "configs/demo.yaml"),
        method_config_dir=str(REPO / "configs/method/demo"),
        protocols=["densehybrid", "mask2anomaly"],
        bootstrap_samples=200,
    )
    for name in ("comparison.json", "comparison.md", "comparison.png"):
        assert (out / name).is_file(), name
    document = json.loads((out / "comparison.json").read_text())
    methods_seen = [r["method"] for r in document["records"]]
    roster = main.roster(None)  # every method compared by default, in table order
    assert {"sml", "fre", "dual_decoder"} <= set(roster) and methods_seen[: len(roster)] == roster
    assert {"msp@sml", "maxlogit@sml", "entropy@sml", "sml@dual_decoder"} <= set(methods_seen)
    # FRE scores SML's network: its logit baselines are listed once (with sml), its own fre_raw with it.
    assert "fre_raw@fre" in methods_seen and not {"msp@fre", "maxlogit@fre", "entropy@fre", "energy@fre"} & set(
        methods_seen
    )
    for record in document["records"]:
        for key in ("aupr", "auroc", "fpr95", "miou", "aupr_per_image", "train_time_s", "test_time_s", "checkpoint"):
            assert key in record, key
    fre = next(r for r in document["records"] if r["method"] == "fre")
    assert fre["train_time_s"] == 0 and fre["checkpoint"].endswith("sml/run/checkpoints/last.ckpt")
    dual = next(r for r in document["records"] if r["method"] == "dual_decoder")
    assert dual["initialized_from"] == "sml" and dual["train_time_s"] > 0
    assert dual["checkpoint"].endswith("dual_decoder/run/checkpoints/last.ckpt")
    hparams = torch.load(out / "dual_decoder/run/checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["init_checkpoint"].endswith("sml/run/checkpoints/last.ckpt")
    assert "| sml |" in (out / "comparison.md").read_text()
    # every method was tested under one protocol, so the file carries that one card
    card = document["protocol"]
    assert card["pooled"]["fpr95_rule"] == "first_reaching" and card["evaluation_resolution"] == "64x96"
    # several protocol presets in one compare: each method's own score under each, one table each
    for record in document["records"]:
        if record["method"] == record["network"]:
            assert set(record["protocols"]) == {"densehybrid", "mask2anomaly"}, record["method"]
    text = (out / "comparison.md").read_text()
    assert "Protocol preset `densehybrid`" in text and "Protocol preset `mask2anomaly`" in text
    assert Image.open(out / "comparison.png").size[0] > 500
    assert len(records) == len(document["records"])
    # Intervals over the 6 test images, the same resamples for every row, and every pair's difference
    assert document["bootstrap"]["samples"] == 200 and document["bootstrap"]["num_images"] == 6
    keys = ("aupr", "auroc", "fpr95", "aupr_per_image", "auroc_per_image", "fpr95_per_image", "miou")
    for record in document["records"]:
        for key in keys:
            assert len(record[f"{key}_ci"]) == 2, (record["method"], key)
    rows = len(document["records"])
    assert len(document["pairs"]) == rows * (rows - 1) // 2
    for pair in document["pairs"]:
        assert set(pair["metrics"]) == set(keys)
        for result in pair["metrics"].values():
            assert set(result) == {"difference", "ci", "excludes_zero"}
    same_network = next(p for p in document["pairs"] if p["a"] == "sml" and p["b"] == "msp@sml")
    assert same_network["metrics"]["miou"] == {"difference": 0.0, "ci": [0.0, 0.0], "excludes_zero": False}
    assert set(document["best"]) == set(keys) and document["best"]["fpr95"]["higher_is_better"] is False
    sml = next(r for r in document["records"] if r["method"] == "sml")
    assert f"| sml | {sml['aupr']:.3f} [{sml['aupr_ci'][0]:.3f}, {sml['aupr_ci'][1]:.3f}]" in text.replace("**", "")
    assert "not distinguishable from that best row" in text


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["fit", "--data.root=/nonexistent/streethazards"], "/nonexistent/streethazards' does not exist"),
        (["test", "--ckpt_path=/nonexistent/model.ckpt"], "checkpoint '/nonexistent/model.ckpt' does not exist"),
    ],
)
def test_cli_bad_input_is_one_clear_line(argv: list[str], expected: str, tmp_path: Path) -> None:
    args = [argv[0], *method_config_args("sml"), f"--trainer.default_root_dir={tmp_path}", *argv[1:]]
    proc = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and expected in last_line
    assert "Traceback" not in proc.stderr

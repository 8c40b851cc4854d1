"""End to end through main.py: fit, resume, test, compare, and the CLI's handling of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from datamodules.synthetic import write_synthetic_streethazards
from tests.helpers import REPO, TEST_ENCODER, cli_args, method_config_args, run_forked_main


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


def tiny_compare_overrides(root: Path) -> list[str]:
    """A one-step compare on the tiny data: the tests' sizes instead of the demo's crops and epochs."""
    return [
        f"--data.root={root}",
        "--data.image_size=[64, 96]",
        "--data.train_crop_size=null",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.num_sanity_val_steps=2",
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--evaluation.num_bits=16",
    ]


def test_compare_end_to_end_writes_three_files(tiny_root: Path, tmp_path: Path) -> None:
    overrides = tiny_compare_overrides(tiny_root)
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
    # Honest budgets: a row's training time counts the network it starts from or scores, and says
    # whether that network saw pasted outliers (the dual decoder's demo config pastes them).
    by_method = {r["method"]: r for r in document["records"]}
    for record in document["records"]:
        assert record["total_train_time_s"] == record["train_time_s"] + record["inherited_train_time_s"]
    sml_record = by_method["sml"]
    assert sml_record["inherited_train_time_s"] == 0 and sml_record["reuses"] == ""
    assert fre["inherited_train_time_s"] == sml_record["total_train_time_s"] > 0
    assert fre["reuses"] == "scores the network of sml" and dual["reuses"] == "starts from the network of sml"
    assert dual["inherited_train_time_s"] == sml_record["total_train_time_s"]
    outliers = {method: r["outliers_in_training"] for method, r in by_method.items()}
    assert outliers["dual_decoder"] is outliers["sml@dual_decoder"] is True
    assert outliers["sml"] is outliers["msp@sml"] is outliers["fre"] is outliers["knn"] is False
    dual_row = next(
        line for line in (out / "comparison.md").read_text().splitlines() if line.startswith("| dual_decoder |")
    )
    own, inherited = dual["train_time_s"], dual["inherited_train_time_s"]
    assert dual_row.endswith(f"| yes | {own:.0f} + {inherited:.0f} | {dual['test_time_s']:.0f} |"), dual_row
    assert "fre scores the network of sml" in (out / "comparison.md").read_text()
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


def test_compare_seeds_trains_each_seed_in_its_folder_and_summarises_them(tiny_root: Path, tmp_path: Path) -> None:
    """`compare --seeds 2`: two whole comparisons (the dual decoder starting from its own seed's
    segmenter) and a top-level summary whose numbers are those of the seed folders."""
    overrides = [*tiny_compare_overrides(tiny_root), f"--model.init_args.encoder_name={TEST_ENCODER}"]
    out = tmp_path / "compare"
    argv = [
        "compare",
        f"--output_dir={out}",
        f"--base_config={REPO / 'configs/demo.yaml'}",
        f"--method_config_dir={REPO / 'configs/method/demo'}",
        "--methods=[sml, dual_decoder]",
        f"--overrides={json.dumps(overrides)}",
        "--num_examples=1",
        "--bootstrap_samples=0",
        "--seeds=2",
    ]
    assert main.main(argv) == 0
    document = json.loads((out / "comparison.json").read_text())
    block = document["seeds"]
    assert block["values"] == [0, 1] and block["folders"] == ["seed_0", "seed_1"]
    per_seed = {}
    for seed in (0, 1):
        folder = out / f"seed_{seed}"
        for name in ("comparison.json", "comparison.md", "comparison.png"):
            assert (folder / name).is_file(), (seed, name)
        per_seed[seed] = {r["method"]: r for r in json.loads((folder / "comparison.json").read_text())["records"]}
        # each seed's runs got that seed, and the dual decoder started from that seed's segmenter
        assert f"seed_everything: {seed}" in (folder / "sml" / "run" / "config.yaml").read_text()
        hparams = last_checkpoint(folder, "dual_decoder")["hyper_parameters"]
        assert hparams["init_checkpoint"] == str(folder / "sml" / "run" / "checkpoints" / "last.ckpt")
    weights = [last_checkpoint(out / f"seed_{seed}", "sml")["state_dict"] for seed in (0, 1)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0] if weights[0][k].is_floating_point())
    assert not (out / "sml").exists()  # with several seeds, every run is in a seed folder
    assert set(block["rows"]) == set(per_seed[0]) == set(per_seed[1])
    for method, row in block["rows"].items():
        for key in main.HEADLINE_KEYS:
            values = [per_seed[seed][method][key] for seed in (0, 1)]
            assert row[key]["values"] == values, (method, key)
            assert row[key]["mean"] == pytest.approx(np.mean(values), rel=1e-12), (method, key)
            assert row[key]["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12, abs=1e-15), (method, key)
    assert block["primary"] == ["sml", "dual_decoder"]
    for key, ranking in block["rankings"].items():
        # held: every pair of the methods' own scores compares the same way in both seeds
        signs = [np.sign(per_seed[s]["sml"][key] - per_seed[s]["dual_decoder"][key]) for s in (0, 1)]
        assert ranking["held"] == (signs[0] == signs[1]), key
        assert ranking["higher_is_better"] == (not key.startswith("fpr95"))
    assert block["rows"]["dual_decoder"]["outliers_in_training"] is True
    assert block["rows"]["sml"]["outliers_in_training"] is False
    text = (out / "comparison.md").read_text()
    sml = block["rows"]["sml"]["aupr"]
    assert f"| sml | {sml['mean']:.3f} ± {sml['std']:.3f} |" in text
    assert "- AUPR: " in text and "- mIoU: " in text and "seed_<s>/comparison.md" in text


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["fit", "--data.root=/nonexistent/streethazards"], "/nonexistent/streethazards' does not exist"),
        (["test", "--ckpt_path=/nonexistent/model.ckpt"], "checkpoint '/nonexistent/model.ckpt' does not exist"),
    ],
)
def test_cli_bad_input_is_one_clear_line(argv: list[str], expected: str, tmp_path: Path) -> None:
    args = [argv[0], *method_config_args("sml"), f"--trainer.default_root_dir={tmp_path}", *argv[1:]]
    code, output = run_forked_main(args, tmp_path / "main.log", timeout=300)  # `python main.py`, forked
    assert code == 2, output[-2000:]
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and expected in last_line
    assert "Traceback" not in output

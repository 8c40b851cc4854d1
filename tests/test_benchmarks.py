"""Smoke runs of the GPU benchmarks on CPU at the tiniest sizes, so they keep working without a GPU.

Each script's ``main()`` runs end to end (a real Trainer, the CLI, the evaluation callback) and
the figures it prints must be positive finite numbers. One torch thread: with two threads on a
busy two-core machine, MKL's multi-threaded ``eigh`` in FRE's fit can stall for tens of seconds.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import lightning as L
import pytest
import torch

from tests.helpers import TEST_ENCODER

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(output: str, first_cells: set[str]) -> list[list[str]]:
    """The cells of every printed markdown row whose first cell is in ``first_cells``."""
    rows = []
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in first_cells:
            rows.append(cells)
    return rows


def positive_finite(text: str) -> bool:
    value = float(text.split()[0].rstrip("x"))
    return math.isfinite(value) and value > 0


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_training_throughput_runs_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    module = load("training_throughput")
    argv = ["--device=cpu", "--height=64", "--width=96", "--batch-size=2", "--steps=2", "--warmup=1"]
    returned = module.main([*argv, f"--encoder={TEST_ENCODER}", "--threads=1", "--methods", "sml", "dual_decoder"])
    output = capsys.readouterr().out
    rows = table_rows(output, {"sml", "dual_decoder"})
    assert [(r[0], r[1]) for r in rows] == [
        ("sml", "fp32"),
        ("sml", "mixed-cl"),
        ("dual_decoder", "fp32"),
        ("dual_decoder", "mixed-cl"),
    ]
    for row in rows:
        assert row[2] == ("32-true (TF32 off)" if row[1] == "fp32" else "bf16-mixed")
        assert all(positive_finite(cell) for cell in row[4:7]), row  # images/s, ms/step, speedup
    assert all(r["images_per_s"] > 0 for r in returned)
    assert "torch " + torch.__version__ in output and "FRE and kNN score SML's network" in output


def test_test_throughput_runs_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = load("test_throughput")
    argv = ["--device=cpu", "--height=64", "--width=96", "--num-test=4", "--num-train=2", "--batch-size=2"]
    argv += ["--num-workers=0", "--warmup-batches=1", "--skip-batches=1", f"--encoder={TEST_ENCODER}", "--threads=1"]
    argv += [f"--data-root={tmp_path / 'data'}", "--write-workers=1", f"--output-dir={tmp_path / 'out'}"]
    # Two methods (one with a second decoder): the script's logic is the same for every method, and
    # each costs two test passes with full-size evaluation states (the real-data configs).
    methods = ["sml", "dual_decoder"]
    returned = module.main([*argv, "--methods", *methods])
    output = capsys.readouterr().out
    rows = table_rows(output, set(module.METHODS))
    assert [r[0] for r in rows] == methods
    for row in rows:
        assert row[1] == "32-true" and row[2] == "4"
        assert all(positive_finite(cell) for cell in row[3:8]), row
        assert "(extrapolated)" in row[6]
    for row in returned:
        assert row["images"] == row["num_images_evaluated"] == 4  # the timed test saw the whole split
    assert "4 test images, written in" in output
    # a second run reuses the dataset instead of writing it again (the step of main() that decides)
    root, num_test, written = module.prepare_dataset(module.build_parser().parse_args(argv))
    assert (root, num_test, written) == (tmp_path / "data", 4, None)


def test_mixed_precision_check_runs_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = load("mixed_precision_check")
    overrides = [
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--evaluation.num_bits=16",
        f"--model.init_args.encoder_name={TEST_ENCODER}",
    ]
    argv = ["--device=cpu", f"--data-root={tmp_path / 'data'}", "--image-size", "64", "96"]
    argv += ["--synthetic-counts", "8", "2", "4", "--epochs=1", "--seed-runs=1", "--threads=1"]
    # SML and FRE (which scores SML's network): the table's logic over two networks' scores at a
    # third of the cost of the whole roster.
    argv += [f"--output-dir={tmp_path / 'out'}", "--methods", "sml", "fre", *(f"--override={o}" for o in overrides)]
    returned = module.main(argv)
    output = capsys.readouterr().out
    metrics = [label for _, label in module.KEYS]
    # compare's own tables print rows that start with the method too; ours has a metric column
    rows = [r for r in table_rows(output, {"sml", "fre"}) if r[1] in metrics]
    assert [(r[0], r[1]) for r in rows] == [(m, k) for m in ("sml", "fre") for k in metrics]
    for row in rows:
        for cell in (row[2], row[3], row[5]):  # fp32, mixed, seed spread
            value = float(cell)
            assert math.isfinite(value) and value >= 0, row
        assert math.isfinite(float(row[4]))  # mixed - fp32
        if row[1] in ("AUPR", "AUROC"):
            assert float(row[2]) > 0 and float(row[3]) > 0, row
    for name in ("fp32", "bf16-mixed", "fp32-seed1"):
        assert (tmp_path / "out" / name / "comparison.json").is_file()
    assert {r["method"] for r in returned["fp32"]} == {r["method"] for r in returned["mixed"]}
    assert "within its own score's seed spread" in output


def test_sml_postprocessing_sweep_matches_sklearn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from datamodules.streethazards import StreetHazardsDataModule, prepare_batch
    from datamodules.synthetic import write_synthetic_streethazards
    from lightning_modules.sml import SMLSegmenter, sml_anomaly_score

    root = write_synthetic_streethazards(tmp_path / "data", 3, 0, 0, image_size=(64, 96), seed=0)
    torch.manual_seed(0)
    model = SMLSegmenter(encoder_name="resnet18", encoder_weights=None)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "sml.ckpt")  # statistics not fitted: the sweep fits them on --root

    argv = [f"--ckpt={tmp_path / 'sml.ckpt'}", f"--root={root}", f"--heldout-dir={tmp_path / 'heldout'}"]
    argv += ["--heldout-images=4", "--heldout-size", "64", "96", "--image-size", "64", "96", "--num-workers=0"]
    argv += ["--boundary-widths", "0", "2", "--dilations", "0", "3", "--threads=1", f"--json={tmp_path / 'sweep.json'}"]
    report = load("sml_postprocessing_sweep").main(argv)
    output = capsys.readouterr().out
    assert len(table_rows(output, {"off", "2"})) == 4 and "selected by aupr" in output
    assert json.loads((tmp_path / "sweep.json").read_text())["selected"] == report["selected"]
    heldout = tmp_path / "heldout" / "heldout-seed1-4test-64x96"
    assert report["eval_root"] == str(heldout) and report["num_images"] == 4

    # Independent: the same statistics and scores, metrics from scikit-learn on every pixel.
    model.fit_posthoc(StreetHazardsDataModule(root=str(root), image_size=(64, 96), num_workers=0).posthoc_dataloader())
    data = StreetHazardsDataModule(root=str(heldout), image_size=(64, 96), num_workers=0)
    data.setup("test")
    batch = prepare_batch(next(iter(torch.utils.data.DataLoader(data.datasets["test"], batch_size=4))))
    with torch.no_grad():
        logits = model.eval()(batch["image"])
    labels = (batch["mask"] == 13).flatten().numpy()
    for row in report["results"]:
        width, dilation = row["boundary_width"], row["dilation"]
        score = sml_anomaly_score(
            logits, model.sml.means.float(), model.sml.stds.float(),
            boundary_suppression=width > 0, boundary_width=max(width, 1), boundary_iterations=max(width, 1),
            dilated_smoothing=dilation > 0, dilation=max(dilation, 1),
        ).flatten().double().numpy()  # fmt: skip
        assert row["aupr"] == pytest.approx(average_precision_score(labels, score), abs=1e-3)
        assert row["auroc"] == pytest.approx(roc_auc_score(labels, score), abs=1e-3)


# ------------------------------------------------------------------------------------------------
# gpu_check: the CPU dry run of the script a GPU lease runs
# ------------------------------------------------------------------------------------------------
def test_gpu_check_dry_run_runs_every_step(tmp_path: Path) -> None:
    """``bash benchmarks/gpu_check.sh --dry-run``: every step passes on the CPU at tiny sizes and the
    summary lists them; about 50 s of CPU on the CI machine."""
    import os
    import subprocess
    import sys

    out = tmp_path / "gpu_check"
    # The script runs `$PYTHON` (default `python`): this interpreter, whatever is first on PATH.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    completed = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run", f"--out={out}"],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    records = {r["name"]: r for r in json.loads((out / "summary.json").read_text())}
    steps = ["environment", "data", "e2e sml", "precision", "training", "test throughput", "loader"]
    assert list(records) == steps and all(r["status"] == "ok" for r in records.values())
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "every step that ran passed" in summary and summary.strip() in completed.stdout
    assert [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| e2e")] == ["e2e sml"]
    stages = records["e2e sml"]["result"]["stages"]
    assert set(stages) == {"fit", "test", "predict"} and stages["predict"]["written"] == 3
    assert math.isfinite(stages["test"]["aupr"]) and stages["fit"]["posthoc_s"] > 0
    actions = [row["action"] for row in stages["fit"]["profile"]]
    assert any("optimizer_step" in a or "run_training_batch" in a for a in actions), actions
    assert (out / "e2e" / "sml" / "run" / "checkpoints" / "last.ckpt").is_file()
    precision = records["precision"]["result"]["results"]["sml"]
    assert all(math.isfinite(v) for v in precision["largest"].values()) and precision["argmax_agreement"] > 0.5
    training = records["training"]["result"]["rows"]
    assert {r["config"] for r in training} == {"fp32", "main.py fit"}
    assert all(r["images_per_s"] > 0 for r in training if r["config"] == "fp32")
    assert all(r["epoch_images_per_s"] > 0 for r in training if r["config"] == "main.py fit")
    assert [r["configuration"] for r in records["loader"]["result"]["rows"]] == ["before", "after", "cached"]


def test_gpu_check_names_host_syncs_by_the_projects_line() -> None:
    import traceback

    gpu_check = load("gpu_check")
    repo = BENCHMARKS.parent

    def frame(path: Path, line: int, name: str) -> traceback.FrameSummary:
        return traceback.FrameSummary(str(path), line, name, line="")

    torch_file = Path(torch.__file__).parent / "_tensor.py"
    stack = [
        frame(repo / "main.py", 10, "cli_main"),
        frame(Path(L.__file__).parent / "pytorch" / "loops" / "evaluation_loop.py", 20, "run"),
        frame(repo / "callbacks" / "evaluation.py", 30, "on_test_batch_end"),
        frame(torch_file, 40, "item"),
    ]
    assert gpu_check.sync_site(stack) == "torch/_tensor.py:40 <- callbacks/evaluation.py:30 (on_test_batch_end)"
    assert gpu_check.sync_site(stack[:3]) == "callbacks/evaluation.py:30"
    assert gpu_check.sync_site(stack[:2]) == "lightning/pytorch/loops/evaluation_loop.py:20"  # Lightning's own

    recorder = gpu_check.HostSyncRecorder()
    recorder._stage = "test"
    for _ in range(3):
        recorder.record(stack)
    assert recorder.sites == {"test": {"torch/_tensor.py:40 <- callbacks/evaluation.py:30 (on_test_batch_end)": 3}}
    record = {"result": {"method": "sml", "stages": {"test": {"host_syncs": recorder.sites["test"]}}}}
    lines = gpu_check.host_sync_table([record])
    assert lines == ["| torch/_tensor.py:40 <- callbacks/evaluation.py:30 (on_test_batch_end) | 3 | sml test 3 |"]


def test_gpu_check_lists_the_wheels_an_offline_node_needs() -> None:
    wheels = load("gpu_check").wheel_requirements()
    names = {line.split("==")[0] for line in wheels}
    assert {"segmentation-models-pytorch", "albumentations", "jsonargparse", "scipy", "matplotlib"} <= names
    assert not names & {"torch", "lightning", "torchvision", "pytorch-lightning", "torchmetrics", "numpy"}
    assert all("==" in line for line in wheels)


def test_bootstrap_cost_runs_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = load("bootstrap_cost")
    argv = ["--num-test=6", "--num-train=2", "--samples=50", "--repeats=1", "--num-workers=0", "--threads=1"]
    returned = module.main([*argv, f"--data-root={tmp_path / 'data'}"])
    output = capsys.readouterr().out
    rows = table_rows(output, {"sml"})
    assert len(rows) == 1 and rows[0][1:4] == ["5", "6", "50"]
    assert all(positive_finite(cell) for cell in (rows[0][4], rows[0][5], rows[0][7]))
    assert returned["bootstrap_s"] > 0 and returned["with_s"] > 0 and "aupr_ci (" in output

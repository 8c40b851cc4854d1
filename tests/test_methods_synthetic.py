"""Each method learns something real on the synthetic dataset (short CPU runs through main.py).

One segmenter is trained and scored by SML, then wrapped by FRE without retraining (as the
README describes); the dual decoder trains on procedurally pasted outliers. The bars sit
above chance (mIoU 1/13, AUPR = the anomaly pixel fraction, AUROC 0.5) with a margin below the
spread measured over repeated 30-epoch runs on these 64 tiny images (CPU training is not
bitwise reproducible across thread schedules): SML mIoU 0.38-0.47, AUPR 2.5-3.6x the fraction,
AUROC 0.78-0.83; FRE on that segmenter AUPR 1.6-1.8x, AUROC 0.66-0.69 (its 1/4-resolution
features are only 16x28 here; on the default compare data FRE is the strongest method);
dual decoder mIoU 0.33-0.35, AUPR 2.2-2.4x, AUROC 0.75-0.76. The full-size figures are in the
README's results section.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import main
from datamodules.synthetic import write_synthetic_streethazards

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 30

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "streethazards"
    write_synthetic_streethazards(path, 64, 4, 16, image_size=(64, 112), seed=11)
    return path


def args(root: Path, out: Path, method: str) -> list[str]:
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(out), "name": method, "version": "run"},
    }
    return [
        f"--config={REPO / 'configs/demo' / (method + '.yaml')}",
        f"--data.root={root}",
        "--data.image_size=[64, 112]",
        "--data.batch_size=8",
        "--data.num_workers=0",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger={json.dumps(logger)}",
        f"--trainer.max_epochs={EPOCHS}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--heatmaps.every_n_batches=1000",
    ]


def metrics(out: Path, method: str) -> dict:
    return json.loads((out / method / "run" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def trained_sml(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main.main(["fit", *args(root, out, "sml")]) == 0
    assert main.main(["test", *args(root, out, "sml"), "--ckpt_path=last"]) == 0
    return out


def test_sml_learns_and_detects_anomalies(trained_sml: Path) -> None:
    result = metrics(trained_sml, "sml")
    fraction = result["anomaly_fraction"]
    assert result["miou"] > 0.3, result["miou"]
    assert result["scores"]["sml"]["aupr"] > 1.8 * fraction, (result["scores"]["sml"], fraction)
    assert result["scores"]["sml"]["auroc"] > 0.72


def test_fre_on_the_same_segmenter(root: Path, trained_sml: Path) -> None:
    checkpoint = trained_sml / "sml" / "run" / "checkpoints" / "last.ckpt"
    out = trained_sml
    assert main.main(["test", *args(root, out, "fre"), f"--model.init_args.init_checkpoint={checkpoint}"]) == 0
    result = metrics(out, "fre")
    sml = metrics(out, "sml")
    assert result["miou"] == pytest.approx(sml["miou"], abs=1e-9), "FRE must score the very same network"
    assert result["scores"]["fre"]["aupr"] > 1.3 * result["anomaly_fraction"], result["scores"]["fre"]
    assert result["scores"]["fre"]["auroc"] > 0.6


def test_dual_decoder_learns_and_detects_anomalies(root: Path, tmp_path: Path) -> None:
    assert main.main(["fit", *args(root, tmp_path, "dual_decoder")]) == 0
    assert main.main(["test", *args(root, tmp_path, "dual_decoder"), "--ckpt_path=last"]) == 0
    result = metrics(tmp_path, "dual_decoder")
    assert result["miou"] > 0.22, result["miou"]
    assert result["scores"]["dual_decoder"]["aupr"] > 1.5 * result["anomaly_fraction"], result["scores"]
    assert result["scores"]["dual_decoder"]["auroc"] > 0.65
    assert "sml" in result["scores"]

"""Checkpoints written before the method folders keep working for ``test`` and ``predict``.

``tests/fixtures/sml_before_method_folders.ckpt`` was written by the code of commit 6ceff61
(``lightning_modules/sml.py``, SML's post-processing as flat arguments) with

    python main.py fit --config configs/demo/sml.yaml \
        --model.init_args.encoder_name=timm-mobilenetv3_small_minimal_100 --data.image_size='[64, 96]' \
        --trainer.max_epochs=1   # on a 4/2/3-image synthetic set

and its optimizer state removed to keep it small (6.8 MB); everything else is as written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import main
from lightning_modules.checkpoints import upgrade_hyperparameters
from tests.helpers import REPO, cli_args

OLD = REPO / "tests" / "fixtures" / "sml_before_method_folders.ckpt"


def test_the_fixture_is_an_old_checkpoint() -> None:
    hparams = torch.load(OLD, weights_only=True)["hyper_parameters"]
    assert hparams["_class_path"] == "lightning_modules.sml.SMLSegmenter"
    assert hparams["boundary_width"] == 2 and hparams["dilation"] == 3 and "sml" not in hparams


def test_old_hyperparameters_are_upgraded_to_the_sml_block() -> None:
    old = {"boundary_width": 2, "dilation": 3, "lr": 0.1, "_class_path": "lightning_modules.sml.SMLSegmenter"}
    assert upgrade_hyperparameters(old) == {
        "sml": {"boundary_width": 2, "dilation": 3},
        "lr": 0.1,
        "_class_path": "lightning_modules.sml.SMLSegmenter",
    }
    current = {"sml": {"boundary_width": 2}, "lr": 0.1}
    assert upgrade_hyperparameters(current) == current


def test_an_old_checkpoint_tests_and_predicts(data_root: Path, tmp_path: Path) -> None:
    args = cli_args(data_root, tmp_path, method="sml")
    assert main.main(["test", *args, f"--ckpt_path={OLD}"]) == 0
    metrics = json.loads((tmp_path / "run" / "run" / "metrics.json").read_text())
    assert metrics["method"] == "sml" and metrics["num_images"] == 7
    # The checkpoint's own post-processing, not the config's defaults, and its fitted statistics.
    assert metrics["scoring_options"]["sml"]["boundary_width"] == 2
    assert metrics["scoring_options"]["sml"]["dilation"] == 3
    assert metrics["checkpoint"] == str(OLD)

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8)).save(images / "a.png")
    assert main.main(["predict", *args, f"--ckpt_path={OLD}", f"--data.predict_dir={images}"]) == 0
    score = np.load(tmp_path / "run" / "run" / "predictions" / "a.npy")
    assert score.shape == (40, 60) and np.isfinite(score).all()

"""Adding a method is one new folder plus one config, nothing else edited.

The test follows the README's "Adding a method" recipe literally: it writes a method folder
under ``lightning_modules/`` (a memory-bank scorer, so that the general post-hoc contract with
a concatenated accumulator is exercised) and its demo config under ``configs/method/demo/``, then
runs ``fit``, ``test``, ``predict``, ``test --model=<name>`` and ``compare`` on it, and removes
both at the end.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from lightning_modules import registry
from tests.helpers import REPO, checkpoint_dir, cli_args

NAME = "toy_bank"

TORCH_MODEL = '''
"""A toy method: how far a pixel's max logit lies from the training pixels' max logits."""

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_modules.base import MethodOutput
from lightning_modules.registry import register_method
from lightning_modules.scoring.baselines import baseline_scores
from lightning_modules.segmenter import DeepLabV3PlusSegmenter


@register_method("toy_bank", compared_by_default=False)
class ToyBankSegmenter(DeepLabV3PlusSegmenter):
    """Score: distance of the max logit to its nearest neighbour in a bank of training max logits."""

    def __init__(self, samples_per_batch: int = 32, **segmenter_kwargs) -> None:
        super().__init__(**segmenter_kwargs)
        self.register_buffer("bank", torch.zeros(0, 1, dtype=torch.float64))
        self.declare_posthoc_accumulator("bank", "cat")

    def update_posthoc(self, batch: Mapping[str, Tensor], pass_index: int) -> None:
        max_logit = self(batch["image"]).amax(dim=1).flatten().double()
        step = max(1, max_logit.numel() // self.hparams.samples_per_batch)
        self.bank = torch.cat([self.bank, max_logit[::step, None]])

    def finalize_posthoc(self, pass_index: int) -> None:
        self.bank = self.bank.sort(dim=0).values

    def segment(self, image: Tensor) -> MethodOutput:
        logits = self(image)
        max_logit = logits.amax(dim=1, keepdim=True).double()
        if self.bank.numel() == 0:  # validation during fit, before the bank is filled
            return MethodOutput(logits, {"toy_bank": torch.zeros_like(max_logit[:, 0]).float()})
        distance = (max_logit[..., None] - self.bank.view(1, 1, 1, 1, -1)).abs().amin(dim=-1)[:, 0]
        return MethodOutput(logits, {"toy_bank": distance.float(), **baseline_scores(logits)})
'''

CONFIG = """
model:
  class_path: lightning_modules.toy_bank.ToyBankSegmenter
  init_args:
    encoder_name: resnet18
    encoder_weights: null
    samples_per_batch: 16
"""


@pytest.fixture
def toy_method() -> str:
    folder = REPO / "lightning_modules" / NAME
    config = REPO / "configs" / "method" / "demo" / f"{NAME}.yaml"
    assert not folder.exists() and not config.exists()
    try:
        folder.mkdir()
        (folder / "__init__.py").write_text(f"from lightning_modules.{NAME}.lightning_model import ToyBankSegmenter\n")
        (folder / "lightning_model.py").write_text(textwrap.dedent(TORCH_MODEL))
        config.write_text(CONFIG)
        yield NAME
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        config.unlink(missing_ok=True)
        registry._REGISTRY.pop(NAME, None)
        for module in [m for m in sys.modules if m.startswith(f"lightning_modules.{NAME}")]:
            del sys.modules[module]


def test_a_new_folder_and_config_give_fit_test_predict_and_compare(
    toy_method: str, data_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = cli_args(data_root, out, method=toy_method)
    assert main.main(["fit", *args, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]) == 0
    state = torch.load(checkpoint_dir(out) / "last.ckpt", weights_only=True)["state_dict"]
    # 16 max logits per post-hoc batch of 1 image, 11 training images
    assert bool(state["posthoc_fitted"]) and state["bank"].shape == (11 * 16, 1)

    assert main.main(["test", *args, "--ckpt_path=last"]) == 0
    metrics = json.loads((out / "run" / "run" / "metrics.json").read_text())
    assert metrics["method"] == toy_method and metrics["primary_score"] == "toy_bank"
    assert set(metrics["scores"]) == {"toy_bank", "msp", "maxlogit", "entropy", "energy"}

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(images / "a.png")
    assert main.main(["predict", *args, "--ckpt_path=last", f"--data.predict_dir={images}"]) == 0
    assert np.load(out / "run" / "run" / "predictions" / "a.npy").shape == (40, 60)

    # `test --model=<name>` with no method config: the registry resolves the name.
    bare = tmp_path / "bare"
    argv = ["test", f"--model={toy_method}", "--model.init_args.encoder_name=resnet18", *args[2:]]
    argv += ["--model.init_args.encoder_weights=null", "--model.init_args.samples_per_batch=16"]
    argv = [a.replace(str(out), str(bare)) for a in argv]
    assert main.main([*argv, f"--model.init_args.init_checkpoint={checkpoint_dir(out) / 'last.ckpt'}"]) == 0
    bare_metrics = json.loads((bare / "run" / "run" / "metrics.json").read_text())
    assert bare_metrics["scores"]["toy_bank"]["auroc"] == pytest.approx(metrics["scores"]["toy_bank"]["auroc"])

    overrides = [a for a in args[2:] if not a.startswith(("--trainer.default_root_dir", "--trainer.logger"))]
    records = main.compare(
        str(tmp_path / "compare"),
        methods=[toy_method],
        overrides=[*overrides, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"],
        num_examples=1,
        base_config=str(REPO / "configs" / "demo.yaml"),
        method_config_dir=str(REPO / "configs" / "method" / "demo"),
    )
    assert records[0]["method"] == toy_method and records[0]["network"] == toy_method
    comparison = (tmp_path / "compare" / "comparison.md").read_text()
    main_table = comparison.split("| method | AUPR |", 1)[1].split("\n\n", 1)[0]
    assert main_table.count(f"| {toy_method} |") == 1  # one row for the method's own score
    assert f"| {toy_method} | tpr95 |" in comparison and f"| {toy_method} | best_f1 |" in comparison


def test_registering_another_class_under_a_taken_name_fails() -> None:
    registry.discover_methods()

    with pytest.raises(ValueError, match="'sml' is taken by lightning_modules.sml.SMLSegmenter"):

        @registry.register_method("sml")
        class Other:  # noqa: B903
            pass

    with pytest.raises(ValueError, match="lower case"):
        registry.register_method("Bad-Name")

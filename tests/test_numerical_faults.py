"""NaN losses and NaN scores stop with a clear message and keep what is good."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import main
from tests.helpers import (
    STEPS_PER_EPOCH,
    callbacks_arg,
    checkpoint_dir,
    cli_args,
    load,
    parameters_finite,
)


# --------------------------------------------------------------------------------------- 4. numerical faults
@pytest.mark.parametrize(
    ("bad_step", "checkpointing", "last_good_step"),
    [
        # last.ckpt after every step (Lightning writes the first one at step 3, once val/miou
        # exists): caught by the check before the step-5 checkpoint is written.
        (5, ["--checkpoint.every_n_train_steps=1"], 4),
        # last.ckpt after each validation: caught by the check before epoch 1's validation.
        (3, [], 2),
    ],
)
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    bad_step: int,
    checkpointing: list[str],
    last_good_step: int,
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "nan"
    code = main.main(
        [
            "fit",
            *cli_args(data_root, out),
            "--trainer.max_epochs=3",
            *checkpointing,
            "--nonfinite.check_every_n_steps=100",  # only the checks before saving / validation act
            callbacks_arg(("NaNInputAt", {"step": bad_step})),
        ]
    )
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    epoch, batch = divmod(bad_step - 1, STEPS_PER_EPOCH)
    last = checkpoint_dir(out) / "last.ckpt"
    assert line == (
        f"error: training loss is nan at global step {bad_step} (epoch {epoch}, batch {batch}); training stopped, "
        f"'{last}' was written before it and is kept. Lower model.init_args.lr, check the inputs, or train in "
        "32-bit precision"
    )
    assert load(last)["global_step"] == last_good_step
    for path in checkpoint_dir(out).glob("*.ckpt"):
        checkpoint = load(path)
        assert checkpoint["global_step"] < bad_step and parameters_finite(checkpoint), path.name


class _NaNScores(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 2

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        score = torch.zeros(batch["mask"].shape)
        score[:, 1, 2] = float("nan")
        return {"logits": torch.zeros(score.shape[0], 2, *score.shape[1:]), "scores": {"broken": score}}


def test_nan_anomaly_scores_fail_evaluation_with_a_clear_message(tmp_path: Path) -> None:
    from callbacks.evaluation import AnomalyEvaluation

    mask = torch.zeros(2, 8, 8, dtype=torch.long)
    mask[:, :2] = 13
    loader = DataLoader([{"image": torch.zeros(3, 8, 8), "mask": m} for m in mask], batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, callbacks=[AnomalyEvaluation(output_dir=str(tmp_path))],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"anomaly scores contain 2 NaN values at non-ignored pixels"):
        trainer.test(_NaNScores(), dataloaders=loader, verbose=False)
    assert not (tmp_path / "metrics.json").exists()

"""Under DDP (2 gloo processes) evaluation and statistics equal one process.

Every method's post-hoc fit and test evaluation on 2 processes is compared with 1 process by the
registry-wide contract test (``tests/test_method_contract.py``: equal sums also mean that no
training pixel was counted twice on 2 processes); this file adds the dual decoder's epoch
statistics during training and in a checkpoint written within an epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import main
from tests.helpers import (
    REPO,
    EpochStatistics,
    callbacks_arg,
    checkpoint_dir,
    cli_args,
    load,
    run_forked_main,
)

# --------------------------------------------------------------------------------------- 3. DDP
DUAL_DECODER = "dual_decoder"


@pytest.mark.slow
def test_ddp_dual_decoder_epoch_statistics_equal_one_process(data_root: Path, tmp_path: Path) -> None:
    """2 epochs of ``fit`` on 2 gloo processes (3 steps of 2 images per process and epoch), and 1
    process that replays the same batches with ``accumulate_grad_batches=2``: at every step rank
    0's batch, then rank 1's. The per-epoch statistics (summed across processes at epoch end)
    equal the 1-process ones, epoch 1's computed by the network after its optimizer steps.

    What makes the runs comparable: the same initial weights (seed); no augmentation, and
    injection seeded per (seed, epoch, sample); every forward pass sees the same 2 images in both
    runs, so batch norm normalizes over the same batch; dropout seeded per batch (EpochStatistics);
    and DDP's gradient, the mean of the two processes' gradients, is what accumulating the two
    batches' losses halved gives. Only the batch-norm running statistics differ (DDP copies rank
    0's to rank 1 before every step), and training never reads them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as _run_one_and_two_processes
    common = ["--trainer.max_epochs=2", "--data.batch_size=2", "--data.train_augment=false"]
    outs = {world: tmp_path / f"world{world}" for world in (1, 2)}

    def fit(world: int, extra: list[str], *callbacks: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
        out = outs[world]
        record = ("EpochStatistics", {"directory": str(out / "epochs")})
        argv = ["fit", *cli_args(data_root, out, method=DUAL_DECODER), *common, *extra]
        argv.append(callbacks_arg(record, *callbacks))
        if world == 2:  # the `ddp` launcher starts rank 1 as `python main.py ...`: a real program
            command = [sys.executable, "main.py", *argv]
            run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stderr[-3000:]
        else:
            code, log = run_forked_main(argv, tmp_path / "world1.log")
            assert code == 0, log[-3000:]
        return [torch.load(out / "epochs" / f"rank{r}.pt", weights_only=True) for r in range(world)]

    rank0, rank1 = fit(2, ["--trainer.strategy=ddp", "--trainer.devices=2"])
    replay = [
        [batch for pair in zip(*steps, strict=True) for batch in pair]
        for steps in zip(rank0["names"], rank1["names"], strict=True)
    ]
    assert [len(batches) for batches in replay] == [6, 6]
    # The training sampler pads 11 images to 12: every image is seen, one of them twice.
    assert all(len({name for batch in batches for name in batch}) == 11 for batches in replay)
    (one,) = fit(1, ["--trainer.accumulate_grad_batches=2"], ("ReplayTrainBatches", {"batches": replay}))
    assert one["names"] == replay

    for epoch in range(2):
        summed = {name: rank0["accumulators"][epoch][name] + rank1["accumulators"][epoch][name]
                  for name in EpochStatistics.ACCUMULATORS}  # fmt: skip
        whole = one["accumulators"][epoch]
        assert whole["sem_counts"].sum() > 0
        for name in ("sem_counts", "emb_counts"):
            assert torch.equal(summed[name], whole[name]), (epoch, name)
        for name in ("sem_sums", "sem_sq_sums", "emb_sums"):
            torch.testing.assert_close(summed[name], whole[name], rtol=1e-12, atol=1e-12, msg=f"{epoch} {name}")
        two = rank0["statistics"][epoch]
        assert bool(two["class_valid"].any())
        for name in EpochStatistics.STATISTICS:
            assert torch.equal(two[name], rank1["statistics"][epoch][name]), (epoch, name)  # all-reduced
        assert torch.equal(two["class_valid"], one["statistics"][epoch]["class_valid"])
        for name in ("class_means", "class_stds", "prototypes"):
            torch.testing.assert_close(two[name], one["statistics"][epoch][name], rtol=1e-12, atol=1e-12)
    # The two runs took the same optimizer steps.
    weights = {world: load(checkpoint_dir(out) / "last.ckpt")["state_dict"] for world, out in outs.items()}
    for name, value in weights[1].items():
        if name.startswith("net.") and "running_" not in name and "num_batches_tracked" not in name:
            torch.testing.assert_close(weights[2][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_ddp_dual_decoder_checkpoint_within_an_epoch_holds_all_processes_sums(data_root: Path, tmp_path: Path) -> None:
    """A checkpoint written by 2 processes in the middle of an epoch (step 2 of 3) holds the sum of
    both processes' epoch accumulators (rank 0's alone would lose rank 1's pixels); resumed from
    it on 2 processes, rank 0 starts from that sum and rank 1 from zero (each starting from the
    sum would count it twice), and the epoch's total counts every pixel once."""
    common = ["--trainer.max_epochs=1", "--data.batch_size=2", "--data.train_augment=false"]
    # In this process, with a forked second rank (ddp_fork; the test above runs the `ddp` launcher):
    # no fresh interpreter. Not from a forked child: once this process has asked for CUDA, torch
    # marks its forked children as bad forks, and ddp_fork refuses to start in one.
    common += ["--trainer.strategy=ddp_fork", "--trainer.devices=2"]

    def fit(out: Path, extra: list[str]) -> list[dict[str, Any]]:
        argv = ["fit", *cli_args(data_root, out, method=DUAL_DECODER), *common, *extra]
        argv.append(callbacks_arg(("EpochStatistics", {"directory": str(out / "epochs")})))
        assert main.main(argv) == 0
        return [torch.load(out / "epochs" / f"rank{r}.pt", weights_only=True) for r in range(2)]

    first = tmp_path / "first"
    keep = ["--checkpoint.every_n_train_steps=2", "--checkpoint.save_top_k=-1", "--checkpoint.monitor=null"]
    ranks = fit(first, [*keep, "--checkpoint.filename=s{step}"])
    assert [len(r["steps"]) for r in ranks] == [3, 3]
    saved = load(checkpoint_dir(first) / "s2.ckpt")["state_dict"]
    for name in EpochStatistics.ACCUMULATORS:
        assert torch.equal(saved[name], ranks[0]["steps"][1][name] + ranks[1]["steps"][1][name]), name
    assert saved["sem_counts"].sum() > 0

    resumed = fit(tmp_path / "resumed", [f"--ckpt_path={checkpoint_dir(first) / 's2.ckpt'}"])
    for name in EpochStatistics.ACCUMULATORS:
        assert torch.equal(resumed[0]["restored"][name], saved[name]), name
        assert not resumed[1]["restored"][name].any(), name
    # Each process runs the one step left, on its own shard's third batch (the loader skips the
    # two already done). Embedding counts (every known pixel, whatever the weights) of the epoch
    # are then those of the uninterrupted run.
    assert [r["names"] for r in resumed] == [[r["names"][0][2:]] for r in ranks]
    counts = [r["accumulators"][0]["emb_counts"] for r in resumed]
    uninterrupted = [r["accumulators"][0]["emb_counts"] for r in ranks]
    assert torch.equal(counts[0] + counts[1], uninterrupted[0] + uninterrupted[1])
    for name in EpochStatistics.STATISTICS:
        assert torch.equal(resumed[0]["statistics"][0][name], resumed[1]["statistics"][0][name]), name


def test_ddp_test_with_one_image_on_two_processes_finishes(tmp_path: Path) -> None:
    """One test image on 2 gloo processes: rank 1 has no image. It evaluates a placeholder batch
    (not counted) so that it takes part in the post-hoc fit at test start and in every collective
    compute(); before, its sampler asserted and rank 0 waited in the first collective forever."""
    from datamodules.synthetic import write_synthetic_streethazards

    root = tmp_path / "data"
    write_synthetic_streethazards(root, 3, 1, 1, image_size=(64, 96), seed=5)
    out = tmp_path / "out"
    # In this process (see the test above for why not forked), rank 1 forked by ddp_fork.
    assert main.main(["test", *cli_args(root, out), "--trainer.strategy=ddp_fork", "--trainer.devices=2"]) == 0
    metrics = json.loads((out / "run" / "run" / "metrics.json").read_text())
    assert metrics["num_images"] == 1 and metrics["num_valid_pixels"] <= 64 * 96

"""Checkpoints are loaded with weights_only=True: a crafted pickle cannot run code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_modules.checkpoints import AtomicCheckpointIO, CheckpointError, load_checkpoint_file


class _Payload:
    """Unpickling this calls os.mkdir(target): the side effect a malicious checkpoint would have."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (self.target,))


def test_planted_payload_does_not_run_and_gives_a_clear_error(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt' cannot be loaded safely"):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint executed the planted payload"


def test_atomic_checkpoint_io_round_trip(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "ok.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(3.0)}, "epoch": 1}, path)
    loaded = io.load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["ok.ckpt"]  # no temporary files left


def test_checkpoint_io_reads_the_bare_weights_of_lightnings_fork_launcher(tmp_path: Path) -> None:
    """After ``fit`` under ``ddp_fork``/``ddp_spawn`` rank 0 passes its weights to the main process as
    a bare state dict through the checkpoint IO; a user's ``--ckpt_path`` must still be a Lightning
    checkpoint (``tests/test_ddp_equality.py`` fits with ``ddp_fork`` through ``main.py``)."""
    path = tmp_path / ".temp.ckpt"
    AtomicCheckpointIO().save_checkpoint({"net.w": torch.arange(3.0)}, path)
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(path)["net.w"], torch.arange(3.0))
    with pytest.raises(CheckpointError, match="is not a Lightning checkpoint"):
        load_checkpoint_file(path)

"""Shared fixtures: small datasets in the released StreetHazards layout, made on the fly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.synthetic import write_synthetic_streethazards
from tests.helpers import REPO

if "PYTEST_XDIST_WORKER" in os.environ:
    # Parallel workers share the cores: one thread each (and in the subprocesses they start),
    # since OpenMP threads spin-waiting for a busy core slow everything down several-fold.
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The longest files, longest first (their summed --durations on the CI machine: about 290, 185,
# 160, 145, 95, 95, 70, 55 s). With `--dist loadfile` a file runs on one worker; a file this long
# started last would leave the other worker idle until it ends (xdist's default order, by test
# count, started the 7 learning tests among the last). The others follow in collection order.
LONGEST_FILES_FIRST = (
    "test_methods_synthetic.py",
    "test_method_contract.py",
    "test_resume.py",
    "test_benchmarks.py",
    "test_bad_input.py",
    "test_main_e2e.py",
    "test_ddp_equality.py",
    "test_streaming_memory.py",
    "test_metrics_accuracy.py",
)


# What pytest and Python themselves may add at the top of the repository.
_TOOL_ENTRIES = {".pytest_cache", "__pycache__", ".ruff_cache"}
_REPO_ENTRIES = pytest.StashKey[set]()


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        session.config.stash[_REPO_ENTRIES] = {path.name for path in REPO.iterdir()}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a test wrote into the repository's top folder (a logger-less Trainer writes
    its results to the working directory: two such files were once committed by accident)."""
    before = session.config.stash.get(_REPO_ENTRIES, None)
    if before is None:
        return
    new = sorted({path.name for path in REPO.iterdir()} - before - _TOOL_ENTRIES)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"error: the tests wrote into the repository: {', '.join(new)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's order is kept


SPLIT_DIRS = {
    "train": ("train", "training", "t1-3", "train.odgt"),
    "val": ("train", "validation", "t4", "validation.odgt"),
    "test": ("test", "test", "t5", "test.odgt"),
}


def write_release_sample(
    root: Path, split: str, name: str, rgb: np.ndarray, raw_label: np.ndarray, town: str | None = None
) -> dict:
    """Write one RGBA image and mode-L annotation where the release puts them; return its record."""
    folder, subset, default_town, _ = SPLIT_DIRS[split]
    town = town or default_town
    image_rel = Path("images") / subset / town / f"{name}.png"
    label_rel = Path("annotations") / subset / town / f"{name}.png"
    for rel in (image_rel, label_rel):
        (root / folder / rel).parent.mkdir(parents=True, exist_ok=True)
    alpha = np.full(rgb.shape[:2] + (1,), 255, dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA").save(root / folder / image_rel)
    Image.fromarray(raw_label.astype(np.uint8), mode="L").save(root / folder / label_rel)
    return {
        "fpath_img": str(image_rel),
        "fpath_segm": str(label_rel),
        "width": int(rgb.shape[1]),
        "height": int(rgb.shape[0]),
    }


def write_index(root: Path, split: str, records: list[dict]) -> Path:
    folder, _, _, index = SPLIT_DIRS[split]
    path = root / folder / index
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def release_root(tmp_path: Path) -> Path:
    """A hand-made dataset in the released layout with known pixel values.

    Every image is 24x40; image ``k`` of a split has raw label ``1 + (row + col + k) % 14`` in the
    test split (anomalies included) and ``1 + (row + col + k) % 13`` elsewhere; its RGB encodes
    the raw label in the red channel so alignment can be checked.
    """
    root = tmp_path / "streethazards"
    rows, cols = np.mgrid[0:24, 0:40]
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        modulo = 14 if split == "test" else 13
        records = []
        for k in range(count):
            raw = 1 + (rows + cols + k) % modulo
            rgb = np.stack([raw * 10, np.full_like(raw, 50), np.full_like(raw, 200)], axis=2).astype(np.uint8)
            records.append(write_release_sample(root, split, f"{k:03d}", rgb, raw))
        write_index(root, split, records)
    return root


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic dataset of the CLI tests (see tests/helpers.py)."""
    root = tmp_path_factory.mktemp("data") / "streethazards"
    write_synthetic_streethazards(root, 11, 4, 7, image_size=(64, 96), seed=3)
    return root


@pytest.fixture(scope="session")
def trained(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-epoch SML run: ``last`` (statistics fitted) and ``best`` (saved before they were)."""
    import main
    from tests.helpers import checkpoint_dir, cli_args

    out = tmp_path_factory.mktemp("trained")
    assert main.main(["fit", *cli_args(data_root, out), "--trainer.max_epochs=2"]) == 0
    folder = checkpoint_dir(out)
    (best,) = folder.glob("best-*.ckpt")
    return {"out": out, "last": folder / "last.ckpt", "best": best}

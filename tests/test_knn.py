"""Dense kNN scoring: the search against brute-force float64 distances, the seeded subsample
(deterministic, independent of order and process count), and the module (fit, score, checkpoint)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightning_modules.knn import (
    KNNSegmenter,
    class_ranks,
    image_seed,
    knn_score_map,
    nearest_distances,
    pixel_priorities,
    prune_rows,
    reduce_distances,
    select_rows,
)
from lightning_modules.scoring.baselines import energy_score


def brute_force(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` smallest Euclidean distances of every query, from explicit float64 differences."""
    diff = queries.astype(np.float64)[:, None, :] - bank.astype(np.float64)[None, :, :]
    return np.sort(np.sqrt((diff**2).sum(axis=2)), axis=1)[:, :k]


# ----------------------------------------------------------------------------- search
@pytest.mark.parametrize("k", [1, 3, 40])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_nearest_distances_match_brute_force(k: int, chunk_size: int) -> None:
    rng = np.random.default_rng(k + chunk_size)
    queries, bank = rng.normal(size=(53, 9)) * 3.0, rng.normal(size=(40, 9)) * 3.0
    queries[:5] = bank[:5]  # queries that are bank rows: distance 0
    ref = brute_force(queries, bank, k)
    exact = nearest_distances(torch.from_numpy(queries), torch.from_numpy(bank), k, chunk_size)
    assert exact.dtype == torch.float64 and exact.shape == (53, k)
    np.testing.assert_allclose(exact.numpy(), ref, rtol=1e-10, atol=1e-6)  # atol: sqrt of a ~1e-14 residue at 0
    single = nearest_distances(torch.from_numpy(queries).float(), torch.from_numpy(bank).float(), k, chunk_size)
    assert single.dtype == torch.float32
    # float32 expansion: absolute error ~1e-7 (|q|^2 + |b|^2) on the squared distance
    np.testing.assert_allclose(single.numpy()[5:], ref[5:], rtol=1e-5, atol=1e-4)
    # a query equal to a bank row: the cancellation residue, at most a few eps (|q|^2 + |b|^2), square-rooted
    bound = np.sqrt(4 * np.finfo(np.float32).eps * 2 * (queries[:5] ** 2).sum(axis=1))
    assert (single[:5, 0].numpy() <= bound).all()


def test_nearest_distances_upcast_half_and_reject_bad_input() -> None:
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(20, 4, generator=g), torch.randn(10, 4, generator=g)
    half = nearest_distances(queries.bfloat16(), bank, 2)
    assert half.dtype == torch.float32
    np.testing.assert_allclose(
        half.numpy(), brute_force(queries.bfloat16().float().numpy(), bank.numpy(), 2), atol=1e-5
    )
    assert nearest_distances(queries[:0], bank, 2).shape == (0, 2)
    with pytest.raises(ValueError, match="fewer than k"):
        nearest_distances(queries, bank, 11)
    with pytest.raises(ValueError, match="same C"):
        nearest_distances(queries, bank[:, :3], 1)
    with pytest.raises(ValueError, match="k must be"):
        nearest_distances(queries, bank, 0)


def test_reductions_and_score_map_match_per_pixel_brute_force() -> None:
    rng = np.random.default_rng(1)
    features, bank = rng.normal(size=(2, 6, 5, 7)), rng.normal(size=(30, 6))
    rows = features.transpose(0, 2, 3, 1).reshape(-1, 6)
    ref = brute_force(rows, bank, 4)
    distances = torch.from_numpy(ref)
    np.testing.assert_allclose(reduce_distances(distances, "mean").numpy(), ref.mean(axis=1))
    np.testing.assert_allclose(reduce_distances(distances, "kth").numpy(), ref[:, 3])
    with pytest.raises(ValueError, match="reduction"):
        reduce_distances(distances, "median")
    score = knn_score_map(torch.from_numpy(features), torch.from_numpy(bank), 4, "mean")
    np.testing.assert_allclose(score.numpy(), ref.mean(axis=1).reshape(2, 5, 7), rtol=1e-10)
    # normalize: the features are compared on the unit sphere (the bank is given normalised)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    unit_bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    normalized = knn_score_map(torch.from_numpy(features), torch.from_numpy(unit_bank), 2, "kth", normalize=True)
    np.testing.assert_allclose(normalized.numpy().ravel(), brute_force(unit, unit_bank, 2)[:, 1], rtol=1e-6)


def test_faiss_flat_search_matches_brute_force() -> None:
    """faiss's exact index (the alternative benchmarked in benchmarks/knn_scoring.py) finds the same distances."""
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    queries, bank = rng.normal(size=(200, 16)).astype(np.float32), rng.normal(size=(300, 16)).astype(np.float32)
    index = faiss.IndexFlatL2(16)
    index.add(bank)
    squared, _ = index.search(queries, 3)
    np.testing.assert_allclose(np.sqrt(np.maximum(squared, 0)), brute_force(queries, bank, 3), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- subsampling
def test_image_seed_depends_on_seed_and_name_only() -> None:
    assert image_seed(0, "t1-3/000001") == image_seed(0, "t1-3/000001")
    seeds = {image_seed(0, f"{i:06d}") for i in range(100)} | {image_seed(1, "000000")}
    assert len(seeds) == 101 and all(0 <= s < 2**63 for s in seeds)
    assert torch.equal(pixel_priorities(10, 5), pixel_priorities(10, 5))


def test_class_ranks_and_selection() -> None:
    priorities = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    assert class_ranks(priorities, None).tolist() == [3, 0, 5, 2, 4, 1]
    assert class_ranks(priorities, labels).tolist() == [1, 0, 2, 0, 1, 0]
    assert select_rows(priorities, None, 3).tolist() == [1, 5, 3]  # the 3 smallest priorities
    # classes take turns (rank 0 of every class first, by priority), a class without rows left skips its turn
    assert select_rows(priorities, labels, 5).tolist() == [1, 5, 3, 0, 4]
    assert select_rows(priorities, labels, 10).tolist() == [1, 5, 3, 0, 4, 2]
    assert prune_rows(priorities, labels, 1).tolist() == [False, True, False, True, False, True]


def test_selection_depends_on_the_set_of_rows_not_their_order_or_split() -> None:
    g = torch.Generator().manual_seed(3)
    priorities = torch.rand(500, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (500,), generator=g)
    labels[labels == 5] = torch.randint(0, 6, ((labels == 5).sum(),), generator=g)  # uneven classes
    for balance in (None, labels):
        chosen = select_rows(priorities, balance, 60)
        permutation = torch.randperm(500, generator=g)
        shuffled = permutation[
            select_rows(priorities[permutation], None if balance is None else balance[permutation], 60)
        ]
        assert torch.equal(shuffled, chosen)
        # pruning each half (two processes) before selecting from their union changes nothing
        halves = [torch.arange(0, 500, 2), torch.arange(1, 500, 2)]
        kept = [h[prune_rows(priorities[h], None if balance is None else balance[h], 60)] for h in halves]
        union = torch.cat(kept)
        again = union[select_rows(priorities[union], None if balance is None else balance[union], 60)]
        assert torch.equal(again, chosen)
    counts = torch.bincount(labels[select_rows(priorities, labels, 60)], minlength=6)
    assert counts.max() - counts.min() <= 1  # an equal share for each class


# ----------------------------------------------------------------------------- module
def tiny_model(**kwargs: object) -> KNNSegmenter:
    torch.manual_seed(0)
    options = {"encoder_name": "resnet18", "encoder_weights": None, "pixels_per_image": 20, "bank_size": 50}
    return KNNSegmenter(**{**options, **kwargs}).eval()


def batches(count: int = 6, batch_size: int = 2, names: bool = True) -> list[dict[str, object]]:
    g = torch.Generator().manual_seed(4)
    out = []
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        mask = torch.randint(0, 13, (size, 64, 96), generator=g)
        mask[:, :8] = 255  # ignored rows are never drawn
        batch = {"image": torch.randn(size, 3, 64, 96, generator=g), "mask": mask}
        if names:
            batch["name"] = [f"img{start + i:03d}" for i in range(size)]
        out.append(batch)
    return out


def rebatch(items: list[dict[str, object]], batch_size: int) -> list[dict[str, object]]:
    """The same images in batches of another size (or another order, given a reordered list)."""
    images = [
        (b["image"][i], b["mask"][i], b.get("name", [None] * len(b["image"]))[i])
        for b in items
        for i in range(len(b["image"]))
    ]
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = {"image": torch.stack([c[0] for c in chunk]), "mask": torch.stack([c[1] for c in chunk])}
        if chunk[0][2] is not None:
            batch["name"] = [c[2] for c in chunk]
        out.append(batch)
    return out


def bank_state(model: KNNSegmenter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return model.bank.clone(), model.bank_priorities.clone(), model.bank_labels.clone()


@pytest.mark.parametrize("class_balanced", [False, True])
def test_bank_is_the_same_on_one_or_two_processes(class_balanced: bool) -> None:
    data = batches(6, batch_size=1)
    one = tiny_model(class_balanced=class_balanced)
    one.fit_posthoc(data)
    # two processes: disjoint interleaved shards, accumulators concatenated in rank order (as the base does)
    shards = [tiny_model(class_balanced=class_balanced) for _ in range(2)]
    for rank, model in enumerate(shards):
        model._reset_accumulators(0)
        for batch in data[rank::2]:
            model.update_posthoc(batch, 0)
    merged = shards[0]
    for name in ("bank", "bank_priorities", "bank_labels"):
        setattr(merged, name, torch.cat([getattr(shards[0], name), getattr(shards[1], name)]))
    merged.finalize_posthoc(0)
    for mine, theirs in zip(bank_state(one), bank_state(merged), strict=True):
        assert torch.equal(mine, theirs)  # the same rows in the same order, not only the same set
    assert one.bank.shape == (50, 256) and int(one.bank_labels.max()) < 13
    # another batching and order of the same images: the same bank again
    shuffled = tiny_model(class_balanced=class_balanced)
    shuffled.fit_posthoc(rebatch(data[::-1], 3))
    for mine, theirs in zip(bank_state(one), bank_state(shuffled), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)  # batch size may change conv rounding
    assert torch.equal(one.bank_priorities, shuffled.bank_priorities)


def test_pruning_while_accumulating_changes_nothing_and_names_or_pixels_seed_the_draw() -> None:
    data = batches(8, batch_size=2)
    pruned = tiny_model(pixels_per_image=30, bank_size=20)  # 60 rows per batch > 2 x 20: pruned every batch
    pruned.fit_posthoc(data)
    everything = tiny_model(pixels_per_image=30, bank_size=None)
    everything.fit_posthoc(data)
    assert everything.bank.shape[0] == 8 * 30
    keep = select_rows(everything.bank_priorities, None, 20)
    assert torch.equal(pruned.bank, everything.bank[keep])
    # without names, a digest of each image's pixels seeds its draw: deterministic too
    anonymous = [tiny_model(), tiny_model()]
    for model in anonymous:
        model.fit_posthoc(batches(4, names=False))
    assert torch.equal(anonymous[0].bank, anonymous[1].bank)
    other_seed = tiny_model(seed=1)
    other_seed.fit_posthoc(data)
    named = tiny_model()
    named.fit_posthoc(data)
    assert not torch.equal(other_seed.bank_priorities, named.bank_priorities)


def test_fit_then_segment_scores_at_image_size_and_round_trips(tmp_path: Path) -> None:
    model = tiny_model()
    image = torch.randn(2, 3, 50, 70, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model.segment(image)  # validation during fit: no bank yet
    assert torch.equal(before.scores["knn"], torch.zeros(2, 50, 70))
    model.fit_posthoc(batches())
    model.eval()
    with torch.no_grad():
        out = model.segment(image)
    assert list(out.scores) == ["knn", "msp", "maxlogit", "entropy", "energy"]
    assert out.scores["knn"].shape == (2, 50, 70) and out.scores["knn"].dtype == torch.float32
    assert bool(torch.isfinite(out.scores["knn"]).all()) and float(out.scores["knn"].min()) >= 0
    assert model.scoring_options()["knn"]["bank_rows"] == 50

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "knn.ckpt")
    loaded = KNNSegmenter.load_from_checkpoint(tmp_path / "knn.ckpt", weights_only=True).eval()
    assert bool(loaded.posthoc_fitted)
    for mine, theirs in zip(bank_state(model), bank_state(loaded), strict=True):
        assert torch.equal(mine, theirs)
    with torch.no_grad():
        again = loaded.segment(image)
    for name, score in out.scores.items():
        assert torch.equal(score, again.scores[name]), name


def test_encoder_stage_features_and_options() -> None:
    model = tiny_model(feature_layer="encoder4", normalize=True, k=2, reduction="kth")
    assert model.bank.shape == (0, 256)
    with torch.no_grad():
        features, logits = model.features_and_logits(torch.randn(1, 3, 50, 70))
    assert features.shape == (1, 256, 4, 5) and logits.shape == (1, 13, 50, 70)  # 1/16 of the padded 64x80
    model.fit_posthoc(batches(4))
    torch.testing.assert_close(model.bank.norm(dim=1), torch.ones(50))
    with torch.no_grad():
        assert model.eval().segment(torch.randn(1, 3, 50, 70)).scores["knn"].shape == (1, 50, 70)
    assert tiny_model(feature_layer="encoder5").bank.shape == (0, 512)
    for bad in ({"feature_layer": "encoder9"}, {"feature_layer": "head"}, {"k": 0}, {"reduction": "max"}):
        with pytest.raises(ValueError, match="model\\."):
            tiny_model(**bad)
    with pytest.raises(ValueError, match="bank_size"):
        tiny_model(k=5, bank_size=4)


def test_a_bank_without_labelled_pixels_fails_clearly() -> None:
    data = batches(2)
    for batch in data:
        batch["mask"].fill_(255)
    with pytest.raises(RuntimeError, match="labelled training pixels"):
        tiny_model().fit_posthoc(data)


# ----------------------------------------------------------------------------- energy temperature
def test_energy_temperature_is_applied_and_recorded() -> None:
    model = tiny_model(energy_temperature=2.0)
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model.segment(image)
    assert torch.equal(out.scores["energy"], energy_score(out.logits, 2.0))
    assert model.scoring_options()["energy_temperature"] == 2.0
    with torch.no_grad():
        model._evaluation_step({"image": image})  # honoured: no complaint
    with pytest.raises(ValueError, match="energy_temperature"):
        tiny_model(energy_temperature=0.0)


# ----------------------------------------------------------------------------- benchmark script
def test_benchmark_script_runs_both_modes(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``benchmarks/knn_scoring.py`` at the tiniest sizes, so that it keeps working."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "knn_scoring.py"
    spec = importlib.util.spec_from_file_location("benchmark_knn_scoring", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(
        ["--device", "cpu", "--bank-sizes", "16", "--images", "1", "--feature-size", "4", "4", "--repeats", "1"]
    )
    assert "| 16 |" in capsys.readouterr().out

    model = tiny_model()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "segmenter.ckpt")
    argv = ["--device", "cpu", "--ckpt", str(tmp_path / "segmenter.ckpt"), "--root", str(data_root)]
    argv += ["--heldout-images", "3", "--heldout-size", "64", "96", "--image-size", "64", "96"]
    argv += ["--heldout-dir", str(tmp_path), "--base", "bank_size=40", "pixels_per_image=8", "--vary", "k=1"]
    script.main(argv)
    out = capsys.readouterr().out
    assert (
        "| bank_size=40, pixels_per_image=8 | 40 |" in out and "| bank_size=40, pixels_per_image=8, k=1 | 40 |" in out
    )

"""Metric states gathered with one collective per dtype give bitwise what per-state gathers give.

The end-to-end 2-process equality tests (test_metrics_ddp, test_ddp_equality, the contract tests)
run through this path; here each rank's tensors are checked one by one, with shapes that differ
between ranks, and the number of collectives is counted.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from callbacks.metrics import AnomalyMetrics
from callbacks.metrics.packed_sync import gather_states


def _rank_states(seed: int, rows: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "counts": torch.randint(0, 1 << 40, (2, rows), generator=generator),
        "scalar": torch.tensor(seed, dtype=torch.int64),
        "level": torch.rand((), generator=generator, dtype=torch.float64),
        "sketch": torch.randint(-5, 5, (3, rows + 1), generator=generator, dtype=torch.int32),
        "empty": torch.zeros(0, 4, dtype=torch.float64),
        "values": torch.randn(rows, generator=generator, dtype=torch.float64),
    }


def _two_ranks(states: list[dict[str, torch.Tensor]]) -> tuple[list[list[dict[str, torch.Tensor]]], int]:
    """What ``gather_states`` returns on each of two ranks, with a stand-in for the collective that
    pairs the i-th call of one rank with the i-th call of the other; and the calls per rank."""
    calls: list[list[torch.Tensor]] = [[], []]

    def record(rank: int):
        def gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
            calls[rank].append(tensor.clone())
            return [tensor, tensor]

        return gather

    for rank in (0, 1):
        gather_states(states[rank], record(rank))

    def replay(rank: int):
        index = iter(range(len(calls[rank])))

        def gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
            i = next(index)
            assert torch.equal(tensor, calls[rank][i])
            return [calls[0][i], calls[1][i]]

        return gather

    results = [gather_states(states[rank], replay(rank)) for rank in (0, 1)]
    assert len(calls[0]) == len(calls[1])
    return results, len(calls[0])


def test_every_rank_gets_every_ranks_states_bitwise_in_one_gather_per_dtype() -> None:
    states = [_rank_states(0, 5), _rank_states(1, 3)]  # shapes differ between the ranks
    results, num_calls = _two_ranks(states)
    assert num_calls == 1 + 3  # the shapes, then int64, float64 and int32 data
    for result in results:
        assert len(result) == 2
        for rank in (0, 1):
            assert list(result[rank]) == list(states[rank])
            for name, tensor in states[rank].items():
                got = result[rank][name]
                assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
                assert torch.equal(got, tensor), name


def test_one_process_returns_its_own_states() -> None:
    states = _rank_states(3, 4)
    (own,) = gather_states(states, lambda tensor, group=None: [tensor])
    assert all(torch.equal(own[name], states[name]) and own[name].shape == states[name].shape for name in states)
    assert gather_states({}, lambda tensor, group=None: [tensor]) == []


def test_metric_sync_equals_torchmetrics_per_state_sync_in_fewer_gathers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``AnomalyMetrics`` with per-image states, synced (one process) through the packed path and
    through torchmetrics' own per-state path: the same states, bitwise. Packed: its layout
    statistics (2 dtypes), its tensor states (2 dtypes) and each list state on its own."""
    from torchmetrics import Metric

    from callbacks.metrics.packed_sync import PackedSyncMetric

    def updated() -> AnomalyMetrics:
        metric = AnomalyMetrics(num_bits=16, bootstrap_samples=5)
        scores = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
        metric.update(scores, (scores > 0.7).long() * 13, image_ids=[11, 12])
        return metric

    def synced(metric: AnomalyMetrics) -> tuple[AnomalyMetrics, int]:
        seen: list[torch.Tensor] = []

        def one_process(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
            seen.append(tensor)
            return [tensor]

        metric._sync_dist(one_process)
        return metric, len(seen)

    packed, packed_calls = synced(updated())
    with monkeypatch.context() as patch:
        patch.setattr(PackedSyncMetric, "_sync_dist", Metric._sync_dist)
        plain, plain_calls = synced(updated())
    tensor_states = [name for name in packed._reductions if isinstance(packed._defaults[name], torch.Tensor)]
    list_states = [name for name in packed._reductions if name not in tensor_states]
    assert len(tensor_states) > 10 and list_states
    assert packed_calls == (1 + 2) + (1 + 2) + len(list_states)
    assert plain_calls == (1 + 2) + len(tensor_states) + len(list_states)  # the layout statistics packed in both
    for name in packed._reductions:
        one, two = getattr(packed, name), getattr(plain, name)
        assert one.dtype == two.dtype and one.shape == two.shape and torch.equal(one, two), name


def test_a_state_that_changed_dtype_is_named() -> None:
    metric = AnomalyMetrics(num_bits=16)
    metric.image_count = metric.image_count.double()
    with pytest.raises(TypeError, match=r"AnomalyMetrics\.image_count: a tensor state must keep"):
        metric._sync_dist(lambda tensor, group=None: [tensor])

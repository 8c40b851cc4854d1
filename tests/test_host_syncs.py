"""Host synchronisations of a training step and of an evaluation batch, counted on CPU.

``benchmarks/host_syncs.py`` counts, through every torch call made from Python, the ones that would
make the process wait for a CUDA device (``.item()``, ``.tolist()``, ``bool(t)``, copies to the host,
data-dependent shapes such as boolean masks and ``nonzero``, CUDA's ``bincount``) on tensors that
would live on the device, with the metric library's CUDA code path switched on. Its limits are in
its docstring; on a GPU, ``--device cuda`` adds CUDA's own count (``torch.cuda.set_sync_debug_mode``).

Measured before this work on the same run (per later batch): a dual-decoder training step 5 (3
``bincount`` in its losses and statistics, 2 progress-bar reads) and an evaluation batch 121-133
(per score and protocol: the layout check, host copies of the layout, ``nonzero``/``repeat_interleave``
when it grows, the per-image metrics' data-dependent steps); after: 0 and 1-2.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from callbacks.metrics import AnomalyMetrics
from callbacks.metrics.functional import _backend
from datamodules.synthetic import write_synthetic_streethazards

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_counter() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_host_syncs", BENCHMARKS / "host_syncs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


host_syncs = _load_counter()


def _where(events: Counter) -> list[str]:
    return [f"{count} x {reason} at {where}" for (reason, where), count in events.items()]


def test_the_counter_sees_syncs_on_device_tensors_only() -> None:
    counter = host_syncs.HostSyncCounter()
    device = torch.arange(6.0)
    with counter:
        counter.mark(device)
        host = torch.arange(3)
        derived = device * 2
        derived.sum().item()  # 1
        derived[derived > 4]  # 2: boolean mask
        torch.bincount(derived.long(), minlength=20)  # 3
        copy = derived.cpu()  # 4: a copy to the host
        copy.numpy()
        int(host.sum())  # a host tensor: nothing to wait for
        moved = torch.zeros(2, device=device.device)  # made on the device: marked
        moved.tolist()  # 5
    assert counter.total == 5, _where(counter.events)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_anomaly_metrics_update_many_waits_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five histograms updated together: one host copy of their checks; their layouts, once grown,
    are not copied again; the counts equal five separate updates."""
    monkeypatch.setattr(_backend, "NUMPY_ON_CPU", False)
    rng = np.random.default_rng(3)
    mask = torch.from_numpy(np.where(rng.random((2, 32, 48)) < 0.1, 13, 0))
    scores = [torch.from_numpy(rng.normal(size=(2, 32, 48)).astype(np.float32) * (k + 1)) for k in range(5)]
    together = [AnomalyMetrics(num_bits=16) for _ in scores]
    alone = [AnomalyMetrics(num_bits=16) for _ in scores]
    counter = host_syncs.HostSyncCounter()
    with counter:
        counter.mark([*scores, mask, *[m.counts for m in together]])
        for metric in together:
            counter.mark([getattr(metric, name) for name in metric._defaults])
        AnomalyMetrics.update_many([(m, s, mask) for m, s in zip(together, scores, strict=True)])
        first = counter.total
        counter.events.clear()
        AnomalyMetrics.update_many([(m, s, mask) for m, s in zip(together, scores, strict=True)])
    assert first == 2, _where(counter.events)  # the checks, then the layouts that must grow
    assert counter.total == 1, _where(counter.events)  # the same keys again: nothing grows
    for metric, score in zip(alone, scores, strict=True):
        metric.update(score, mask)
        metric.update(score, mask)
    for mine, theirs in zip(together, alone, strict=True):
        assert torch.equal(mine.counts, theirs.counts)
        assert mine.compute() == theirs.compute()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dual_decoder_training_step_and_evaluation_batch_host_syncs(tmp_path: Path) -> None:
    """A dual-decoder ``fit`` (4 batches) and ``test`` (3 batches) through the CLI, every callback on.

    A training step waits for nothing: the dual decoder's statistics and losses have no bincount, and
    the progress bar reads its values every ``log_every_n_steps`` batches (and at the end of an
    epoch), when the logger reads them anyway. An evaluation batch waits once (the pooled
    histograms' checks of every score, read together) and once more in batches where a histogram
    layout grows (on real data: the first batches)."""
    root = tmp_path / "data"
    write_synthetic_streethazards(root, 8, 1, 6, image_size=(64, 96), seed=0)
    counted = host_syncs.count_method(
        "dual_decoder", root, tmp_path / "run", (64, 96), "cpu", train_batches=4, test_batches=3
    )
    steps = [sum(events.values()) for events in counted.train]
    print(f"training steps: {steps}; evaluation batches: {[sum(e.values()) for e in counted.test]}")
    # Batch 0 sets things up (optimizer state, first logs); batch 3 ends the epoch (progress bar).
    assert steps[1] == steps[2] == 0, [_where(events) for events in counted.train]
    for events in counted.test[1:]:
        # The pooled histograms of every score, then the size strata's: one wait each (two when a
        # layout grows).
        pooled = {key: n for key, n in events.items() if key[1].startswith("callbacks/metrics/anomaly.py")}
        assert 2 <= sum(pooled.values()) <= 4, _where(events)
        # The rest is the operating-point evaluation's: components are labelled on the host (scipy),
        # so the primary score and the labels are copied there once per batch; an image entering
        # the failure gallery adds the copy of its input.
        rest = {key: n for key, n in events.items() if key not in pooled}
        assert all(where.startswith("callbacks/operating_points.py") for _, where in rest), _where(events)
        assert 2 <= sum(rest.values()) <= 3, _where(events)

"""compare's summary over training seeds and its budget columns, on hand-made records (no training)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import main

KEYS = main.HEADLINE_KEYS


def record(method: str, network: str | None = None, **values: float) -> dict[str, Any]:
    """A comparison record: every headline metric 0.5 unless given, with the budget fields."""
    return {
        "method": method,
        "network": network or method,
        **{key: values.get(key, 0.5) for key in KEYS},
        "train_time_s": values.get("train_time_s", 10.0),
        "inherited_train_time_s": values.get("inherited_train_time_s", 0.0),
        "total_train_time_s": values.get("train_time_s", 10.0) + values.get("inherited_train_time_s", 0.0),
        "test_time_s": 1.0,
        "outliers_in_training": False,
        "reuses": "",
    }


def test_mean_and_std_over_seeds_are_numpys_and_baselines_are_rows_but_not_ranked() -> None:
    seeds = {
        3: [record("a", aupr=0.30), record("b", aupr=0.20), record("msp@a", "a", aupr=0.10)],
        4: [record("a", aupr=0.34), record("b", aupr=0.22), record("msp@a", "a", aupr=0.12)],
        5: [record("a", aupr=0.29), record("b", aupr=0.25), record("msp@a", "a", aupr=0.05)],
    }
    block = main.seed_summary(seeds)
    assert block["values"] == [3, 4, 5] and block["primary"] == ["a", "b"]
    assert list(block["rows"]) == ["a", "b", "msp@a"]
    for method in ("a", "b", "msp@a"):
        values = [next(r for r in seeds[s] if r["method"] == method)["aupr"] for s in (3, 4, 5)]
        summary = block["rows"][method]["aupr"]
        assert summary["values"] == values
        assert summary["mean"] == np.mean(values) and summary["std"] == np.std(values, ddof=1)
    assert block["rows"]["a"]["total_train_time_s"]["mean"] == 10.0
    aupr = block["rankings"]["aupr"]
    assert aupr["held"] is True and aupr["orders"] == [[["a"], ["b"]]] * 3 and aupr["unranked"] == [[], [], []]


def test_a_ranking_that_flips_in_one_seed_did_not_hold_and_fpr95_ranks_lower_first() -> None:
    seeds = {
        0: [record("a", auroc=0.9, fpr95=0.3), record("b", auroc=0.8, fpr95=0.4)],
        1: [record("a", auroc=0.7, fpr95=0.2), record("b", auroc=0.8, fpr95=0.5)],
        2: [record("a", auroc=0.9, fpr95=0.1), record("b", auroc=0.6, fpr95=0.6)],
    }
    block = main.seed_summary(seeds)
    auroc, fpr95 = block["rankings"]["auroc"], block["rankings"]["fpr95"]
    assert auroc["held"] is False and auroc["orders"] == [[["a"], ["b"]], [["b"], ["a"]], [["a"], ["b"]]]
    assert fpr95["held"] is True and fpr95["higher_is_better"] is False and fpr95["orders"][0] == [["a"], ["b"]]
    text = main.format_seed_table(block)
    assert "- AUROC: **changed** between seeds: a > b (seeds 0, 2); b > a (seed 1)" in text
    assert "- FPR95 (lower is better): held in every seed: a > b" in text
    assert "| a | 0.500 ± 0.000 | 0.833 ± 0.115 | 0.200 ± 0.100 |" in text


def test_ties_are_one_group_and_a_missing_value_is_unranked_without_a_crash() -> None:
    # a and c share a network's mIoU in every seed: a tie, not an order
    seeds = {
        0: [record("a", miou=0.6, aupr=0.3), record("b", miou=0.5, aupr=0.2), record("c", miou=0.6, aupr=0.1)],
        1: [record("a", miou=0.7, aupr=math.nan), record("b", miou=0.4, aupr=0.2), record("c", miou=0.7, aupr=0.1)],
    }
    block = main.seed_summary(seeds)
    miou = block["rankings"]["miou"]
    assert miou["held"] is True and miou["orders"] == [[["a", "c"], ["b"]]] * 2
    aupr = block["rankings"]["aupr"]
    assert aupr["held"] is False and aupr["unranked"] == [[], ["a"]] and aupr["orders"][1] == [["b"], ["c"]]
    assert math.isnan(block["rows"]["a"]["aupr"]["mean"]) and math.isnan(block["rows"]["a"]["aupr"]["std"])
    assert block["rows"]["b"]["aupr"]["std"] == 0.0
    text = main.format_seed_table(block)
    assert "- mIoU: held in every seed: a = c > b" in text
    assert "b > c; n/a: a (seed 1)" in text and "| a | n/a |" in text


def test_a_row_missing_from_one_seed_and_a_single_method_or_seed() -> None:
    block = main.seed_summary({0: [record("a", aupr=0.3)], 1: [record("a", aupr=0.4), record("x@a", "a")]})
    assert math.isnan(block["rows"]["x@a"]["aupr"]["values"][0])  # no such row in seed 0
    assert all(ranking["held"] for ranking in block["rankings"].values())  # one method: one order
    single = main.seed_summary({7: [record("a", aupr=0.3)]})
    assert single["rows"]["a"]["aupr"]["mean"] == 0.3 and math.isnan(single["rows"]["a"]["aupr"]["std"])
    assert "| a | 0.300 |" in main.format_seed_table(single)
    empty = main.seed_summary({0: [], 1: []})
    assert empty["rows"] == {} and empty["rankings"]["aupr"] == {
        "higher_is_better": True,
        "held": True,
        "orders": [[], []],
        "unranked": [[], []],
    }
    assert "held in every seed: none" in main.format_seed_table(empty)


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True, None])
def test_seeds_must_be_a_positive_integer(value: Any) -> None:
    with pytest.raises(ValueError, match=r"^compare: --seeds .* must be an integer >= 1, got "):
        main.check_seeds(value)
    with pytest.raises(ValueError, match="--seeds"):
        main.compare("unused", seeds=value)


def test_seed_base_is_the_overrides_then_the_base_configs_seed(tmp_path: Any) -> None:
    config = tmp_path / "base.yaml"
    config.write_text("seed_everything: 42\ntrainer:\n  max_epochs: 1\n")
    assert main._seed_base(str(config), []) == 42
    assert main._seed_base(str(config), ["--seed_everything=5", "--trainer.max_epochs=2"]) == 5
    assert main._seed_base(str(config), ["--seed_everything", "6"]) == 6
    config.write_text("seed_everything: true\n")  # a random seed: nothing to count from
    assert main._seed_base(str(config), []) == 0
    assert main._seed_base(None, []) == 0


def test_budget_inherits_recursively_and_outliers_follow_the_trained_runs_injection() -> None:
    pasting = SimpleNamespace(injection=SimpleNamespace(probability=0.8))
    clean = SimpleNamespace(injection=None)
    off = SimpleNamespace(injection={"source": "procedural", "probability": 0.0})
    assert main._pastes_outliers(pasting) and not main._pastes_outliers(clean) and not main._pastes_outliers(off)
    base = main._budget({"train_time_s": 150.0, "datamodule": clean}, None, trained=True)
    assert base == {"inherited_train_time_s": 0.0, "total_train_time_s": 150.0, "outliers_in_training": False}
    tuned = main._budget({"train_time_s": 95.0, "datamodule": pasting}, base, trained=True)
    assert tuned == {"inherited_train_time_s": 150.0, "total_train_time_s": 245.0, "outliers_in_training": True}
    # scoring another's network: its own datamodule's injection is not what that network saw
    scorer = main._budget({"train_time_s": 0.0, "datamodule": pasting}, base, trained=False)
    assert scorer == {"inherited_train_time_s": 150.0, "total_train_time_s": 150.0, "outliers_in_training": False}
    # starting from a network that saw outliers: this one saw them too, whatever its own data
    again = main._budget({"train_time_s": 5.0, "datamodule": clean}, tuned, trained=True)
    assert again == {"inherited_train_time_s": 245.0, "total_train_time_s": 250.0, "outliers_in_training": True}


def test_table_shows_own_plus_inherited_time_outliers_and_reuse() -> None:
    rows = [
        record("sml", train_time_s=150.0),
        {**record("dd", train_time_s=95.0, inherited_train_time_s=150.0), "outliers_in_training": True},
        {**record("fre", train_time_s=0.0, inherited_train_time_s=150.0), "reuses": "scores the network of sml"},
    ]
    rows[1]["reuses"] = "starts from the network of sml"
    table = main.format_table(rows)
    lines = table.splitlines()
    assert lines[0].endswith("| mIoU | outliers in training | train s (own + inherited) | test s |")
    assert lines[2].endswith("| no | 150 | 1 |") and lines[3].endswith("| yes | 95 + 150 | 1 |")
    assert lines[4].endswith("| no | 0 + 150 | 1 |")
    assert table.endswith("dd starts from the network of sml; fre scores the network of sml.")
    # records written before the budget fields still format
    old = {k: v for k, v in record("old").items() if k not in ("inherited_train_time_s", "outliers_in_training")}
    assert main.format_table([old]).splitlines()[2].endswith("| n/a | 10 | 1 |")


def test_seed_table_shows_mean_train_time_and_names_each_reused_network_once() -> None:
    def tuned(method: str, train: float, base: float) -> dict[str, Any]:
        row = record(method, "dd", train_time_s=train, inherited_train_time_s=base)
        return {**row, "outliers_in_training": True, "reuses": "starts from the network of sml"}

    seeds = {
        0: [record("sml", train_time_s=100.0), tuned("dd", 40.0, 100.0), tuned("msp@dd", 40.0, 100.0)],
        1: [record("sml", train_time_s=120.0), tuned("dd", 60.0, 120.0), tuned("msp@dd", 60.0, 120.0)],
    }
    text = main.format_seed_table(main.seed_summary(seeds))
    assert "| sml | 0.500 ± 0.000 |" in text and text.count("| yes | 50 + 110 |") == 2
    assert "Reused networks (their training time is the inherited part): dd starts from the network of sml.\n" in text

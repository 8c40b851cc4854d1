"""The protocol card, and the protocol presets reproducing the published families on a tiny set
where they disagree (each family's rules transcribed with scikit-learn and the reference code)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from test_metrics_reference import reference_fpr_at_recall
from torch.utils.data import DataLoader

from callbacks.evaluation import AnomalyEvaluation
from callbacks.protocol import FPR95_RULES, PRESETS, ProtocolPreset, protocol_card, resolve_presets
from datamodules.labels import CLASS_NAMES
from lightning_modules.base import AnomalySegmentationModule, MethodOutput

UNLABELED, OTHER, ROAD, ANOMALY, VOID = 0, 3, 7, 13, 255


def test_card_states_negatives_void_and_resolution() -> None:
    reference = protocol_card(CLASS_NAMES, ignore_unlabeled=False, test_image_size=None)
    assert reference["void"] == ["label 255"] and "'unlabeled' included" in reference["negatives"]
    assert reference["evaluation_resolution"] == "native" and reference["num_classes"] == 13
    assert reference["pooled"]["fpr95_rule"] == "first_reaching"
    assert reference["per_image"]["fpr95_rule"] == "closest_recall"
    for part in ("pooled", "per_image"):
        assert reference[part]["fpr95_rule_text"] == FPR95_RULES[reference[part]["fpr95_rule"]]
    # data.ignore_unlabeled also takes 'unlabeled' out of the anomaly negatives: the card says so
    twelve = protocol_card(CLASS_NAMES[1:], ignore_unlabeled=True, test_image_size=(128, 224))
    assert twelve["void"] == ["label 255", "unlabeled"] and "'unlabeled' is void" in twelve["negatives"]
    assert twelve["evaluation_resolution"] == "128x224" and "nearest-neighbour" in twelve["resize_policy"]
    assert twelve["class_set"] == list(CLASS_NAMES[1:])


def _tiny_set(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """5 images 24x32: unlabeled, 'other' and road pixels, anomalies in 4 of them, void rows.
    'other' scores high and 'unlabeled' medium, so that which of them count as negatives moves
    every metric; the image without anomalies only counts where images are pooled."""
    rng = np.random.default_rng(seed)
    masks = np.full((5, 24, 32), ROAD, dtype=np.int64)
    masks[:, :6] = UNLABELED
    masks[:, 6:10, :12] = OTHER
    masks[:, -1] = VOID
    for i in range(4):
        top, left = 10 + 2 * i, 4 + 5 * i
        masks[i, top : top + 5 + i, left : left + 6] = ANOMALY
    scores = rng.normal(0.0, 1.0, masks.shape)
    scores += 1.6 * (masks == ANOMALY) + 1.2 * (masks == OTHER) + 0.6 * (masks == UNLABELED)
    scores[4] += 0.8  # the image without anomalies scores high everywhere
    return scores.astype(np.float32), masks


def _first_reaching(y: np.ndarray, s: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(fpr[np.argmax(tpr >= 0.95)])


def _expected(scores: np.ndarray, masks: np.ndarray) -> dict[str, dict[str, float]]:
    """Each family's definition, transcribed directly."""

    def per_image(void: tuple[int, ...], rule: str) -> dict[str, float]:
        values = []
        for s, m in zip(scores, masks, strict=True):
            keep = (m != VOID) & ~np.isin(m, void)
            y, x = (m[keep] == ANOMALY), s[keep].astype(np.float64)
            if not y.any() or y.all():
                continue
            fpr = reference_fpr_at_recall(y, x) if rule == "closest_recall" else _first_reaching(y, x)
            values.append((average_precision_score(y, x), roc_auc_score(y, x), fpr))
        aupr, auroc, fpr95 = np.mean(values, axis=0)
        return {"aupr": aupr, "auroc": auroc, "fpr95": fpr95}

    def pooled(void: tuple[int, ...], only_with_anomalies: bool) -> dict[str, float]:
        images = [i for i in range(len(masks)) if (masks[i] == ANOMALY).any() or not only_with_anomalies]
        m, s = masks[images], scores[images]
        keep = (m != VOID) & ~np.isin(m, void)
        y, x = m[keep] == ANOMALY, s[keep].astype(np.float64)
        return {"aupr": average_precision_score(y, x), "auroc": roc_auc_score(y, x), "fpr95": _first_reaching(y, x)}

    return {
        "reference": per_image((), "closest_recall"),
        "densehybrid": per_image((OTHER,), "first_reaching"),
        "mask2anomaly": pooled((UNLABELED, OTHER), True),
        "pooled": pooled((), False),
    }


class _Fixed(AnomalySegmentationModule):
    """Returns the tiny set's scores for the image index carried in the image's first pixel."""

    method_name = "fixed"

    def __init__(self, scores: np.ndarray) -> None:
        super().__init__()
        self.fixed = torch.from_numpy(scores)

    def segment(self, image: torch.Tensor) -> MethodOutput:
        index = image[:, 0, 0, 0].long()
        logits = torch.zeros(image.shape[0], self.num_classes, *image.shape[-2:])
        return MethodOutput(logits, {"fixed": self.fixed[index]})


def test_presets_reproduce_each_family_where_they_disagree(tmp_path: Path) -> None:
    scores, masks = _tiny_set()
    expected = _expected(scores, masks)
    batches = [
        {"image": torch.full((3, 24, 32), float(i)), "mask": torch.from_numpy(masks[i])} for i in range(len(masks))
    ]
    evaluation = AnomalyEvaluation(output_dir=str(tmp_path), protocols=list(PRESETS), per_class_false_positives=False)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, callbacks=[evaluation], enable_progress_bar=False, enable_model_summary=False
    )
    trainer.test(_Fixed(scores), dataloaders=DataLoader(batches, batch_size=2), verbose=False)
    document = json.loads((tmp_path / "metrics.json").read_text())
    for name, family in expected.items():
        got = document["protocols"][name]["scores"]["fixed"]
        for key, value in family.items():
            assert got[key] == pytest.approx(value, abs=1e-9), (name, key, got[key], value)
        assert document["protocols"][name]["card"]["name"] == name
    # the families really disagree on this set: every metric differs between every two presets
    for key in ("aupr", "auroc", "fpr95"):
        values = [family[key] for family in expected.values()]
        assert len({round(v, 6) for v in values}) == len(values), (key, values)
    # the presets without their own state read the default metrics
    assert document["protocols"]["pooled"]["scores"]["fixed"]["aupr"] == document["aupr"]
    assert document["protocols"]["reference"]["scores"]["fixed"]["fpr95"] == document["fpr95_per_image"]
    card = document["protocols"]["mask2anomaly"]["card"]
    assert card["void_classes"] == ["unlabeled", "other"] and card["reproduced"].startswith("without")


@pytest.mark.parametrize(
    ("protocols", "message"),
    [
        (["bogus"], "unknown protocol preset 'bogus'"),
        ([{"name": "mine", "void_classes": ["sky"]}], "unknown void class"),
        ([{"name": "mine", "fpr95_rule": "closest"}], "unknown fpr95_rule 'closest'"),
        ([{"name": "mine", "aggregation": "pooled", "fpr95_rule": "closest_recall"}], "first_reaching FPR95 rule only"),
        ([{"void_classes": ["other"]}], "needs a 'name'"),
        ([{"name": "mine", "typo": 1}], "unknown field"),
        (["pooled", "pooled"], "unique"),
    ],
)
def test_bad_protocols_fail_with_one_clear_line(protocols: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AnomalyEvaluation(protocols=protocols)


def test_custom_preset_and_ignore_unlabeled_classes() -> None:
    (custom,) = resolve_presets([{"name": "no-other", "void_classes": ["other"]}], CLASS_NAMES)
    assert custom == ProtocolPreset("no-other", "user-defined", "pooled", "first_reaching", ("other",))
    # under data.ignore_unlabeled 'unlabeled' is void already: naming it is not an error
    (m2a,) = resolve_presets(["mask2anomaly"], CLASS_NAMES[1:], CLASS_NAMES)
    assert m2a.void_classes == ("unlabeled", "other")


def test_the_card_records_the_test_time_augmentation_applied(tmp_path: Path) -> None:
    scores, masks = _tiny_set()
    module = _Fixed(scores)
    batches = [{"image": torch.full((3, 24, 32), float(i)), "mask": torch.from_numpy(masks[i])} for i in range(5)]
    evaluation = AnomalyEvaluation(
        output_dir=str(tmp_path),
        protocols=["reference"],
        per_class_false_positives=False,
        test_time_augmentation={"flip": True},
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, callbacks=[evaluation], enable_progress_bar=False, enable_model_summary=False
    )
    trainer.test(module, dataloaders=DataLoader(batches, batch_size=2), verbose=False)
    document = json.loads((tmp_path / "metrics.json").read_text())
    assert document["protocol"]["test_time_augmentation"].startswith("mean over 2 views")
    card = document["protocols"]["reference"]["card"]
    assert card["test_time_augmentation_applied"].startswith("mean over 2 views")

"""The protocol card every results file carries."""

from __future__ import annotations

from callbacks.protocol import FPR95_RULES, protocol_card
from datamodules.labels import CLASS_NAMES


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

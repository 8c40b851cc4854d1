"""The protocol card: what every number of a results file was computed under.

Published StreetHazards numbers come from several protocol families that differ in which pixels
count as negatives, how images are aggregated and which FPR95 rule is used. A ``metrics.json``
(and the ``comparison.json`` built from them) therefore carries a card that states, for the
pooled and the per-image values, the aggregation, the FPR95 rule and the AP definition, and, for
the whole file, the positives, negatives and void pixels, the class set, the evaluation
resolution and resize policy, and the test-time augmentation.

Example:
    >>> card = protocol_card(("unlabeled", "building"), ignore_unlabeled=False, test_image_size=None)
    >>> card["negatives"]
    "every labelled pixel of a known class, 'unlabeled' included"
    >>> card["evaluation_resolution"]
    'native'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["AP_DEFINITION", "FPR95_RULES", "protocol_card"]

#: How AP is computed, for both aggregations: the step-wise sum over thresholds (no interpolation).
AP_DEFINITION = (
    "average precision sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds "
    "(no interpolation; scikit-learn's average_precision_score)"
)
#: The two FPR95 rules, by the name a card uses.
FPR95_RULES = {
    "first_reaching": "FPR at the highest threshold whose TPR is at least 0.95 (the first ROC point reaching it)",
    "closest_recall": (
        "FPR at the threshold whose recall is closest to 0.95, the lowest such threshold among ties "
        "(hendrycks/anomaly-seg anom_utils.py)"
    ),
}


def protocol_card(
    class_names: Sequence[str],
    ignore_unlabeled: bool | None,
    test_image_size: Sequence[int] | str | None,
    test_time_augmentation: str = "none",
    anomaly_index: int = 13,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """The card of a test run (see the module docstring).

    Args:
        class_names: the known classes the network predicts.
        ignore_unlabeled: the datamodule's ``ignore_unlabeled`` (``None``: not a StreetHazards
            datamodule, unknown).
        test_image_size: ``(H, W)`` the test split is resized to on load, ``None`` for native, or a
            text that describes the resolution (a datamodule this function does not know).
        test_time_augmentation: what was averaged over views, ``"none"`` without.
        anomaly_index, ignore_index: the label values of anomaly and void pixels.
    """
    if ignore_unlabeled is None:
        negatives = "every non-void pixel that is not an anomaly"
        void = [f"label {ignore_index}"]
    elif ignore_unlabeled:
        negatives = "every labelled pixel of a known class; 'unlabeled' is void (data.ignore_unlabeled)"
        void = [f"label {ignore_index}", "unlabeled"]
    else:
        negatives = "every labelled pixel of a known class, 'unlabeled' included"
        void = [f"label {ignore_index}"]
    if isinstance(test_image_size, str):
        resolution = test_image_size
        resize = "method outputs resized bilinearly (align_corners=False) to the label grid"
    elif test_image_size is None:
        resolution = "native"
        resize = "labels at their native size; method outputs resized bilinearly to the label grid"
    else:
        resolution = f"{int(test_image_size[0])}x{int(test_image_size[1])}"
        resize = (
            f"test images resized to {resolution} on load (bilinear), labels nearest-neighbour; method "
            "outputs resized bilinearly (align_corners=False) to the label grid"
        )
    return {
        "pooled": {
            "keys": ["aupr", "auroc", "fpr95"],
            "aggregation": "all valid pixels of all test images pooled",
            "fpr95_rule": "first_reaching",
            "fpr95_rule_text": FPR95_RULES["first_reaching"],
            "ap_definition": AP_DEFINITION,
        },
        "per_image": {
            "keys": ["aupr_per_image", "auroc_per_image", "fpr95_per_image"],
            "aggregation": (
                "each image's metric, averaged over the test images with at least one anomaly pixel "
                "and one valid non-anomaly pixel"
            ),
            "fpr95_rule": "closest_recall",
            "fpr95_rule_text": FPR95_RULES["closest_recall"],
            "ap_definition": AP_DEFINITION,
        },
        "positives": f"anomaly pixels (label {anomaly_index})",
        "negatives": negatives,
        "void": void,
        "class_set": list(class_names),
        "num_classes": len(class_names),
        "evaluation_resolution": resolution,
        "resize_policy": resize,
        "test_time_augmentation": test_time_augmentation,
        "undefined_values": "written as null (e.g. no anomaly pixel in the split)",
    }

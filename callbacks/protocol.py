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

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = [
    "AP_DEFINITION",
    "FPR95_RULES",
    "PRESETS",
    "EvaluationOptionError",
    "ProtocolPreset",
    "protocol_card",
    "resolve_presets",
]


class EvaluationOptionError(ValueError):
    """An evaluation option is wrong (a preset naming an unknown preset, rule, field or class; a
    histogram size out of range); the message is one line that names the option."""


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


_AGGREGATIONS = ("pooled", "per_image")
_IMAGES = ("all", "with_anomalies")


@dataclass(frozen=True)
class ProtocolPreset:
    """A named evaluation protocol: which pixels count, how images are aggregated, which FPR95 rule.

    Attributes:
        name: the preset's name (``metrics.json`` key ``protocols.<name>``).
        source: where the rules were read (code and file).
        aggregation: ``"pooled"`` (all counted pixels of all counted images together) or
            ``"per_image"`` (each image with both anomaly and normal pixels alone, then the mean).
        fpr95_rule: ``"first_reaching"`` or ``"closest_recall"`` (:data:`FPR95_RULES`).
        void_classes: known classes left out of the evaluation (neither anomaly nor negative).
        images: ``"all"`` or ``"with_anomalies"`` (only images with at least one anomaly pixel; a
            per-image mean always uses only those).
        test_time_augmentation: what the source averages at test time. The views a run averages
            over are ``evaluation.test_time_augmentation``, not the preset's; the card
            says whether the run had any (``reproduced``).
    """

    name: str
    source: str
    aggregation: str
    fpr95_rule: str
    void_classes: tuple[str, ...] = ()
    images: str = "all"
    test_time_augmentation: str = "none"

    def __post_init__(self) -> None:
        for option, value, allowed in (
            ("aggregation", self.aggregation, _AGGREGATIONS),
            ("fpr95_rule", self.fpr95_rule, tuple(FPR95_RULES)),
            ("images", self.images, _IMAGES),
        ):
            if value not in allowed:
                raise EvaluationOptionError(
                    f"protocol '{self.name}': unknown {option} '{value}'; expected one of {allowed}"
                )
        object.__setattr__(self, "void_classes", tuple(self.void_classes))

    @property
    def result_keys(self) -> dict[str, str]:
        """Headline name -> the ``AnomalyMetrics`` key that holds it under this protocol."""
        if self.aggregation == "pooled":
            return {"aupr": "aupr", "auroc": "auroc", "fpr95": "fpr95"}
        fpr95 = "fpr95_per_image" if self.fpr95_rule == "closest_recall" else "fpr95_first_per_image"
        return {"aupr": "aupr_per_image", "auroc": "auroc_per_image", "fpr95": fpr95}

    def check(self) -> None:
        """Reject combinations the metric library does not compute."""
        if self.aggregation == "pooled" and self.fpr95_rule != "first_reaching":
            raise EvaluationOptionError(
                f"protocol '{self.name}': pooled metrics use the first_reaching FPR95 rule only, "
                f"got '{self.fpr95_rule}'"
            )

    def card(self, applied_tta: str = "none") -> dict[str, Any]:
        return {
            **asdict(self),
            "void_classes": list(self.void_classes),
            "fpr95_rule_text": FPR95_RULES[self.fpr95_rule],
            "ap_definition": AP_DEFINITION,
            "test_time_augmentation_applied": applied_tta,
            "reproduced": (
                "fully"
                if self.test_time_augmentation == "none"
                else f"without the source's test-time augmentation ({self.test_time_augmentation})"
                if applied_tta == "none"
                else f"with this run's test-time augmentation for the source's ({self.test_time_augmentation}); "
                "scores are averaged, not the softmax"
            ),
        }


#: Published StreetHazards protocol families (rules read in each source's evaluation code).
PRESETS: dict[str, ProtocolPreset] = {
    "reference": ProtocolPreset(
        "reference",
        "hendrycks/anomaly-seg: anom_utils.py (AP, AUROC, fpr_and_fdr_at_recall), eval_ood.py",
        aggregation="per_image",
        fpr95_rule="closest_recall",
        images="with_anomalies",
        test_time_augmentation="softmax averaged over 5 test scales",
    ),
    "densehybrid": ProtocolPreset(
        "densehybrid",
        "matejgrcic/DenseHybrid: per-image evaluation, class 'other' ignored, first ROC point at TPR >= 0.95",
        aggregation="per_image",
        fpr95_rule="first_reaching",
        void_classes=("other",),
        images="with_anomalies",
    ),
    "mask2anomaly": ProtocolPreset(
        "mask2anomaly",
        "shyam671/Mask2Anomaly: pooled over images with anomalies, 'unlabeled' and 'other' void, flip averaging",
        aggregation="pooled",
        fpr95_rule="first_reaching",
        void_classes=("unlabeled", "other"),
        images="with_anomalies",
        test_time_augmentation="horizontal flip averaging",
    ),
    "pooled": ProtocolPreset(
        "pooled",
        "this project's pooled metrics (SegmentMeIfYouCan-style pixel pooling over the whole split)",
        aggregation="pooled",
        fpr95_rule="first_reaching",
    ),
}


def resolve_presets(
    protocols: Sequence[str | Mapping[str, Any]], class_names: Sequence[str], all_class_names: Sequence[str] = ()
) -> list[ProtocolPreset]:
    """Presets by name (:data:`PRESETS`) or custom ones given as mappings of :class:`ProtocolPreset`
    fields, checked against the class set: a void class must be one of ``class_names``, or one of
    ``all_class_names`` that is void already (``unlabeled`` under ``data.ignore_unlabeled``)."""
    known = set(class_names) | set(all_class_names)
    allowed = {f.name for f in fields(ProtocolPreset)}
    presets = []
    for item in protocols:
        if isinstance(item, str):
            if item not in PRESETS:
                raise EvaluationOptionError(f"unknown protocol preset '{item}'; known: {', '.join(PRESETS)}")
            preset = PRESETS[item]
        else:
            unknown = set(item) - allowed
            if unknown:
                raise EvaluationOptionError(
                    f"protocol {dict(item)}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
                )
            if "name" not in item:
                raise EvaluationOptionError(f"protocol {dict(item)}: a custom protocol needs a 'name'")
            defaults = {"source": "user-defined", "aggregation": "pooled", "fpr95_rule": "first_reaching"}
            preset = ProtocolPreset(**{**defaults, **item})
        preset.check()
        missing = [c for c in preset.void_classes if c not in known]
        if missing:
            raise EvaluationOptionError(
                f"protocol '{preset.name}': unknown void class(es) {missing}; classes: {', '.join(class_names)}"
            )
        presets.append(preset)
    names = [p.name for p in presets]
    if len(set(names)) != len(names):
        raise EvaluationOptionError(f"protocol names must be unique, got {names}")
    return presets

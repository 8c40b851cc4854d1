"""StreetHazards label set, after the dataset's label shift (annotation value - 1).

The order follows the CARLA 0.8 semantic tags the dataset was rendered with. The anomaly
class exists only in the test split; 255 is the ignore index used throughout.
"""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "unlabeled",
    "building",
    "fence",
    "other",
    "pedestrian",
    "pole",
    "road line",
    "road",
    "sidewalk",
    "vegetation",
    "car",
    "wall",
    "traffic sign",
)
NUM_CLASSES: int = len(CLASS_NAMES)  # 13 known classes, the reference protocol
ANOMALY_INDEX: int = 13
IGNORE_INDEX: int = 255
UNLABELED_INDEX: int = 0

# Raw annotation PNG values are 1..14; the loader subtracts this offset.
LABEL_OFFSET: int = 1
RAW_LABEL_MIN: int = 1
RAW_LABEL_MAX: int = 14

# CARLA's semantic-segmentation colours for the 13 known classes, plus a colour for anomalies
# that no known class uses.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (70, 70, 70),
    (100, 40, 40),
    (55, 90, 80),
    (220, 20, 60),
    (153, 153, 153),
    (157, 234, 50),
    (128, 64, 128),
    (244, 35, 232),
    (107, 142, 35),
    (0, 0, 142),
    (102, 102, 156),
    (220, 220, 0),
    (0, 255, 255),  # anomaly
)
IGNORE_COLOR: tuple[int, int, int] = (255, 255, 255)

# ImageNet statistics: the encoders are ImageNet-pretrained for real runs.
IMAGE_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGE_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def colorize(mask):  # type: ignore[no-untyped-def]
    """Map a label array (H, W) of class indices to an RGB uint8 array (H, W, 3).

    Accepts a NumPy array or a torch tensor; values outside the palette (255) get IGNORE_COLOR.
    """
    import numpy as np

    arr = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    lut = np.tile(np.asarray(IGNORE_COLOR, dtype=np.uint8), (256, 1))
    lut[: len(PALETTE)] = np.asarray(PALETTE, dtype=np.uint8)
    return lut[arr.astype(np.int64).clip(0, 255)]

"""Write a small procedural dataset in the released StreetHazards format.

The loading code cannot tell it from the release: the same folders, ``.odgt`` indexes, RGBA image
PNGs and mode-L annotation PNGs with raw values ``class index + 1`` (1..14)::

    train/train.odgt         train/images/training/t1-3/NNNNNN.png   train/annotations/training/...
    train/validation.odgt    train/images/validation/t4/NNNNNN.png     train/annotations/validation/...
    test/test.odgt           test/images/test/t5/NNNNNN.png            test/annotations/test/...

Paths in an ``.odgt`` are relative to the folder the index sits in, as in the release. File
``NNNNNN`` of a split is drawn from its own random generator seeded by ``(seed, split, NNNNNN)``,
so an image does not depend on how many other images are written, and the same arguments give
the same bytes.

Scenes
------
Each image is a driving scene seen through a pinhole camera (random horizon, vanishing point,
field of view and camera height). The ground plane holds the road (with dashed or solid lane
lines in perspective), tiled sidewalks on both sides and grass or gravel beyond; two facades run
along the road, cut into segments of buildings (with window grids), walls, see-through fences
and hedges, with a distant skyline behind. Objects stand on the ground, sorted far to near: cars,
vans and trucks seen from behind, pedestrians, poles and street lamps, traffic signs, trees,
and street furniture labelled "other" (bins, benches, crates, bollards). The sky is "unlabeled",
as in CARLA. Colours vary per object; surfaces get value-noise textures, then the whole image
gets depth fog, a per-image gain / colour cast / gamma, vignetting and sensor noise.

Anomalies (test split only)
---------------------------
Each test image holds 1 to 3 anomalies: upright objects standing on the road or a sidewalk, each
one 4-connected region, fully visible (nothing nearer occludes it) and not touching another,
covering 0.12% to 4.5% of the image (inside the benchmark-style [0.1%, 5%] band). They are made
of shapes and textures no known class uses, and that differ on purpose from the training-time
outlier pasting (plain random polygons and smooth blobs with noise textures):

* shapes: stars (5 to 8 points), rings (annuli; the hole shows the scene behind) and crosses
  (plus or saltire, depending on the rotation);
* textures, in two colours: checkerboard, parallel stripes, concentric bands and polka dots.

Both colours are copied from known-class pixels of the same image (road, sky, cars, buildings,
...), so intensity alone does not separate anomalies from the rest (best single-channel
threshold AUROC well below 0.8); what gives them away is their outline and texture.

Command line::

    python -m datamodules.synthetic ROOT --num-train 200 --num-val 40 --num-test 300 \\
        --height 180 --width 320 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.labels import ANOMALY_INDEX, CLASS_NAMES, LABEL_OFFSET

__all__ = [
    "MIN_IMAGE_SIZE",
    "PARAMETERS_FILE",
    "read_synthetic_parameters",
    "render_scene",
    "scene_rng",
    "write_synthetic_streethazards",
]

_CLASS = {name: index for index, name in enumerate(CLASS_NAMES)}
_UNLABELED = _CLASS["unlabeled"]
_BUILDING = _CLASS["building"]
_FENCE = _CLASS["fence"]
_OTHER = _CLASS["other"]
_PEDESTRIAN = _CLASS["pedestrian"]
_POLE = _CLASS["pole"]
_ROAD_LINE = _CLASS["road line"]
_ROAD = _CLASS["road"]
_SIDEWALK = _CLASS["sidewalk"]
_VEGETATION = _CLASS["vegetation"]
_CAR = _CLASS["car"]
_WALL = _CLASS["wall"]
_SIGN = _CLASS["traffic sign"]

#: Smallest (height, width) the writer accepts: below it anomalies cannot keep their shape.
MIN_IMAGE_SIZE: tuple[int, int] = (64, 96)

#: Written at the dataset root: the arguments that produced it (sizes, seed), so that a folder
#: written with other arguments than the ones asked for is recognised instead of silently used.
PARAMETERS_FILE = "synthetic.json"

# Anomaly size band (fraction of the image), kept inside [0.1%, 5%] with a margin so that the
# dataset satisfies the band whatever rounding the consumer applies.
_ANOMALY_MIN_FRACTION = 0.0012
_ANOMALY_MAX_FRACTION = 0.045
_ANOMALY_MIN_PIXELS = 40  # below this a star or ring is no longer recognisable
_ANOMALY_SHAPES = ("star", "ring", "cross")
_ANOMALY_TEXTURES = ("checkerboard", "stripes", "bands", "dots")


@dataclass(frozen=True)
class _Split:
    key: str  # the RNG namespace and the name used by the datamodule
    code: int
    folder: str  # top-level folder that holds the .odgt
    subset: str  # folder under images/ and annotations/
    towns: tuple[str, ...]
    index_file: str
    anomalies: bool


_SPLITS: tuple[_Split, ...] = (
    _Split("train", 0, "train", "training", ("t1-3",), "train.odgt", False),
    _Split("val", 1, "train", "validation", ("t4",), "validation.odgt", False),
    _Split("test", 2, "test", "test", ("t5",), "test.odgt", True),
)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that draws image ``index`` of ``split`` ('train', 'val' or 'test')."""
    codes = {s.key: s.code for s in _SPLITS}
    if split not in codes:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(codes)}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), codes[split], int(index)]))


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class _Camera:
    """Pinhole camera looking along the road; world X right, Y up, Z forward, metres."""

    height: int
    width: int
    horizon: float  # image row of the horizon
    cx: float  # image column of the vanishing point
    focal: float  # pixels
    cam_h: float  # camera height above the ground, metres

    def column(self, x: np.ndarray | float, z: np.ndarray | float) -> np.ndarray | float:
        return self.cx + self.focal * x / z

    def row(self, y: np.ndarray | float, z: np.ndarray | float) -> np.ndarray | float:
        return self.horizon + self.focal * (self.cam_h - y) / z


@dataclass(frozen=True)
class _Road:
    left: float  # X of the left road edge
    right: float
    lane_width: float
    lanes: int
    walk_left: float  # X of the sidewalks' outer edges
    walk_right: float
    facade_left: float  # X of the facade planes
    facade_right: float


class _Canvas:
    """Per-pixel layers the painter writes: label, depth, albedo and texture amplitudes."""

    def __init__(self, height: int, width: int) -> None:
        self.label = np.zeros((height, width), np.uint8)
        self.depth = np.full((height, width), np.inf, np.float32)
        self.albedo = np.zeros((height, width, 3), np.float32)
        # Amplitudes of the two value-noise fields (medium, fine) that modulate the albedo.
        self.grain = np.zeros((height, width, 2), np.float32)

    def paint(
        self,
        region: tuple[slice, slice],
        mask: np.ndarray,
        cls: int,
        colour: np.ndarray | Sequence[float],
        depth: float | np.ndarray,
        grain: tuple[float, float] = (0.05, 0.03),
    ) -> None:
        """Overwrite the pixels of ``mask`` inside ``region``.

        ``mask`` and array-valued ``depth`` [h, w] / ``colour`` [h, w, 3] may have size-1 axes
        that broadcast over the region; ``colour`` may also be one RGB triple.
        """
        height, width = self.label.shape
        (top, _, _), (left, _, _) = region[0].indices(height), region[1].indices(width)
        mask = np.broadcast_to(mask, self.label[region].shape)
        # Work on the mask's bounding box only: most layers cover a small part of the image.
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return
        cols = np.flatnonzero(mask.any(axis=0))
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1

        def crop(values: np.ndarray | float | Sequence[float]) -> np.ndarray | float | Sequence[float]:
            if np.ndim(values) < 2:
                return values
            array = np.asarray(values)
            rows_cut = slice(r0, r1) if array.shape[0] > 1 else slice(None)
            cols_cut = slice(c0, c1) if array.shape[1] > 1 else slice(None)
            return array[rows_cut, cols_cut]

        box = (slice(top + r0, top + r1), slice(left + c0, left + c1))
        mask = mask[r0:r1, c0:c1]
        np.copyto(self.label[box], cls, where=mask)
        np.copyto(self.depth[box], crop(depth), where=mask, casting="unsafe")
        np.copyto(self.albedo[box], crop(colour), where=mask[..., None], casting="unsafe")
        np.copyto(self.grain[box], np.asarray(grain, np.float32), where=mask[..., None])


def _billboard(
    cam: _Camera, x: float, z: float, x_lo: float, x_hi: float, y_hi: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """Pixel box of an upright object standing at (x, z) spanning [x+x_lo, x+x_hi] x [0, y_hi] m.

    Returns the box and the object-local metric coordinates of its pixel centres: ``lx`` [1, w]
    (metres right of x) and ``ly`` [h, 1] (metres above the ground), or None when off-screen.
    """
    c0 = max(0, math.floor(cam.column(x + x_lo, z)))
    c1 = min(cam.width, math.ceil(cam.column(x + x_hi, z)) + 1)
    r0 = max(0, math.floor(cam.row(y_hi, z)))
    r1 = min(cam.height, math.ceil(cam.row(0.0, z)) + 1)
    if c1 <= c0 or r1 <= r0:
        return None
    scale = z / cam.focal  # metres per pixel at this depth
    lx = ((np.arange(c0, c1, dtype=np.float32) + 0.5 - cam.cx) * scale - x)[None, :]
    ly = (cam.cam_h - (np.arange(r0, r1, dtype=np.float32) + 0.5 - cam.horizon) * scale)[:, None]
    return (slice(r0, r1), slice(c0, c1)), lx, ly


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth noise [height, width], about unit variance: a Gaussian grid of spacing ``cell`` px,
    interpolated with smoothstep weights."""
    grid = rng.standard_normal((math.ceil(height / cell) + 2, math.ceil(width / cell) + 2))
    grid = grid.astype(np.float32)

    def axis(n: int) -> tuple[np.ndarray, np.ndarray]:
        pos = (np.arange(n, dtype=np.float32) + 0.5) / cell
        start = pos.astype(np.int64)
        frac = pos - start
        return start, frac * frac * (3.0 - 2.0 * frac)

    iy, wy = axis(height)
    ix, wx = axis(width)
    rows = grid[iy] * (1.0 - wy)[:, None] + grid[iy + 1] * wy[:, None]
    noise = rows[:, ix] * (1.0 - wx) + rows[:, ix + 1] * wx
    return noise / 0.75  # smoothstep interpolation shrinks the std to about 0.75


def _value_noise_1d(rng: np.random.Generator, length: int, cell: float) -> np.ndarray:
    return _value_noise(rng, 1, length, cell)[0]


def _byte_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance triangular noise from random bytes (much faster than Gaussian)."""
    count = math.prod(shape)
    pairs = np.frombuffer(rng.bytes(2 * count), np.uint8).reshape(2, *shape).astype(np.float32)
    return (pairs[0] + pairs[1] - 255.0) * np.float32(math.sqrt(6.0) / 255.0)


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _colour(rng: np.random.Generator, mean: Sequence[float], spread: float, jitter: float) -> np.ndarray:
    """A colour near ``mean``: a common brightness factor in 1 +- spread, plus per-channel jitter."""
    base = np.asarray(mean, np.float32) * rng.uniform(1.0 - spread, 1.0 + spread)
    return np.clip(base + rng.uniform(-jitter, jitter, 3), 0.0, 255.0).astype(np.float32)


# ----------------------------------------------------------------------------- background
def _draw_sky(cv: _Canvas, cam: _Camera, rng: np.random.Generator) -> np.ndarray:
    """Vertical gradient with clouds; returns the horizon colour (used for fog)."""
    overcast = rng.random() < 0.25
    if overcast:
        zenith = _colour(rng, (150, 158, 168), 0.15, 10)
        horizon = _colour(rng, (196, 200, 204), 0.1, 8)
    else:
        zenith = _colour(rng, (80, 130, 205), 0.15, 18)
        horizon = _colour(rng, (185, 205, 228), 0.08, 12)
    h, w = cv.label.shape
    t = np.clip((np.arange(h, dtype=np.float32) + 0.5) / max(cam.horizon, 1.0), 0.0, 1.0) ** 0.7
    sky = zenith + (horizon - zenith) * t[:, None]  # [h, 3]
    clouds = np.clip(_value_noise(rng, h, w, w / 6) * 0.8 + _value_noise(rng, h, w, w / 24) * 0.3 - 0.3, 0, 1)
    cover = clouds * rng.uniform(0.2, 0.8)
    white = np.array([235, 235, 238], np.float32)
    albedo = sky[:, None, :] * (1 - cover[..., None]) + white * cover[..., None]
    cv.paint((slice(None), slice(None)), np.ones((h, w), bool), _UNLABELED, albedo, np.inf, (0.0, 0.01))
    return horizon


def _draw_skyline(cv: _Canvas, cam: _Camera, rng: np.random.Generator) -> None:
    """Distant buildings and tree lines along the horizon (rows above it only)."""
    h, w = cv.label.shape
    far = 400.0
    # Runs of columns, each a building block or a stretch of trees.
    widths = rng.uniform(0.02, 0.1, 64) * w
    starts = np.concatenate([[0.0], np.cumsum(widths)])
    cols = np.arange(w) + 0.5
    run = np.minimum(np.searchsorted(starts, cols, side="right") - 1, 63)
    is_tree = rng.random(64) < 0.45
    heights = rng.uniform(0.01, 0.12, 64) * h * rng.uniform(0.3, 1.0)
    top = cam.horizon - heights[run]
    bumps = np.abs(_value_noise_1d(rng, w, max(w / 60, 2.0))) * 0.03 * h
    top = np.where(is_tree[run], top + 0.02 * h - bumps, top)
    rows = np.arange(h, dtype=np.float32)[:, None] + 0.5
    mask = (rows >= top[None, :]) & (rows < cam.horizon + 1.0)
    grey = _colour(rng, (120, 125, 135), 0.15, 8)
    green = _colour(rng, (70, 95, 60), 0.2, 8)
    tree_cols = is_tree[run][None, :]
    colours = np.where(tree_cols[..., None], green, grey * rng.uniform(0.85, 1.15, (64, 1))[run][None])
    cls = np.where(tree_cols, _VEGETATION, _BUILDING)
    for value in (_BUILDING, _VEGETATION):
        cv.paint((slice(None), slice(None)), mask & (cls == value), value, colours, far, (0.04, 0.04))


def _layout_road(rng: np.random.Generator) -> _Road:
    lanes = int(rng.integers(2, 5))
    lane_width = rng.uniform(2.8, 3.6)
    ego = rng.integers(0, lanes)
    left = -(ego + 0.5) * lane_width - rng.uniform(-0.5, 0.5)
    right = left + lanes * lane_width
    walk_left = left - rng.uniform(1.5, 4.0)
    walk_right = right + rng.uniform(1.5, 4.0)
    return _Road(
        left=left,
        right=right,
        lane_width=lane_width,
        lanes=lanes,
        walk_left=walk_left,
        walk_right=walk_right,
        facade_left=walk_left - rng.uniform(0.0, 3.0),
        facade_right=walk_right + rng.uniform(0.0, 3.0),
    )


def _draw_ground(cv: _Canvas, cam: _Camera, road: _Road, rng: np.random.Generator) -> None:
    """Road, lane lines, sidewalks and terrain on the ground plane Y = 0."""
    h, w = cv.label.shape
    r0 = max(0, math.floor(cam.horizon + 0.5))
    if r0 >= h:
        return
    region = (slice(r0, h), slice(0, w))
    rows = np.arange(r0, h, dtype=np.float32) + 0.5
    z = (cam.focal * cam.cam_h / np.maximum(rows - cam.horizon, 0.05))[:, None]  # [h', 1]
    x = (np.arange(w, dtype=np.float32) + 0.5 - cam.cx)[None, :] * z / cam.focal  # [h', w]
    metres_per_px = z / cam.focal
    depth = np.broadcast_to(z, x.shape)

    # Terrain beyond each sidewalk: grass (vegetation) or gravel ("other").
    for sign, edge in ((-1.0, road.walk_left), (1.0, road.walk_right)):
        beyond = sign * (x - edge) > 0
        if rng.random() < 0.6:
            cv.paint(region, beyond, _VEGETATION, _colour(rng, (78, 112, 52), 0.2, 10), depth, (0.15, 0.2))
        else:
            cv.paint(region, beyond, _OTHER, _colour(rng, (128, 112, 92), 0.15, 10), depth, (0.12, 0.15))

    # Sidewalks: paving tiles with darker joints and a lighter kerb.
    walk = ((x >= road.walk_left) & (x < road.left)) | ((x > road.right) & (x <= road.walk_right))
    paving = _colour(rng, (150, 146, 138), 0.18, 10)
    tile = rng.uniform(0.4, 1.0)
    joint = np.minimum(_frac(x / tile), _frac(z / tile)) * tile < np.maximum(0.04, 0.6 * metres_per_px)
    kerb = np.minimum(np.abs(x - road.left), np.abs(x - road.right)) < 0.18
    walk_colour = np.where(joint[..., None], paving * 0.8, paving)
    walk_colour = np.where(kerb[..., None], np.minimum(paving * 1.15, 255), walk_colour)
    cv.paint(region, walk, _SIDEWALK, walk_colour, depth, (0.06, 0.07))

    # Asphalt.
    on_road = (x >= road.left) & (x <= road.right)
    cv.paint(region, on_road, _ROAD, _colour(rng, (92, 92, 96), 0.2, 6), depth, (0.07, 0.06))

    # Lane lines: painted where they are at least ~0.6 px wide, so the far end does not alias.
    line_w = rng.uniform(0.12, 0.2)
    z_max = cam.focal * line_w / 0.6
    period, duty, phase = rng.uniform(8.0, 13.0), rng.uniform(0.3, 0.55), rng.uniform(0.0, 13.0)
    half = np.maximum(line_w / 2, 0.5 * metres_per_px)  # at least one pixel wide
    lines = np.zeros(x.shape, bool)
    centres = [road.left + k * road.lane_width for k in range(1, road.lanes)]
    for k, centre in enumerate(centres):
        solid = rng.random() < (0.5 if k == (len(centres) - 1) // 2 else 0.15)
        stroke = np.abs(x - centre) < half
        lines |= stroke if solid else stroke & (_frac((z + phase) / period) < duty)
    if rng.random() < 0.6:  # edge lines
        lines |= np.minimum(np.abs(x - road.left - 0.3), np.abs(x - road.right + 0.3)) < half
    lines &= on_road & (z < z_max)
    paint = (228, 200, 70) if rng.random() < 0.25 else (222, 222, 214)
    cv.paint(region, lines, _ROAD_LINE, _colour(rng, paint, 0.1, 6), depth, (0.06, 0.06))


def _facade_segments(rng: np.random.Generator, z_far: float) -> dict[str, np.ndarray]:
    """Consecutive stretches along one side of the road: buildings, walls, fences, hedges, gaps."""
    kinds = ("building", "wall", "fence", "hedge", "gap")
    prob = np.array([0.42, 0.16, 0.16, 0.14, 0.12])
    length_range = {"building": (8, 30), "wall": (4, 16), "fence": (4, 16), "hedge": (3, 12), "gap": (2, 10)}
    height_range = {
        "building": (5.0, 28.0),
        "wall": (1.2, 3.5),
        "fence": (0.9, 2.2),
        "hedge": (0.8, 2.5),
        "gap": (0, 0),
    }
    material = {
        "building": ((150, 140, 128), 0.35, 25),
        "wall": ((140, 136, 130), 0.25, 15),
        "fence": ((110, 104, 96), 0.35, 20),
        "hedge": ((60, 95, 45), 0.25, 10),
        "gap": ((0, 0, 0), 0.0, 0),
    }
    starts, kind_ids, heights, colours, accents, periods = [], [], [], [], [], []
    z = 0.0
    while z < z_far:
        k = int(rng.choice(len(kinds), p=prob))
        kind = kinds[k]
        starts.append(z)
        kind_ids.append(k)
        heights.append(rng.uniform(*height_range[kind]))
        colours.append(_colour(rng, *material[kind]))
        # Accent colour: windows (bluish glass or dark) for buildings, joints for walls.
        accents.append(_colour(rng, (55, 68, 85) if rng.random() < 0.6 else (150, 175, 200), 0.25, 12))
        periods.append((rng.uniform(2.8, 3.6), rng.uniform(1.8, 3.5), rng.uniform(0.12, 0.3)))
        z += rng.uniform(*length_range[kind])
    return {
        "start": np.asarray(starts, np.float32),
        "kind": np.asarray(kind_ids),
        "height": np.asarray(heights, np.float32),
        "colour": np.asarray(colours, np.float32),
        "accent": np.asarray(accents, np.float32),
        "period": np.asarray(periods, np.float32),
        "names": np.asarray(kinds),
    }


def _draw_facades(cv: _Canvas, cam: _Camera, road: _Road, rng: np.random.Generator) -> None:
    """Two vertical planes X = facade_left / facade_right, cut into segments along Z."""
    h, w = cv.label.shape
    cols = np.arange(w, dtype=np.float32) + 0.5
    rows = np.arange(h, dtype=np.float32)[:, None] + 0.5
    for x_plane in (road.facade_left, road.facade_right):
        z_far = rng.uniform(60.0, 160.0)
        seg = _facade_segments(rng, z_far)
        hedge_bumps = 0.25 * _value_noise_1d(rng, w, 3.0)
        dx = cols - cam.cx
        on_side = dx * np.sign(x_plane) > 0.5
        z = cam.focal * x_plane / np.where(on_side, dx, np.inf)
        visible = np.flatnonzero(on_side & (z < z_far))
        if visible.size == 0:
            continue
        # The plane shows in one contiguous run of columns; work on that run only.
        cs = slice(int(visible[0]), int(visible[-1]) + 1)
        z = z[cs]
        idx = np.clip(np.searchsorted(seg["start"], z, side="right") - 1, 0, len(seg["start"]) - 1)
        kind = seg["names"][seg["kind"][idx]]
        # Per-column quantities as [1, w'] rows, broadcasting against per-pixel [h, w'] arrays.
        along = (z - seg["start"][idx])[None, :]  # metres from the segment start
        top = (seg["height"][idx] + np.where(kind == "hedge", hedge_bumps[cs], 0.0))[None, :]
        floor_h, spacing, bar = (seg["period"][idx, i][None, :] for i in range(3))
        px = z[None, :] / cam.focal  # metres per pixel
        height_at = cam.cam_h - (rows - cam.horizon) * px  # [h, w'] metres above the ground
        inside = (height_at >= 0.0) & (height_at <= top)
        colour = seg["colour"][idx][None]  # [1, w', 3]
        depth = z[None, :]
        region = (slice(None), cs)

        building = inside & (kind == "building")[None, :]
        storey = _frac(height_at / floor_h)
        bay = _frac(along / spacing)
        windows = (storey > 0.35) & (storey < 0.8) & (bay > 0.25) & (bay < 0.72) & (height_at > 1.0)
        cv.paint(region, building, _BUILDING, colour, depth, (0.06, 0.04))
        cv.paint(region, building & windows, _BUILDING, seg["accent"][idx][None], depth, (0.06, 0.04))

        wall = inside & (kind == "wall")[None, :]
        seams = (bay * spacing < np.maximum(0.06, px)) | (height_at > top - 0.15)
        cv.paint(region, wall, _WALL, colour, depth, (0.08, 0.05))
        cv.paint(region, wall & seams, _WALL, colour * 0.8, depth, (0.08, 0.05))

        # Fences are see-through: only posts, rails and bars are painted.
        fence = inside & (kind == "fence")[None, :]
        bars = _frac(along / bar) * bar < np.maximum(0.05, 0.7 * px)
        posts = _frac(along / 2.5) * 2.5 < np.maximum(0.1, px)
        rails = (np.abs(height_at - top + 0.05) < np.maximum(0.05, 0.6 * px)) | (
            np.abs(height_at - 0.2) < np.maximum(0.04, 0.6 * px)
        )
        cv.paint(region, fence & (bars | posts | rails), _FENCE, colour, depth, (0.05, 0.05))

        hedge = inside & (kind == "hedge")[None, :]
        cv.paint(region, hedge, _VEGETATION, colour, depth, (0.2, 0.22))


# ----------------------------------------------------------------------------- objects
_CAR_PAINTS = (
    (225, 225, 222),
    (35, 36, 40),
    (150, 152, 156),
    (95, 98, 104),
    (160, 30, 30),
    (35, 60, 130),
    (40, 80, 60),
    (200, 170, 60),
    (120, 70, 40),
)


def _draw_car(cv: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float) -> None:
    """A car, van or truck seen from behind."""
    kind = rng.choice(3, p=[0.7, 0.2, 0.1])
    width = (rng.uniform(1.65, 1.95), rng.uniform(1.9, 2.2), rng.uniform(2.3, 2.5))[kind]
    height = (rng.uniform(1.35, 1.6), rng.uniform(1.9, 2.5), rng.uniform(2.8, 3.6))[kind]
    body_top = height * (rng.uniform(0.5, 0.6) if kind == 0 else rng.uniform(0.88, 0.95))
    box = _billboard(cam, x, z, -width / 2, width / 2, height)
    if box is None:
        return
    region, lx, ly = box
    half = width / 2
    ax = np.abs(lx)
    rise = np.clip((ly - body_top) / max(height - body_top, 1e-3), 0.0, 1.0)
    cabin_half = half * (0.92 - 0.2 * rise)
    body = (ly >= 0.2) & (ly <= body_top) & (ax <= half - 0.06 * (ly > body_top - 0.08))
    cabin = (ly > body_top) & (ly <= height) & (ax <= cabin_half)
    wheels = (ly >= 0.0) & (ly < 0.4) & (ax >= half - 0.32) & (ax <= half - 0.03)
    under = (ly >= 0.0) & (ly < 0.2) & (ax < half - 0.32)
    shape = body | cabin | wheels | under

    paint = _CAR_PAINTS[rng.integers(len(_CAR_PAINTS))]
    colour = np.broadcast_to(_colour(rng, paint, 0.1, 8), shape.shape + (3,)).copy()
    glass = cabin & (ly > body_top + 0.06) & (ly < height - 0.06) & (ax <= cabin_half - 0.1)
    if kind != 0:  # vans and trucks: a small rear window high up in the box
        glass = (ly > height - 0.55) & (ly < height - 0.2) & (ax < half - 0.25) & (ax > 0.06)
    lights = (ly > body_top - 0.28) & (ly < body_top - 0.1) & (ax > half - 0.3) & (ax < half - 0.06)
    plate = (ly > 0.38) & (ly < 0.5) & (ax < 0.26)
    colour[glass] = _colour(rng, (35, 40, 50), 0.2, 6)
    colour[lights] = _colour(rng, (185, 25, 25), 0.1, 8)
    colour[plate] = (205, 205, 195)
    colour[wheels | under] = (24, 24, 26)
    cv.paint(region, shape, _CAR, colour, z, (0.04, 0.02))


def _draw_pedestrian(cv: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float) -> None:
    height = rng.uniform(1.5, 1.95)
    box = _billboard(cam, x, z, -0.4, 0.4, height)
    if box is None:
        return
    region, lx, ly = box
    head_r = 0.11
    hip = 0.5 * height
    shoulder = height - 2 * head_r - 0.04
    stride = rng.uniform(0.0, 0.22)
    lean = rng.uniform(-0.04, 0.04)
    head = (lx - lean) ** 2 + (ly - height + head_r) ** 2 <= head_r**2
    neck = (np.abs(lx - lean) < 0.05) & (ly > shoulder) & (ly <= height - head_r)
    torso = (ly >= hip - 0.05) & (ly <= shoulder) & (np.abs(lx - lean * 0.5) <= 0.19)
    spread = 0.08 + stride * np.clip((hip - ly) / hip, 0.0, 1.0)
    legs = (ly >= 0.0) & (ly < hip) & (np.minimum(np.abs(lx - spread), np.abs(lx + spread)) <= 0.075)
    arms = (ly > 0.45 * height) & (ly < shoulder) & (np.abs(np.abs(lx) - 0.24) < 0.05)
    shape = head | neck | torso | legs | arms
    skin = _colour(rng, ((224, 180, 150), (170, 120, 90), (110, 75, 55))[rng.integers(3)], 0.1, 8)
    shirt = _colour(rng, rng.uniform(30, 220, 3), 0.1, 10)
    trousers = _colour(rng, rng.uniform(25, 120, 3), 0.1, 8)
    colour = np.broadcast_to(shirt, shape.shape + (3,)).copy()
    colour[head | neck] = skin
    colour[legs] = trousers
    colour[legs & (ly < 0.07)] = (30, 28, 28)
    cv.paint(region, shape, _PEDESTRIAN, colour, z, (0.05, 0.04))


def _draw_pole(
    cv: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float, toward_road: float, sign: bool
) -> None:
    """A pole, a street lamp (arm over the road) or a sign post, optionally with a traffic sign."""
    lamp = not sign and rng.random() < 0.5
    height = rng.uniform(2.6, 3.4) if sign and rng.random() < 0.5 else rng.uniform(4.0, 8.0)
    radius = rng.uniform(0.06, 0.12)
    arm = rng.uniform(1.0, 2.2) * toward_road if lamp else 0.0
    lo, hi = min(-radius, arm) - 0.2, max(radius, arm) + 0.2
    box = _billboard(cam, x, z, lo, hi, height + 0.1)
    if box is not None:
        region, lx, ly = box
        shape = (np.abs(lx) <= radius) & (ly <= height)
        if lamp:
            along = lx * np.sign(arm)
            shape |= (along >= 0) & (along <= abs(arm)) & (np.abs(ly - height + 0.06) < 0.06)
            shape |= (np.abs(along - abs(arm)) < 0.25) & (ly > height - 0.2) & (ly < height)
        grey = _colour(rng, (128, 128, 124), 0.25, 8)
        cv.paint(region, shape, _POLE, grey, z, (0.04, 0.03))
    if not sign:
        return
    size = rng.uniform(0.55, 0.9)
    centre_y = min(height, rng.uniform(2.2, 3.0)) - size / 2
    offset = toward_road * rng.uniform(0.0, 0.3)
    box = _billboard(cam, x + offset, z - 0.02, -size / 2, size / 2, centre_y + size / 2)
    if box is None:
        return
    region, lx, ly = box
    u, v = lx / (size / 2), (ly - centre_y) / (size / 2)  # [-1, 1] in the plate
    form = rng.integers(3)
    if form == 0:  # disc
        plate, inner = u**2 + v**2 <= 1.0, u**2 + v**2 <= 0.62
    elif form == 1:  # triangle, apex up
        plate = (v >= -0.85) & (np.abs(u) <= (1.0 - v) * 0.58) & (v <= 1.0)
        inner = (v >= -0.6) & (np.abs(u) <= (0.7 - v) * 0.58)
    else:  # square
        plate, inner = (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9), (np.abs(u) <= 0.72) & (np.abs(v) <= 0.72)
    rim, face = [
        ((200, 30, 30), (235, 235, 230)),
        ((240, 240, 235), (30, 70, 170)),
        ((30, 30, 30), (225, 195, 40)),
    ][rng.integers(3)]
    colour = np.where(inner[..., None], _colour(rng, face, 0.1, 8), _colour(rng, rim, 0.1, 8))
    cv.paint(region, plate, _SIGN, colour, z - 0.02, (0.03, 0.03))


def _draw_tree(cv: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float) -> None:
    trunk_h = rng.uniform(1.8, 3.2)
    crown = rng.uniform(1.2, 2.6)
    box = _billboard(cam, x, z, -2.2 * crown, 2.2 * crown, trunk_h + 2.6 * crown)
    if box is None:
        return
    region, lx, ly = box
    trunk = (np.abs(lx) <= rng.uniform(0.1, 0.2)) & (ly <= trunk_h + crown)
    blobs = np.zeros(trunk.shape, bool)
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(-0.8, 0.8) * crown, trunk_h + crown * rng.uniform(0.6, 1.5)
        r = crown * rng.uniform(0.55, 0.9)
        blobs |= (lx - cx) ** 2 + (ly - cy) ** 2 <= r * r
    colour = np.where(blobs[..., None], _colour(rng, (62, 100, 40), 0.3, 12), _colour(rng, (90, 68, 48), 0.15, 8))
    cv.paint(region, trunk | blobs, _VEGETATION, colour, z, (0.18, 0.25))


def _draw_furniture(cv: _Canvas, cam: _Camera, rng: np.random.Generator, x: float, z: float) -> None:
    """Street furniture labelled "other": bins, benches, crates and bollards."""
    form = ("bin", "bench", "crate", "bollard")[rng.integers(4)]
    width, height = {
        "bin": (0.6, 1.05),
        "bench": (1.8, 0.95),
        "crate": (rng.uniform(0.6, 1.2), rng.uniform(0.5, 1.0)),
        "bollard": (0.22, 0.85),
    }[form]
    box = _billboard(cam, x, z, -width / 2 - 0.05, width / 2 + 0.05, height)
    if box is None:
        return
    region, lx, ly = box
    ax = np.abs(lx)
    if form == "bin":  # the lid overhangs the body
        body = (ax <= width / 2 - 0.04) & (ly <= height - 0.08)
        shape = body | ((ax <= width / 2) & (ly > height - 0.08) & (ly <= height))
        mean = ((45, 85, 55), (70, 72, 78), (40, 60, 120))[rng.integers(3)]
    elif form == "bench":  # legs, seat, slatted backrest
        legs = (np.abs(ax - width / 2 + 0.15) < 0.05) & (ly <= 0.45)
        seat = (ly > 0.4) & (ly <= 0.5) & (ax <= width / 2)
        back = (ly > 0.62) & (ly <= height) & (ax <= width / 2) & (_frac(ly / 0.12) < 0.7)
        shape = legs | seat | back
        mean = (120, 85, 55)
    elif form == "crate":
        shape = (ax <= width / 2) & (ly <= height)
        mean = (150, 115, 75)
    else:  # bollard with a round top
        shape = ((ax <= width / 2) & (ly <= height - width / 2)) | (
            lx**2 + (ly - height + width / 2) ** 2 <= (width / 2) ** 2
        )
        mean = (110, 110, 108)
    colour = _colour(rng, mean, 0.2, 10)
    edge = (ax > width / 2 - 0.04) | (ly > height - 0.04)
    cv.paint(region, shape, _OTHER, np.where(edge[..., None], colour * 0.8, colour), z, (0.06, 0.05))


def _place_objects(
    cv: _Canvas, cam: _Camera, road: _Road, rng: np.random.Generator
) -> list[tuple[float, Callable[[], None]]]:
    """Sample every object's kind and position, return (depth, draw) pairs."""
    drawers: list[tuple[float, Callable[[], None]]] = []

    def add(z: float, draw: Callable[..., None], *args: object) -> None:
        sub = np.random.default_rng(rng.integers(2**63))  # parameters independent of draw order
        drawers.append((z, lambda: draw(cv, cam, sub, *args)))

    def depth(lo: float, hi: float) -> float:  # log-uniform: more objects near the camera
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))

    for _ in range(int(rng.integers(1, 7))):
        lane = rng.integers(road.lanes)
        x = road.left + (lane + 0.5) * road.lane_width + rng.uniform(-0.35, 0.35)
        if rng.random() < 0.2:  # parked at the kerb
            x = (road.left + 1.1) if rng.random() < 0.5 else (road.right - 1.1)
        z = depth(4.0, 70.0)
        add(z, _draw_car, x, z)

    def on_walk() -> tuple[float, float]:
        if rng.random() < 0.5:
            return rng.uniform(road.walk_left + 0.3, road.left - 0.3), 1.0
        return rng.uniform(road.right + 0.3, road.walk_right - 0.3), -1.0

    for _ in range(int(rng.integers(1, 6))):
        x, _side = on_walk()
        if rng.random() < 0.15:  # crossing the road
            x = rng.uniform(road.left, road.right)
        z = depth(3.0, 45.0)
        add(z, _draw_pedestrian, x, z)

    for _ in range(int(rng.integers(1, 5))):
        x, _side = on_walk()
        z = depth(3.0, 40.0)
        add(z, _draw_furniture, x, z)

    # Poles along the kerbs; the first one always carries a sign so that every image has one.
    first = True
    for kerb, toward_road in ((road.left - 0.4, 1.0), (road.right + 0.4, -1.0)):
        if rng.random() < 0.25 and not first:
            continue
        z = rng.uniform(3.0, 15.0)
        while z < 80.0:
            sign = first or rng.random() < 0.3
            add(z, _draw_pole, kerb, z, toward_road, sign)
            first = False
            z += rng.uniform(10.0, 28.0)

    # Tree rows along the outer edge of the sidewalks.
    for edge, inward in ((road.walk_left, 1.0), (road.walk_right, -1.0)):
        if rng.random() < 0.55:
            z = rng.uniform(4.0, 20.0)
            while z < 90.0:
                add(z, _draw_tree, edge + inward * rng.uniform(0.4, 0.9), z)
                z += rng.uniform(7.0, 18.0)
    return drawers


# ----------------------------------------------------------------------------- anomalies
def _anomaly_shape(kind: str, u: np.ndarray, v: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Mask of a shape in normalized coordinates (the shape spans about [-1, 1]^2)."""
    r = np.hypot(u, v)
    if kind == "star":
        points, inner = 5 + int(p[0] * 4), 0.42 + 0.18 * p[1]  # 5 to 8 points
        tri = np.abs(_frac(np.arctan2(v, u) * points / (2 * np.pi) + p[2]) * 2.0 - 1.0)
        return r <= inner + (1.0 - inner) * tri**1.5
    if kind == "ring":
        return (r <= 1.0) & (r >= 0.45 + 0.2 * p[0])
    arm = 0.26 + 0.14 * p[0]  # cross
    return ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))


def _anomaly_texture(kind: str, a: np.ndarray, b: np.ndarray, period: float) -> np.ndarray:
    """Two-colour pattern (True = first colour) in rotated pixel coordinates a, b."""
    if kind == "checkerboard":
        return (np.floor(a / period) + np.floor(b / period)) % 2 == 0
    if kind == "stripes":
        return np.floor(a / period) % 2 == 0
    if kind == "bands":
        return np.floor(np.hypot(a, b) / period) % 2 == 0
    cell = 2.0 * period  # dots
    return (_frac(a / cell) - 0.5) ** 2 + (_frac(b / cell) - 0.5) ** 2 < 0.09


def _rasterize_anomaly(
    kind: str, radius: float, aspect: float, angle: float, params: np.ndarray, shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask of the shape in its own square box and the box's pixel coordinates about its centre."""
    n = math.ceil(2.0 * radius * max(aspect, 1.0 / aspect) * 1.05) + 3
    coords = np.arange(n, dtype=np.float32) - (n - 1) / 2.0
    dy, dx = coords[:, None] + shift[0], coords[None, :] + shift[1]
    cos, sin = math.cos(angle), math.sin(angle)
    u = (dx * cos + dy * sin) / (radius * aspect)
    v = (-dx * sin + dy * cos) / (radius / aspect)
    return _anomaly_shape(kind, u, v, params), dy, dx


def _pick_colours(cv: _Canvas, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two contrasting colours copied from known-class pixels of this image."""
    known = np.flatnonzero(cv.label.ravel() != ANOMALY_INDEX)
    samples = cv.albedo.reshape(-1, 3)[rng.choice(known, 12)]
    distance = np.abs(samples[:, None, :] - samples[None, :, :]).sum(-1)
    pairs = np.argwhere(distance > 90.0)
    if len(pairs) == 0:
        pairs = np.argwhere(distance == distance.max())
    i, j = pairs[rng.integers(len(pairs))]
    return samples[i], samples[j]


def _draw_anomalies(cv: _Canvas, cam: _Camera, rng: np.random.Generator, count: int) -> int:
    """Place ``count`` anomalies on visible road / sidewalk; returns how many were placed."""
    h, w = cv.label.shape
    area = h * w
    lo = max(_ANOMALY_MIN_FRACTION, _ANOMALY_MIN_PIXELS / area)
    hi = _ANOMALY_MAX_FRACTION
    floor_rows = np.arange(h)[:, None] > cam.horizon + 2
    ground = np.flatnonzero((np.isin(cv.label, (_ROAD, _ROAD_LINE, _SIDEWALK)) & floor_rows).ravel())
    if len(ground) == 0:
        return 0
    from scipy import ndimage  # scipy comes with albumentations / scikit-learn

    placed = 0
    for _ in range(200):
        if placed == count:
            break
        target = math.exp(rng.uniform(math.log(lo * 1.25), math.log(hi * 0.85))) * area
        kind = _ANOMALY_SHAPES[rng.integers(len(_ANOMALY_SHAPES))]
        params = rng.random(3)
        aspect, angle = rng.uniform(0.75, 1.33), rng.uniform(0.0, np.pi)
        shift = rng.uniform(-0.5, 0.5, 2).astype(np.float32)
        radius = math.sqrt(target / 2.0)
        for _refine in range(2):  # area grows as radius^2: two rescalings land close to the target
            mask, dy, dx = _rasterize_anomaly(kind, radius, aspect, angle, params, shift)
            radius *= math.sqrt(target / max(int(mask.sum()), 1))
        mask, dy, dx = _rasterize_anomaly(kind, radius, aspect, angle, params, shift)
        size = int(mask.sum())
        if not lo * area <= size <= hi * area or ndimage.label(mask)[1] != 1:
            continue
        # Stand the shape on a random ground pixel: its lowest row is the foot point's row.
        foot = ground[rng.integers(len(ground))]
        fy, fx = divmod(int(foot), w)
        mask_rows = np.flatnonzero(mask.any(axis=1))
        y0 = fy - int(mask_rows[-1])
        x0 = fx - mask.shape[1] // 2
        y1, x1 = y0 + mask.shape[0], x0 + mask.shape[1]
        if y0 < 0 or x0 < 0 or y1 > h or x1 > w:
            continue
        region = (slice(y0, y1), slice(x0, x1))
        z = float(cv.depth[fy, fx])
        around = cv.label[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2]
        if (around == ANOMALY_INDEX).any() or (cv.depth[region][mask] < 0.97 * z).any():
            continue  # touches another anomaly, or something nearer would hide part of it
        first, second = _pick_colours(cv, rng)
        texture = _ANOMALY_TEXTURES[rng.integers(len(_ANOMALY_TEXTURES))]
        period = max(2.5, radius / rng.uniform(1.5, 3.5))
        turn = rng.uniform(0.0, np.pi)
        a = dx * math.cos(turn) + dy * math.sin(turn)
        b = -dx * math.sin(turn) + dy * math.cos(turn)
        pattern = _anomaly_texture(texture, a, b, period)
        colour = np.where(pattern[..., None], first, second)
        cv.paint(region, mask, ANOMALY_INDEX, colour, z, (0.03, 0.04))
        placed += 1
    return placed


# ----------------------------------------------------------------------------- image formation
def _develop(cv: _Canvas, cam: _Camera, rng: np.random.Generator, fog_colour: np.ndarray) -> np.ndarray:
    """Albedo x texture, depth fog, gain / colour cast / gamma, vignetting, noise -> uint8 RGB."""
    h, w = cv.label.shape
    medium = _value_noise(rng, h, w, max(2.0, w / 80)) * 0.6 + _value_noise(rng, h, w, w / 12) * 0.8
    fine = _byte_noise(rng, (h, w))
    texture = 1.0 + cv.grain[..., 0] * medium + cv.grain[..., 1] * fine
    image = cv.albedo * np.clip(texture, 0.3, 1.7)[..., None]
    fog = np.where(np.isfinite(cv.depth), 1.0 - np.exp(-cv.depth / rng.uniform(120.0, 500.0)), 0.0)
    image += (fog_colour - image) * fog[..., None].astype(np.float32)
    image *= rng.uniform(0.75, 1.2) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    radius2 = ((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2
    image *= (1.0 - rng.uniform(0.0, 0.5) * radius2)[..., None]
    image = 255.0 * (np.clip(image, 0.0, 255.0) / 255.0) ** rng.uniform(0.85, 1.15)
    image += _byte_noise(rng, image.shape) * np.float32(rng.uniform(1.0, 4.0))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_scene(
    height: int, width: int, rng: np.random.Generator, anomalies: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene: RGB uint8 [height, width, 3] and class indices uint8 [height, width].

    Labels are 0..12 (``CLASS_NAMES``), plus ``ANOMALY_INDEX`` for 1 to 3 anomalies when
    ``anomalies`` is set. Raises RuntimeError if no anomaly fits (never seen at the supported sizes).
    """
    cam = _Camera(
        height=height,
        width=width,
        horizon=height * rng.uniform(0.36, 0.52),
        cx=width * rng.uniform(0.38, 0.62),
        focal=(width / 2) / math.tan(math.radians(rng.uniform(75.0, 100.0)) / 2),
        cam_h=rng.uniform(1.3, 2.1),
    )
    road = _layout_road(rng)
    cv = _Canvas(height, width)
    fog_colour = _draw_sky(cv, cam, rng)
    _draw_skyline(cv, cam, rng)
    _draw_ground(cv, cam, road, rng)
    _draw_facades(cv, cam, road, rng)
    for _, draw in sorted(_place_objects(cv, cam, road, rng), key=lambda item: -item[0]):
        draw()
    if anomalies:
        wanted = int(rng.integers(1, 4))
        if _draw_anomalies(cv, cam, rng, wanted) == 0:
            raise RuntimeError(f"could not place an anomaly in a {height}x{width} scene")
    return _develop(cv, cam, rng, fog_colour), cv.label


# ----------------------------------------------------------------------------- writer
def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}")
    height, width = (int(v) for v in image_size)
    if height < MIN_IMAGE_SIZE[0] or width < MIN_IMAGE_SIZE[1]:
        raise ValueError(
            f"image_size {height}x{width} is too small; the synthetic scenes need at least "
            f"{MIN_IMAGE_SIZE[0]}x{MIN_IMAGE_SIZE[1]} (height x width)"
        )
    return height, width


def _sample_paths(split: _Split, index: int, count: int) -> tuple[str, str]:
    """Image and annotation paths of sample ``index``, relative to the split folder."""
    town = split.towns[index * len(split.towns) // count]  # contiguous runs of towns, like the release
    name = f"{index:06d}.png"
    return f"images/{split.subset}/{town}/{name}", f"annotations/{split.subset}/{town}/{name}"


def _write_sample(task: tuple[str, str, int, int, tuple[int, int], int]) -> dict[str, object]:
    """Render sample ``index`` of a split and save its two PNGs; returns its ``.odgt`` record.

    A module-level function of plain arguments, so that worker processes can run it.
    """
    folder, split_key, index, count, (height, width), seed = task
    split = next(s for s in _SPLITS if s.key == split_key)
    image_rel, label_rel = _sample_paths(split, index, count)
    rgb, label = render_scene(height, width, scene_rng(seed, split.key, index), split.anomalies)
    rgba = np.concatenate([rgb, np.full((height, width, 1), 255, np.uint8)], axis=2)
    base = Path(folder) / split.folder
    # Level 1: the noisy RGB barely compresses better at higher levels, and takes 3x longer.
    Image.fromarray(rgba, mode="RGBA").save(base / image_rel, compress_level=1)
    Image.fromarray(label + np.uint8(LABEL_OFFSET), mode="L").save(base / label_rel, compress_level=6)
    return {"fpath_img": image_rel, "fpath_segm": label_rel, "width": width, "height": height}


def _write_all(folder: Path, counts: dict[str, int], size: tuple[int, int], seed: int, workers: int) -> None:
    tasks = []
    for split in _SPLITS:
        for town in split.towns:
            for kind in ("images", "annotations"):
                (folder / split.folder / kind / split.subset / town).mkdir(parents=True, exist_ok=True)
        tasks += [(str(folder), split.key, i, counts[split.key], size, seed) for i in range(counts[split.key])]
    if workers > 1 and len(tasks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may hold CUDA contexts or threads (Lightning's prepare_data).
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
            records = list(pool.map(_write_sample, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers)))))
    else:
        records = [_write_sample(task) for task in tasks]
    done = 0
    for split in _SPLITS:
        own = records[done : done + counts[split.key]]
        done += counts[split.key]
        text = "[\n" + ",\n".join(json.dumps(r) for r in own) + "\n]\n" if own else "[]\n"
        (folder / split.folder / split.index_file).write_text(text, encoding="utf-8")


def write_synthetic_streethazards(
    root: str | os.PathLike[str],
    num_train: int,
    num_val: int,
    num_test: int,
    image_size: tuple[int, int] = (180, 320),
    seed: int = 0,
    *,
    workers: int = 1,
) -> Path:
    """Write a procedural StreetHazards-format dataset at ``root`` and return ``Path(root)``.

    ``image_size`` is (height, width). Training images are spread over towns t1..t3 in
    contiguous runs; validation is t4, test is t5 and only the test split has anomalies.
    ``workers`` > 1 renders in that many spawned processes; the bytes written do not depend on it.
    The arguments are recorded in ``synthetic.json`` at the root (:func:`read_synthetic_parameters`).
    The dataset is written into a hidden sibling folder and renamed to ``root`` when complete,
    so an interrupted run never leaves a partial dataset at ``root``. Raises FileExistsError if
    ``root`` exists and is not an empty folder, ValueError on bad arguments.
    """
    counts = {"train": num_train, "val": num_val, "test": num_test, "workers": workers}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{'num_' * (key != 'workers')}{key} must be a non-negative integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    size = _check_size(image_size)
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} already exists and is not an empty folder; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        split_counts = {k: int(v) for k, v in counts.items() if k != "workers"}
        _write_all(partial, split_counts, size, int(seed), workers)
        parameters = {f"num_{k}": v for k, v in split_counts.items()} | {"height": size[0], "width": size[1]}
        (partial / PARAMETERS_FILE).write_text(json.dumps(parameters | {"seed": int(seed)}) + "\n", encoding="utf-8")
        if root.exists():
            root.rmdir()  # empty (checked above); the rename needs the name free
        try:
            partial.rename(root)
        except OSError as error:
            if root.is_dir() and any(root.iterdir()):
                raise FileExistsError(f"{root} was filled by another process while this one was writing") from error
            raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return root


def read_synthetic_parameters(root: str | os.PathLike[str]) -> dict[str, int] | None:
    """The arguments a dataset at ``root`` was written with, or None if it has no readable record.

    Keys: ``num_train``, ``num_val``, ``num_test``, ``height``, ``width``, ``seed``.
    """
    path = Path(root) / PARAMETERS_FILE
    try:
        parameters = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return parameters if isinstance(parameters, dict) else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.synthetic",
        description="Write a procedural dataset in the released StreetHazards format.",
    )
    parser.add_argument("root", help="output folder (must not exist, or be empty)")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=40)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers", type=int, default=min(os.cpu_count() or 1, 8), help="processes (default: CPU count, max 8)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        root = write_synthetic_streethazards(
            args.root,
            args.num_train,
            args.num_val,
            args.num_test,
            (args.height, args.width),
            args.seed,
            workers=args.workers,
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    total = args.num_train + args.num_val + args.num_test
    elapsed = time.perf_counter() - start
    print(f"wrote {total} images ({args.height}x{args.width}) to {root} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Procedural scenes with exact labels: the embedded dataset of the demo, the tests and the benchmarks.

A scene is a random background (a colour gradient plus low-frequency noise) with clutter (single
strokes, polylines and flat blobs, all labelled background), then ``min_objects``-``max_objects``
objects painted back to front, so occlusion is real and the mask holds the visible object of every
pixel. Each object takes two random colours, so colour says nothing about its class: the class is
carried by the shape and, above all, by the texture, whose kind, period and orientation range depend
only on the class. Object size (square root of its area) is 15-50% of the shorter image side, any
rotation, centre anywhere in the frame +- 5% (so objects may be cut by the border). Texture periods
below are in pixels for images up to 128 px and grow in proportion beyond, so a 16 px patch
holds about one to three periods. Angles are in image coordinates (y down); 0 deg is horizontal.

Classes (index, name: shape; texture):

0. background: the whole frame; smooth gradient and noise, strokes, polylines, flat blobs
1. striped disc: disc; straight stripes, period 5-7 px, within 20 deg of horizontal
2. checkered square: square; checkerboard, cells 4-6 px, aligned with the square's sides
3. dotted triangle: equilateral triangle; dots on a square lattice, spacing 6-8 px, turned with it
4. ringed ellipse: ellipse (axis ratio 0.45-0.7); concentric circular rings, period 5-8 px
5. zigzag hexagon: regular hexagon; zigzag stripes, period 6-8 px, any orientation
6. hatched star: five-pointed star; thin parallel lines, period 8-11 px, at 45 +- 12 deg
7. speckled blob: smooth random blob; binary salt-and-pepper speckle of 2 px cells
8. meshed cross: plus sign; thin grid lines, spacing 7-9 px, within 10 deg of the image axes

The mask is exact: each object's pixel set is rasterised once as a boolean array (no anti-aliasing)
and both its colours and its label are written through that same array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "background",
    "striped disc",
    "checkered square",
    "dotted triangle",
    "ringed ellipse",
    "zigzag hexagon",
    "hatched star",
    "speckled blob",
    "meshed cross",
)

# [K+1, 3] mask colours: black background, then well-separated hues.
SYNTHETIC_PALETTE: np.ndarray = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
    ],
    dtype=np.uint8,
)

_REFERENCE_SIDE = 128  # texture periods are given for images of this size
_SUBPIXEL_BITS = 4  # fillPoly fixed-point precision: vertices placed to 1/16 px

# Per class: (period range in px, texture orientation). One period of the checkerboard is two cells;
# class 7's "period" is its speckle cell. Orientation: (centre, half-range) in degrees, "object" (turns
# with the shape), "any", or None (rings and speckle have none).
_TEXTURES: dict[int, tuple[tuple[float, float], tuple[float, float] | str | None]] = {
    1: ((5, 7), (0, 20)),
    2: ((8, 12), "object"),
    3: ((6, 8), "object"),
    4: ((5, 8), None),
    5: ((6, 8), "any"),
    6: ((8, 11), (45, 12)),
    7: ((2, 2), None),
    8: ((7, 9), (0, 10)),
}


@dataclass
class _Object:
    label: int
    size: float  # square root of the area, px
    center: np.ndarray  # [2] (x, y); pixel (row i, column j) has its centre at (j, i)
    vertices: np.ndarray  # [V, 2] outline in image coordinates
    colors: np.ndarray  # [2, 3] float32, the two colours of the texture
    texture: dict


def _polygon(n: int, radii: np.ndarray | float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.reshape(radii, (-1, 1))  # [n, 2]


def _area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _unit_shape(label: int, rng: np.random.Generator) -> np.ndarray:
    """Outline [V, 2] of class ``label`` in object coordinates (any scale: callers normalise its area)."""
    if label == 1:
        return _polygon(48)
    if label == 2:
        return _polygon(4, phase=math.pi / 4)
    if label == 3:
        return _polygon(3)
    if label == 4:
        return _polygon(48) * np.array([1.0, rng.uniform(0.45, 0.7)])
    if label == 5:
        return _polygon(6)
    if label == 6:
        return _polygon(10, np.tile([1.0, 0.45], 5))
    if label == 7:
        angles = 2 * math.pi * np.arange(48) / 48
        amplitudes = rng.uniform(0.0, 0.14, size=(3, 1))
        phases = rng.uniform(0, 2 * math.pi, size=(3, 1))
        radii = 0.8 + (amplitudes * np.cos(np.arange(2, 5)[:, None] * angles + phases)).sum(axis=0)
        return _polygon(48, radii, phase=0.0)
    if label == 8:
        w = 0.34  # arm half-width
        quarter = np.array([[w, -1.0], [w, -w], [1.0, -w]])
        quarter_turn = np.array([[0.0, -1.0], [1.0, 0.0]])
        return np.concatenate([quarter @ np.linalg.matrix_power(quarter_turn, k).T for k in range(4)])
    raise ValueError(f"label must be in [1, {len(SYNTHETIC_CLASSES)}), got {label}")


def _sample_texture(label: int, rng: np.random.Generator, scale: float, angle: float, reach: float) -> dict:
    """Texture parameters of one instance: kind and ranges come from the class, values from ``rng``."""
    (low, high), orientation = _TEXTURES[label]
    texture = {"period": scale * rng.uniform(low, high), "phase": rng.uniform(0, 1, size=2)}
    if orientation == "object":
        texture["angle"] = angle
    elif orientation == "any":
        texture["angle"] = rng.uniform(0, 2 * math.pi)
    elif orientation is not None:
        texture["angle"] = math.radians(orientation[0] + rng.uniform(-orientation[1], orientation[1]))
    if label == 7:
        side = int(2 * reach / texture["period"]) + 4  # cells covering the object's whole box
        texture["cells"] = rng.integers(0, 2, size=(side, side)).astype(np.float32)
    return texture


def _band(coord: np.ndarray, period: float, duty: float, phase: float) -> np.ndarray:
    """Soft periodic on/off pattern: 1 on a ``duty`` fraction of each period, edges about 1 px wide."""
    gain = period / (2 * math.pi * math.sin(math.pi * duty))
    wave = np.cos((2 * math.pi / period) * coord + 2 * math.pi * phase)
    return np.clip((wave - math.cos(math.pi * duty)) * gain + 0.5, 0.0, 1.0)


def _texture(label: int, texture: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Texture value in [0, 1] at offsets (x [1, w], y [h, 1]) from the object's centre: [h, w]."""
    period, phase = texture["period"], texture["phase"]
    if label == 7:
        cells = texture["cells"]
        offset = cells.shape[0] * period / 2
        cols = np.clip(((x + offset) / period).astype(np.int64), 0, cells.shape[1] - 1)
        rows = np.clip(((y + offset) / period).astype(np.int64), 0, cells.shape[0] - 1)
        return cells[rows, cols]
    if label == 4:
        return _band(np.sqrt(x * x + y * y), period, 0.5, phase[0])
    cos, sin = math.cos(texture["angle"]), math.sin(texture["angle"])
    u, v = x * cos + y * sin, y * cos - x * sin  # u along the texture's orientation
    if label == 1:
        return _band(v, period, 0.5, phase[0])
    if label == 6:
        return _band(v, period, 0.3, phase[0])
    if label == 2:
        a, b = _band(u, period, 0.5, phase[0]), _band(v, period, 0.5, phase[1])
        return a + b - 2 * a * b  # soft exclusive-or
    if label == 3:
        du = (u / period + phase[0]) % 1.0 - 0.5
        dv = (v / period + phase[1]) % 1.0 - 0.5
        return np.clip(0.3 * period - np.sqrt(du * du + dv * dv) * period + 0.5, 0.0, 1.0)
    if label == 5:
        zigzag = 4 * np.abs((u / (1.5 * period) + phase[1]) % 1.0 - 0.5) - 1  # triangle wave in [-1, 1]
        return _band(v + 0.6 * period * zigzag, period, 0.5, phase[0])
    if label == 8:
        return np.maximum(_band(u, period, 0.22, phase[0]), _band(v, period, 0.22, phase[1]))
    raise ValueError(f"label must be in [1, {len(SYNTHETIC_CLASSES)}), got {label}")


def _two_colors(rng: np.random.Generator) -> np.ndarray:
    """Two uniform random RGB colours at least 90 apart, so every texture stays visible: [2, 3]."""
    candidates = rng.uniform(0, 255, size=(16, 2, 3))
    ok = np.linalg.norm(candidates[:, 0] - candidates[:, 1], axis=1) >= 90
    pair = candidates[int(np.argmax(ok))].copy()
    if not ok.any():
        pair[1] = np.where(pair[0] < 128, pair[0] + 127, pair[0] - 127)
    return pair.astype(np.float32)


def _sample_objects(rng: np.random.Generator, height: int, width: int, num_classes: int, count: int) -> list[_Object]:
    side = min(height, width)
    scale = max(1.0, side / _REFERENCE_SIDE)
    objects = []
    for _ in range(count):
        label = int(rng.integers(1, num_classes))
        size = side * rng.uniform(0.15, 0.5)
        angle = rng.uniform(0, 2 * math.pi)
        center = rng.uniform(-0.05, 1.05, size=2) * np.array([width, height]) - 0.5
        outline = _unit_shape(label, rng)
        outline = outline * (size / math.sqrt(_area(outline)))
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        reach = float(np.linalg.norm(outline, axis=1).max())
        texture = _sample_texture(label, rng, scale, angle, reach)
        objects.append(_Object(label, size, center, center + outline @ rotation.T, _two_colors(rng), texture))
    # Larger objects further back, so small ones are rarely hidden entirely.
    return sorted(objects, key=lambda o: -o.size)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Gradient + low-frequency noise + clutter (strokes, polylines, flat blobs): [H, W, 3] uint8."""
    side = min(height, width)
    # Gradient and noise both live on a coarse grid: cubic upsampling keeps a ramp a ramp and makes
    # the noise smooth, for the price of one resize.
    rows, cols = int(rng.integers(3, 6)), int(rng.integers(3, 6))
    ends = rng.uniform(0, 255, size=(2, 3))
    direction = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(0, math.cos(direction), cols)[None]
    ramp = ramp + np.linspace(0, math.sin(direction), rows)[:, None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)  # [rows, cols] in [0, 1]
    coarse = ends[0] + ramp[..., None] * (ends[1] - ends[0])
    coarse += rng.normal(0, rng.uniform(8, 30), size=(rows, cols, 3))
    coarse = np.clip(coarse + 0.5, 0, 255).astype(np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)  # [H, W, 3], saturating

    # Clutter is deliberately unlike every class texture: single strokes and flat-coloured blobs.
    thick = max(1.0, side / _REFERENCE_SIDE)
    for _ in range(max(1, round(rng.integers(3, 10) * height * width / _REFERENCE_SIDE**2))):
        kind = int(rng.integers(0, 3))
        color = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        start = rng.uniform(0, 1, size=2) * np.array([width, height])
        if kind == 2:
            axes = tuple(int(a) for a in np.maximum(1, rng.uniform(0.02, 0.07, size=2) * side))
            angle = rng.uniform(0, 360)
            cv2.ellipse(image, tuple(int(c) for c in start), axes, angle, 0, 360, color, -1, cv2.LINE_AA)
            continue
        steps = 1 if kind == 0 else int(rng.integers(2, 5))
        moves = rng.normal(0, 0.12 * side / steps**0.5, size=(steps, 2))
        points = np.concatenate([start[None], start + np.cumsum(moves, axis=0)]).astype(np.int32)
        thickness = int(rng.integers(1, 4 if kind == 0 else 3) * thick)
        cv2.polylines(image, [points], False, color, thickness, cv2.LINE_AA)
    return image


def _render(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_classes: int,
    min_objects: int,
    max_objects: int,
    *,
    flat_colors: np.ndarray | None,
    noise: bool,
    keep_layers: bool,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    height, width = int(height), int(width)
    _check_scene_args(height, width, num_classes, min_objects, max_objects)
    if flat_colors is not None:
        flat_colors = np.asarray(flat_colors)
        if flat_colors.shape != (num_classes, 3) or flat_colors.min() < 0 or flat_colors.max() > 255:
            raise ValueError(f"flat_colors must be [{num_classes}, 3] in [0, 255], got {flat_colors.shape}")
    # All the geometry is drawn from rng before any painting, so a flat-colour render of the same
    # generator state has exactly the masks of the textured one.
    background = _background(rng, height, width)
    count = int(rng.integers(min_objects, max_objects + 1))
    objects = _sample_objects(rng, height, width, num_classes, count)
    noise_amplitude = int(rng.integers(3, 9))

    image = background
    if flat_colors is not None:
        image[:] = flat_colors[0]
    mask = np.zeros((height, width), np.uint8)  # [H, W]
    layers = []
    for obj in objects:
        x0, y0 = np.maximum(np.floor(obj.vertices.min(axis=0)).astype(int), 0)
        x1, y1 = np.minimum(np.floor(obj.vertices.max(axis=0)).astype(int) + 2, [width, height])
        drawn = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), np.uint8)  # [h, w] pixel set in its box
        if drawn.size:
            fixed = np.round((obj.vertices - [x0, y0]) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
            cv2.fillPoly(drawn, [fixed], 1, cv2.LINE_8, shift=_SUBPIXEL_BITS)
        inside = drawn.astype(bool)
        if flat_colors is not None:
            image[y0:y1, x0:x1][inside] = flat_colors[obj.label]
        elif inside.any():
            x = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(obj.center[0])
            y = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(obj.center[1])
            value = _texture(obj.label, obj.texture, x, y)[inside][:, None]  # [n, 1]
            pixels = obj.colors[0] + value * (obj.colors[1] - obj.colors[0])  # [n, 3]
            image[y0:y1, x0:x1][inside] = np.clip(pixels + 0.5, 0, 255).astype(np.uint8)
        mask[y0:y1, x0:x1][inside] = obj.label
        if keep_layers:
            layer = np.zeros((height, width), bool)
            layer[y0:y1, x0:x1] = inside
            layers.append((obj.label, layer))

    if flat_colors is None and noise:
        # Uniform integer noise in [-a, a] (std 1.7-4.6), made from raw random bytes by a lookup table:
        # several times cheaper than drawing Gaussian or bounded integers.
        a = noise_amplitude
        table = (((np.arange(256) * (2 * a + 1)) >> 8) - a).astype(np.int8)
        raw = np.frombuffer(rng.bytes(height * width * 3), np.uint8).reshape(height, width, 3)
        image = cv2.add(image, cv2.LUT(raw, table), dtype=cv2.CV_8U)  # saturating
    return image, mask, layers


def render_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_classes: int = len(SYNTHETIC_CLASSES),
    min_objects: int = 2,
    max_objects: int = 6,
    *,
    flat_colors: np.ndarray | None = None,
    noise: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene from ``rng``: image [H, W, 3] uint8 RGB and mask [H, W] uint8 in [0, num_classes).

    ``flat_colors`` [num_classes, 3] (a test and debugging hook) paints every pixel with the flat
    colour of its class instead (background and clutter included, no noise), with the same geometry.
    ``noise=False`` leaves out the final pixel noise, the last thing drawn from ``rng``.
    """
    scene = (rng, height, width, num_classes, min_objects, max_objects)
    image, mask, _ = _render(*scene, flat_colors=flat_colors, noise=noise, keep_layers=False)
    return image, mask


def render_scene_layers(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_classes: int = len(SYNTHETIC_CLASSES),
    min_objects: int = 2,
    max_objects: int = 6,
    *,
    noise: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`render_scene` plus every object's drawn pixel set before occlusion, back to front.

    Returns image [H, W, 3], mask [H, W], layers [N, H, W] bool and their labels [N] int64.
    """
    scene = (rng, height, width, num_classes, min_objects, max_objects)
    image, mask, layers = _render(*scene, flat_colors=None, noise=noise, keep_layers=True)
    labels = np.array([label for label, _ in layers], dtype=np.int64)  # [N]
    stacked = np.zeros((len(layers), height, width), bool)  # [N, H, W]
    for i, (_, layer) in enumerate(layers):
        stacked[i] = layer
    return image, mask, stacked, labels


def _check_scene_args(height: int, width: int, num_classes: int, min_objects: int, max_objects: int) -> None:
    if height < 8 or width < 8:
        raise ValueError(f"image height and width must be at least 8 pixels, got {height}x{width}")
    if not 2 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(
            f"num_classes (background included) must be in [2, {len(SYNTHETIC_CLASSES)}], got {num_classes}"
        )
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects} and {max_objects}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class SyntheticScenes:
    """Map-style dataset of procedural scenes, deterministic per (seed, index); no torch needed."""

    def __init__(
        self,
        length: int = 1000,
        image_size: int | tuple[int, int] = 128,
        num_classes: int = len(SYNTHETIC_CLASSES),
        seed: int = 0,
        min_objects: int = 2,
        max_objects: int = 6,
        with_masks: bool = True,
    ) -> None:
        if not _is_int(length) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        size = (image_size, image_size) if _is_int(image_size) else image_size
        if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(_is_int(s) for s in size):
            raise ValueError(f"image_size must be an int or a (height, width) pair, got {image_size!r}")
        _check_scene_args(size[0], size[1], num_classes, min_objects, max_objects)
        self.length = int(length)
        self.image_size = (int(size[0]), int(size[1]))
        self.num_classes = num_classes
        self.seed = int(seed)
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.with_masks = with_masks

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the classes in use, index 0 = background."""
        return SYNTHETIC_CLASSES[: self.num_classes]

    @property
    def palette(self) -> np.ndarray:
        """Mask colours of the classes in use: [num_classes, 3] uint8."""
        return SYNTHETIC_PALETTE[: self.num_classes].copy()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        """Scene ``index``: {"image": [H, W, 3] uint8, "mask": [H, W] uint8 (if with_masks), "index"}."""
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index out of range for {self.length} scenes")
        # Seeded by (seed, index) alone: the same scene in any worker, order or process.
        rng = np.random.default_rng([self.seed, index])
        height, width = self.image_size
        image, mask = render_scene(rng, height, width, self.num_classes, self.min_objects, self.max_objects)
        sample = {"image": image, "index": index}
        if self.with_masks:
            sample["mask"] = mask
        return sample

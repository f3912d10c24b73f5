"""Class names and mask palettes of the segmentation datasets, indexed by training label.

Training label ``k`` is what the loss sees after a layout's label handling (ADE20K and Pascal
Context shift their stored values down by one; Cityscapes uses its 19 train ids). Palettes are
``uint8 [C, 3]`` RGB rows in the same order. Cityscapes uses its official colours; the others are
drawn from the PASCAL VOC colour map at the index of the STORED value, so a class keeps its colour
across datasets that share it (Pascal Context's first 20 classes look like VOC's).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# Stored values 1..59 of SegmentationClassContext (0 = background, ignored).
PASCAL_CONTEXT_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
    "bag", "bed", "bench", "book", "building", "cabinet", "ceiling", "cloth", "computer", "cup",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "keyboard", "light", "mountain",
    "mouse", "curtain", "platform", "sign", "plate", "road", "rock", "shelves", "sidewalk", "sky",
    "snow", "bedclothes", "track", "tree", "truck", "wall", "water", "window", "wood",
)  # fmt: skip

# Stored values 1..150 of ADEChallengeData2016 (0 = "other", ignored).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip

# Train ids 0..18 of the official Cityscapes label table.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)  # fmt: skip

CITYSCAPES_PALETTE: np.ndarray = np.array(
    [
        [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
        [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
        [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
        [0, 80, 100], [0, 0, 230], [119, 11, 32],
    ],
    dtype=np.uint8,
)  # fmt: skip

# Official Cityscapes label id -> train id (cityscapesScripts' table); ids not listed are ignored (255).
CITYSCAPES_LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def label_colormap(count: int) -> np.ndarray:
    """The PASCAL VOC colour map: ``uint8 [count, 3]``, bits of the index spread over R, G, B."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    index = np.arange(count, dtype=np.int64)  # [count]
    colours = np.zeros((count, 3), dtype=np.int64)  # [count, 3]
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return colours.astype(np.uint8)


def dataset_classes(layout: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Class names and palette ``uint8 [C, 3]`` of a named layout (not "folder": see read_class_names)."""
    if layout == "ade20k":
        return ADE20K_CLASSES, label_colormap(len(ADE20K_CLASSES) + 1)[1:]
    if layout == "pascal_context":
        return PASCAL_CONTEXT_CLASSES, label_colormap(len(PASCAL_CONTEXT_CLASSES) + 1)[1:]
    if layout == "voc2012":
        return VOC_CLASSES, label_colormap(len(VOC_CLASSES))
    if layout == "cityscapes":
        return CITYSCAPES_CLASSES, CITYSCAPES_PALETTE.copy()
    if layout == "synthetic":
        from loca_lightning.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE

        return tuple(SYNTHETIC_CLASSES), np.asarray(SYNTHETIC_PALETTE, dtype=np.uint8)[: len(SYNTHETIC_CLASSES)].copy()
    raise ValueError(
        f"no built-in classes for layout {layout!r}; expected one of ade20k, cityscapes, pascal_context, "
        "voc2012, synthetic (the folder layout reads its names from class_names_file)"
    )


def read_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names from a text file, one per line in label order (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class_names_file {str(path)!r} does not exist (expected one class name per line)")
    names = tuple(
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#")
    )
    if not names:
        raise ValueError(f"class_names_file {str(path)!r} lists no class names (expected one per line)")
    if len(names) > 255:
        raise ValueError(
            f"class_names_file {str(path)!r} lists {len(names)} classes; at most 255 fit beside ignore 255"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"class_names_file {str(path)!r} repeats class names {duplicates}")
    return names

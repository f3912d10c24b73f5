"""Dataset layouts for semantic segmentation: where images and masks live, and how stored labels map to training labels.

Label conventions follow MMSegmentation. Training labels are ``0..C-1`` and 255 is ignored
everywhere (loss and metric).
- ``reduce_zero_label`` (ADE20K, Pascal Context 59, optional for folders): stored 0 means "no class"
  and becomes 255; every other value shifts down by one; 255 stays 255.
- Cityscapes: ``*_gtFine_labelTrainIds.png`` holds train ids already; when only
  ``*_gtFine_labelIds.png`` exists, label ids are mapped to train ids on the fly with the official
  table (ids without a train id -> 255). Nothing is ever written into the dataset folder.
- VOC 2012: palette PNGs whose indices are the labels; 255 (object boundaries) stays ignored.
Every layout returns a list of SegSample; a missing folder, an image without its mask or a mask
without its image raises an error that names the path and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from loca_lightning.data.classes import CITYSCAPES_LABEL_ID_TO_TRAIN_ID
from loca_lightning.data.images import IMAGE_EXTENSIONS, ImageReadError, list_images, read_path_list

IGNORE_INDEX = 255
MASK_EXTENSIONS: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class SegSample:
    """One image/mask pair: file paths, a display name and the label handling of its mask."""

    image: Path
    mask: Path
    name: str
    labels: str = "identity"  # "identity" | "reduce_zero_label" | "cityscapes_label_ids"


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """Stored 0 -> 255, v -> v - 1, 255 stays 255: int64 [H, W]."""
    out = mask.astype(np.int64) - 1
    out[(mask == 0) | (mask == IGNORE_INDEX)] = IGNORE_INDEX
    return out


_CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, dtype=np.int64)
for _label_id, _train_id in CITYSCAPES_LABEL_ID_TO_TRAIN_ID.items():
    _CITYSCAPES_LUT[_label_id] = _train_id


def cityscapes_label_ids_to_train_ids(mask: np.ndarray) -> np.ndarray:
    """Official Cityscapes label ids -> train ids (ids without one, and values past 255, -> 255): int64 [H, W]."""
    mask = mask.astype(np.int64)
    return np.where((mask >= 0) & (mask < 256), _CITYSCAPES_LUT[np.clip(mask, 0, 255)], IGNORE_INDEX)


def apply_label_map(mask: np.ndarray, labels: str) -> np.ndarray:
    """A stored mask [H, W] -> training labels int64 [H, W] under the named label handling."""
    if labels == "identity":
        return mask.astype(np.int64, copy=False)
    if labels == "reduce_zero_label":
        return reduce_zero_label(mask)
    if labels == "cityscapes_label_ids":
        return cityscapes_label_ids_to_train_ids(mask)
    raise ValueError(f"unknown label handling {labels!r}")


def header_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header only (Pillow's lazy open)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as error:  # Pillow raises many types for bad data
        raise ImageReadError(path, f"cannot read its header ({type(error).__name__}: {error})") from error
    return height, width


def check_sample_sizes(samples: Iterable[SegSample]) -> None:
    """Raise ValueError for the first pair whose image and mask sizes (from file headers) differ."""
    for sample in samples:
        image_hw, mask_hw = header_size(sample.image), header_size(sample.mask)
        if image_hw != mask_hw:
            raise ValueError(
                f"mask {str(sample.mask)!r} is {mask_hw[0]}x{mask_hw[1]} (HxW) but its image {str(sample.image)!r} "
                f"is {image_hw[0]}x{image_hw[1]}; a mask must have its image's size"
            )


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {str(path)!r} does not exist")
    return path


def _list_split(path: Path) -> list[str]:
    """Stems listed in a split file (first token per line)."""
    if not path.is_file():
        raise FileNotFoundError(f"split file {str(path)!r} does not exist (expected one image stem per line)")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _preview(items: Sequence[object], limit: int = 5) -> str:
    shown = ", ".join(repr(str(i)) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _keyed(files: list[Path], root: Path, kind: str) -> dict[str, Path]:
    """Files by their path relative to ``root`` without suffix (the stem for flat folders)."""
    keyed: dict[str, Path] = {}
    for path in files:
        key = path.relative_to(root).with_suffix("").as_posix()
        if key in keyed:
            raise ValueError(f"two {kind} files share the stem {key!r}: {str(keyed[key])!r} and {str(path)!r}")
        keyed[key] = path
    return keyed


def pair_by_stem(
    image_dir: Path, mask_dir: Path, mask_extensions: Sequence[str] = MASK_EXTENSIONS
) -> dict[str, tuple[Path, Path]]:
    """Pair every image with the mask of the same stem; raise naming any unpaired file."""
    images = _keyed(list_images(_require_dir(image_dir, "image")), image_dir, "image")
    masks = _keyed(list_images(_require_dir(mask_dir, "mask"), mask_extensions), mask_dir, "mask")
    if not images:
        raise ValueError(f"no image files found in {str(image_dir)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    lonely_images = sorted(str(images[k]) for k in images.keys() - masks.keys())
    if lonely_images:
        raise ValueError(
            f"{len(lonely_images)} image(s) without a mask of the same stem in {str(mask_dir)!r} "
            f"(expected one of {', '.join(mask_extensions)}): {_preview(lonely_images)}"
        )
    lonely_masks = sorted(str(masks[k]) for k in masks.keys() - images.keys())
    if lonely_masks:
        raise ValueError(
            f"{len(lonely_masks)} mask(s) without an image of the same stem in {str(image_dir)!r}: {_preview(lonely_masks)}"
        )
    return {key: (images[key], masks[key]) for key in sorted(images)}


def _listed_pairs(
    image_dir: Path, mask_dirs: Sequence[Path], stems: Sequence[str], split_file: Path, labels: str
) -> list[SegSample]:
    """Samples for the stems of a split file: ``{stem}.jpg`` and the first ``{stem}.png`` found in mask_dirs."""
    samples, missing_images, missing_masks = [], [], []
    for stem in stems:
        image = image_dir / f"{stem}.jpg"
        mask = next((d / f"{stem}.png" for d in mask_dirs if (d / f"{stem}.png").is_file()), None)
        if not image.is_file():
            missing_images.append(image)
        elif mask is None:
            missing_masks.append(mask_dirs[0] / f"{stem}.png")
        else:
            samples.append(SegSample(image, mask, stem, labels))
    if missing_images:
        raise FileNotFoundError(
            f"{len(missing_images)} image(s) listed in {str(split_file)!r} do not exist: {_preview(missing_images)}"
        )
    if missing_masks:
        raise FileNotFoundError(
            f"{len(missing_masks)} image(s) listed in {str(split_file)!r} have no mask "
            f"(looked in {', '.join(repr(str(d)) for d in mask_dirs)}): {_preview(missing_masks)}"
        )
    if not samples:
        raise ValueError(f"split file {str(split_file)!r} lists no images")
    return samples


def _base(root: Path, subfolder: str, marker: str) -> Path:
    """``root/subfolder`` when it exists, else ``root`` itself when it holds ``marker``."""
    if (root / subfolder).is_dir():
        return root / subfolder
    if (root / marker).is_dir():
        return root
    raise FileNotFoundError(f"dataset folder {str(root / subfolder)!r} does not exist (nor {str(root / marker)!r})")


def ade20k_samples(root: str | os.PathLike, split: str) -> list[SegSample]:
    """ADEChallengeData2016/{images,annotations}/{training,validation}: 150 classes, reduce-zero-label."""
    base = _base(Path(root), "ADEChallengeData2016", "images")
    folder = {"train": "training", "val": "validation"}.get(split, split)
    pairs = pair_by_stem(base / "images" / folder, base / "annotations" / folder, (".png",))
    return [SegSample(image, mask, Path(key).name, "reduce_zero_label") for key, (image, mask) in pairs.items()]


def cityscapes_samples(root: str | os.PathLike, split: str) -> list[SegSample]:
    """leftImg8bit/{split}/{city}/*_leftImg8bit.png with gtFine labelTrainIds (or labelIds, mapped on the fly)."""
    root = Path(root)
    image_dir = _require_dir(root / "leftImg8bit" / split, "Cityscapes image")
    mask_dir = _require_dir(root / "gtFine" / split, "Cityscapes annotation")
    suffix = "_leftImg8bit.png"
    samples, missing = [], []
    for image in sorted(image_dir.rglob(f"*{suffix}")):
        base = image.name[: -len(suffix)]
        folder = mask_dir / image.parent.relative_to(image_dir)
        train_ids, label_ids = folder / f"{base}_gtFine_labelTrainIds.png", folder / f"{base}_gtFine_labelIds.png"
        if train_ids.is_file():
            samples.append(SegSample(image, train_ids, base, "identity"))
        elif label_ids.is_file():
            samples.append(SegSample(image, label_ids, base, "cityscapes_label_ids"))
        else:
            missing.append(train_ids)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} Cityscapes image(s) without *_gtFine_labelTrainIds.png or *_gtFine_labelIds.png: {_preview(missing)}"
        )
    if not samples:
        raise ValueError(f"no *{suffix} images found under {str(image_dir)!r}")
    images = {s.name for s in samples}
    lonely = sorted(
        str(p) for p in mask_dir.rglob("*_gtFine_label*Ids.png") if p.name.split("_gtFine_")[0] not in images
    )
    if lonely:
        raise ValueError(f"{len(lonely)} Cityscapes mask(s) without an image in {str(image_dir)!r}: {_preview(lonely)}")
    return samples


def pascal_context_samples(root: str | os.PathLike, split: str) -> list[SegSample]:
    """VOC2010 JPEGImages + SegmentationClassContext (0 = background, 1..59), split lists in ImageSets/SegmentationContext."""
    base = _base(Path(root), "VOC2010", "JPEGImages")
    split_file = base / "ImageSets" / "SegmentationContext" / f"{split}.txt"
    image_dir = _require_dir(base / "JPEGImages", "Pascal Context image")
    mask_dir = _require_dir(base / "SegmentationClassContext", "Pascal Context annotation")
    return _listed_pairs(image_dir, [mask_dir], _list_split(split_file), split_file, "reduce_zero_label")


def voc2012_samples(root: str | os.PathLike, split: str, use_sbd: bool = False) -> list[SegSample]:
    """VOC2012 JPEGImages + SegmentationClass (palette indices, 255 kept as ignore); ``use_sbd`` turns the train
    split into mmseg's trainaug (ImageSets/Segmentation/trainaug.txt, SBD masks from SegmentationClassAug)."""
    base = _base(Path(root), "VOC2012", "JPEGImages")
    image_dir = _require_dir(base / "JPEGImages", "VOC image")
    mask_dirs = [_require_dir(base / "SegmentationClass", "VOC annotation")]
    if split == "trainaug" or (use_sbd and split == "train"):
        split = "trainaug"
        # VOC's own masks (with boundaries) where they exist, SBD's for the rest, as mmseg's train + aug concat.
        mask_dirs.append(_require_dir(base / "SegmentationClassAug", "SBD annotation (use_sbd)"))
    split_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    return _listed_pairs(image_dir, mask_dirs, _list_split(split_file), split_file, "identity")


def folder_samples(
    root: str | os.PathLike | None,
    split: str,
    image_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    reduce_zero_label: bool = False,
) -> list[SegSample]:
    """images/ and masks/ paired by stem (root/splits/{split}.txt selects stems; without a splits folder every split is all)."""
    if root is None and (image_dir is None or mask_dir is None):
        raise ValueError("the folder layout needs root (with images/ and masks/) or both image_dir and mask_dir")
    images = Path(image_dir) if image_dir is not None else Path(root) / "images"
    masks = Path(mask_dir) if mask_dir is not None else Path(root) / "masks"
    pairs = pair_by_stem(images, masks)
    labels = "reduce_zero_label" if reduce_zero_label else "identity"
    split_dir = Path(root) / "splits" if root is not None else None
    if split_dir is None or not split_dir.is_dir():
        return [SegSample(image, mask, key, labels) for key, (image, mask) in pairs.items()]
    split_file = split_dir / f"{split}.txt"
    stems = _list_split(split_file)
    unknown = [s for s in stems if s not in pairs]
    if unknown:
        raise ValueError(
            f"{len(unknown)} stem(s) in {str(split_file)!r} have no image/mask pair in {str(images)!r}: {_preview(unknown)}"
        )
    return [SegSample(*pairs[stem], stem, labels) for stem in stems]


def predict_files(paths: Sequence[str] | str) -> list[Path]:
    """Images to predict: a folder (recursive), a text file of paths, an image file, or a list of those."""
    found: list[Path] = []
    for entry in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
        path = Path(entry)
        if path.is_dir():
            found.extend(list_images(path))
        elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(path)
        elif path.is_file():
            found.extend(read_path_list(path))
        else:
            raise FileNotFoundError(
                f"predict path {str(path)!r} does not exist (expected a folder, an image or a list file)"
            )
    if not found:
        raise ValueError(f"predict_paths {paths!r} yield no image files (looked for {', '.join(IMAGE_EXTENSIONS)})")
    missing = [p for p in found if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} predict image(s) do not exist: {_preview(missing)}")
    return found

"""Semantic-segmentation datasets (folder layouts, synthetic scenes, prediction folders) and their collation.

Items are ``{"image": uint8 [3, H, W], "mask": int64 [H, W] (255 = ignore), "name", "image_path"}``;
ImageNet normalisation happens on the accelerator in the LightningModule. Training items are
crop-sized; evaluation and prediction items keep their native size (labels are never resized) and
are batched by ``pad_collate`` (image padded with 0, mask with 255, original sizes in ``sizes``);
the LightningModule's ``test_scale``, if any, resizes the images on the accelerator and its scores back.
Layouts and label conventions are documented in ``seg_layouts``; the DataModule is in ``segmentation``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from loca_lightning.data.images import ImageReadError, read_image, read_mask
from loca_lightning.data.resumable import SharedEpoch, item_seed
from loca_lightning.data.seg_layouts import IGNORE_INDEX, SegSample, apply_label_map, predict_files
from loca_lightning.data.synthetic import SyntheticScenes
from loca_lightning.data.transforms import to_tensors

_SYNTHETIC_SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}


def check_labels(mask: np.ndarray, num_classes: int, mask_path: str | os.PathLike) -> np.ndarray:
    """Training labels int [H, W] -> uint8 [H, W]; ValueError naming the file if a value is not in [0, C) or 255."""
    bad = (mask < 0) | ((mask >= num_classes) & (mask != IGNORE_INDEX))
    if bad.any():
        values = np.unique(mask[bad])
        raise ValueError(
            f"mask {str(mask_path)!r} has label values {values[:10].tolist()} outside [0, {num_classes}) and "
            f"{IGNORE_INDEX} (ignore), after the layout's label handling"
        )
    return mask.astype(np.uint8)


def fraction_subset(count: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a deterministic ``fraction`` of ``count`` items (at least one); smaller fractions are nested in larger ones."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    keep = min(count, max(1, round(count * fraction)))
    return np.sort(np.random.default_rng(seed).permutation(count)[:keep])


class _Augmented(Dataset):
    """Base for datasets with an optional albumentations pipeline whose draws for an item come from
    ``(seed, epoch, index)`` alone: the same whatever worker, process or (resumed) run produces the item."""

    def __init__(self, transform: A.Compose | None, seed: int = 0) -> None:
        self.transform = transform
        self.seed = int(seed)
        self._epoch = SharedEpoch()  # set by the training loader when an epoch starts, read in the workers

    @property
    def epoch(self) -> int:
        """The epoch that seeds the augmentations."""
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the augmentations drawn from now on (in every worker)."""
        self._epoch.set(epoch)

    def _augment(self, image: np.ndarray, mask: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.transform is None:
            return image, mask
        # One numpy and one Python stream shared by the pipeline's steps (albumentations' set_random_seed would give
        # every step its own stream from the same seed, so that their first draws coincide).
        seed = item_seed(self.seed, self._epoch.get(), index)
        self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"]


class SegmentationDataset(_Augmented):
    """Image/mask files of a layout -> items with training labels, validated when loaded."""

    def __init__(
        self, samples: Sequence[SegSample], num_classes: int, transform: A.Compose | None = None, seed: int = 0
    ) -> None:
        super().__init__(transform, seed)
        self.samples = list(samples)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = read_image(sample.image)  # [H, W, 3] uint8
        stored = read_mask(sample.mask)  # [H, W] stored values
        if stored.shape != image.shape[:2]:
            raise ValueError(
                f"mask {str(sample.mask)!r} has shape {stored.shape} but its image {str(sample.image)!r} has {image.shape[:2]}"
            )
        mask = check_labels(apply_label_map(stored, sample.labels), self.num_classes, sample.mask)
        image, mask = self._augment(image, mask, index)
        image_t, mask_t = to_tensors(image, mask)
        return {"image": image_t, "mask": mask_t, "name": sample.name, "image_path": str(sample.image)}


class SyntheticSegmentationDataset(_Augmented):
    """SyntheticScenes of one split as segmentation items (class 0 "background" is a real class)."""

    def __init__(self, split: str, length: int, image_size: int, seed: int, transform: A.Compose | None = None) -> None:
        super().__init__(transform, seed)
        if split not in _SYNTHETIC_SPLIT_OFFSETS:
            raise ValueError(f"synthetic split must be one of {sorted(_SYNTHETIC_SPLIT_OFFSETS)}, got {split!r}")
        self.split = split
        # Disjoint per (seed, split): scenes are drawn from default_rng([scene_seed, index]).
        self.scenes = SyntheticScenes(
            length=length, image_size=image_size, seed=3 * seed + _SYNTHETIC_SPLIT_OFFSETS[split]
        )

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scenes[index]
        image, mask = self._augment(scene["image"], scene["mask"], index)
        image_t, mask_t = to_tensors(image, mask)
        return {
            "image": image_t,
            "mask": mask_t,
            "name": str(scene["index"]),
            "image_path": f"synthetic/{self.split}/{scene['index']}",
        }


class PredictImageDataset(Dataset):
    """Images to segment, at native size: {"image" uint8 [3, H, W], "name", "image_path", "size" int64 [2]}.

    A file that cannot be decoded gives {"name", "image_path", "unreadable": reason} instead: a prediction job over a
    user's folder writes every image it can (``pad_collate`` sets such items aside, the prediction writer reports
    them). Evaluation datasets raise instead: a score over a silently shrunk dataset would be wrong.
    """

    def __init__(self, paths: Sequence[str] | str) -> None:
        self.paths = predict_files(paths)
        self.names = _unique_names(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, name = str(self.paths[index]), self.names[index]
        try:
            image = read_image(path)
        except ImageReadError as error:
            return {"name": name, "image_path": path, "unreadable": error.reason}
        image_t, _ = to_tensors(image)
        size = torch.tensor(image_t.shape[1:], dtype=torch.int64)  # [2] (H, W)
        return {"image": image_t, "name": name, "image_path": path, "size": size}


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """File stems, or, when two stems collide, paths below the common folder joined by "__"."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    common = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    return [p.resolve().relative_to(common).with_suffix("").as_posix().replace("/", "__") for p in paths]


def unpadded(batch: dict[str, Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each image ``[1, 3, h, w]`` of a batch at its own size, with its mask ``[1, h, w]`` (None without masks): the
    padding :func:`pad_collate` added (recorded in ``sizes``) cut off."""
    images, masks, sizes = batch["image"], batch.get("mask"), batch.get("sizes")
    for i in range(images.shape[0]):
        height, width = (int(v) for v in sizes[i]) if sizes is not None else images.shape[-2:]
        mask = masks[i : i + 1, :height, :width] if masks is not None else None
        yield images[i : i + 1, :, :height, :width], mask


def pad_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch native-size items: pad images with 0 and masks with 255 (bottom/right) to the largest; ``sizes`` [B, 2] = (H, W).

    Unreadable items (``"unreadable"``, from :class:`PredictImageDataset`) are left out of the tensors and listed in
    ``batch["unreadable"]`` as ``{"name", "image_path", "reason"}``.
    """
    unreadable = [
        {"name": i["name"], "image_path": i["image_path"], "reason": i["unreadable"]}
        for i in items
        if "unreadable" in i
    ]
    items = [item for item in items if "unreadable" not in item]
    sizes = torch.tensor([list(item["image"].shape[1:]) for item in items], dtype=torch.int64).view(-1, 2)  # [B, 2]
    height, width = (int(v) for v in sizes.max(dim=0).values) if items else (0, 0)
    images = torch.zeros(len(items), 3, height, width, dtype=torch.uint8)  # [B, 3, H, W]
    batch: dict[str, Any] = {"image": images, "sizes": sizes}
    has_mask = bool(items) and "mask" in items[0]
    if has_mask:
        batch["mask"] = torch.full((len(items), height, width), IGNORE_INDEX, dtype=torch.int64)  # [B, H, W]
    for i, item in enumerate(items):
        h, w = item["image"].shape[1:]
        images[i, :, :h, :w] = item["image"]
        if has_mask:
            batch["mask"][i, :h, :w] = item["mask"]
    batch["name"] = [item["name"] for item in items]
    batch["image_path"] = [item["image_path"] for item in items]
    if unreadable:
        batch["unreadable"] = unreadable
    return batch

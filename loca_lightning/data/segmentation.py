"""Semantic-segmentation datasets and SegmentationDataModule.

Items are ``{"image": uint8 [3, H, W], "mask": int64 [H, W] (255 = ignore), "name", "image_path"}``;
ImageNet normalisation happens on the accelerator in the LightningModule. Training items are
crop-sized; evaluation and prediction items keep their native size (labels are never resized) and
are batched by ``pad_collate`` (image padded with 0, mask with 255, original sizes in ``sizes``);
the LightningModule's ``test_scale``, if any, resizes the images on the accelerator and its scores back.
Layouts and label conventions are documented in ``seg_layouts``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from loca_lightning.data.arguments import missing_message
from loca_lightning.data.classes import dataset_classes, label_colormap, read_class_names
from loca_lightning.data.images import ImageReadError, read_image, read_mask
from loca_lightning.data.resumable import ResumableTrainData, SharedEpoch, item_seed
from loca_lightning.data.seg_layouts import (
    IGNORE_INDEX,
    SegSample,
    ade20k_samples,
    apply_label_map,
    check_sample_sizes,
    cityscapes_samples,
    folder_samples,
    pascal_context_samples,
    predict_files,
    voc2012_samples,
)
from loca_lightning.data.synthetic import SyntheticScenes
from loca_lightning.data.transforms import to_tensors, train_pipeline

Layout = Literal["ade20k", "cityscapes", "pascal_context", "voc2012", "folder", "synthetic"]
LAYOUTS: tuple[str, ...] = ("ade20k", "cityscapes", "pascal_context", "voc2012", "folder", "synthetic")
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
    unreadable = [{"name": i["name"], "image_path": i["image_path"], "reason": i["unreadable"]} for i in items
                  if "unreadable" in i]  # fmt: skip
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


class SegmentationDataModule(ResumableTrainData, L.LightningDataModule):
    """Semantic-segmentation data for finetuning, evaluation and prediction in any supported layout.

    Training batches are a function of ``seed``, the epoch and the position in it (shuffle order and augmentations),
    so a run resumed from a checkpoint, mid-epoch too, sees the batches the uninterrupted run would have seen.
    """

    def __init__(
        self,
        *,
        layout: Layout = "synthetic",
        root: str | None = None,
        image_dir: str | None = None,
        mask_dir: str | None = None,
        class_names_file: str | None = None,
        reduce_zero_label: bool = False,
        use_sbd: bool = False,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        crop_size: int = 512,
        base_size: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        label_fraction: float = 1.0,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        synthetic_length: int = 512,
        synthetic_val_length: int = 64,
        synthetic_image_size: int = 128,
        predict_paths: list[str] | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        missing = self.missing_arguments(layout=layout, root=root, image_dir=image_dir, mask_dir=mask_dir)
        if missing:
            raise ValueError(missing_message(missing))
        if reduce_zero_label and layout != "folder":
            raise ValueError(
                f"reduce_zero_label applies to the folder layout only; {layout!r} fixes its own label handling"
            )
        for name, value in (("crop_size", crop_size), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        if not 0.0 < label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
        if len(base_size) != 2 or min(base_size) < 1:
            raise ValueError(f"base_size must be two positive ints, got {base_size}")
        if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self.layout = layout
        self.test_split = val_split if test_split is None else test_split
        self._class_names, self._palette = self._classes()
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.predict_dataset: Dataset | None = None

    @staticmethod
    def missing_arguments(layout: str = "synthetic", root: str | None = None, image_dir: str | None = None,
                          mask_dir: str | None = None, **_: Any) -> list[tuple[str, str]]:  # fmt: skip
        """(argument, what it is) for each argument this layout needs but is left unset; the CLI checks them before
        it builds anything."""
        if layout == "folder" and root is None and (image_dir is None or mask_dir is None):
            return [("root", "the folder holding images/ and masks/ (or set image_dir and mask_dir)")]
        if layout not in ("synthetic", "folder") and root is None:
            return [("root", f"the {layout} dataset folder")]
        return []

    def _classes(self) -> tuple[tuple[str, ...], np.ndarray]:
        hp = self.hparams
        if self.layout != "folder":
            return dataset_classes(self.layout)
        names_file = hp.class_names_file
        if names_file is None and hp.root is not None and (Path(hp.root) / "classes.txt").is_file():
            names_file = str(Path(hp.root) / "classes.txt")
        if names_file is None:
            raise ValueError("the folder layout needs class_names_file (one class name per line), or root/classes.txt")
        names = read_class_names(names_file)
        # Colour by stored value, so that a reduced class keeps the colour of its value on disk.
        palette = label_colormap(len(names) + 1)[1:] if hp.reduce_zero_label else label_colormap(len(names))
        return names, palette

    @property
    def num_classes(self) -> int:
        """Number of training classes (labels 0..num_classes-1; 255 is ignored)."""
        return len(self._class_names)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in label order."""
        return self._class_names

    @property
    def palette(self) -> np.ndarray:
        """Mask colours in label order: uint8 [num_classes, 3]."""
        return self._palette.copy()

    @property
    def ignore_index(self) -> int:
        """Label value ignored by the loss and the metric."""
        return IGNORE_INDEX

    def _samples(self, split: str, training: bool) -> list[SegSample]:
        hp = self.hparams
        if self.layout == "ade20k":
            return ade20k_samples(hp.root, split)
        if self.layout == "cityscapes":
            return cityscapes_samples(hp.root, split)
        if self.layout == "pascal_context":
            return pascal_context_samples(hp.root, split)
        if self.layout == "voc2012":
            return voc2012_samples(hp.root, split, use_sbd=hp.use_sbd and training)
        return folder_samples(hp.root, split, hp.image_dir, hp.mask_dir, hp.reduce_zero_label)

    def _dataset(self, split: str, training: bool) -> Dataset:
        hp = self.hparams
        transform = (
            train_pipeline(hp.crop_size, tuple(hp.base_size), tuple(hp.ratio_range), hp.cat_max_ratio, IGNORE_INDEX)
            if training
            else None
        )
        if self.layout == "synthetic":
            length = hp.synthetic_length if training else hp.synthetic_val_length
            dataset: Dataset = SyntheticSegmentationDataset(split, length, hp.synthetic_image_size, hp.seed, transform)
            count = len(dataset)
        else:
            samples = self._samples(split, training)
            check_sample_sizes(samples)
            dataset = SegmentationDataset(samples, self.num_classes, transform, hp.seed)
            count = len(samples)
        if training and hp.label_fraction < 1.0:
            dataset = torch.utils.data.Subset(dataset, fraction_subset(count, hp.label_fraction, hp.seed).tolist())
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Build (once) the datasets the stage needs, validating folders, pairs and sizes."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset(self.hparams.train_split, training=True)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._dataset(self.hparams.val_split, training=False)
        if stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = self._dataset(self.test_split, training=False)
        if stage == "predict" or (stage is None and self.hparams.predict_paths is not None):
            if self.hparams.predict_paths is None:
                raise ValueError("predicting needs predict_paths (a folder, a text file of paths, or a list of images)")
            if self.predict_dataset is None:
                self.predict_dataset = PredictImageDataset(self.hparams.predict_paths)

    def _loader(self, dataset: Dataset | None, stage: str, training: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call setup({stage!r}) before asking for its dataloader")
        hp = self.hparams
        batch_size = hp.batch_size if training else hp.eval_batch_size
        options = dict(
            batch_size=batch_size,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),  # no warning on CPU-only hosts
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
        )
        if training:
            # Full batches only, unless the (low-label) training set is smaller than one batch.
            return self.resumable_loader(
                dataset, hp.seed, shuffle=True, drop_last=len(dataset) >= batch_size, **options
            )
        # A generator of its own for the workers' base seed: without one, DataLoader draws it from the global torch
        # RNG whenever an evaluation iterator starts, which would move training's stream (drop path) by a draw that a
        # resumed run makes at another time.
        return DataLoader(dataset, collate_fn=pad_collate, generator=torch.Generator().manual_seed(hp.seed), **options)

    def train_dataloader(self) -> DataLoader:
        """Shuffled crop-sized batches: image uint8 [B, 3, crop, crop], mask int64 [B, crop, crop]."""
        return self._loader(self.train_dataset, "fit", training=True)

    def val_dataloader(self) -> DataLoader:
        """Native-size batches (pad_collate): image, mask, sizes, name, image_path."""
        return self._loader(self.val_dataset, "validate", training=False)

    def test_dataloader(self) -> DataLoader:
        """Native-size batches of the test split (val_split unless test_split is given)."""
        return self._loader(self.test_dataset, "test", training=False)

    def predict_dataloader(self) -> DataLoader:
        """Native-size batches of the predict_paths images: image, sizes, name, image_path."""
        return self._loader(self.predict_dataset, "predict", training=False)

"""SegmentationDataModule: finetuning, evaluation and prediction data in any supported layout.

The datasets and ``pad_collate`` (items and batches) are in ``seg_datasets``; layouts and label conventions in
``seg_layouts``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from loca_lightning.data.arguments import missing_message
from loca_lightning.data.classes import dataset_classes, label_colormap, read_class_names
from loca_lightning.data.resumable import ResumableTrainData
from loca_lightning.data.seg_datasets import (
    PredictImageDataset,
    SegmentationDataset,
    SyntheticSegmentationDataset,
    fraction_subset,
    pad_collate,
)
from loca_lightning.data.seg_layouts import (
    IGNORE_INDEX,
    SegSample,
    ade20k_samples,
    check_sample_sizes,
    cityscapes_samples,
    folder_samples,
    pascal_context_samples,
    voc2012_samples,
)
from loca_lightning.data.transforms import train_pipeline

Layout = Literal["ade20k", "cityscapes", "pascal_context", "voc2012", "folder", "synthetic"]
LAYOUTS: tuple[str, ...] = ("ade20k", "cityscapes", "pascal_context", "voc2012", "folder", "synthetic")


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
    def missing_arguments(
        layout: str = "synthetic",
        root: str | None = None,
        image_dir: str | None = None,
        mask_dir: str | None = None,
        **_: Any,
    ) -> list[tuple[str, str]]:
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

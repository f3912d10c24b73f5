"""LOCA pretraining data: a Dataset of views over image files or synthetic scenes, and its DataModule.

Per-item randomness comes from a numpy Generator seeded with (seed, epoch, index) (``resumable.item_rng``): a run is
reproducible whatever the number of workers or processes, and every item and epoch gets its own draws. The epoch lives
in shared memory that the loader sets each time an epoch's iteration starts, so persistent workers see it
without being restarted; the loader and the DataModule resume mid-epoch exactly (``data/resumable.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
from jsonargparse import lazy_instance
from torch.utils.data import DataLoader, Dataset

from loca_lightning.data.arguments import missing_message
from loca_lightning.data.images import check_nonempty, list_images, read_image, read_path_list
from loca_lightning.data.resumable import ResumableTrainData, SharedEpoch, item_rng
from loca_lightning.data.shards import ShardSamples, open_shards
from loca_lightning.data.synthetic import SyntheticScenes
from loca_lightning.malloc import keep_freed_memory
from loca_lightning.pretrain.views import LOCAViews

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 50


class PathTable:
    """Paths packed in two numpy arrays: no per-path Python objects whose reference counts would make
    every DataLoader worker copy the pages of a million-file list (copy-on-read after fork)."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        encoded = [str(p).encode("utf-8") for p in paths]
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(f"path index {index} out of range for {len(self)} paths")
        return self._bytes[self._offsets[index] : self._offsets[index + 1]].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


class LOCAPretrainDataset(Dataset):
    """LOCA views of images from a list of files, tar shards or a :class:`SyntheticScenes`; unreadable images are
    skipped.

    An item is the dict of :class:`LOCAViews` plus ``num_skipped``, the number of unreadable images passed
    over (replaced by the next index, wrapping; a truncated shard's missing samples by the next shard's first) to
    produce it.
    """

    def __init__(
        self, source: Sequence[str | Path] | SyntheticScenes | ShardSamples, views: LOCAViews, seed: int = 0
    ) -> None:
        if len(source) == 0:
            raise ValueError("LOCAPretrainDataset needs at least one image, got an empty source")
        self.source = source if isinstance(source, (SyntheticScenes, ShardSamples)) else PathTable(source)
        self.views = views
        self.seed = int(seed)
        self._epoch = SharedEpoch()

    def __len__(self) -> int:
        return len(self.source)

    @property
    def epoch(self) -> int:
        """The epoch that seeds the per-item randomness."""
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the items drawn from now on (in every worker)."""
        self._epoch.set(epoch)

    def _image(self, index: int) -> np.ndarray:
        if isinstance(self.source, SyntheticScenes):
            return self.source[index]["image"]
        if isinstance(self.source, ShardSamples):
            return self.source.read(index)
        return read_image(self.source[index])

    def _name(self, index: int) -> str:
        if isinstance(self.source, ShardSamples):
            return self.source.name(index)
        return self.source[index] if isinstance(self.source, PathTable) else f"synthetic scene {index}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        position, skipped = index, 0
        while True:
            try:
                image = self._image(position)
                break
            except Exception as error:  # any decoder failure: skip the file, never kill a long run
                log.warning("skipping unreadable image %s: %s", self._name(position), error)
                skipped += 1
                if skipped >= MAX_CONSECUTIVE_FAILURES:
                    raise RuntimeError(
                        f"{skipped} consecutive images starting at index {index} could not be read; the dataset "
                        "looks broken (see the warnings above for the files and reasons)"
                    ) from error
                if isinstance(self.source, ShardSamples):
                    position = self.source.next_candidate(position)
                else:
                    position = (position + 1) % len(self.source)
        item = self.views(image, item_rng(self.seed, self.epoch, index))
        item["num_skipped"] = skipped
        return item


class LOCAPretrainDataModule(ResumableTrainData, L.LightningDataModule):
    """Images (a folder tree, a path list, tar shards, or synthetic scenes) -> batches of LOCA views and position targets.

    Batches: ``reference [B,3,R,R]``, ``query_large [B,3,S,S]``, ``query_focal [B,n,3,F,F]`` (uint8 unless
    ``views.normalize``), ``target_large [B,(S/P)^2]``, ``target_focal [B,n,(F/P)^2]`` (int64, -1 = no label),
    ``num_skipped [B]``.
    """

    def __init__(
        self,
        *,
        source: Literal["folder", "list", "shards", "synthetic"] = "synthetic",
        root: str | None = None,
        list_file: str | None = None,
        shards: str | list[str] | None = None,
        shard_cache: str | None = None,
        synthetic_length: int = 2048,
        synthetic_image_size: int = 128,
        synthetic_seed: int = 0,
        views: LOCAViews = lazy_instance(LOCAViews),
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source not in ("folder", "list", "shards", "synthetic"):
            raise ValueError(f"source must be 'folder', 'list', 'shards' or 'synthetic', got {source!r}")
        source = self.source_of(source, root, list_file, shards)
        missing = self.missing_arguments(source=source, root=root, list_file=list_file, shards=shards)
        if missing:
            raise ValueError(missing_message(missing))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters(ignore=["views"])
        self.hparams["source"] = source  # as resolved (under the CLI the saved values are the config's)
        # Per device; an attribute so that LOCAPretrainModule and Lightning's batch-size tuner find it.
        self.batch_size = batch_size
        if hasattr(views, "lazy_get_init_args"):  # the signature's default, untouched (from Python): build it here
            views = views.lazy_get_init_args().as_dict()
        if isinstance(views, Mapping):  # what a user's own config or script holds: LOCAViews' arguments
            views = LOCAViews(**views)
        if not isinstance(views, LOCAViews):
            raise TypeError(f"views must be a LOCAViews or a mapping of its arguments, got {type(views).__name__}")
        self._views = views
        self.hparams["views"] = dict(views.settings)  # plain values: checkpoints stay loadable with weights_only
        self.dataset: LOCAPretrainDataset | None = None

    @staticmethod
    def source_of(source: str, root: str | None, list_file: str | None, shards: str | list[str] | None) -> str:
        """The source these settings read: ``shards`` when shards are given and the configured source's own input is
        not (so that one argument, ``--data.init_args.shards``, switches a folder config to shards)."""
        if not shards or source == "shards":
            return source
        own = {"folder": root, "list": list_file, "synthetic": None}[source]
        if own is not None:
            raise ValueError(f"data.init_args.shards and the {source} source's input are both set: keep one of them")
        return "shards"

    @staticmethod
    def missing_arguments(
        source: str = "synthetic",
        root: str | None = None,
        list_file: str | None = None,
        shards: str | list[str] | None = None,
        **_: Any,
    ) -> list[tuple[str, str]]:
        """(argument, what it is) for each argument these settings need but leave unset; the CLI checks them before
        it builds anything."""
        if source in ("folder", "list", "synthetic", "shards"):
            source = LOCAPretrainDataModule.source_of(source, root, list_file, shards)
        if source == "folder" and root is None:
            return [("root", "the folder of training images (a tree of image files, e.g. ImageNet's train/)")]
        if source == "list" and list_file is None:
            return [("list_file", "a text file of image paths, one per line")]
        if source == "shards" and not shards:
            return [
                (
                    "shards",
                    "WebDataset tar shards: a brace pattern such as 'train-{000000..000099}.tar', a list, "
                    "or a .txt file of paths/URLs",
                )
            ]
        return []

    def check_geometry(self, reference_size: int, patch_size: int) -> None:
        """The views' reference size and patch size must be the model's (the CLI links them from the model)."""
        views = self._views
        if (views.reference_size, views.patch_size) != (reference_size, patch_size):
            raise ValueError(
                f"data.init_args.views has reference_size {views.reference_size} and patch_size {views.patch_size}, "
                f"but the model has reference_size {reference_size} and patch size {patch_size}: make them equal"
            )

    @property
    def views(self) -> LOCAViews:
        """The view sampler (its sizes and patch size are checked against the model's in :meth:`setup`)."""
        return self._views

    def _source(self) -> Sequence[Path] | SyntheticScenes | ShardSamples:
        hp = self.hparams
        if hp.source == "synthetic":
            return SyntheticScenes(
                length=hp.synthetic_length, image_size=hp.synthetic_image_size, seed=hp.synthetic_seed, with_masks=False
            )
        if hp.source == "shards":
            return open_shards(hp.shards, hp.shard_cache)
        if hp.source == "folder":
            paths = list_images(hp.root)
            check_nonempty(paths, f"folder {hp.root!r}")
            return paths
        paths = read_path_list(hp.list_file, hp.root)
        check_nonempty(paths, f"path list {hp.list_file!r}")
        return paths

    def setup(self, stage: str | None = None) -> None:
        """Check the views against the model (under a Trainer), build the dataset (once: listing a folder is slow)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        reference_size = getattr(module, "hparams", {}).get("reference_size")
        if reference_size is not None and hasattr(module, "patch_size"):
            self.check_geometry(reference_size, module.patch_size)
        if self.dataset is None:
            self.dataset = LOCAPretrainDataset(self._source(), self._views, seed=self.hparams.seed)

    def set_epoch(self, epoch: int) -> None:
        """Seed the per-item randomness of the following items with ``epoch`` (done automatically under a Trainer)."""
        if self.dataset is None:
            self.setup()
        self.dataset.set_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader; under DDP Lightning swaps in its DistributedSampler."""
        if self.dataset is None:
            self.setup("fit")
        hp = self.hparams
        return self.resumable_loader(
            self.dataset,
            # The shuffle order follows ``seed`` too (under DDP, Lightning's DistributedSampler takes over).
            seed=hp.seed,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
            drop_last=hp.drop_last,
            worker_init_fn=keep_freed_memory,
        )

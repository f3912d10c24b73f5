"""Training loaders that resume exactly: the order is a function of (seed, epoch), a restored position skips what was
trained on in that epoch only, and augmentations do not depend on which worker draws them."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from loca_lightning.data.resumable import ResumableLoader, train_position
from loca_lightning.data.segmentation import SegmentationDataModule
from loca_lightning.pretrain.views import LOCAViews

VIEWS = dict(reference_size=32, query_size=32, focal_size=16, num_focal=2, patch_size=8)


class Indices(Dataset):
    """Item i is i; records the epochs it was told."""

    def __init__(self, length: int = 12) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


def _epochs(loader: ResumableLoader, clock: list[int], epochs: range) -> list[list[int]]:
    seen = []
    for epoch in epochs:
        clock[0] = epoch
        seen.append([int(i) for batch in loader for i in batch])
    return seen


def test_order_depends_on_seed_and_epoch_only_not_on_workers_or_persistence() -> None:
    clock = [0]
    kwargs = dict(epoch_fn=lambda: clock[0], seed=3, shuffle=True, batch_size=3)
    persistent = _epochs(ResumableLoader(Indices(), num_workers=1, persistent_workers=True, **kwargs), clock, range(3))
    fresh = [_epochs(ResumableLoader(Indices(), **kwargs), clock, range(e, e + 1))[0] for e in range(3)]
    assert persistent == fresh
    assert len({tuple(order) for order in fresh}) == 3  # every epoch has its own order
    other_seed = _epochs(ResumableLoader(Indices(), **{**kwargs, "seed": 4}), clock, range(1))[0]
    assert other_seed != fresh[0]


def test_a_restored_position_skips_batches_of_the_resumed_epoch_only() -> None:
    clock = [0]
    kwargs = dict(epoch_fn=lambda: clock[0], seed=0, shuffle=True, batch_size=3, drop_last=True)
    expected = _epochs(ResumableLoader(Indices(), **kwargs), clock, range(3))
    # persistent workers keep the iterator (and its index sampler) from one epoch to the next
    loader = ResumableLoader(
        Indices(), num_workers=1, persistent_workers=True, resume={"epoch": 1, "batches": 2}, **kwargs
    )
    clock[0] = 0  # the trainer's counter may still be behind when the first iterator is built
    resumed = [int(i) for batch in loader for i in batch]
    assert resumed == expected[1][6:]
    clock[0] = 2
    assert [int(i) for batch in loader for i in batch] == expected[2]
    assert len(loader) == 4


def test_train_position_moves_to_the_next_epoch_after_its_last_batch() -> None:
    assert train_position(1, 3, 4) == {"epoch": 1, "batches": 3}
    assert train_position(1, 4, 4) == {"epoch": 2, "batches": 0}


@pytest.mark.slow
def test_datamodule_position_reaches_the_next_training_loader_once() -> None:
    from loca_lightning.data.pretrain import LOCAPretrainDataModule

    dm = LOCAPretrainDataModule(
        source="synthetic",
        synthetic_length=4,
        synthetic_image_size=40,
        views=LOCAViews(**VIEWS),
        batch_size=1,
        num_workers=0,
        pin_memory=False,
        seed=5,
    )
    assert dm.state_dict() == {}  # outside fit: nothing to save
    reference = [batch["target_large"] for batch in dm.train_dataloader()]
    dm.load_state_dict({"train_position": {"epoch": 0, "batches": 3}})
    resumed = [batch["target_large"] for batch in dm.train_dataloader()]
    assert len(resumed) == 1 and torch.equal(resumed[0], reference[3])
    assert len(list(dm.train_dataloader())) == 4  # a later loader starts at the beginning
    assert not torch.equal(reference[3], reference[0])


def test_segmentation_augmentations_depend_on_seed_epoch_and_index_only() -> None:
    def batches(num_workers: int, epoch: int, seed: int = 0) -> list[torch.Tensor]:
        dm = SegmentationDataModule(
            layout="synthetic",
            synthetic_length=4,
            synthetic_image_size=48,
            crop_size=32,
            base_size=(48, 48),
            batch_size=2,
            num_workers=num_workers,
            pin_memory=False,
            persistent_workers=False,
            seed=seed,
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.set_epoch(epoch)
        loader.epoch_fn = lambda: epoch
        return [batch["image"] for batch in loader]

    in_process, with_workers = batches(0, 1), batches(2, 1)
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(in_process, batches(0, 2)))
    assert not any(torch.equal(a, b) for a, b in zip(in_process, batches(0, 1, seed=1)))

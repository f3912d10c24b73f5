"""Training data that a checkpoint resumes exactly: mid-epoch, with any number of DataLoader workers.

What decides a batch, and where it comes back from after a restart:
- which items: the shuffle order is drawn from a generator seeded by ``(seed, epoch)`` alone, never by how many epochs
  this loader object has run or whether its workers persisted (a fresh iterator and a persistent one draw the same
  order); under DDP Lightning's DistributedSampler takes over and gets the epoch set here too;
- where in the epoch: the epoch and the number of batches already trained on are stored in the checkpoint (by the
  DataModule, :class:`ResumableTrainData`, and by the loader's own ``state_dict``); the resumed iterator skips those
  batches at the sampler level, without loading them;
- each item's random draws: datasets derive them from ``(seed, epoch, index)`` alone, through one numpy
  ``SeedSequence`` (:func:`item_rng`: a Generator, for pretraining's views; :func:`item_seed`: an integer, for
  segmentation's albumentations pipelines, which also take a ``random.Random``), so no worker's random stream has to
  be saved: an item is the same whichever worker, process or run produces it.

Why the DataModule carries the position too: a module whose ``configure_optimizers`` reads
``trainer.estimated_stepping_batches`` (both of ours: their schedules need the step count) makes Lightning build the
training loader and its first iterator *before* it restores the loops from the checkpoint, and Lightning never hands
the restored position to that loader (lightning 2.6, ``FitLoop.setup_data``). The DataModule's state is restored
earlier, before the model is set up, so the loader is built with the position from the start.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset


def item_sequence(seed: int, epoch: int, index: int) -> np.random.SeedSequence:
    """The root of item ``index``'s random draws in ``epoch`` (independent streams for each triple)."""
    return np.random.SeedSequence((int(seed), int(epoch), int(index)))


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit integer seed for the random draws of item ``index`` in ``epoch``, from :func:`item_sequence`."""
    return int(item_sequence(seed, epoch, index).generate_state(2, np.uint64)[0] >> 1)


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A numpy Generator for the random draws of item ``index`` in ``epoch``, from :func:`item_sequence` (the same
    stream as ``np.random.default_rng((seed, epoch, index))``)."""
    return np.random.default_rng(item_sequence(seed, epoch, index))


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence((int(seed), int(epoch), stream)).generate_state(1)[0])


class SharedEpoch:
    """An epoch number in shared memory: DataLoader workers (persistent or not, fork or spawn) read what the main
    process sets, without being restarted."""

    def __init__(self) -> None:
        self._value = torch.zeros(1, dtype=torch.int64).share_memory_()

    def get(self) -> int:
        """The current epoch."""
        return int(self._value[0])

    def set(self, epoch: int) -> None:
        """Make ``epoch`` the current epoch (in every worker)."""
        self._value[0] = int(epoch)


class ResumableLoader(DataLoader):
    """DataLoader whose batches are a function of ``(seed, epoch, position)``; it resumes mid-epoch exactly.

    ``dataset.set_epoch(epoch)`` is called each time an epoch's iteration starts (``iter()`` is where the epoch's
    indices go to the workers, so the epoch is in shared memory before any item of it is drawn). ``epoch_fn`` gives
    the trainer's epoch, ``progress_fn`` the batches of the current epoch handed to training steps. ``resume`` (or
    :meth:`load_state_dict`) makes the next iteration epoch ``resume["epoch"]`` without its first
    ``resume["batches"]`` batches. Everything is a constructor argument, so it survives Lightning re-creating the
    loader to insert a DistributedSampler.
    """

    def __init__(
        self,
        dataset: Dataset,
        *args: Any,
        epoch_fn: Callable[[], int | None],
        progress_fn: Callable[[], int] | None = None,
        seed: int = 0,
        resume: dict[str, int] | None = None,
        shuffle: bool | None = None,
        sampler: Any = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        self.seed = int(seed)
        # Two generators of our own: the shuffle order, and the workers' base seed (which DataLoader draws from
        # `generator` when a fresh iterator starts, but not when persistent workers start another epoch). Sharing one,
        # as DataLoader(shuffle=True, generator=g) does, made the order depend on which of the two happened.
        self._order_generator = torch.Generator()
        if shuffle and sampler is None and kwargs.get("batch_sampler") is None:
            sampler, shuffle = RandomSampler(dataset, generator=self._order_generator), None
        super().__init__(
            dataset,
            *args,
            shuffle=shuffle,
            sampler=sampler,
            generator=generator if generator is not None else torch.Generator(),
            **kwargs,
        )
        self.epoch_fn = epoch_fn
        self.progress_fn = progress_fn
        self._resume = dict(resume) if resume else None
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:
        # A pending resume wins over the trainer's epoch counter, which may not be restored yet.
        resume, self._resume = self._resume, None
        epoch = resume["epoch"] if resume is not None else self.epoch_fn()
        if epoch is None:  # outside a Trainer: the epoch the dataset was given (set_epoch), else 0
            epoch = getattr(self._base_dataset(), "epoch", 0)
        self.set_epoch(epoch)
        self._skip = resume["batches"] if resume is not None else 0  # read by _Skipping while the iterator is built
        try:
            return super().__iter__()
        finally:
            self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Seed the shuffle order, the workers' base seed and the dataset's per-item draws with ``epoch``."""
        dataset = self._base_dataset()
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        self._order_generator.manual_seed(_epoch_seed(self.seed, epoch, 0))
        self.generator.manual_seed(_epoch_seed(self.seed, epoch, 1))
        if hasattr(self.sampler, "set_epoch"):  # DistributedSampler: Lightning sets it too, but not before a resume
            self.sampler.set_epoch(epoch)

    def _base_dataset(self) -> Dataset:
        dataset = self.dataset
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        return dataset

    def state_dict(self) -> dict[str, int]:
        """Position in the epoch, which Lightning stores in checkpoints: a mid-epoch resume skips what was done."""
        return train_position(self.epoch_fn() or 0, self.progress_fn() if self.progress_fn else 0, len(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration epoch ``state["epoch"]`` without its first ``state["batches"]`` batches."""
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    @property
    def _index_sampler(self) -> Any:
        return _Skipping(self, super()._index_sampler)


class _Skipping:
    """An index (or batch) sampler that skips its loader's pending ``_skip`` entries when an iteration starts.

    The loader's value is read at ``iter()`` time, because a persistent-workers iterator keeps this object and calls
    ``iter()`` on it again every epoch: only the resumed epoch skips anything.
    """

    def __init__(self, loader: ResumableLoader, sampler: Any) -> None:
        self.loader, self.sampler = loader, sampler

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.sampler), self.loader._skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.loader._skip)


def train_position(epoch: int, batches_taken: int, batches_per_epoch: int | float) -> dict[str, int]:
    """``{"epoch", "batches"}`` to resume at; a checkpoint saved at an epoch's last batch resumes at the next epoch."""
    epoch, batches_taken = int(epoch), int(batches_taken)
    if batches_taken >= batches_per_epoch:
        epoch, batches_taken = epoch + 1, 0
    return {"epoch": epoch, "batches": batches_taken}


class ResumableTrainData:
    """Mixin for a LightningDataModule whose training loader is a :class:`ResumableLoader`: the position in the
    training data goes into the checkpoint with the DataModule's state and comes back before the loader is built."""

    _resume_position: dict[str, int] | None = None

    def _current_epoch(self) -> int | None:
        # None outside a Trainer: keep whatever set_epoch() was given.
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else None

    def _batches_taken(self) -> int:
        # Batches of the current epoch handed to training steps (not the one the fetcher prefetched).
        trainer = getattr(self, "trainer", None)
        return trainer.fit_loop.epoch_loop.batch_progress.current.ready if trainer is not None else 0

    def resumable_loader(self, dataset: Dataset, seed: int, **kwargs: Any) -> ResumableLoader:
        """The training loader, starting at the restored position if there is one (used once)."""
        resume, self._resume_position = self._resume_position, None
        return ResumableLoader(
            dataset, epoch_fn=self._current_epoch, progress_fn=self._batches_taken, seed=seed, resume=resume, **kwargs
        )

    def state_dict(self) -> dict[str, Any]:
        """The training position while fitting (Lightning saves it in checkpoints), else nothing."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        per_epoch = trainer.num_training_batches
        return {"train_position": train_position(trainer.current_epoch, self._batches_taken(), per_epoch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep the saved training position for the next training loader."""
        position = state.get("train_position")
        self._resume_position = (
            {"epoch": int(position["epoch"]), "batches": int(position["batches"])} if position else None
        )

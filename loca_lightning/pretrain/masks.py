"""LOCA's token masks: the band of reference tokens the location head sees, the large-query tokens the student
encodes, and the generator they are drawn from (its state travels in checkpoints, for exact resume).

Masks are drawn per sample; the release draws one mask per device batch (results must not depend on how many
devices share a batch).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

ReferenceMask = Literal["consecutive", "unstructured", "first"]  # the choices of the module's reference_mask
REFERENCE_MASKS: tuple[str, ...] = get_args(ReferenceMask)


def band_keep_index(
    batch: int, num_tokens: int, keep: int, mode: str, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """Reference tokens kept as keys of the location head ``[B, keep]``, drawn per sample.

    consecutive: a band of ``keep`` tokens in raster order at an offset uniform over all ``num_tokens - keep + 1``
    positions; unstructured: a random subset; first: the first ``keep`` tokens.
    """
    if mode == "consecutive":
        offset = torch.randint(0, num_tokens - keep + 1, (batch, 1), device=device, generator=generator)
        return offset + torch.arange(keep, device=device)
    if mode == "unstructured":
        return random_keep_index(batch, num_tokens, keep, device, generator)
    if mode == "first":
        return torch.arange(keep, device=device).expand(batch, -1)
    raise ValueError(f"reference_mask must be one of {REFERENCE_MASKS}, got {mode!r}")


def random_keep_index(
    batch: int, num_tokens: int, keep: int, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """A uniformly random subset of ``keep`` of ``num_tokens`` token positions per sample, sorted: ``[B, keep]``."""
    return torch.rand(batch, num_tokens, device=device, generator=generator).argsort(dim=1)[:, :keep].sort(dim=1).values


def reference_keep_count(ratio: float, num_positions: int) -> int:
    """Reference tokens visible to the location head: ``int(ratio * N)`` as released (floor: 39 of 196, 12 of 64)."""
    return max(1, int(ratio * num_positions))


def query_keep_count(query_keep: int, num_tokens: int) -> int:
    """Large-query tokens fed to the encoder: ``query_keep`` (70 as released), or all when there are no more."""
    return min(query_keep, num_tokens)


class MaskGenerator:
    """The ``torch.Generator`` token masks are drawn from, on the device that asks for it.

    Seeded on first use from the global torch RNG (so ``seed_everything`` fixes it) plus the process rank (so
    processes draw different masks). :meth:`state` and :meth:`load_state` carry its position through checkpoints:
    a resumed run continues the sequence instead of restarting it.
    """

    def __init__(self) -> None:
        self._generator: torch.Generator | None = None
        self._pending: Tensor | None = None  # a state from a checkpoint, applied when the generator is next built

    def get(self, device: torch.device, rank: int = 0) -> torch.Generator:
        """The generator on ``device`` (moved with its state when the device changes)."""
        generator = self._generator
        if generator is not None and generator.device == torch.device(device):
            return generator
        fresh = torch.Generator(device=device)
        if self._pending is not None:
            fresh.set_state(self._pending)
            self._pending = None
        elif generator is not None:
            fresh.set_state(generator.get_state())
        else:
            fresh.manual_seed(int(torch.randint(0, 2**62, ())) + rank)
        self._generator = fresh
        return fresh

    def state(self) -> Tensor | None:
        """The generator's state (None before its first use)."""
        return self._generator.get_state() if self._generator is not None else self._pending

    def load_state(self, state: Tensor | None) -> None:
        """Continue from ``state`` at the next :meth:`get`."""
        self._generator, self._pending = None, state

"""Random-number state: capture and restore every stream training draws from, and run side work on streams of its own.

The streams are torch's CPU generator (drop path, dropout), CUDA's where initialised, numpy's and Python's global
generators, and any named ``torch.Generator`` a module owns (LOCA's token masks). States are stored as tensors and
plain Python values, so a checkpoint holding them still loads with ``torch.load(..., weights_only=True)``.

In a distributed run every process has streams of its own (the mask generator is seeded with the rank), while only
one process writes the checkpoint: :func:`capture_rng_state` gathers all of them and :func:`restore_rng_state` gives
each process back its own.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

RNG_KEY = "loca_rng_state"  # where modules keep the state in a checkpoint
_GENERATOR = "generator/"


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _set_numpy_state(state: Mapping[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["gauss"]))


def _python_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _set_python_state(state: Mapping[str, Any]) -> None:
    random.setstate((state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss"]))


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def capture_rng_state(generators: Mapping[str, torch.Generator | torch.Tensor | None] | None = None) -> dict[str, Any]:
    """This process's global torch CPU (and CUDA, where initialised), numpy and Python states plus those of named
    generators (a generator, or its state as a tensor; None is left out); in a distributed run also every process's,
    by rank, under ``"by_rank"``.

    Distributed, it is a collective: every process must call it (Lightning calls ``on_save_checkpoint`` on all).
    """
    state = _local_state(generators)
    _, world_size = _world()
    if world_size > 1:
        by_rank: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(by_rank, state)
        state = {**state, "by_rank": by_rank}
    return state


def _local_state(generators: Mapping[str, torch.Generator | torch.Tensor | None] | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, generator in (generators or {}).items():
        if generator is not None:
            state[_GENERATOR + name] = generator.get_state() if isinstance(generator, torch.Generator) else generator
    return state


def restore_rng_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Restore the global states saved by :func:`capture_rng_state` (those present); return the named generators'.

    A process restores its own rank's states when the checkpoint has them for the current world size; otherwise (the
    number of processes changed) every process takes the saving process's global states and no named generator
    state, so that generators seeded per rank are seeded afresh instead of all drawing the same numbers.
    """
    by_rank = state.get("by_rank")
    rank, world_size = _world()
    if by_rank is not None and len(by_rank) == world_size:
        state = by_rank[rank]
    elif by_rank is not None or world_size > 1:
        saved = len(by_rank) if by_rank is not None else 1
        warnings.warn(
            f"the checkpoint holds the random state of {saved} process(es), this run has {world_size}: each process "
            "continues from the saving process's global streams and reseeds its own generators (not an exact resume)",
            UserWarning,
            stacklevel=2,
        )
        state = {k: v for k, v in state.items() if k != "by_rank" and not k.startswith(_GENERATOR)}
    return _set_local_state(state)


def _set_local_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        _set_numpy_state(state["numpy"])
    if "python" in state:
        _set_python_state(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    return {key[len(_GENERATOR) :]: value for key, value in state.items() if key.startswith(_GENERATOR)}


class OwnRNG:
    """Streams of one's own for side work (a probe, image logging): inside :meth:`active` the global torch CPU, numpy
    and Python generators are this object's; on exit they are saved for next time and training's are put back, so
    training draws exactly the numbers it would have drawn without the side work. CUDA's stream is never swapped
    (reseeding it would initialise CUDA); side work on a GPU restores it with ``torch.random.fork_rng``.
    """

    def __init__(self, seed: int) -> None:
        # Fresh generators, not torch.manual_seed: that would also (lazily) reseed CUDA, which training uses.
        with isolated_rng():
            np.random.seed(seed % 2**32)
            random.seed(seed)
            self.state = {**_cpu_state(), "torch": torch.Generator().manual_seed(seed).get_state()}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Swap this object's states in for the duration of the block."""
        saved = _cpu_state()
        _set_local_state(self.state)
        try:
            yield
        finally:
            self.state = _cpu_state()
            _set_local_state(saved)


def _cpu_state() -> dict[str, Any]:
    return {k: v for k, v in _local_state().items() if k != "cuda"}


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Whatever the block draws from the global CPU streams (torch, numpy, Python), they are as before afterwards."""
    saved = _cpu_state()
    try:
        yield
    finally:
        _set_local_state(saved)

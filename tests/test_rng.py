"""Random-number state: every global stream comes back from a checkpoint (each process its own), and side work leaves
training's draws alone."""

import io
import random

import numpy as np
import pytest
import torch

from loca_lightning.rng import OwnRNG, capture_rng_state, isolated_rng, restore_rng_state


def _draws(generator: torch.Generator | None = None) -> tuple:
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        [random.random() for _ in range(3)],
        torch.rand(2, generator=generator).tolist() if generator is not None else None,
    )


def test_state_round_trips_through_a_weights_only_checkpoint():
    generator = torch.Generator().manual_seed(5)
    torch.rand(1, generator=generator)
    np.random.randn(1)  # leaves a cached Gaussian in numpy's state
    state = capture_rng_state({"mask": generator})
    buffer = io.BytesIO()
    torch.save({"rng": state}, buffer)
    expected = _draws(generator)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["rng"]  # tensors and plain values only
    generators = restore_rng_state(loaded)
    restored = torch.Generator()
    restored.set_state(generators["mask"])
    assert _draws(restored) == expected


def _seed_all(seed: int = 0) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_own_rng_leaves_training_streams_unchanged():
    _seed_all()
    expected = _draws()
    _seed_all()
    side = OwnRNG(seed=7)
    with side.active():
        first = _draws()
    with side.active():
        second = _draws()
    assert first != second  # the side streams continue from where they stopped
    assert _draws() == expected


def test_isolated_rng_restores_the_global_streams():
    _seed_all()
    expected = _draws()
    _seed_all()
    with isolated_rng():
        _draws()
    assert _draws() == expected


def _per_rank_resume(rank: int, world_size: int) -> dict:
    """Each rank draws from streams of its own, one rank's checkpoint is restored on all: each continues its own."""
    torch.manual_seed(100 + rank)
    np.random.seed(100 + rank)
    random.seed(100 + rank)
    mask = torch.Generator().manual_seed(7 + rank)
    state = capture_rng_state({"mask": mask})  # a collective: every rank gathers all ranks' states
    expected = _draws(mask)
    buffer = io.BytesIO()
    torch.save({"rng": state}, buffer)  # what rank 0 would write
    payload = [buffer.getvalue()]
    torch.distributed.broadcast_object_list(payload, src=0)
    torch.manual_seed(0)  # a fresh process: nothing but the checkpoint carries the streams over
    loaded = torch.load(io.BytesIO(payload[0]), weights_only=True)["rng"]
    generators = restore_rng_state(loaded)
    restored = torch.Generator()
    restored.set_state(generators["mask"])
    return {"same": _draws(restored) == expected, "saved_ranks": len(loaded["by_rank"])}


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_each_process_gets_its_own_streams_back_from_one_checkpoint():
    from _dist import run_distributed

    results = run_distributed(_per_rank_resume, 2)
    assert results == [{"same": True, "saved_ranks": 2}] * 2


def test_a_checkpoint_of_another_number_of_processes_warns_and_reseeds_named_generators():
    state = capture_rng_state({"mask": torch.Generator().manual_seed(1)})
    two_ranks = {**state, "by_rank": [state, state]}
    with pytest.warns(UserWarning, match="random state of 2 process"):
        generators = restore_rng_state(two_ranks)
    assert generators == {}  # reseeded by their owner instead of every process drawing the same numbers

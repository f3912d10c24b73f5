"""Random-number state: every global stream comes back from a checkpoint, and side work leaves training's draws alone."""

import io
import random

import numpy as np
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

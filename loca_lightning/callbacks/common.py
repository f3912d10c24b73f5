"""Small helpers the callbacks share: side forwards that leave a module as it was, device lookup, argument checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no gradients and saved/restored RNG for a side forward; every submodule's mode is restored after."""
    modes = {m: m.training for m in module.modules()}
    devices = [module_device(module)] if module_device(module).type == "cuda" else []
    try:
        module.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def module_device(module: torch.nn.Module) -> torch.device:
    """Device of a module's first parameter (CPU for a module without parameters)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def check_positive(**values: int) -> None:
    """Raise ValueError naming the first argument below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")

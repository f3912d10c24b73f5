"""The teacher's exponential moving average: its momentum schedule and the in-place update, plain functions."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def ema_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Teacher momentum at ``step``: cosine from ``base`` (step 0) towards ``final`` at ``total_steps``, as the
    release's ``constant*cosine_decay`` schedule (progress ``step / total_steps``: the last step's momentum is just
    below ``final``)."""
    if total_steps < 1:
        return final
    progress = min(1.0, step / total_steps)
    return final - (final - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, for all tensors at once (foreach kernels)."""
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors, student {len(student)}")
    if not teacher:
        return
    torch._foreach_lerp_(teacher, student, 1.0 - momentum)

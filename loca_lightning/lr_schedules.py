"""Learning-rate schedules as plain functions of the step (tested against tables of numbers), and the scheduler that
applies one of them together with each parameter group's ``lr_scale`` (layer-wise decay)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final_ratio: float = 0.01) -> float:
    """Multiplier of the peak lr: linear from 0 at step 0 to 1 at ``warmup_steps``, cosine to ``final_ratio`` at the end."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def poly(step: int, total_steps: int, power: float = 0.9, min_ratio: float = 0.0, warmup_steps: int = 0) -> float:
    """Multiplier of the base lr for polynomial decay (mmseg/Segmenter): (1 - step/total)^power, floored at min_ratio."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, step / total_steps)
    return (1.0 - min_ratio) * (1.0 - progress) ** power + min_ratio


class GroupScaledLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """torch's LambdaLR times each parameter group's ``lr_scale`` (layer-wise decay; 1 where a group has none)."""

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [
            base_lr * lmbda(self.last_epoch) * group.get("lr_scale", 1.0)
            for lmbda, base_lr, group in zip(self.lr_lambdas, self.base_lrs, self.optimizer.param_groups)
        ]

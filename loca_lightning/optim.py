"""Parameter groups, learning-rate schedules and the EMA momentum schedule: plain functions, tested alone."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


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


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_names: Iterable[str] = (),
    layer_decay: float | None = None,
    num_layers: int | None = None,
    layer_id: Callable[[str], int] | None = None,
    decay_suffixes: Iterable[str] = (),
) -> list[dict]:
    """Optimizer parameter groups: no weight decay on 1-D parameters (biases, norms) nor on ``no_decay_names``,
    except the 1-D parameters whose names end with one of ``decay_suffixes``; optional layer-wise lr decay
    (``lr_scale = layer_decay ** (num_layers + 1 - layer_id(name))``).

    Frozen parameters (``requires_grad=False``) are left out.
    """
    exclude = set(no_decay_names)
    suffixes = tuple(decay_suffixes)
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shaped = param.ndim > 1 or (bool(suffixes) and name.endswith(suffixes))
        decay = shaped and name not in exclude and name.rsplit(".", 1)[-1] not in exclude
        layer = 0
        scale = 1.0
        if layer_decay is not None:
            if num_layers is None or layer_id is None:
                raise ValueError("layer_decay needs num_layers and layer_id")
            layer = layer_id(name)
            scale = layer_decay ** (num_layers + 1 - layer)
        key = (decay, layer)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale, "names": []}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def vit_layer_id(name: str, num_layers: int, backbone_prefix: str = "backbone.") -> int:
    """Layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, everything after the blocks num_layers + 1."""
    if not name.startswith(backbone_prefix):
        return num_layers + 1  # decoder / heads
    rest = name[len(backbone_prefix) :]
    if rest.startswith(("patch_embed", "pos_embed", "cls_token", "norm_pre")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", rest)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


class SegmenterSGD(torch.optim.SGD):
    """SGD with Segmenter's defaults (lr 1e-3, momentum 0.9, no weight decay): SegmentationFinetuneModule's default
    optimizer (torch's SGD has no momentum by default)."""

    def __init__(
        self, params: Iterable, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0, **kwargs
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)


class LambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR that also applies each group's ``lr_scale`` (layer-wise decay) on top of the schedule."""

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [
            base_lr * lmbda(self.last_epoch) * group.get("lr_scale", 1.0)
            for lmbda, base_lr, group in zip(self.lr_lambdas, self.base_lrs, self.optimizer.param_groups)
        ]


def global_batch_size(trainer: Any) -> int:
    """Samples per optimizer step over all processes: per-device batch x devices x nodes x gradient accumulation.

    The per-device batch is the DataModule's ``batch_size`` attribute, else the train loader's.
    """
    per_device = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if per_device is None:
        per_device = getattr(trainer.train_dataloader, "batch_size", None)
    if per_device is None:
        raise ValueError("cannot tell the per-device batch size: give the DataModule a batch_size attribute")
    return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches


def steps_per_epoch(trainer: Any, total_steps: int) -> float:
    """Optimizer steps in one epoch (for a warmup given in epochs); ``total_steps / max_epochs`` for an endless loader."""
    batches = trainer.num_training_batches
    if batches is None or batches == float("inf"):
        return float(total_steps) / max(1, trainer.max_epochs or 1)
    return math.ceil(batches / trainer.accumulate_grad_batches)


def warmup_cosine_optimization(
    trainer: Any,
    groups: list[dict],
    optimizer_factory: Callable[[Iterable], torch.optim.Optimizer],
    base_lr: float,
    reference_batch: int,
    warmup_epochs: float,
    final_ratio: float,
) -> tuple[dict[str, Any], int]:
    """Optimizer and per-step scheduler (Lightning's ``configure_optimizers`` format) for the LOCA recipe, and the
    number of optimizer steps: peak lr ``base_lr * global batch / reference_batch``, linear warmup over
    ``warmup_epochs`` from 0, cosine to ``final_ratio * peak``. The factory's own lr default never wins."""
    total = max(1, int(trainer.estimated_stepping_batches))
    batch = global_batch_size(trainer)
    peak_lr = base_lr * batch / reference_batch
    warmup = int(round(warmup_epochs * steps_per_epoch(trainer, total)))
    optimizer = optimizer_factory([{k: v for k, v in g.items() if k != "names"} for g in groups])
    for group in optimizer.param_groups:
        group["lr"] = peak_lr
    scheduler = LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup, final_ratio))
    log.info("global batch %d, peak lr %.3g, %d steps (%d warmup)", batch, peak_lr, total, warmup)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}, total

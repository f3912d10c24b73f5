"""Parameter groups, learning-rate schedules and the EMA momentum schedule: plain functions, tested alone."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

# LightningCLI injects these: `optimizer: OptimizerCallable = AdamW` lets a config choose the class and its arguments
# while the module builds parameter groups itself.
OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]


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
    """Teacher momentum at ``step``: cosine from ``base`` (step 0) to ``final`` (last step, ``total_steps - 1``)."""
    if total_steps <= 1:
        return final
    progress = min(1.0, step / (total_steps - 1))
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
) -> list[dict]:
    """Optimizer parameter groups: no weight decay on 1-D parameters (biases, norms) nor on ``no_decay_names``;
    optional layer-wise lr decay (``lr_scale = layer_decay ** (num_layers + 1 - layer_id(name))``).

    Frozen parameters (``requires_grad=False``) are left out.
    """
    exclude = set(no_decay_names)
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and name not in exclude and name.rsplit(".", 1)[-1] not in exclude
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
    """SGD with Segmenter's defaults (lr 1e-3, momentum 0.9, no weight decay), so configs can name it plainly."""

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 **kwargs) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)


class LambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR that also applies each group's ``lr_scale`` (layer-wise decay) on top of the schedule."""

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [
            base_lr * lmbda(self.last_epoch) * group.get("lr_scale", 1.0)
            for lmbda, base_lr, group in zip(self.lr_lambdas, self.base_lrs, self.optimizer.param_groups)
        ]

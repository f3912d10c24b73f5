"""Compiling and sharding the LOCA networks: ``torch.compile`` in place, FSDP2 (``fully_shard``) under Lightning's
``ModelParallelStrategy``, and gradient clipping under classic FSDP. None of it changes what is computed, nor any
state-dict key: checkpoints move freely between compiled, eager, sharded and unsharded runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from loca_lightning.pretrain import losses

CompileScope = bool | Literal["blocks", "all"]


def check_compile_scope(scope: Any) -> None:
    """Raise ValueError unless ``scope`` is false, true, 'blocks' or 'all'."""
    if scope not in (False, True, "blocks", "all"):
        raise ValueError(f"compile must be false, true, 'blocks' or 'all', got {scope!r}")


def compile_in_place(module: L.LightningModule, scope: CompileScope, options: dict[str, Any]) -> None:
    """Compile LOCA's networks in place. ``"blocks"``: every transformer block of student and teacher. ``"all"`` (or
    true) also the heads, and the module's loss functions (``location_loss``, ``clustering_loss``, ``me_max_loss``,
    ``sinkhorn``): the work outside the backbone, memory-bound on [tokens, prototypes] tensors. The step calls the
    same attributes either way."""
    check_compile_scope(scope)
    if not scope:
        return
    for backbone in backbones(module):
        for block in backbone.blocks:
            block.compile(**options)
    if scope == "blocks":
        return
    for head in heads(module):
        head.compile(**options)
    module.location_loss = torch.compile(losses.location_loss, **options)
    module.clustering_loss = torch.compile(losses.clustering_loss, **options)
    module.me_max_loss = torch.compile(losses.me_max_loss, **options)
    module.sinkhorn = torch.compile(losses.sinkhorn_knopp, **options)


def backbones(module: L.LightningModule) -> list[nn.Module]:
    """The student's backbone and, when there is a teacher, the teacher's."""
    teacher = [module.teacher.backbone] if module.teacher is not None else []
    return [module.student.backbone, *teacher]


def heads(module: L.LightningModule) -> list[nn.Module]:
    """The location head and the projection heads of student and teacher (those that exist)."""
    found = [module.student.location_head]
    found += [n.projection for n in (module.student, module.teacher) if n is not None and n.projection is not None]
    return found


def shard_fsdp2(module: L.LightningModule, mesh: Any) -> None:
    """Shard student and teacher alike with FSDP2: one unit per transformer block, one per backbone and per head.

    The step calls backbones and heads directly (never ``student.forward``), so each is a root unit of its own.
    Sharded alike, the EMA update pairs local shards (a foreach lerp on DTensors).
    """
    from torch.distributed.fsdp import fully_shard

    names = mesh.mesh_dim_names or ()
    data_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    for backbone in backbones(module):
        for block in backbone.blocks:
            fully_shard(block, mesh=data_mesh)
    for root in backbones(module) + heads(module):
        fully_shard(root, mesh=data_mesh)


def reshard(modules: Iterable[nn.Module]) -> None:
    """Shard FSDP2 root units again: they keep their weights gathered after forward; the EMA pairs shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()


def clip_gradients(
    module: L.LightningModule, optimizer: torch.optim.Optimizer, value: float | None, algorithm: str | None
) -> None:
    """Clip by global norm; under classic FSDP through the root module, whose norm spans all shards (Lightning's
    FSDP precision plugin refuses ``gradient_clip_algorithm='norm'``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = module.trainer.model
    if value and isinstance(root, FullyShardedDataParallel) and algorithm in (None, "norm"):
        root.clip_grad_norm_(value)
        return
    if value and algorithm in (None, "norm") and _unscaled_fused(module, optimizer):
        # Lightning's mixed-precision plugin refuses to clip for an optimizer that could unscale gradients itself
        # (fused AdamW), even under bf16, where there is no scaler and the gradients are already true values.
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, value)
        return
    module.clip_gradients(optimizer, value, algorithm)


def _unscaled_fused(module: L.LightningModule, optimizer: torch.optim.Optimizer) -> bool:
    """A fused optimizer (it would unscale gradients in its step) under a precision without a gradient scaler."""
    handles_unscaling = getattr(optimizer, "_step_supports_amp_scaling", False)
    return bool(handles_unscaling) and getattr(module.trainer.precision_plugin, "scaler", None) is None

"""The LOCA recipe's optimizer and lr schedule from the run's size: the global batch (devices x nodes x per-device batch
x gradient accumulation) sets the peak lr, the steps per epoch set the warmup; gradient accumulation is warned about
once (:func:`accumulation_note`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from loca_lightning.lr_schedules import GroupScaledLambdaLR, warmup_cosine

log = logging.getLogger(__name__)


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


def accumulation_note(batch: int, accumulate: int) -> str:
    """What ``accumulate_grad_batches > 1`` changes for LOCA: the lr follows the accumulated batch, the batch-wide terms
    do not."""
    return (
        f"accumulate_grad_batches={accumulate}: the lr follows the accumulated global batch of {batch}, but the Sinkhorn "
        f"targets, the me-max mean and the loss normalisers each span one micro-batch of {batch // accumulate}, so "
        "this does not train like one batch of that size (measured: docs/scaling.md, Gradient accumulation). For the "
        "same step as one batch, set data.init_args.batch_size to the whole per-device batch, model.init_args."
        "micro_batch_size to what fits in memory and accumulate_grad_batches to 1"
    )


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
    if trainer.accumulate_grad_batches > 1:
        rank_zero_warn(accumulation_note(batch, trainer.accumulate_grad_batches), category=UserWarning)
    peak_lr = base_lr * batch / reference_batch
    warmup = int(round(warmup_epochs * steps_per_epoch(trainer, total)))
    optimizer = optimizer_factory([{k: v for k, v in g.items() if k != "names"} for g in groups])
    for group in optimizer.param_groups:
        group["lr"] = peak_lr
    scheduler = GroupScaledLambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup, final_ratio))
    log.info("global batch %d, peak lr %.3g, %d steps (%d warmup)", batch, peak_lr, total, warmup)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}, total

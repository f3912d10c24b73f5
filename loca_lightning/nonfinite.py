"""The non-finite guard: never train on a NaN or infinite loss; stop with the last good state saved, or skip the step.

The decision is taken over all processes, so every rank skips or stops together: a rank that stopped or skipped
alone would leave the others waiting in the next collective. A skipped step still runs a backward pass (of a zero
loss that reaches every parameter, so DDP's gradient all-reduce happens on every rank, as Lightning requires), then
drops the gradients: the optimizer leaves every parameter and its state untouched. The step still counts (global
step and lr schedule move on).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Literal, get_args

import lightning as L
import torch
from torch import Tensor

log = logging.getLogger(__name__)

Policy = Literal["stop", "skip"]  # the choices of on_nonfinite
POLICIES: tuple[str, ...] = get_args(Policy)


def any_rank_nonfinite(loss: Tensor, trainer: L.Trainer | None) -> bool:
    """True when the loss is not finite on this process or on any other (one host sync, one all-reduce)."""
    nonfinite = not bool(torch.isfinite(loss.detach()).all())
    if trainer is not None and trainer.world_size > 1:
        nonfinite = bool(trainer.strategy.reduce_boolean_decision(nonfinite, all=False))
    return nonfinite


class NonFiniteGuard:
    """Called on a step's loss terms (``terms["loss"]`` is their sum) by the module's ``training_step``; the module
    calls :meth:`after_backward` from ``on_after_backward`` and skips its own post-step work (the EMA) while
    :attr:`skipping`. ``enabled = False`` turns the check (one host sync per step) off, for benchmarks."""

    def __init__(self, policy: Policy = "stop") -> None:
        if policy not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.enabled = True
        self.skipping = False

    def __call__(self, terms: Mapping[str, Tensor], module: L.LightningModule) -> Tensor:
        """The loss to optimise: ``terms["loss"]``, or when it is not finite on some process, on every process: with
        ``"skip"`` a zero loss (the step is then skipped), with ``"stop"`` FloatingPointError after the last good state
        (weights before this step) was saved as ``nonfinite-step{N}.ckpt`` where the run keeps its checkpoints. The
        message names every loss term, so the cause is visible."""
        self.skipping = False
        trainer = module._trainer
        if not self.enabled or not any_rank_nonfinite(terms["loss"], trainer):
            return terms["loss"]
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items() if k.startswith("loss"))
        message = f"non-finite loss at step {module.global_step}: {parts}"
        if self.policy == "skip":
            log.warning("%s; skipping this step", message)
            self.skipping = True
            return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0
        saved = save_rescue_checkpoint(trainer, module.global_step) if trainer is not None else None
        hint = f"; the last good state is in {saved}" if saved else ""
        raise FloatingPointError(message + hint + " (set on_nonfinite: skip to skip such steps)")

    def after_backward(self, module: torch.nn.Module) -> None:
        """While skipping, drop the (zero) gradients: optimizers leave parameters without gradients untouched."""
        if self.skipping:
            for param in module.parameters():
                param.grad = None


def save_rescue_checkpoint(trainer: L.Trainer, step: int) -> str | None:
    """Save ``nonfinite-step{step}.ckpt`` next to the run's checkpoints (collective: every rank calls it)."""
    folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
    path = os.path.join(folder, f"nonfinite-step{step}.ckpt")
    try:
        trainer.save_checkpoint(path)
    except Exception as error:  # the FloatingPointError is the news; a failed rescue must not hide it
        log.error("could not save the last good state to %s: %s", path, error)
        return None
    return path

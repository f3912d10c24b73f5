"""A callback for pre-emption tests: it sends a real signal when training reaches a chosen phase of a chosen step."""

from __future__ import annotations

import os
import signal as signal_module

import lightning as L
import torch

PHASES = ("data", "forward", "backward", "optimizer")


class SignalAt(L.Callback):
    """Send ``signal`` once, in ``phase`` of the step that starts at global step ``step``, on the ranks in ``ranks``:
    ``data`` (just before the batch is fetched from the DataLoader), ``forward`` (the first module call of the
    training step), ``backward`` (a gradient hook), ``optimizer`` (after the optimizer step, before the EMA update).
    ``to``: ``self`` (this process), ``job`` (the whole process group: every rank and DataLoader worker, as srun
    delivers a signal)."""

    def __init__(
        self, step: int, phase: str, signal: str = "SIGTERM", ranks: list[int] | None = None, to: str = "self"
    ):
        assert phase in PHASES, phase
        self.step, self.phase, self.signum, self.to = step, phase, getattr(signal_module, signal), to
        self.ranks = ranks
        self.sent = False
        self._handles: list = []

    def _fire(self, trainer: L.Trainer) -> None:
        if self.sent or trainer.global_step != self.step or not trainer.training or trainer.sanity_checking:
            return
        if self.ranks is not None and trainer.global_rank not in self.ranks:
            return
        self.sent = True
        print(f"test: sending {self.signum!r} in {self.phase} of step {self.step} (rank {trainer.global_rank})")
        if self.to == "job":
            os.killpg(os.getpgrp(), self.signum)
        else:
            os.kill(os.getpid(), self.signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase == "data":
            # the fetcher calls profiler.start("...train_dataloader_next") right before it asks the DataLoader
            start = trainer.profiler.start

            def start_and_fire(action: str) -> None:
                start(action)
                if action.endswith("train_dataloader_next"):
                    self._fire(trainer)

            trainer.profiler.start = start_and_fire
        elif self.phase == "forward":
            self._handles.append(
                torch.nn.modules.module.register_module_forward_pre_hook(lambda *_: self._fire(trainer))
            )
        elif self.phase == "backward":
            param = next(p for p in pl_module.parameters() if p.requires_grad)
            self._handles.append(param.register_hook(lambda grad: (self._fire(trainer), grad)[1]))
        elif self.phase == "optimizer":
            for optimizer in trainer.optimizers:
                self._handles.append(optimizer.register_step_post_hook(lambda *_: self._fire(trainer)))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()

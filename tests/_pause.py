"""A callback for tests that kill a run: it holds the run still once a chosen step is done and checkpointed."""

from __future__ import annotations

import time

import lightning as L


class PauseAfter(L.Callback):
    """Sleep at the start of the batch after optimizer step ``step``: by then ``last.ckpt`` of that step is written
    (checkpoints are saved at the end of a batch), so a test that kills the process when it sees the step kills it
    there, mid-epoch, with the DataLoader workers alive, whatever the machine's speed."""

    def __init__(self, step: int, seconds: float = 120.0) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            time.sleep(self.seconds)

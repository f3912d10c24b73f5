"""The Preemption callback in one process with a plain Trainer: a SIGTERM mid-run stops after that step with
``hpc_ckpt_<step>.ckpt`` and exit status 75; one at the last step lets the run finish; the signal handlers are given
back either way."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from loca_lightning.preemption import EXIT_PREEMPTED, Preempted, Preemption


class SigtermAt(L.Callback):
    """Send SIGTERM to this process in the backward pass of the step that starts at global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit(tmp_path: Path, step: int, max_steps: int = 6) -> L.Trainer:
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        limit_train_batches=4,  # 4 batches per epoch: a stop at step 5 is mid-epoch
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Preemption(), SigtermAt(step)],
    )
    trainer.fit(BoringModel())
    return trainer


def test_sigterm_mid_run_stops_after_that_step_with_a_checkpoint(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stopped:
        _fit(tmp_path, step=4)
    assert stopped.value.code == EXIT_PREEMPTED
    assert signal.getsignal(signal.SIGTERM) is before  # given back
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("hpc_ckpt_*"))
    assert saved == ["hpc_ckpt_5.ckpt"], saved
    assert torch.load(tmp_path / "checkpoints" / "hpc_ckpt_5.ckpt", weights_only=True)["global_step"] == 5


def test_a_signal_at_the_last_step_lets_the_run_finish(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    trainer = _fit(tmp_path, step=5)  # the sixth and last step
    assert trainer.global_step == 6 and trainer.state.finished
    assert not list((tmp_path / "checkpoints").glob("hpc_ckpt_*"))
    assert signal.getsignal(signal.SIGTERM) is before

"""Pre-emption at a step boundary: the signal handler only records the request; every rank stops after the same step,
writes one checkpoint, rank 0 requeues the job under SLURM, and the run exits with :data:`EXIT_PREEMPTED`.

What the signals mean while fitting (:class:`Preemption`, the ``loca`` command's default):

- the requeue signal under SLURM (``--signal=SIGUSR1@90``; ``SLURMEnvironment.requeue_signal``, SIGUSR1 by default):
  stop, save, then global rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` once every rank has saved;
- SIGTERM (``scancel``, SLURM's own requeue, cloud pre-emption, Kubernetes) and SIGINT: stop, save, never requeue.
  A second SIGINT interrupts at once (KeyboardInterrupt), for a user at a terminal who does not want to wait.

Why not Lightning's handlers (``_SignalConnector``, lightning 2.6): its SLURM handler calls ``trainer.save_checkpoint``
inside the signal handler, wherever the main thread was interrupted. The step counter, the weights, the EMA and the
data position then come from different moments of one step (a requeued run ended a step short, weights off by 1e-3),
and the save is a collective (the random states of every rank are gathered) that the other ranks never enter when
only one received the signal, or enter from a different place: both ranks waited forever. Its SIGTERM handler
broadcasts inside the handler too, saves nothing and ends the run with status 0. So this callback replaces the
trainer's signal connector (never chaining Lightning's handlers) and decides with one all-reduce per optimizer step,
at the end of the step, as the non-finite guard does (:mod:`loca_lightning.nonfinite`).

The checkpoint is ``hpc_ckpt_<global step>.ckpt`` in the run's checkpoint folder, written by ``trainer.save_checkpoint``
at the same point of a step as ``ModelCheckpoint``'s own step checkpoints: weights, optimizer, lr schedule, EMA
teacher, every random stream of every rank and the data position. Older ``hpc_ckpt_*`` files there are removed once
it is written. :mod:`loca_lightning.resume` picks the newest good checkpoint by global step on restart.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from loca_lightning.distributed import destroy_process_groups

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped at a step boundary with a checkpoint; run it again to resume


class Preempted(SystemExit):
    """Raised on every rank once the pre-emption checkpoint is written; its ``code`` is :data:`EXIT_PREEMPTED`."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.message = message


class _KeepOurHandlers(_SignalConnector):
    """The trainer's signal connector with Lightning's handlers left out: :class:`Preemption` owns the signals."""

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False  # never set: Lightning's loops would end the run without a checkpoint

    def teardown(self) -> None:
        pass


def requeue_signal(trainer: L.Trainer) -> signal.Signals | None:
    """The signal that asks for a requeue: SLURM's (SIGUSR1 unless its environment names another), None off SLURM."""
    environment = trainer._accelerator_connector.cluster_environment
    if not isinstance(environment, SLURMEnvironment):
        return None
    return environment.requeue_signal or signal.SIGUSR1


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(L.Callback):
    """Stop at a step boundary on SIGTERM, SIGINT or (under SLURM) the requeue signal: every rank stops after the same
    optimizer step, ``hpc_ckpt_<step>.ckpt`` is saved, rank 0 runs ``scontrol requeue`` (requeue signal only) after
    all ranks saved, and :class:`Preempted` ends the run with :data:`EXIT_PREEMPTED`. ``requeue: false`` never
    requeues (a supervisor restarts the job instead)."""

    def __init__(self, requeue: bool = True) -> None:
        self.requeue = requeue
        self.received: dict[int, int] = {}  # signal number -> times received (written by the handler only)
        self._previous: dict[int, Any] = {}
        self._requeue_signal: signal.Signals | None = None
        self._pending: bool | None = None  # agreed to stop at the end of this epoch; requeue or not

    # -- signals -------------------------------------------------------------------------------------------------
    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Only record: the main thread may be anywhere (inside a collective, a DataLoader fetch, an optimizer step).
        self.received[signum] = self.received.get(signum, 0) + 1
        if signum == signal.SIGINT and self.received[signum] > 1:
            raise KeyboardInterrupt

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Own the signals for the whole fit, before any DataLoader worker is forked (workers inherit the handler,
        so a signal sent to the whole job does not kill them)."""
        if stage != "fit":
            return
        trainer._signal_connector = _KeepOurHandlers(trainer)
        self._requeue_signal = requeue_signal(trainer)
        self.received, self._pending = {}, None
        signals = {signal.SIGTERM, signal.SIGINT} | ({self._requeue_signal} if self._requeue_signal else set())
        for signum in signals:
            try:
                self._previous[signum] = signal.signal(signum, self._record)
            except ValueError:  # not the main thread (a Trainer driven from a thread): Lightning skips it too
                pass

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Give the signals back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Give the signals back when the fit ends with an exception (:class:`Preempted` included)."""
        self.teardown(trainer, pl_module, "fit")

    # -- the decision ------------------------------------------------------------------------------------------
    def _local_request(self) -> int:
        """0: none; 1: stop; 2: stop and requeue (the requeue signal came, and no SIGTERM/SIGINT said otherwise)."""
        if not self.received:
            return 0
        if self._requeue_signal is not None and self.requeue and set(self.received) == {int(self._requeue_signal)}:
            return 2
        return 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """After an optimizer step (and the EMA), all ranks agree whether to stop; if so, save and exit."""
        if trainer.fit_loop.epoch_loop._should_accumulate():  # mid-accumulation: the gradients are in no checkpoint
            return
        request = self._local_request()
        if trainer.world_size > 1:
            # one collective per step: any rank's request stops all; a SIGTERM anywhere vetoes the requeue
            stop = trainer.strategy.reduce_boolean_decision(request > 0, all=False)
            if not stop:
                return
            requeue = trainer.strategy.reduce_boolean_decision(request != 1, all=True)
        else:
            if not request:
                return
            requeue = request == 2
        if _training_ends_here(trainer):  # the run is complete after this step: finish it (exit 0), no requeue
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # Saved at the end of an epoch's last batch, a checkpoint resumes with Lightning's epoch bookkeeping one
            # epoch off (lightning 2.6 skips the next on_train_epoch_start and miscounts the epoch): stop at the
            # epoch's end instead, where ModelCheckpoint saves last.ckpt too (after an end-of-epoch validation).
            self._pending = requeue
            return
        self._stop(trainer, requeue)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop at the end of the epoch when all ranks agreed to at its last batch."""
        if self._pending is not None:
            self._stop(trainer, self._pending)

    def _stop(self, trainer: L.Trainer, requeue: bool) -> None:
        self._pending = None
        step = trainer.global_step
        folder = checkpoint_folder(trainer)
        path = os.path.join(folder, f"hpc_ckpt_{step}.ckpt")
        trainer.save_checkpoint(path)  # collective: every rank's random state is gathered, rank 0 writes
        trainer.strategy.barrier("loca-preempted")  # every rank has saved before anyone requeues or exits
        if trainer.is_global_zero:
            _remove_older(folder, keep=path)
        what = f"pre-empted: stopped after step {step}, saved {path}"
        if trainer.is_global_zero:
            # said before the requeue: SLURM's requeue of a running job kills it
            print(f"loca: {what}", flush=True)
            if requeue:
                what += "; " + _requeue()
                print(f"loca: {what}", flush=True)
            log.warning("%s (exit status %d)", what, EXIT_PREEMPTED)
        for logger in trainer.loggers:
            logger.finalize("preempted")
        # Lightning's teardown after an exception calls no collective; destroying the process group now keeps a gloo
        # worker thread from aborting the exit (loca_lightning.distributed).
        destroy_process_groups()
        raise Preempted(what)


def _training_ends_here(trainer: L.Trainer) -> bool:
    """True when this step completes the run (max_steps, or the last batch of the last epoch): the same on all ranks."""
    if trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1
    return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def checkpoint_folder(trainer: L.Trainer) -> str:
    """Where the run keeps its checkpoints (the checkpoint callback's folder, else ``default_root_dir``)."""
    return getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir


def _remove_older(folder: str, keep: str) -> None:
    for other in Path(folder).glob("hpc_ckpt_*.ckpt"):
        if re.fullmatch(r"hpc_ckpt_\d+\.ckpt", other.name) and other.resolve() != Path(keep).resolve():
            if other.is_file():
                other.unlink(missing_ok=True)


def _requeue() -> str:
    job = slurm_job_id()
    if job is None or not re.fullmatch(r"[0-9_]+", job):
        return f"not requeued: SLURM_JOB_ID is {job!r}"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"`scontrol requeue {job}` failed: {error}"
    if done.returncode != 0:
        return f"`scontrol requeue {job}` failed with status {done.returncode}: {done.stderr.strip()[-300:]}"
    return f"requeued SLURM job {job}"

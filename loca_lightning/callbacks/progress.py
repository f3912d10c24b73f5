"""Progress for logs that are not a terminal: one compact line every N steps instead of progress-bar redraws.

A TQDM bar redraws itself with carriage returns; piped into a file (``make demo > log``, a batch job's output) every
redraw stays, 650 KB for a 4-minute demo. :class:`ProgressLines` prints a line every ``every_n_steps`` training steps
(step, epoch, the progress-bar metrics such as the loss, steps/s and samples/s over the last interval, elapsed time and
ETA), one line per validation, and a line every ``every_n_batches`` batches of ``loca test`` / ``predict``.
``loca`` installs it in place of the TQDM bar when stdout is not a terminal; interactive use keeps the bar.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

import lightning as L
import torch
from lightning.pytorch.callbacks.progress import ProgressBar


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (``-`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _samples(batch: Any) -> int | None:
    """Leading size of the first tensor in a batch (dicts, lists and tuples searched in order)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, Sequence) else ()
    for value in values:
        if not isinstance(value, str):
            found = _samples(value)
            if found is not None:
                return found
    return None


def _number(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value
    if isinstance(value, float):
        return "?" if math.isinf(value) else f"{value:.4g}"
    return str(value)


class ProgressLines(ProgressBar):
    """Print a line every ``every_n_steps`` training steps and every ``every_n_batches`` test/predict batches, and one
    per validation; no carriage returns. Only the global-zero process prints."""

    def __init__(self, every_n_steps: int = 50, every_n_batches: int = 50, stream: IO[str] | None = None) -> None:
        super().__init__()
        if every_n_steps < 1 or every_n_batches < 1:
            raise ValueError(f"every_n_steps and every_n_batches must be >= 1, got {every_n_steps}, {every_n_batches}")
        self.every_n_steps, self.every_n_batches = every_n_steps, every_n_batches
        self.stream = stream
        self._enabled = True
        self._start = self._interval_start = 0.0
        self._interval_step = self._printed_step = 0
        self._samples_per_step: int | None = None
        self._eval_start = 0.0

    # ------------------------------------------------------------------ ProgressBar interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _print(self, text: str) -> None:
        if self._enabled:
            print(text, file=self.stream or sys.stdout, flush=True)

    def _metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        items = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        return "".join(f" {k} {_number(v)}" for k, v in items.items())

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._interval_start = time.monotonic()
        self._interval_step = self._printed_step = trainer.global_step  # a resumed run starts where it stopped
        total = trainer.estimated_stepping_batches  # -1 or inf when unknown (an iterable dataset without max_steps)
        self._total_steps = float(total) if total is not None and total > 0 else math.inf
        self._total_text = str(int(self._total_steps)) if math.isfinite(self._total_steps) else "?"
        self._first_step = trainer.global_step
        self._print(
            f"[fit] from step {trainer.global_step} to {self._total_text}, a line every {self.every_n_steps} steps"
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._samples_per_step is None:
            per_process = _samples(batch)
            if per_process is not None:
                self._samples_per_step = per_process * trainer.world_size * trainer.accumulate_grad_batches
        step = trainer.global_step
        if step == self._printed_step or step % self.every_n_steps:
            return
        self._printed_step = step
        now = time.monotonic()
        rate = (step - self._interval_step) / max(now - self._interval_start, 1e-9)  # steps/s, this interval
        mean_rate = (step - self._first_step) / max(now - self._start, 1e-9)
        self._interval_step, self._interval_start = step, now
        samples = f", {rate * self._samples_per_step:.1f} samples/s" if self._samples_per_step else ""
        eta = (self._total_steps - step) / mean_rate if mean_rate > 0 else math.inf
        self._print(
            f"[fit] step {step}/{self._total_text} epoch {trainer.current_epoch}"
            f"{self._metrics(trainer, pl_module)} | {rate:.2f} steps/s{samples} | "
            f"elapsed {format_duration(now - self._start)} ETA {format_duration(eta)}"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.monotonic() - self._start
        steps = trainer.global_step - self._first_step
        self._print(
            f"[fit] done: step {trainer.global_step}, {steps} steps in {format_duration(elapsed)} "
            f"({steps / max(elapsed, 1e-9):.2f} steps/s)"
        )

    # ------------------------------------------------------------------ evaluation
    def _eval_start_line(self) -> None:
        self._eval_start = time.monotonic()

    def _eval_batch_line(self, stage: str, batch_idx: int, total: Any) -> None:
        done = batch_idx + 1
        if done % self.every_n_batches:
            return
        elapsed = time.monotonic() - self._eval_start
        rate = done / max(elapsed, 1e-9)
        eta = (float(total) - done) / rate if isinstance(total, (int, float)) and math.isfinite(total) else math.inf
        shown = str(int(total)) if isinstance(total, (int, float)) and math.isfinite(total) else "?"
        self._print(
            f"[{stage}] batch {done}/{shown} | {rate:.2f} batches/s | "
            f"elapsed {format_duration(elapsed)} ETA {format_duration(eta)}"
        )

    def _eval_end_line(self, stage: str, count: int, trainer: L.Trainer, prefix: str | None) -> None:
        elapsed = time.monotonic() - self._eval_start
        metrics = {k: v for k, v in trainer.callback_metrics.items() if prefix and k.startswith(prefix)}
        shown = "".join(f" {k} {_number(v)}" for k, v in sorted(metrics.items()))
        step = f" at step {trainer.global_step}" if trainer.state.fn == "fit" else ""
        self._print(f"[{stage}] {count} batches in {format_duration(elapsed)}{step}{shown}")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start_line()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            count = int(sum(trainer.num_val_batches)) if trainer.num_val_batches else 0
            self._eval_end_line("validate", count, trainer, "val")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start_line()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_line("test", batch_idx, trainer.num_test_batches[dataloader_idx])

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end_line("test", int(sum(trainer.num_test_batches)), trainer, "test")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start_line()

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_line("predict", batch_idx, trainer.num_predict_batches[dataloader_idx])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end_line("predict", int(sum(trainer.num_predict_batches)), trainer, None)


def use_progress_lines(stream: IO[str] | None = None) -> bool:
    """Whether progress should be printed as lines: the output (stdout by default) is not a terminal."""
    stream = stream or sys.stdout
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced by an object without isatty
        return True

"""Progress output: compact lines (no redraws) when stdout is not a terminal, the TQDM bar when it is."""

from __future__ import annotations

import io
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from loca_lightning.callbacks import ProgressLines
from loca_lightning.callbacks.progress import format_duration


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(count: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(count, 2)), batch_size=4)


def test_lines_every_n_steps_with_metrics_rate_and_eta() -> None:
    out = io.StringIO()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[ProgressLines(every_n_steps=3, every_n_batches=2, stream=out)],
        val_check_interval=4,
    )
    assert isinstance(trainer.progress_bar_callback, ProgressLines)  # Lightning adds no TQDM bar next to it
    trainer.fit(Tiny(), _loader(), _loader(8))
    trainer.test(Tiny(), _loader())
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    steps = [line for line in lines if line.startswith("[fit] step")]
    assert [int(re.search(r"step (\d+)/8", line).group(1)) for line in steps] == [3, 6]
    pattern = r"\[fit\] step 3/8 epoch 0 loss [\d.e-]+ \| [\d.]+ steps/s, [\d.]+ samples/s \| elapsed \d:\d\d:\d\d ETA"
    assert re.match(pattern, steps[0]), steps[0]
    assert sum(line.startswith("[validate] 2 batches") and "at step" in line for line in lines) == 2
    assert any(line.startswith("[fit] done: step 8, 8 steps in") for line in lines)
    assert [line.split(" |")[0] for line in lines if line.startswith("[test] batch")] == [
        "[test] batch 2/4",
        "[test] batch 4/4",
    ]
    assert any(re.match(r"\[test\] 4 batches in \d:\d\d:\d\d test/loss [\d.]+", line) for line in lines)


def test_format_duration() -> None:
    assert format_duration(3725.4) == "1:02:05" and format_duration(float("inf")) == "-"


@pytest.mark.parametrize("terminal", [True, False])
def test_loca_prints_lines_when_stdout_is_not_a_terminal(monkeypatch, terminal: bool) -> None:
    import loca_lightning.cli as cli

    monkeypatch.setattr(cli, "use_progress_lines", lambda: not terminal)
    args = [
        "--model=loca_lightning.LOCAPretrainModule",
        "--model.backbone=vit_test_patch16",
        "--model.reference_size=64",
        "--data=loca_lightning.LOCAPretrainDataModule",
        "--trainer.logger=false",
        "--trainer.accelerator=cpu",
    ]
    bar = cli.LOCACLI(args=args, run=False).trainer.progress_bar_callback
    assert isinstance(bar, TQDMProgressBar if terminal else ProgressLines)
    # switched off, or a bar of the config's own: left as configured
    assert (
        cli.LOCACLI(args=[*args, "--trainer.enable_progress_bar=false"], run=False).trainer.progress_bar_callback
        is None
    )
    own = cli.LOCACLI(args=[*args, "--trainer.callbacks+=TQDMProgressBar"], run=False).trainer.progress_bar_callback
    assert isinstance(own, TQDMProgressBar)

"""Saving a ``loca`` run's resolved config inside the run's own folder, never over a file the run did not write.

Lightning's SaveConfigCallback writes ``config.yaml`` to ``trainer.log_dir``, which is the current folder when there
is no logger, and the CLI saved with overwrite allowed: ``loca fit --config config.yaml --trainer.logger=false``
replaced the user's own file. Here the folder is the logger's version folder, or the checkpoint folder without a
logger, and an existing file is replaced only when it is a config this project wrote there (it starts with
:data:`HEADER`) and not one of the run's own ``--config`` inputs; otherwise the config goes to ``config-1.yaml``,
``config-2.yaml``, ... whichever is free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

HEADER = "# Resolved config of a loca run, written by the run itself (loca_lightning.callbacks.SaveRunConfig)."


def run_folder(trainer: L.Trainer) -> str | None:
    """The run's own folder: the logger's version folder, else the checkpoint folder (None without either).

    Collective under a logger (``trainer.log_dir`` broadcasts rank 0's folder): call it on every process.
    """
    if trainer.loggers:
        return trainer.log_dir
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    # ModelCheckpoint resolves a missing dirpath to <default_root_dir>/checkpoints when there is no logger.
    return getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")


class SaveRunConfig(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in :func:`run_folder`, never over a file the run did not write."""

    def __init__(
        self,
        parser: Any,
        config: Any,
        config_filename: str = "config.yaml",
        overwrite: bool = False,
        multifile: bool = False,
        save_to_log_dir: bool = True,
    ) -> None:
        # `overwrite` is accepted for LightningCLI's signature and ignored: only this project's own files are replaced.
        super().__init__(parser, config, config_filename, overwrite, multifile, save_to_log_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        # Without a logger only training has a folder of its own (its checkpoints); test/predict would create one.
        own_folder = self.save_to_log_dir and (trainer.loggers or stage == "fit")
        folder = run_folder(trainer) if own_folder else None
        if trainer.is_global_zero:
            if folder is not None:
                path = self.write(folder)
                rank_zero_info(f"config of this run: {path}")
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)

    def write(self, folder: str) -> str:
        """Write the config into ``folder`` under the first name that is free or holds a config this run may replace."""
        fs = get_filesystem(folder)
        fs.makedirs(folder, exist_ok=True)
        text = HEADER + "\n" + self.parser.dump(self.config, skip_none=False)
        inputs = {_resolved(str(p)) for p in (self.config.get("config") or []) if p is not None}
        stem, suffix = os.path.splitext(self.config_filename)
        for attempt in range(1000):
            name = self.config_filename if attempt == 0 else f"{stem}-{attempt}{suffix}"
            path = os.path.join(folder, name)
            if _resolved(path) in inputs or (fs.exists(path) and not _written_by_a_run(fs, path)):
                continue
            with fs.open(path, "w") as handle:
                handle.write(text)
            return path
        raise FileExistsError(f"no free config file name in {folder!r} (tried {self.config_filename} and 999 more)")


def _written_by_a_run(fs: Any, path: str) -> bool:
    try:
        with fs.open(path, "r") as handle:
            return handle.readline().rstrip("\n") == HEADER
    except (OSError, UnicodeDecodeError):
        return False


def _resolved(path: str) -> str:
    return str(Path(path).resolve()) if "://" not in path else path

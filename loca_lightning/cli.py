"""The ``loca`` command: LightningCLI (fit / validate / test / predict) plus ``loca export`` and ``loca import-release``.

Model and data are chosen in the config by class path, so one entry point serves pretraining and segmentation::

    loca fit --config configs/pretrain.yaml
    loca test --config configs/seg_ade.yaml --ckpt_path runs/seg_ade/.../last.ckpt
    loca export runs/pretrain/.../last.ckpt vit_b16_loca.pth --weights teacher
    loca import-release /path/to/release/checkpoint_100000 imported/loca_vitb16
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from loca_lightning.backbones.registry import backbone_patch_size
from loca_lightning.callbacks import ProgressLines, SaveRunConfig, SegmentationPredictionWriter
from loca_lightning.callbacks.progress import use_progress_lines
from loca_lightning.checkpointing import AtomicCheckpointIO
from loca_lightning.data.arguments import missing_message
from loca_lightning.data.pretrain import keep_freed_memory
from loca_lightning.distributed import destroy_process_groups
from loca_lightning.preemption import Preemption
from loca_lightning.resume import ResumeError, check_ckpt_path, resolve_ckpt_path

DESCRIPTION = (
    "LOCA pretraining and semantic-segmentation finetuning of Vision Transformers. "
    "Subcommands: fit, validate, test, predict (LightningCLI, configured with --config FILE) and "
    "`loca export CKPT OUT [--weights teacher|student] [--force]` (timm weights) and "
    "`loca import-release SRC OUT [--weights teacher|student] [--force] [--custom-size]` (the authors' flax checkpoints "
    "as a LOCA module checkpoint and timm weights)."
)


EXIT_SKIPPED_IMAGES = 3  # `loca predict` wrote what it could but skipped unreadable images


class LOCACLI(LightningCLI):
    """LightningCLI with the project's defaults: TensorBoard under ``runs/``, ``last.ckpt`` kept (written atomically),
    lr logged per step, the resolved config saved in the run's own folder (:class:`SaveRunConfig`), progress as lines
    when stdout is not a terminal (:class:`ProgressLines`)."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        self.exit_code = 0  # the `loca` command's exit status once the subcommand has run
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,  # in the run's own folder, never over a file the run did not write
            auto_configure_optimizers=False,  # modules build their own optimizers from injected callables
            seed_everything_default=0,
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "loca"},
                },
            },
            parser_kwargs={"description": DESCRIPTION},
            args=list(args) if args is not None else None,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Always-on callbacks with their own config sections (`checkpoint:`, `lr_monitor:`), so a config that sets
        # trainer.callbacks does not silently lose them.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        # Writes masks during `loca predict` (`prediction_writer:` section); its hooks are predict-only.
        parser.add_lightning_class_args(SegmentationPredictionWriter, "prediction_writer")
        # LOCA's geometry is given once, by the model: the views take its reference size and its backbone's patch
        # size (links whose keys a model or DataModule does not have, e.g. segmentation's, are not applied).
        views = "data.init_args.views.init_args"
        parser.link_arguments("model.init_args.reference_size", f"{views}.reference_size")
        backbone = ("model.init_args.backbone", "model.init_args.backbone_kwargs")
        parser.link_arguments(backbone, f"{views}.patch_size", compute_fn=backbone_patch_size)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads an explicit checkpoint's hyperparameters here, first of all: one that does not load is named
        # in one line instead of a traceback.
        subcommand = self.config.get("subcommand")
        try:
            check_ckpt_path(self.config[subcommand].get("ckpt_path") if subcommand else None)
        except ResumeError as error:
            print(f"loca: error: {error}", file=sys.stderr)
            sys.exit(2)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """Name the required data arguments a config leaves unset, in one line, before anything is built."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        data = config.get("data")
        if data is None or not data.get("class_path"):
            return
        module, _, name = data["class_path"].rpartition(".")
        check = getattr(getattr(importlib.import_module(module), name, None), "missing_arguments", None)
        missing = check(**dict(data.get("init_args") or {})) if check is not None else []
        if missing:
            print(f"loca: error: {missing_message(missing)}", file=sys.stderr)
            sys.exit(2)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[L.Callback]) -> L.Trainer:
        # Atomic checkpoint writes by default: a crash while writing last.ckpt must not destroy the previous one.
        # A config that names its own CheckpointIO plugin keeps it.
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config = {**config, "plugins": plugins + [AtomicCheckpointIO()]}
        # Pre-emption stops at a step boundary with a checkpoint (loca_lightning/preemption.py), unless a config names
        # its own Preemption callback (e.g. with requeue: false).
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, (list, tuple)) else [configured]
        if not any(isinstance(c, Preemption) for c in [*configured, *callbacks]):
            callbacks = [*callbacks, Preemption()]
        # Output that is not a terminal (a log file, a pipe) gets a line every N steps instead of a redrawn bar; a
        # config that names its own progress bar, or switches it off, keeps that.
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, (list, tuple)) else [configured]
        has_bar = any(isinstance(c, ProgressBar) for c in [*configured, *callbacks])
        if config.get("enable_progress_bar") is not False and not has_bar and use_progress_lines():
            callbacks = [*callbacks, ProgressLines()]
        return super()._instantiate_trainer(config, callbacks)

    def after_instantiate_classes(self) -> None:
        """Drop the lr monitor when there is no logger (`--trainer.logger false`): it would refuse to start."""
        super().after_instantiate_classes()
        if self.trainer is not None and not self.trainer.loggers:
            self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, LearningRateMonitor)]

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit`` with ``--ckpt_path last`` resolved to the run's newest good checkpoint (and its own version
        folder), a requeued SLURM job resuming by itself, and a checkpoint that does not load named in one line."""
        try:
            kwargs["ckpt_path"] = resolve_ckpt_path(self.trainer, kwargs.get("ckpt_path"))
        except ResumeError as error:
            print(f"loca: error: {error}", file=sys.stderr)
            sys.exit(2)
        self.trainer.fit(**kwargs)

    def predict(self, **kwargs: Any) -> None:
        """``trainer.predict`` without keeping every mask in memory: the writer has them on disk already. Images the
        writer had to skip (unreadable files) make the command's exit status :data:`EXIT_SKIPPED_IMAGES`."""
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)
        writers = [c for c in self.trainer.callbacks if isinstance(c, SegmentationPredictionWriter)]
        if any(writer.num_skipped for writer in writers):
            self.exit_code = EXIT_SKIPPED_IMAGES


def tune_malloc() -> None:
    """Let glibc keep freed memory for reuse in this process unless ``LOCA_KEEP_FREED_MEMORY=0``.

    Training allocates and frees the same large temporaries every step; by default glibc unmaps them and the next
    step page-faults them in again (the gain and the memory it costs: benchmarks/README.md, `run.py --keep-memory
    both`). DataLoader workers always do this (``keep_freed_memory`` is their ``worker_init_fn``).
    """
    if os.environ.get("LOCA_KEEP_FREED_MEMORY", "1") != "0":
        keep_freed_memory()


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``loca`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    tune_malloc()
    if argv and argv[0] == "export":
        from loca_lightning.export import export_main

        export_main(argv[1:])
        return
    if argv and argv[0] == "import-release":
        from loca_lightning.release import import_release_main

        import_release_main(argv[1:])
        return
    cli = LOCACLI(args=None if args is None else argv)
    # Only after a successful command: a failed one exits with its error, and a peer that is still inside a
    # collective could make the teardown wait for the process-group timeout.
    destroy_process_groups()
    if cli.exit_code:
        sys.exit(cli.exit_code)


if __name__ == "__main__":
    main()

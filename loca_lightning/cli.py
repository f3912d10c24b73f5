"""The ``loca`` command: LightningCLI (fit / validate / test / predict) plus ``loca export`` and ``loca import-release``.

Model and data are chosen in the config by class path, so one entry point serves pretraining and segmentation::

    loca fit --config configs/pretrain.yaml
    loca test --config configs/seg_ade.yaml --ckpt_path runs/seg_ade/.../last.ckpt
    loca export runs/pretrain/.../last.ckpt vit_b16_loca.pth --weights teacher
    loca import-release /path/to/release/checkpoint_100000 imported/loca_vitb16
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from loca_lightning.backbones.registry import backbone_patch_size
from loca_lightning.callbacks.progress import ProgressLines, use_progress_lines
from loca_lightning.callbacks.run_config import SaveRunConfig
from loca_lightning.checkpointing import AtomicCheckpointIO
from loca_lightning.data.arguments import missing_message
from loca_lightning.distributed import destroy_process_groups
from loca_lightning.errors import check_devices, one_line_user_errors
from loca_lightning.malloc import tune_malloc
from loca_lightning.preemption import Preemption
from loca_lightning.resume import ResumeError, check_ckpt_path, resolve_ckpt_path

DESCRIPTION = (
    "LOCA pretraining and semantic-segmentation finetuning of Vision Transformers. fit, validate, test and predict are "
    "LightningCLI's, configured with --config FILE; `loca SUBCOMMAND --help` shows each one's arguments."
)

# Subcommands beside LightningCLI's: name -> ("module:function" called with the remaining arguments, one-line help).
# Each module is imported only when its subcommand runs (`loca export` loads neither the datasets nor OpenCV);
# `loca --help` lists them with fit and the others. A new subcommand is one entry.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "export": ("loca_lightning.export:export_main", "Write a checkpoint's backbone as timm weights (.pth and .json)."),
    "import-release": (
        "loca_lightning.release:import_release_main",
        "Convert the authors' flax checkpoint into a LOCA module checkpoint and timm weights.",
    ),
    "shards": (
        "loca_lightning.data.shard_writer:shards_main",
        "Write a folder or a path list of images as WebDataset tar shards (for --data.init_args.shards).",
    ),
}


EXIT_SKIPPED_IMAGES = 3  # `loca predict` wrote what it could but skipped unreadable images


class LOCACLI(LightningCLI):
    """LightningCLI with the project's defaults: TensorBoard under ``runs/``, ``last.ckpt`` kept (written atomically),
    lr logged per step, the resolved config saved in the run's own folder (:class:`SaveRunConfig`), progress as lines
    when stdout is not a terminal (:class:`ProgressLines`)."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        self.exit_code = 0  # the `loca` command's exit status once the subcommand has run
        with one_line_user_errors():  # a mistake in a config or a file ends in one line; a bug keeps its traceback
            self._build_and_run(args, run)

    def _build_and_run(self, args: Sequence[str] | None, run: bool) -> None:
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

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        # List SUBCOMMANDS in `loca --help` next to fit; :func:`main` runs them before this parser is built.
        super()._add_subcommands(parser, **kwargs)
        for name, (_, help_line) in SUBCOMMANDS.items():
            parser._subcommands_action.add_subcommand(
                name, LightningArgumentParser(description=help_line), help=help_line
            )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from loca_lightning.callbacks.prediction import SegmentationPredictionWriter  # OpenCV: only under LightningCLI

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
        """Name the required data arguments a config leaves unset, and GPUs it asks for that this machine does not
        have, in one line, before anything is built."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        data = config.get("data")
        missing = []
        if data is not None and data.get("class_path"):
            module, _, name = data["class_path"].rpartition(".")
            check = getattr(getattr(importlib.import_module(module), name, None), "missing_arguments", None)
            missing = check(**dict(data.get("init_args") or {})) if check is not None else []
        if missing:
            print(f"loca: error: {missing_message(missing)}", file=sys.stderr)
            sys.exit(2)
        check_devices(config.get("trainer") or {})

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[L.Callback]) -> L.Trainer:
        # Atomic checkpoint writes by default: a crash while writing last.ckpt must not destroy the previous one.
        # A config that names its own CheckpointIO plugin keeps it.
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config = {**config, "plugins": plugins + [AtomicCheckpointIO()]}
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, (list, tuple)) else [configured]
        # Pre-emption stops at a step boundary with a checkpoint (loca_lightning/preemption.py), unless a config names
        # its own Preemption callback (e.g. with requeue: false).
        if not any(isinstance(c, Preemption) for c in [*configured, *callbacks]):
            callbacks = [*callbacks, Preemption()]
        # Output that is not a terminal (a log file, a pipe) gets a line every N steps instead of a redrawn bar; a
        # config that names its own progress bar, or switches it off, keeps that.
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
        from loca_lightning.callbacks.prediction import SegmentationPredictionWriter

        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)
        writers = [c for c in self.trainer.callbacks if isinstance(c, SegmentationPredictionWriter)]
        if any(writer.num_skipped for writer in writers):
            self.exit_code = EXIT_SKIPPED_IMAGES


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``loca`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    tune_malloc()
    if argv and argv[0] in SUBCOMMANDS:
        module, _, function = SUBCOMMANDS[argv[0]][0].partition(":")
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    cli = LOCACLI(args=None if args is None else argv)
    # Only after a successful command: a failed one exits with its error, and a peer that is still inside a
    # collective could make the teardown wait for the process-group timeout.
    destroy_process_groups()
    if cli.exit_code:
        sys.exit(cli.exit_code)


if __name__ == "__main__":
    main()

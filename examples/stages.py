"""The stages the demo and the experiment share: ``loca fit`` runs in this process, and what is read back from them.

Every stage runs the real ``loca`` entry point (:class:`~loca_lightning.cli.LOCACLI`) with ``args=``, on the configs
of ``configs/demo/`` in this checkout (found next to this folder, or in a folder given with ``--config-dir``).
"""

from __future__ import annotations

import resource
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loca_lightning.cli import LOCACLI
from loca_lightning.data.synthetic import SyntheticScenes
from loca_lightning.pretrain.evaluation import location_accuracy
from loca_lightning.pretrain.module import LOCAPretrainModule

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "demo"  # examples/ sits next to configs/
# Pretraining variants: CLI overrides on top of the pretraining config, and the weights finetuning starts from.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "loca": ([], "teacher"),
    "loca_location_only": (["--model.init_args.apply_cluster_loss=false"], "student"),
}
INIT_NAMES = {"loca": "LOCA", "loca_location_only": "LOCA, location only", "random": "random init"}
# Scenes for the location-accuracy check: neither pretraining (synthetic_seed 100 + seed) nor segmentation (scene seeds
# 3 * seed + 0, 1, 2 for its train/val/test splits) draws from them for any seed below 33.
HELD_OUT_SEED = 99


def log(message: str, start: float) -> None:
    """Print ``message`` with the seconds since ``start``."""
    print(f"[demo {time.perf_counter() - start:6.0f}s] {message}", flush=True)


def config_path(name: str, config_dir: str | Path | None = None) -> Path:
    """``<config_dir>/<name>`` when that file exists, else ``configs/demo/<name>`` of this checkout."""
    for folder in ([Path(config_dir)] if config_dir else []) + [CONFIG_DIR]:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"demo config {name!r} found neither in {config_dir} nor in {CONFIG_DIR}")


def run_cli(args: Sequence[str]) -> LOCACLI:
    """Run ``loca <args>`` in this process and return the CLI object (trainer, model and datamodule inside)."""
    with warnings.catch_warnings():
        # LightningCLI parses `args` only; it merely warns that sys.argv (the demo's own flags) holds something else.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return LOCACLI(args=list(args))


def pretrain(out: Path, seed: int, variant: str, extra: Sequence[str] = (), config_dir: str | None = None) -> LOCACLI:
    """``loca fit --config configs/demo/pretrain.yaml`` with logs and checkpoints under ``out/pretrain_<variant>``."""
    overrides, _ = VARIANTS[variant]
    args = [
        "fit", f"--config={config_path('pretrain.yaml', config_dir)}",
        f"--seed_everything={seed}", f"--data.init_args.seed={seed}", f"--data.init_args.synthetic_seed={100 + seed}",
        f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name=pretrain_{variant}",
        *overrides, *extra,
    ]  # fmt: skip
    return run_cli(args)


def finetune(
    out: Path,
    seed: int,
    name: str,
    pretrained: str | None,
    weights: str = "teacher",
    label_fraction: float = 1.0,
    extra: Sequence[str] = (),
    config_dir: str | None = None,
) -> tuple[LOCACLI, dict[str, float]]:
    """``loca fit --config configs/demo/seg.yaml`` from ``pretrained`` (None: random init), then test-split metrics."""
    args = [
        "fit", f"--config={config_path('seg.yaml', config_dir)}",
        f"--seed_everything={seed}", f"--data.init_args.seed={seed}", f"--data.init_args.label_fraction={label_fraction}",
        f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name={name}",
        f"--model.init_args.pretrained={pretrained or 'null'}", f"--model.init_args.pretrained_weights={weights}",
        *extra,
    ]  # fmt: skip
    cli = run_cli(args)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    result = cli.model.last_test_result
    metrics = {k: float(result[k]) for k in ("mIoU", "mAcc", "aAcc")}
    return cli, metrics


def heldout_location_accuracy(
    model: LOCAPretrainModule, views: Any, num_images: int = 256, image_size: int = 96
) -> float:
    """Location accuracy on held-out scenes (same views and masking as training, eval mode, fixed draws)."""
    scenes = SyntheticScenes(length=num_images, image_size=image_size, seed=HELD_OUT_SEED, with_masks=False)
    return location_accuracy(model, views, [scenes[i]["image"] for i in range(num_images)], seed=HELD_OUT_SEED)


def read_scalars(log_dir: str | Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a scalar written to TensorBoard under ``log_dir`` (empty arrays if absent)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags().get("scalars", []):
        return np.zeros(0), np.zeros(0)
    scalars = events.Scalars(tag)
    return np.array([s.step for s in scalars]), np.array([s.value for s in scalars])


def peak_memory_mb() -> float:
    """Peak resident memory of this process plus its largest finished child (DataLoader workers), in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024.0  # ru_maxrss is in kB on Linux


def smoothed_tail(values: np.ndarray, count: int = 20) -> float:
    """Mean of the last ``count`` values (NaN when empty)."""
    return float(np.mean(values[-count:])) if len(values) else float("nan")


def pretrain_summary(cli: LOCACLI, location_images: int = 256) -> dict[str, Any]:
    """Checkpoint, steps, location accuracy (training tail and held-out), their curve and the dense probe's curve."""
    model = cli.model
    log_dir = cli.trainer.logger.log_dir
    steps, acc = read_scalars(log_dir, "train/acc_location")
    probe_steps, probe = read_scalars(log_dir, "probe/mIoU")  # empty when the config runs no OnlineDenseProbe
    return {
        "checkpoint": cli.trainer.checkpoint_callback.last_model_path,
        "log_dir": log_dir,
        "steps": int(cli.trainer.global_step),
        "backbone": model.hparams.backbone,
        "chance": 1.0 / model.num_positions,
        "location_accuracy_train": smoothed_tail(acc),
        "location_accuracy_heldout": heldout_location_accuracy(
            model, cli.datamodule.views, location_images, cli.datamodule.hparams.synthetic_image_size
        ),
        "probe_miou": float(probe[-1]) if len(probe) else None,
        "curve": (steps.tolist(), acc.tolist()),
        "probe_curve": (probe_steps.tolist(), probe.tolist()),
    }


def overrides(pairs: Sequence[str]) -> list[str]:
    """``key=value`` pairs -> ``--key=value`` CLI overrides."""
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"overrides must look like key=value (e.g. trainer.max_epochs=2), got {pair!r}")
    return [f"--{pair.lstrip('-')}" for pair in pairs]

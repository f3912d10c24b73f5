"""The one-command demo (``make demo``) and the longer experiment (``make experiment``), on synthetic scenes and a CPU.

Demo: LOCA pretraining (``configs/demo/pretrain.yaml``) -> linear-decoder finetuning (``configs/demo/seg.yaml``) from
the LOCA backbone and from random init with the same budget, data and seed -> test mIoU of each, the location
accuracy pretraining reached, a figure and a results file under ``--out``. Every stage runs the real ``loca``
entry point (:class:`~loca_lightning.cli.LOCACLI`) in this process, so the demo is also a run of ``loca fit``.

Experiment: the same recipe over several seeds, full labels and a 10% label split, LOCA vs location-only LOCA vs
random init; mean and standard deviation in ``results.md`` and every number in ``results.json``.

    python -m loca_lightning.demo --out runs/demo
    python -m loca_lightning.demo --experiment --out runs/experiment --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loca_lightning.cli import LOCACLI, tune_malloc
from loca_lightning.data.synthetic import SyntheticScenes, colorize_mask
from loca_lightning.pretrain.module import LOCAPretrainModule

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "demo"
# Pretraining variants: CLI overrides on top of the pretraining config, and the weights finetuning starts from.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "loca": ([], "teacher"),
    "loca_location_only": (["--model.init_args.apply_cluster_loss=false"], "student"),
}
INIT_NAMES = {"loca": "LOCA", "loca_location_only": "LOCA, location only", "random": "random init"}
HELD_OUT_SEED = 99  # scenes for the location-accuracy check: neither pretraining (100+) nor segmentation (0-5)


def _log(message: str, start: float) -> None:
    print(f"[demo {time.perf_counter() - start:6.0f}s] {message}", flush=True)


def config_path(name: str, config_dir: str | Path | None = None) -> Path:
    """``configs/demo/<name>`` next to the package (source checkout), else under the current directory."""
    for folder in ([Path(config_dir)] if config_dir else []) + [CONFIG_DIR, Path("configs") / "demo"]:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"demo config {name!r} not found in {config_dir or CONFIG_DIR} nor ./configs/demo")


def run_cli(args: Sequence[str]) -> LOCACLI:
    """Run ``loca <args>`` in this process and return the CLI object (trainer, model and datamodule inside)."""
    argv = sys.argv
    sys.argv = argv[:1]  # the demo's own flags are not the CLI's (LightningCLI warns when it sees both)
    try:
        return LOCACLI(args=list(args))
    finally:
        sys.argv = argv


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


@torch.no_grad()
def location_accuracy(model: LOCAPretrainModule, views: Any, num_images: int = 256, image_size: int = 96) -> float:
    """Location accuracy on held-out scenes (same views and masking as training, eval mode, fixed draws)."""
    scenes = SyntheticScenes(length=num_images, image_size=image_size, seed=HELD_OUT_SEED, with_masks=False)
    was_training = model.training
    model.eval()
    hits = valid = 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the masks drawn here are the same for every model compared
            for start in range(0, num_images, 64):
                stop = min(num_images, start + 64)
                items = [views(scenes[i]["image"], np.random.default_rng((HELD_OUT_SEED, i))) for i in range(start, stop)]
                batch = {k: torch.from_numpy(np.stack([item[k] for item in items])) for k in items[0]}
                size = batch["reference"].shape[0]
                keep = model.select_reference_keep(size)  # [B, Kr]
                keys, _ = model.encode_reference(model.normalize(batch["reference"]), keep)
                large_keep = model.select_query_keep(size, batch["target_large"].shape[1])  # [B, Kq]
                queries = (model.normalize(batch["query_large"]), model.normalize(batch["query_focal"]))
                tokens = model.encode_queries(*queries, large_keep)  # [B, Q, D]
                target = torch.cat([torch.gather(batch["target_large"], 1, large_keep), batch["target_focal"].flatten(1)], 1)
                logits = model.student.location_head(tokens, keys)  # [B, Q, P]
                labelled = target >= 0
                hits += int(((logits.argmax(-1) == target) & labelled).sum())
                valid += int(labelled.sum())
    finally:
        model.train(was_training)
    return hits / max(valid, 1)


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


@torch.no_grad()
def predict_masks(model: Any, images: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Predicted class masks ``[H, W]`` of uint8 images ``[3, H, W]`` with the model's configured inference."""
    was_training = model.training
    model.eval()
    try:
        return [model.predict_logits(image[None]).argmax(1)[0].numpy() for image in images]
    finally:
        model.train(was_training)


def save_figure(path: Path, samples: list[dict], predictions: dict[str, list[np.ndarray]], curves: dict) -> None:
    """PNG: rows of image / ground truth / each model's prediction, then pretraining and finetuning curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(predictions)
    rows, cols = 2 + len(names), len(samples)
    fig = plt.figure(figsize=(1.6 * max(cols, 6), 1.6 * rows + 2.6))
    grid = fig.add_gridspec(rows + 1, max(cols, 3), height_ratios=[1] * rows + [1.6], hspace=0.35)
    labels = ["image", "ground truth"] + [f"{INIT_NAMES.get(n, n)}" for n in names]
    for j, sample in enumerate(samples):
        pictures = [sample["image"].permute(1, 2, 0).numpy(), colorize_mask(sample["mask"].numpy())]
        pictures += [colorize_mask(predictions[n][j]) for n in names]
        for i, picture in enumerate(pictures):
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(labels[i], fontsize=8)
    panels = [
        ("pretraining: location accuracy", curves.get("location", {}), "step"),
        ("finetuning: training loss", curves.get("loss", {}), "step"),
        ("finetuning: validation mIoU", curves.get("miou", {}), "step"),
    ]
    span = max(cols, 3) // 3
    for k, (title, series, xlabel) in enumerate(panels):
        ax = fig.add_subplot(grid[rows, k * span : (k + 1) * span if k < 2 else max(cols, 3)])
        for label, (steps, values) in series.items():
            if len(steps):
                ax.plot(steps, values, label=INIT_NAMES.get(label, label), marker="o" if len(steps) < 12 else None)
        if "chance" in curves and k == 0:
            ax.axhline(curves["chance"], color="grey", linestyle=":", label="chance")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def smoothed_tail(values: np.ndarray, count: int = 20) -> float:
    """Mean of the last ``count`` values (NaN when empty)."""
    return float(np.mean(values[-count:])) if len(values) else math.nan


def format_demo_table(results: dict) -> str:
    """Markdown table of the demo's results (percentages)."""
    lines = ["| init | mIoU | mAcc | aAcc |", "|---|---|---|---|"]
    for name, metrics in results["finetune"].items():
        lines.append(
            f"| {INIT_NAMES.get(name, name)} | {100 * metrics['mIoU']:.1f} | {100 * metrics['mAcc']:.1f} "
            f"| {100 * metrics['aAcc']:.1f} |"
        )
    pre = results["pretrain"]
    lines.append("")
    lines.append(
        f"LOCA location accuracy: {100 * pre['location_accuracy_heldout']:.1f}% on held-out scenes "
        f"(training, last 20 steps: {100 * pre['location_accuracy_train']:.1f}%; chance {100 * pre['chance']:.1f}%)"
    )
    return "\n".join(lines)


def _pretrain_summary(cli: LOCACLI, location_images: int = 256) -> dict[str, Any]:
    model = cli.model
    log_dir = cli.trainer.logger.log_dir
    steps, acc = read_scalars(log_dir, "train/acc_location")
    return {
        "checkpoint": cli.trainer.checkpoint_callback.last_model_path,
        "log_dir": log_dir,
        "steps": int(cli.trainer.global_step),
        "backbone": model.hparams.backbone,
        "chance": 1.0 / model.num_positions,
        "location_accuracy_train": smoothed_tail(acc),
        "location_accuracy_heldout": location_accuracy(
            model, cli.datamodule.views, location_images, cli.datamodule.hparams.synthetic_image_size
        ),
        "curve": (steps.tolist(), acc.tolist()),
    }


def run_demo(
    out: str | Path,
    seed: int = 0,
    pretrain_extra: Sequence[str] = (),
    finetune_extra: Sequence[str] = (),
    config_dir: str | None = None,
    num_figure_images: int = 6,
    location_images: int = 256,
) -> dict[str, Any]:
    """Pretrain, finetune from LOCA and from random init, evaluate; write results.json/.md and demo.png under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _log(f"1/3 LOCA pretraining on synthetic scenes (logs: {out}/pretrain_loca)", start)
    pre_cli = pretrain(out, seed, "loca", pretrain_extra, config_dir)
    pre = _pretrain_summary(pre_cli, location_images)
    # Both finetuning runs build the pretrained architecture; only the initial weights differ.
    finetune_extra = [f"--model.init_args.backbone={pre['backbone']}", *finetune_extra]
    _log(
        f"pretraining done: {pre['steps']} steps, held-out location accuracy {100 * pre['location_accuracy_heldout']:.1f}% "
        f"(chance {100 * pre['chance']:.1f}%); checkpoint {pre['checkpoint']}",
        start,
    )
    del pre_cli
    finetuned, models = {}, {}
    for step, (name, ckpt) in enumerate((("loca", pre["checkpoint"]), ("random", None)), start=2):
        _log(f"{step}/3 linear-decoder finetuning from {INIT_NAMES[name]} (logs: {out}/finetune_{name})", start)
        cli, metrics = finetune(out, seed, f"finetune_{name}", ckpt, "teacher", 1.0, finetune_extra, config_dir)
        finetuned[name] = {**metrics, "steps": int(cli.trainer.global_step)}
        models[name] = cli
        _log(f"{INIT_NAMES[name]}: test mIoU {100 * metrics['mIoU']:.1f}", start)

    test_set = models["loca"].datamodule.test_dataset
    samples = [test_set[i] for i in range(min(num_figure_images, len(test_set)))]
    predictions = {name: predict_masks(cli.model, [s["image"] for s in samples]) for name, cli in models.items()}
    curves: dict[str, Any] = {"chance": pre["chance"], "location": {"loca": pre.pop("curve")}, "loss": {}, "miou": {}}
    for name, cli in models.items():
        log_dir = cli.trainer.logger.log_dir
        curves["loss"][name] = read_scalars(log_dir, "train/loss")
        curves["miou"][name] = read_scalars(log_dir, "val/mIoU")
    save_figure(out / "demo.png", samples, predictions, curves)

    hparams = [dict(cli.model.hparams) for cli in models.values()]
    results = {
        "pretrain": pre,
        "finetune": finetuned,
        # Fairness, checkable: the finetuning hyperparameters that differ between the runs (only the init should).
        "finetune_hparams_differ": sorted(k for k in hparams[0] if hparams[0][k] != hparams[1].get(k)),
        "seed": seed,
        "wall_time_s": time.perf_counter() - start,
        "peak_memory_mb": peak_memory_mb(),
    }
    table = format_demo_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table + "\n")
    _log(f"done in {results['wall_time_s']:.0f}s, peak memory {results['peak_memory_mb']:.0f} MB", start)
    print("\n" + table + f"\n\nFigure: {out / 'demo.png'}\nTensorBoard: tensorboard --logdir {out}\n", flush=True)
    return results


def _mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` in percent (sample standard deviation; a single value has none)."""
    values = [100 * v for v in values]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def format_experiment_table(rows: list[dict], fractions: Sequence[float]) -> str:
    """Markdown: one row per init, test mIoU (mean ± std over seeds) per label fraction, location accuracy."""
    inits = [i for i in INIT_NAMES if any(r.get("init") == i for r in rows)]
    head = [f"mIoU, {100 * f:g}% labels" for f in fractions]
    lines = ["| init | " + " | ".join(head) + " | location acc. (held-out) | seeds |", "|---" * (len(head) + 3) + "|"]
    for init in inits:
        cells = []
        for fraction in fractions:
            runs = [r["mIoU"] for r in rows if r.get("init") == init and r["label_fraction"] == fraction]
            cells.append(_mean_std(runs))
        accuracy = [r["location_accuracy_heldout"] for r in rows if r.get("variant") == init]
        seeds = sorted({r["seed"] for r in rows if r.get("init") == init})
        lines.append(f"| {INIT_NAMES[init]} | " + " | ".join(cells) + f" | {_mean_std(accuracy)} | {len(seeds)} |")
    return "\n".join(lines)


def run_experiment(
    out: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    pretrain_extra: Sequence[str] = (),
    finetune_extra: Sequence[str] = (),
    config_dir: str | None = None,
    fractions: Sequence[float] = (1.0, 0.1),
    variants: Sequence[str] = ("loca", "loca_location_only"),
) -> list[dict]:
    """Every (seed, pretraining variant) and (seed, init, label fraction); resumes from ``out/results.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "results.json"
    rows: list[dict] = json.loads(record.read_text())["runs"] if record.is_file() else []
    start = time.perf_counter()

    def save() -> None:
        table = format_experiment_table(rows, fractions)
        record.write_text(json.dumps({"runs": rows, "seeds": list(seeds), "fractions": list(fractions)}, indent=2))
        (out / "results.md").write_text(table + "\n")

    def done(**key: Any) -> dict | None:
        return next((r for r in rows if all(r.get(k) == v for k, v in key.items())), None)

    for seed in seeds:
        checkpoints: dict[str, str | None] = {"random": None}
        for variant in variants:
            row = done(kind="pretrain", seed=seed, variant=variant)
            if row is None or not Path(row["checkpoint"]).is_file():
                _log(f"seed {seed}: pretraining {INIT_NAMES[variant]}", start)
                cli = pretrain(out / f"seed{seed}", seed, variant, pretrain_extra, config_dir)
                summary = _pretrain_summary(cli)
                summary.pop("curve")
                row = {"kind": "pretrain", "seed": seed, "variant": variant, **summary}
                rows[:] = [r for r in rows if not (r.get("kind") == "pretrain" and r["seed"] == seed and r["variant"] == variant)]
                rows.append(row)
                save()
                del cli
                gc.collect()  # let the finished run's persistent DataLoader workers go
            checkpoints[variant] = row["checkpoint"]
            backbone = row["backbone"]
        for fraction in fractions:
            for init, checkpoint in checkpoints.items():
                if done(kind="finetune", seed=seed, init=init, label_fraction=fraction):
                    continue
                _log(f"seed {seed}: finetuning from {INIT_NAMES[init]}, {100 * fraction:g}% labels", start)
                weights = VARIANTS[init][1] if init in VARIANTS else "teacher"
                name = f"seed{seed}/finetune_{init}_labels{100 * fraction:g}"
                extra = [f"--model.init_args.backbone={backbone}", *finetune_extra]  # random init: same architecture
                cli, metrics = finetune(out, seed, name, checkpoint, weights, fraction, extra, config_dir)
                rows.append({"kind": "finetune", "seed": seed, "init": init, "label_fraction": fraction,
                             "steps": int(cli.trainer.global_step), **metrics})  # fmt: skip
                save()
                del cli
                gc.collect()
                _log(f"seed {seed}, {INIT_NAMES[init]}, {100 * fraction:g}% labels: mIoU {100 * metrics['mIoU']:.1f}", start)
    save()
    print("\n" + (out / "results.md").read_text(), flush=True)
    return rows


def _overrides(pairs: Sequence[str]) -> list[str]:
    """``key=value`` pairs -> ``--key=value`` CLI overrides."""
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"overrides must look like key=value (e.g. trainer.max_epochs=2), got {pair!r}")
    return [f"--{pair.lstrip('-')}" for pair in pairs]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m loca_lightning.demo [--experiment] --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output folder (default runs/demo or runs/experiment)")
    parser.add_argument("--experiment", action="store_true", help="run the multi-seed experiment instead of the demo")
    parser.add_argument("--seed", type=int, default=0, help="demo seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="experiment seeds")
    parser.add_argument("--config-dir", default=None, help="folder holding pretrain.yaml and seg.yaml")
    parser.add_argument("--pretrain", nargs="*", default=[], metavar="KEY=VALUE", help="pretraining config overrides")
    parser.add_argument("--finetune", nargs="*", default=[], metavar="KEY=VALUE", help="finetuning config overrides")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="experiment: pretraining variants to compare with random init",
    )
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: cores minus one, for the loader)")
    args = parser.parse_args(argv)
    # The DataLoader worker needs a core of its own: PyTorch's threads spin-wait on each other when a core is taken,
    # which made training steps several times slower on a busy 2-core machine.
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    tune_malloc()
    pre, fine = _overrides(args.pretrain), _overrides(args.finetune)
    if args.experiment:
        run_experiment(args.out or "runs/experiment", args.seeds, pre, fine, args.config_dir, variants=args.variants)
    else:
        run_demo(args.out or "runs/demo", args.seed, pre, fine, args.config_dir)


if __name__ == "__main__":
    main(sys.argv[1:])

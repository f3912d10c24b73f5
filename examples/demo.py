"""The one-command demo (``make demo``) and the entry point of the longer experiment (``make experiment``), on
synthetic scenes and a CPU. Run from the repository root::

    python -m examples.demo --out runs/demo
    python -m examples.demo --experiment --out runs/experiment --seeds 0 1 2

Demo: LOCA pretraining (``configs/demo/pretrain.yaml``, with its TensorBoard image logger and online dense probe) ->
linear-decoder finetuning (``configs/demo/seg.yaml``) from the LOCA backbone and from random init with the same budget,
data and seed -> test mIoU of each, the location accuracy pretraining reached, a figure and a results file under
``--out``. Every stage is a run of the real ``loca fit`` in this process (:mod:`examples.stages`). The experiment
(:mod:`examples.experiment`) repeats the recipe over seeds and label fractions.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from examples.experiment import run_experiment
from examples.stages import (
    INIT_NAMES,
    VARIANTS,
    finetune,
    log,
    overrides,
    peak_memory_mb,
    pretrain,
    pretrain_summary,
    read_scalars,
)
from loca_lightning.data.synthetic import SYNTHETIC_PALETTE
from loca_lightning.malloc import tune_malloc
from loca_lightning.visualize import colorize

# What the printed `tensorboard` command shows (the pretraining callbacks are configured in configs/demo/pretrain.yaml).
TENSORBOARD_GUIDE = """  pretrain_loca  SCALARS train/loss*, train/acc_location*, probe/mIoU (the online dense probe);
                 IMAGES loca/reference_band, loca/query_positions (true green, predicted red), loca/pca_teacher,
                 loca/pca_student, loca/attention_teacher, loca/attention_student
  finetune_*     SCALARS train/loss, val/mIoU, val/mAcc, val/aAcc, test/*"""


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend; matplotlib is the ``examples`` extra of the project."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the demo's figure needs matplotlib: pip install -e '.[examples]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    plt = pyplot()
    names = list(predictions)
    rows, cols = 2 + len(names), len(samples)
    fig = plt.figure(figsize=(1.6 * max(cols, 6), 1.6 * rows + 2.6))
    grid = fig.add_gridspec(rows + 1, max(cols, 3), height_ratios=[1] * rows + [1.6], hspace=0.35)
    labels = ["image", "ground truth"] + [f"{INIT_NAMES.get(n, n)}" for n in names]
    for j, sample in enumerate(samples):
        pictures = [sample["image"].permute(1, 2, 0).numpy(), colorize(sample["mask"].numpy(), SYNTHETIC_PALETTE)]
        pictures += [colorize(predictions[n][j], SYNTHETIC_PALETTE) for n in names]
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
    if pre.get("probe_miou") is not None:
        lines.append(
            f"Online dense probe (a linear per-patch classifier on the teacher's tokens, trained on the side): "
            f"{100 * pre['probe_miou']:.1f}% mIoU at step {pre['probe_curve'][0][-1]}"
        )
    return "\n".join(lines)


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
    pyplot()  # fail now, not after minutes of training, when matplotlib is missing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log(f"1/3 LOCA pretraining on synthetic scenes (logs: {out}/pretrain_loca)", start)
    pre_cli = pretrain(out, seed, "loca", pretrain_extra, config_dir)
    pre = pretrain_summary(pre_cli, location_images)
    # Both finetuning runs build the pretrained architecture; only the initial weights differ.
    finetune_extra = [f"--model.init_args.backbone={pre['backbone']}", *finetune_extra]
    log(
        f"pretraining done: {pre['steps']} steps, held-out location accuracy {100 * pre['location_accuracy_heldout']:.1f}% "
        f"(chance {100 * pre['chance']:.1f}%); checkpoint {pre['checkpoint']}",
        start,
    )
    del pre_cli
    finetuned, models = {}, {}
    for step, (name, ckpt) in enumerate((("loca", pre["checkpoint"]), ("random", None)), start=2):
        log(f"{step}/3 linear-decoder finetuning from {INIT_NAMES[name]} (logs: {out}/finetune_{name})", start)
        cli, metrics = finetune(out, seed, f"finetune_{name}", ckpt, "teacher", 1.0, finetune_extra, config_dir)
        finetuned[name] = {**metrics, "steps": int(cli.trainer.global_step)}
        models[name] = cli
        log(f"{INIT_NAMES[name]}: test mIoU {100 * metrics['mIoU']:.1f}", start)

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
    log(f"done in {results['wall_time_s']:.0f}s, peak memory {results['peak_memory_mb']:.0f} MB", start)
    print(
        f"\n{table}\n\nFigure: {out / 'demo.png'}\nTensorBoard: tensorboard --logdir {out}\n{TENSORBOARD_GUIDE}\n",
        flush=True,
    )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m examples.demo [--experiment] --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output folder (default runs/demo or runs/experiment)")
    parser.add_argument("--experiment", action="store_true", help="run the multi-seed experiment instead of the demo")
    parser.add_argument("--seed", type=int, default=0, help="demo seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="experiment seeds")
    parser.add_argument(
        "--config-dir", default=None, help="folder holding pretrain.yaml and/or seg.yaml (default configs/demo)"
    )
    parser.add_argument("--pretrain", nargs="*", default=[], metavar="KEY=VALUE", help="pretraining config overrides")
    parser.add_argument("--finetune", nargs="*", default=[], metavar="KEY=VALUE", help="finetuning config overrides")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="experiment: pretraining variants to compare with random init",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="PyTorch threads (default: cores minus one, for the loader)"
    )
    args = parser.parse_args(argv)
    # The DataLoader worker needs a core of its own: PyTorch's threads spin-wait on each other when a core is taken,
    # which made training steps several times slower on a busy 2-core machine.
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    tune_malloc()
    pre, fine = overrides(args.pretrain), overrides(args.finetune)
    if args.experiment:
        run_experiment(args.out or "runs/experiment", args.seeds, pre, fine, args.config_dir, variants=args.variants)
    else:
        run_demo(args.out or "runs/demo", args.seed, pre, fine, args.config_dir)


if __name__ == "__main__":
    main()

"""The longer experiment (``make experiment``): the demo's recipe over several seeds, full labels and a 10% label split,
LOCA vs location-only LOCA vs random init; mean and standard deviation in ``results.md``, every run in ``results.json``.

    python -m examples.demo --experiment --out runs/experiment --seeds 0 1 2
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from examples.stages import INIT_NAMES, VARIANTS, finetune, log, pretrain, pretrain_summary


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
                log(f"seed {seed}: pretraining {INIT_NAMES[variant]}", start)
                cli = pretrain(out / f"seed{seed}", seed, variant, pretrain_extra, config_dir)
                summary = pretrain_summary(cli)
                summary.pop("curve")
                summary.pop("probe_curve")
                row = {"kind": "pretrain", "seed": seed, "variant": variant, **summary}
                rows[:] = [
                    r
                    for r in rows
                    if not (r.get("kind") == "pretrain" and r["seed"] == seed and r["variant"] == variant)
                ]
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
                log(f"seed {seed}: finetuning from {INIT_NAMES[init]}, {100 * fraction:g}% labels", start)
                weights = VARIANTS[init][1] if init in VARIANTS else "teacher"
                name = f"seed{seed}/finetune_{init}_labels{100 * fraction:g}"
                extra = [f"--model.init_args.backbone={backbone}", *finetune_extra]  # random init: same architecture
                cli, metrics = finetune(out, seed, name, checkpoint, weights, fraction, extra, config_dir)
                rows.append(
                    {
                        "kind": "finetune",
                        "seed": seed,
                        "init": init,
                        "label_fraction": fraction,
                        "steps": int(cli.trainer.global_step),
                        **metrics,
                    }
                )
                save()
                del cli
                gc.collect()
                log(
                    f"seed {seed}, {INIT_NAMES[init]}, {100 * fraction:g}% labels: mIoU {100 * metrics['mIoU']:.1f}",
                    start,
                )
    save()
    print("\n" + (out / "results.md").read_text(), flush=True)
    return rows

"""How far gradient accumulation (k micro-batches of B) is from one batch of k x B for LOCA.

Under accumulation the Sinkhorn targets, the me-max mean and the loss normalisers each span one micro-batch; in one
big batch they span all k x B images. On the demo's model (configs/demo/pretrain.yaml: ViT pico/8, 32-pixel
references, 256 prototypes) and the same images, masks and weights, this prints for each k:

- the teacher's Sinkhorn targets: mean total-variation distance per reference token between the two ways, and the
  share of tokens whose most likely prototype differs;
- the gradient: relative L2 distance ``|g_acc - g_big| / |g_big|`` and cosine, for the whole loss and for the
  location-only and clustering + me-max parts;
- the first AdamW update from the same state: relative L2 distance of the parameter change;
- for scale, the same distances between two big batches of different images (sampling noise);
- the module's exact mode (``micro_batch_size``: the k micro-batches with the big batch's Sinkhorn targets, me-max
  mean and normalisers): the relative L2 distance of its gradient to the big batch's;
- with ``--time``: seconds per step (median of ``--repeats``) of the big batch in one pass, of the exact mode in k
  chunks, and of k micro-batches as ``accumulate_grad_batches`` runs them.

At initialisation and after ``--train-steps`` steps of the demo recipe. CPU, a few minutes::

    python benchmarks/accumulation.py --micro 8 --ks 2 4 8 --train-steps 300 --time
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator

import lightning as L
import torch
from torch import Tensor

from loca_lightning.data.pretrain import LOCAPretrainDataModule
from loca_lightning.pretrain.module import LOCAPretrainModule

DEMO_MODEL = dict(
    backbone="vit_pico_patch8",
    backbone_kwargs={"img_size": 32},
    drop_path_rate=0.0,  # the demo's; and the two ways then see the same network
    reference_size=32,
    query_keep=6,
    num_prototypes=256,
    projection_hidden_dim=256,
    projection_dim=64,
    momentum_base=0.99,
    base_lr=5e-4,
    lr_reference_batch=32,
    weight_decay=0.05,
    warmup_epochs=1,
)
DEMO_VIEWS = dict(query_size=32, focal_size=16, num_focal=4)


def data(batch_size: int, seed: int) -> LOCAPretrainDataModule:
    return LOCAPretrainDataModule(
        source="synthetic",
        synthetic_length=4096,
        synthetic_image_size=96,
        synthetic_seed=seed,
        views=dict(DEMO_VIEWS, reference_size=32, patch_size=8),
        batch_size=batch_size,
        num_workers=0,
        pin_memory=False,
        persistent_workers=False,
    )


def one_batch(size: int, seed: int) -> dict[str, Tensor]:
    loader = data(size, seed)
    loader.setup("fit")
    return next(iter(loader.train_dataloader()))


@contextlib.contextmanager
def fixed_masks(module: LOCAPretrainModule, reference_keep: Tensor, large_keep: Tensor) -> Iterator[list[slice]]:
    """The module draws its masks from ``reference_keep`` / ``large_keep`` rows (the slice set in the yielded list),
    so that a micro-batch sees exactly the masks its images have in the big batch."""
    rows = [slice(None)]
    module.select_reference_keep = lambda batch_size: reference_keep[rows[0]]  # type: ignore[method-assign]
    module.select_query_keep = lambda batch_size, tokens: large_keep[rows[0]]  # type: ignore[method-assign]
    try:
        yield rows
    finally:
        del module.select_reference_keep, module.select_query_keep


def gradient(module: LOCAPretrainModule, batch: dict[str, Tensor], k: int, masks: tuple[Tensor, Tensor]) -> Tensor:
    """The flat gradient of the training loss over ``batch`` taken as ``k`` micro-batches, each loss divided by k as
    Lightning does under ``accumulate_grad_batches``; and the concatenated Sinkhorn targets."""
    module.zero_grad(set_to_none=True)
    size = next(iter(batch.values())).shape[0] // k
    with fixed_masks(module, *masks) as rows:
        for i in range(k):
            rows[0] = slice(i * size, (i + 1) * size)
            micro = {key: value[rows[0]] for key, value in batch.items()}
            (module.training_step(micro, 0) / k).backward()
    return torch.cat([p.grad.flatten() for p in module.student.parameters() if p.grad is not None])


def exact_gradient(
    module: LOCAPretrainModule, batch: dict[str, Tensor], k: int, masks: tuple[Tensor, Tensor]
) -> Tensor:
    """The flat gradient of the module's micro-batched step: ``batch`` in ``k`` chunks (``micro_batch_size``)."""
    module.zero_grad(set_to_none=True)
    module.hparams.micro_batch_size = next(iter(batch.values())).shape[0] // k
    try:
        with fixed_masks(module, *masks):
            module.training_step(batch, 0).backward()
    finally:
        module.hparams.micro_batch_size = None
    return torch.cat([p.grad.flatten() for p in module.student.parameters() if p.grad is not None])


def step_seconds(
    module: LOCAPretrainModule, batch: dict[str, Tensor], k: int, masks: tuple[Tensor, Tensor], repeats: int
) -> dict[str, float]:
    """Median seconds of one step's forward and backward passes over ``batch``: in one pass, in the exact mode's k
    chunks, and as k accumulated micro-batches."""
    ways = {
        "one_pass": lambda: gradient(module, batch, 1, masks),
        "exact": lambda: exact_gradient(module, batch, k, masks),
        "accumulated": lambda: gradient(module, batch, k, masks),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats + 1):  # the first round warms up
        for name, run in ways.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def targets(module: LOCAPretrainModule, batch: dict[str, Tensor], k: int) -> Tensor:
    """The teacher's Sinkhorn targets ``[N, R, K]`` of the references, computed over ``k`` separate micro-batches."""
    reference = module.normalize(batch["reference"])
    with torch.no_grad():
        parts = []
        for chunk in reference.chunk(k):
            tokens = module.teacher.backbone(chunk)
            parts.append(module.sinkhorn(module.teacher.projection(tokens), module.hparams.teacher_temperature, 3))
    return torch.cat(parts)


def adamw_update(module: LOCAPretrainModule, grad: Tensor, lr: float = 5e-4) -> Tensor:
    """The parameter change of one AdamW step (demo lr, no weight decay) from a fresh state with gradient ``grad``."""
    params = [p for p in module.student.parameters() if p.grad is not None]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    offset = 0
    for copy in copies:
        copy.grad = grad[offset : offset + copy.numel()].view_as(copy).clone()
        offset += copy.numel()
    before = [c.detach().clone() for c in copies]
    torch.optim.AdamW(copies, lr=lr, weight_decay=0.0).step()
    return torch.cat([(c.detach() - b).flatten() for c, b in zip(copies, before)])


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def measure(module: LOCAPretrainModule, micro: int, ks: list[int], repeats: int = 0) -> list[dict]:
    """One row per k: the distances described in the module docstring."""
    module.log = module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    rows = []
    weights = {w: module.hparams[w] for w in ("location_weight", "cluster_weight", "me_max_weight")}
    for k in ks:
        big, other = one_batch(micro * k, seed=1000 + k), one_batch(micro * k, seed=2000 + k)
        torch.manual_seed(k)
        num_tokens = big["target_large"].shape[1]
        masks = (module.select_reference_keep(micro * k), module.select_query_keep(micro * k, num_tokens))
        row: dict = {"k": k, "micro_batch": micro, "batch": micro * k}
        whole, split = targets(module, big, 1), targets(module, big, k)
        row["targets_tv"] = float(0.5 * (whole - split).abs().sum(-1).mean())
        row["targets_argmax_differs"] = float((whole.argmax(-1) != split.argmax(-1)).float().mean())
        for part, setting in (
            ("all", weights),
            ("location", {**weights, "cluster_weight": 0.0, "me_max_weight": 0.0}),
            ("cluster", {**weights, "location_weight": 0.0}),
        ):
            module.hparams.update(setting)
            g_big, g_acc = gradient(module, big, 1, masks), gradient(module, big, k, masks)
            g_other = gradient(module, other, 1, masks)
            row[f"grad_{part}_rel"] = relative(g_acc, g_big)
            row[f"grad_{part}_cos"] = float(torch.nn.functional.cosine_similarity(g_acc, g_big, dim=0))
            row[f"grad_{part}_rel_other_batch"] = relative(g_other, g_big)
            if part == "all":
                u_big, u_acc, u_other = (adamw_update(module, g) for g in (g_big, g_acc, g_other))
                row["update_rel"], row["update_rel_other_batch"] = relative(u_acc, u_big), relative(u_other, u_big)
                row["grad_exact_rel"] = relative(exact_gradient(module, big, k, masks), g_big)
        module.hparams.update(weights)
        if repeats:
            seconds = step_seconds(module, big, k, masks, repeats)
            row.update({f"seconds_{name}": value for name, value in seconds.items()})
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro", type=int, default=8, help="micro-batch size B")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="accumulation counts k")
    parser.add_argument("--train-steps", type=int, default=300, help="demo-recipe steps before the second measurement")
    parser.add_argument("--time", action="store_true", help="also time the three ways (seconds per step)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per way, after one warm-up round")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = LOCAPretrainModule(**DEMO_MODEL)
    repeats = args.repeats if args.time else 0
    results = {"init": measure(module, args.micro, args.ks, repeats)}
    if args.train_steps:
        del module.log, module.log_dict
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=args.train_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            gradient_clip_val=1.0,
            precision="bf16-mixed",
        )
        trainer.fit(module, datamodule=data(32, seed=100))
        module.trainer = None
        results[f"after {args.train_steps} steps"] = measure(module.train(), args.micro, args.ks)
    columns = [
        "k",
        "batch",
        "targets_tv",
        "targets_argmax_differs",
        "grad_all_rel",
        "grad_all_cos",
        "grad_location_rel",
        "grad_cluster_rel",
        "grad_all_rel_other_batch",
        "update_rel",
        "update_rel_other_batch",
        "grad_exact_rel",
    ]
    if args.time:
        columns += ["seconds_one_pass", "seconds_exact", "seconds_accumulated"]
    for state, rows in results.items():
        print(f"\n{state} (micro-batch {args.micro})")
        print(" | ".join(columns))
        for row in rows:
            print(
                " | ".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns)
            )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()

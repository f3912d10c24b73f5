"""Instruments shared by ``run.py`` (CPU) and ``gpu.py``: matmul rate, analytic FLOPs of a LOCA step, the step itself.

Needs only torch and this package's model code (``loca_lightning.pretrain.module``, which imports lightning and timm).
How FLOPs are counted is written in ``benchmarks/README.md`` and in :func:`loca_step_flops`.
"""

from __future__ import annotations

import functools
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor

from loca_lightning.pretrain.masks import query_keep_count
from loca_lightning.pretrain.module import LOCAPretrainModule

# The released geometry (scenic/projects/loca/configs/loca_imnet1k_base16.py): 224 px reference and large query, nine 96 px focal queries.
RELEASED = dict(reference_size=224, query_size=224, focal_size=96, num_focal=9)

# The step calls self.log() without a Trainer; Lightning warns once per call site and returns.
warnings.filterwarnings("ignore", message=".*self.log.*")


def sync(device: torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[int], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls ``fn(i)`` after ``warmup`` untimed ones, each call synchronised."""
    for i in range(warmup):
        fn(i)
    sync(device)
    times = []
    for i in range(warmup, warmup + repeats):
        start = time.perf_counter()
        fn(i)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 4096, repeats: int = 5) -> float:
    """Dense ``n x n @ n x n`` matmul rate in FLOP/s (median of ``repeats``), the denominator of MFU."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    out = torch.empty(n, n, device=device, dtype=dtype)
    times = time_calls(lambda _: torch.mm(a, b, out=out), device, warmup=1, repeats=repeats)
    return 2 * n**3 / statistics.median(times)


# ---------------------------------------------------------------------------------------------- analytic FLOPs
def vit_forward_flops(dim: int, depth: int, mlp_hidden: int, seqs: int, tokens: int, patches: int, patch: int) -> int:
    """Matmul FLOPs of a ViT forward: ``seqs`` sequences of ``tokens`` tokens, ``patches`` patches embedded in all."""
    per_token_layer = 2 * dim * (4 * dim + 2 * mlp_hidden)  # qkv (3d^2) + proj (d^2) + MLP (2 d h), 2 FLOPs per MAC
    attention_layer = 2 * 2 * tokens * tokens * dim  # q k^T and attn v, per sequence
    embed = 2 * patches * 3 * patch * patch * dim  # the patch conv as a matmul
    return seqs * depth * (tokens * per_token_layer + attention_layer) + embed


def projection_forward_flops(tokens: int, dim: int, hidden: int, bottleneck: int, prototypes: int, layers: int) -> int:
    """Matmul FLOPs of the projection head (MLP to the bottleneck, then cosines to the prototypes) on ``tokens``."""
    dims = [dim] + [hidden] * (layers - 1) + [bottleneck]
    return 2 * tokens * (sum(a * b for a, b in zip(dims[:-1], dims[1:])) + bottleneck * prototypes)


def location_head_flops(queries: int, keys: int, dim: int, mlp_hidden: int, positions: int) -> tuple[int, int]:
    """(forward, backward) matmul FLOPs of the location head for one image. Backward = 2 x forward: even the kv
    projection of the (gradient-free) teacher keys needs its input gradient, for the keys' LayerNorm parameters."""
    kv = 2 * keys * dim * 2 * dim
    rest = 2 * queries * (dim * dim * 2 + 2 * dim * mlp_hidden + dim * positions) + 2 * 2 * queries * keys * dim
    return kv + rest, 2 * (kv + rest)


def loca_step_flops(module: LOCAPretrainModule, batch: dict[str, Tensor]) -> dict[str, int]:
    """Analytic matmul FLOPs of one training step on ``batch`` (see benchmarks/README.md for the rules).

    2 FLOPs per multiply-add; matmuls and convolutions only (norms, softmax, losses, optimizer and EMA are not
    counted); backward = 2 x forward except where an input gradient is not needed (the images).
    """
    hp = module.hparams
    vit = module.student.backbone
    dim, depth, patch = vit.embed_dim, len(vit.blocks), vit.patch_size
    mlp_hidden = vit.blocks[0].mlp.fc1.out_features
    b = batch["reference"].shape[0]
    ref_tokens = (batch["reference"].shape[-1] // patch) ** 2
    large_tokens = (batch["query_large"].shape[-1] // patch) ** 2
    large_kept = query_keep_count(hp.query_keep, large_tokens)
    num_focal, focal_tokens = batch["query_focal"].shape[1], (batch["query_focal"].shape[-1] // patch) ** 2
    queries = large_kept + num_focal * focal_tokens
    embed = 2 * 3 * patch * patch * dim

    teacher = vit_forward_flops(dim, depth, mlp_hidden, b, ref_tokens, b * ref_tokens, patch)
    student_large = vit_forward_flops(dim, depth, mlp_hidden, b, large_kept, b * large_tokens, patch)
    student_focal = vit_forward_flops(
        dim, depth, mlp_hidden, b * num_focal, focal_tokens, b * num_focal * focal_tokens, patch
    )
    student_fwd = student_large + student_focal
    student_embed = embed * b * (large_tokens + num_focal * focal_tokens)
    student_bwd = 2 * student_fwd - student_embed  # no gradient for the images
    loc_fwd, loc_bwd = location_head_flops(queries, module.reference_keep, dim, mlp_hidden, module.num_positions)
    out = {
        "teacher_backbone_fwd": teacher,
        "student_backbone_fwd": student_fwd,
        "student_backbone_bwd": student_bwd,
        "location_head_fwd_bwd": b * (loc_fwd + loc_bwd),
    }
    projection = module.student.projection
    if projection is not None:
        linears = [m for m in projection.mlp if isinstance(m, torch.nn.Linear)]
        args = (
            dim,
            linears[0].out_features,
            linears[-1].out_features,
            projection.prototypes.out_features,
            len(linears),
        )
        out["teacher_projection_fwd"] = projection_forward_flops(b * ref_tokens, *args)
        out["student_projection_fwd_bwd"] = 3 * projection_forward_flops(b * queries, *args)
    else:  # location-only variant: the student encodes the kept reference band with gradients
        band = vit_forward_flops(dim, depth, mlp_hidden, b, module.reference_keep, b * ref_tokens, patch)
        out["teacher_backbone_fwd"] = 0
        out["student_backbone_fwd"] += band
        out["student_backbone_bwd"] += 2 * band - embed * b * ref_tokens
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------------------------- the step
def build_module(backbone: str, compile: bool = False, **overrides: Any) -> LOCAPretrainModule:
    """LOCAPretrainModule at the released recipe (B/16 heads, 224 px reference), in train mode."""
    module = LOCAPretrainModule(backbone=backbone, compile=compile, **overrides)
    module.configure_model()
    return module.train()


def synthetic_batch(
    batch_size: int,
    device: torch.device,
    reference_size: int = 224,
    query_size: int = 224,
    focal_size: int = 96,
    num_focal: int = 9,
    patch: int = 16,
    grid: int | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A batch with the layout of LOCAPretrainDataModule: uint8 views, int64 targets with about 30% unlabelled.

    The step's cost does not depend on pixel or target values, so random ones stand in for real views.
    """
    g = torch.Generator().manual_seed(seed)
    cells = (grid or reference_size // patch) ** 2

    def targets(*shape: int) -> Tensor:
        t = torch.randint(0, cells, shape, generator=g)
        return torch.where(torch.rand(shape, generator=g) < 0.3, -1, t)

    batch = {
        "reference": torch.randint(
            0, 256, (batch_size, 3, reference_size, reference_size), dtype=torch.uint8, generator=g
        ),
        "query_large": torch.randint(0, 256, (batch_size, 3, query_size, query_size), dtype=torch.uint8, generator=g),
        "query_focal": torch.randint(
            0, 256, (batch_size, num_focal, 3, focal_size, focal_size), dtype=torch.uint8, generator=g
        ),
        "target_large": targets(batch_size, (query_size // patch) ** 2),
        "target_focal": targets(batch_size, num_focal, (focal_size // patch) ** 2),
    }
    return {k: v.to(device) for k, v in batch.items()}


class RecipeTrainer:
    """What a LOCAPretrainModule reads of its Trainer, for one process without Lightning's loop: the batch size and
    step count (``configure_optimizers``), the step index (``optimizer_step``), the precision plugin (gradient
    clipping), and ``barebones`` (``self.log`` returns at once, so the loop's own cost is left out)."""

    barebones = True
    world_size = accumulate_grad_batches = max_epochs = 1
    global_rank = 0
    gradient_clip_val = gradient_clip_algorithm = None

    def __init__(self, module: LOCAPretrainModule, batch_size: int, steps: int = 10_000) -> None:
        self.datamodule = SimpleNamespace(batch_size=batch_size)
        self.estimated_stepping_batches = self.num_training_batches = steps
        self.model = module
        self.precision_plugin = Precision()
        self.global_step = 0


class TrainStep:
    """One optimisation step of a LOCAPretrainModule as Lightning's automatic optimisation runs it, through the
    module's own code: its ``configure_optimizers`` (parameter groups, AdamW, fused or foreach), and its
    ``optimizer_step`` around a closure of ``training_step`` under autocast (``bf16-mixed``) or not (``32``),
    backward and the module's gradient clipping; the teacher's EMA update follows inside ``optimizer_step``.
    No Trainer loop (:class:`RecipeTrainer`), so Lightning's own loop cost is left out. The lr is fixed at ``lr``:
    the schedule changes no cost.
    """

    def __init__(
        self,
        module: LOCAPretrainModule,
        batch: dict[str, Tensor],
        precision: str = "bf16-mixed",
        fused: bool = True,
        clip: float | None = 1.0,
        lr: float = 1e-4,
    ) -> None:
        if precision not in ("bf16-mixed", "32"):
            raise ValueError(f"precision must be 'bf16-mixed' or '32', got {precision!r}")
        self.module, self.batch, self.precision, self.clip = module, batch, precision, clip
        self.device = batch["reference"].device
        module.optimizer_factory = functools.partial(
            torch.optim.AdamW, **({"fused": True} if fused else {"foreach": True})
        )
        module.trainer = self.trainer = RecipeTrainer(module, batch["reference"].shape[0])
        self.optimizer = module.configure_optimizers()["optimizer"]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def autocast(self):
        """The autocast context of Lightning's precision plugin."""
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def __call__(self, step: int) -> Tensor:
        module, losses = self.module, []
        self.trainer.global_step = step

        def closure() -> Tensor:
            with self.autocast():
                loss = module.training_step(self.batch, step)
            loss.backward()
            module.on_after_backward()
            if self.clip is not None:
                module.configure_gradient_clipping(self.optimizer, self.clip, "norm")
            losses.append(loss)
            return loss

        module.optimizer_step(0, step, self.optimizer, closure)  # the optimizer's step, then the teacher's EMA
        self.optimizer.zero_grad(set_to_none=True)
        return losses[0]

    def backbone_only(self, step: int) -> None:
        """The step's encoder work alone (teacher on the reference, student on both queries, backward through
        the student's encoder): the denominator of the share of time spent outside the backbone."""
        module, batch = self.module, self.batch
        reference = module.normalize(batch["reference"])
        large = module.normalize(batch["query_large"])
        focal = module.normalize(batch["query_focal"])
        b = reference.shape[0]
        keep = module.select_query_keep(b, batch["target_large"].shape[1])
        with self.autocast():
            if module.teacher is not None:
                with torch.no_grad():
                    module.teacher.backbone(reference)
            tokens = module.encode_queries(large, focal, keep)
            loss = tokens.float().square().mean()
        loss.backward()
        for p in self.params:
            p.grad = None

"""LOCA ViT-B/16 training step on one GPU: images/s, MFU against a bf16 matmul measured in the same run, peak memory,
eager and with torch.compile (blocks only, or blocks + heads + losses), levers, and a plain timm ViT-B/16 step
for reference; and the data pipeline's samples/s on this machine's CPU.

    python benchmarks/gpu.py                              # one CUDA GPU, < 5 minutes; JSON to bench_results/gpu.json
    python benchmarks/gpu.py --profile                    # also: top kernels and matmul/attention/other shares
    python benchmarks/gpu.py --device cpu --tiny          # smoke run without a GPU (tiny model, seconds)
    python benchmarks/gpu.py --parts eager,compiled_all,timm_compiled --profile   # chosen parts only

Parts (``--parts``, in the order given; default eager,data,compiled,compiled_all,compiled_all_proto_bf16):
    eager              the LOCA step as the module runs it by default
    compiled           model.compile: blocks (each transformer block compiled)
    compiled_all       model.compile: all (blocks, heads with their losses, the teacher's Sinkhorn targets)
    compiled_all_b2x   compiled_all at twice the batch
    compiled_all_proto_bf16   compiled_all with prototype_precision: bfloat16 (bf16 inputs, float32 sums; _b2x: and
                       twice the batch)
    compiled_all_tf32  compiled_all with TF32 float32 matmuls
    compiled_all_autotune   compiled_all with mode max-autotune-no-cudagraphs (long compilation)
    eager_tf32         eager with TF32 float32 matmuls (the fp32 prototype layer), to price that layer
    eager_no_guard     eager without the per-step non-finite check (one host sync), to price that sync
    timm_eager, timm_compiled   plain timm ViT-B/16 supervised training step at 224 px (fwd, CE, bwd, clip, fused
                       AdamW; compiled: each block): what this GPU gives an ordinary ViT, the ceiling to compare with
    eager_conv, compiled_all_conv   eager / compiled_all with timm's convolution as the patch embedding (before the
                       matmul of ViT.patch_tokens)
    attention          one attention layer per SDPA backend at the step's four shapes (ms, fwd + bwd)
    patch_embed        the patch embedding, convolution vs matmul (ms, fwd + weight gradient)
    prototype_precision   the prototype layer's cosines per precision: largest error against float64 on unit vectors
                       (some pairs near-parallel), the device's bf16 kernel against its exact emulation, and ms
    data               the LOCA data pipeline on this machine's CPU cores

Run from the repository root. Needs torch (with CUDA), numpy, timm and lightning (LOCAPretrainModule is a
LightningModule); nothing else of this package's dependencies. The data part also needs opencv-python-headless and
albumentations: without them it is skipped with a note (then compare against the per-worker rate of `make bench`).
The step is the module's own ``training_step`` (bf16 autocast), backward, gradient clipping, fused AdamW and the
teacher's EMA update (benchmarks/common.py: TrainStep); FLOPs are counted as in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, when the package is not installed

from common import (  # noqa: E402
    TrainStep,
    build_module,
    loca_step_flops,
    matmul_rate,
    sync,
    synthetic_batch,
    time_calls,
    vit_forward_flops,
)

from loca_lightning.backbones.vit import ViT  # noqa: E402
from loca_lightning.pretrain.heads import Bf16DotFp32  # noqa: E402
from loca_lightning.pretrain.masks import query_keep_count, reference_keep_count  # noqa: E402
from loca_lightning.pretrain.module import LOCAPretrainModule  # noqa: E402

TINY = dict(
    backbone="vit_test_patch16",
    batch_size=4,
    geometry=dict(reference_size=64, query_size=64, focal_size=32, num_focal=2),
    module=dict(num_prototypes=64, projection_hidden_dim=64, projection_dim=16),
    timm_reference="vit_tiny_patch16_224",
    patch=16,
    heads=2,
    head_dim=16,
    matmul_n=512,
)
FULL = dict(
    backbone="vit_base_patch16",
    batch_size=128,
    geometry=dict(reference_size=224, query_size=224, focal_size=96, num_focal=9),
    module=dict(),
    timm_reference="vit_base_patch16_224",
    patch=16,
    heads=12,
    head_dim=64,
    matmul_n=8192,
)


def _memory_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _allow_recompiles(limit: int = 64) -> None:
    """With torch < 2.5 (nn-module parameters not yet graph inputs) every block compiles its own graph; dynamo's
    default limit of 8 would then leave the later blocks eager and the measurement would not be of a compiled model."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))


_CATEGORIES = (  # kernel-name fragments (lower case) -> category; first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa", "dot_do_o", "convert_dq")),  # cuDNN's helpers too
    ("convolution", ("convolution", "fprop", "wgrad", "dgrad")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "sm80_", "addmm", "aten::mm", "aten::bmm")),
)


def profile_steps(step: TrainStep, device: torch.device, first: int, count: int = 2, rows: int = 40) -> dict:
    """Where the step's device time goes: top kernels and matmul / attention / other shares (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(count):
            step(first + i)
        sync(device)

    def self_time(event: Any) -> float:  # microseconds on the device (or the CPU without one)
        if device.type == "cuda":
            return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
        return float(event.self_cpu_time_total)

    events = [e for e in prof.key_averages() if self_time(e) > 0]
    if device.type == "cuda":  # kernels only: an operator's device time is that of its kernels, counted already
        from torch.autograd import DeviceType

        events = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
    total = sum(self_time(e) for e in events) or 1.0
    shares: dict[str, float] = {}
    for event in events:
        name = event.key.lower()
        category = next((c for c, keys in _CATEGORIES if any(k in name for k in keys)), "other")
        shares[category] = shares.get(category, 0.0) + self_time(event) / total
    top = sorted(events, key=self_time, reverse=True)[:rows]
    return {
        "device_ms_per_step": total / 1e3 / count,
        "shares": {k: round(v, 4) for k, v in sorted(shares.items())},
        "top": [
            {
                "name": e.key[:120],
                "calls_per_step": e.count / count,
                "ms_per_step": round(self_time(e) / 1e3 / count, 3),
            }
            for e in top
        ],
    }


class TimmStep:
    """A plain supervised ViT training step (timm model, bf16 autocast, cross-entropy on random labels, backward,
    clipping, fused AdamW): the reference for what an ordinary ViT reaches on the same GPU in the same run."""

    def __init__(self, name: str, batch_size: int, image_size: int, device: torch.device, compile: bool) -> None:
        import timm

        self.model = timm.create_model(name, num_classes=1000, img_size=image_size).to(device).train()
        if compile:
            for block in self.model.blocks:
                block.compile()
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device)
        self.labels = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.device = device

    def flops(self) -> int:
        vit = self.model
        dim, depth, patch = vit.embed_dim, len(vit.blocks), vit.patch_embed.patch_size[0]
        b, n = self.images.shape[0], (self.images.shape[-1] // patch) ** 2
        fwd = vit_forward_flops(dim, depth, vit.blocks[0].mlp.fc1.out_features, b, n + 1, b * n, patch)
        fwd += 2 * b * dim * 1000  # the classifier
        return 3 * fwd - 2 * b * n * 3 * patch * patch * dim  # no gradient for the images

    def __call__(self, step: int) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def _conv_patch_tokens(self: ViT, images: torch.Tensor) -> torch.Tensor:
    return self.patch_embed(images)  # timm's PatchEmbed: a stride-p convolution


_MATMUL_PATCH_TOKENS = ViT.patch_tokens


def _median_ms(fn: Any, device: torch.device, warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of ``fn()``: CUDA events on a GPU (launch latency would be a large share of a 0.1 ms
    kernel), :func:`common.time_calls` on the CPU."""
    if device.type != "cuda":
        return statistics.median(time_calls(lambda _: fn(), device, warmup, repeats)) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


_DEFAULTS = inspect.signature(LOCAPretrainModule).parameters  # the module's defaults: keep ratios, head sizes


def _step_tokens(cfg: dict) -> dict[str, int]:
    """Tokens per image of the step at ``cfg``'s geometry: reference, large query (all and kept), one focal query,
    all of the student's query tokens (kept large + focal), reference keys of the location head."""
    g, p = cfg["geometry"], cfg["patch"]
    ref, large, focal = (g["reference_size"] // p) ** 2, (g["query_size"] // p) ** 2, (g["focal_size"] // p) ** 2
    kept = query_keep_count(_DEFAULTS["query_keep"].default, large)
    keys = reference_keep_count(_DEFAULTS["reference_keep_ratio"].default, ref)
    queries = kept + g["num_focal"] * focal
    return dict(reference=ref, large=large, kept=kept, focal=focal, queries=queries, keys=keys)


def bench_attention(device: torch.device, cfg: dict, repeats: int = 20) -> dict:
    """Milliseconds of one attention layer (forward, and backward where the step has one) per SDPA backend, at the
    step's shapes, with q, k, v as views of one packed tensor as timm's Attention makes them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = cfg["geometry"]
    b, heads, head_dim = cfg["batch_size"], cfg["heads"], cfg["head_dim"]
    t = _step_tokens(cfg)
    ref, kept, focal, queries, keys = t["reference"], t["kept"], t["focal"], t["queries"], t["keys"]
    shapes = {  # name: (sequences, query tokens, key tokens, backward?)
        f"teacher_{ref}_no_grad": (b, ref, ref, False),
        f"large_query_{kept}": (b, kept, kept, True),
        f"focal_{focal}": (b * g["num_focal"], focal, focal, True),
        f"location_head_{queries}x{keys}": (b, queries, keys, True),
    }
    backends = {
        "default": None,
        **{
            k.name: k
            for k in (
                SDPBackend.CUDNN_ATTENTION,
                SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH,
            )
        },
    }
    dtype = torch.bfloat16
    out: dict[str, dict] = {}
    for name, (n, nq, nk, grad) in shapes.items():
        q = torch.randn(n, nq, heads, head_dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_(grad)
        kv = torch.randn(n, nk, 2, heads, head_dim, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)
        kv.requires_grad_(grad)
        grad_out = torch.randn(n, heads, nq, head_dim, device=device, dtype=dtype)
        row: dict[str, Any] = {}
        for key, backend in backends.items():

            def layer(backend=backend, q=q, kv=kv, grad=grad, grad_out=grad_out) -> None:
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    k, v = kv.unbind(0)
                    o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                if grad:
                    o.backward(grad_out)

            try:
                row[key] = round(_median_ms(layer, device, repeats=repeats), 4)
            except RuntimeError:  # a backend that does not take this shape or device
                row[key] = "unavailable"  # e.g. cuDNN or memory-efficient attention on the CPU
        out[name] = row
    return out


def bench_patch_embed(device: torch.device, cfg: dict, repeats: int = 20) -> dict:
    """Milliseconds of the patch embedding (bf16 autocast, forward and weight gradient): timm's convolution vs the
    matmul of ``ViT.patch_tokens``, on the step's reference and focal batches."""
    g, p = cfg["geometry"], cfg["patch"]
    vit = ViT(
        img_size=g["reference_size"],
        patch_size=p,
        embed_dim=cfg["heads"] * cfg["head_dim"],
        depth=1,
        num_heads=cfg["heads"],
    ).to(device)
    shapes = {
        f"reference_{cfg['batch_size']}x{g['reference_size']}": (cfg["batch_size"], g["reference_size"]),
        f"focal_{cfg['batch_size'] * g['num_focal']}x{g['focal_size']}": (
            cfg["batch_size"] * g["num_focal"],
            g["focal_size"],
        ),
    }
    out: dict[str, dict] = {}
    for name, (n, size) in shapes.items():
        images = torch.randn(n, 3, size, size, device=device)
        row: dict[str, float] = {}
        for kind, embed in (("conv", vit.patch_embed), ("matmul", vit.patch_tokens)):

            def run(embed=embed, images=images) -> None:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    tokens = embed(images)
                tokens.float().sum().backward()

            row[kind] = round(_median_ms(run, device, repeats=repeats), 4)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            diff = vit.patch_embed(images).float() - vit.patch_tokens(images).float()
        row["max_abs_diff_bf16"] = float(diff.abs().max())
        out[name] = row
    return out


def bench_prototype_precision(device: torch.device, cfg: dict, repeats: int = 20) -> dict:
    """The prototype layer (cosines of ``batch x (queries + reference)`` normalised features with the prototypes) per
    ``prototype_precision``: largest error against float64, the device kernel against the bf16 rounding it stands
    for (:class:`Bf16DotFp32`), and milliseconds of forward + backward."""
    g = torch.Generator().manual_seed(0)
    dim, count = _DEFAULTS["projection_dim"].default, _DEFAULTS["num_prototypes"].default  # released: 256, 4096
    z = torch.nn.functional.normalize(torch.randn(count, dim, generator=g), dim=-1)
    w = torch.nn.functional.normalize(torch.randn(count, dim, generator=g), dim=-1)
    w[: count // 64] = torch.nn.functional.normalize(z[: count // 64] + 0.05 * w[: count // 64], dim=-1)  # cos ~1
    z, w = z.to(device), w.to(device)
    exact = z.double() @ w.double().T
    rounded = z.bfloat16().double() @ w.bfloat16().double().T  # what bfloat16 precision stands for
    bf16 = Bf16DotFp32.apply(z, w)
    out: dict[str, Any] = {
        "max_abs_error": {
            "float32": float((z @ w.T - exact).abs().max()),
            "bfloat16 (bf16 inputs, float32 sums)": float((bf16 - exact).abs().max()),
            "bf16 result (autocast)": float(((z.bfloat16() @ w.bfloat16().T).double() - exact).abs().max()),
        },
        "bfloat16_kernel_vs_rounding": float((bf16 - rounded).abs().max()),
    }
    tokens = cfg["batch_size"] * _step_tokens(cfg)["queries"]  # the student's query tokens
    feats = torch.nn.functional.normalize(torch.randn(tokens, dim, device=device), dim=-1).requires_grad_(True)
    protos = w.clone().requires_grad_(True)
    ms = {}
    for name, fn in (("float32", lambda: feats @ protos.T), ("bfloat16", lambda: Bf16DotFp32.apply(feats, protos))):

        def run(fn=fn) -> None:
            fn().sum().backward()

        ms[name] = round(_median_ms(run, device, repeats=repeats), 4)
    out[f"ms_fwd_bwd_{tokens}x{dim}x{count}"] = ms
    return out


def bench_step(
    device: torch.device,
    cfg: dict,
    compile: bool | str,
    warmup: int,
    steps: int,
    matmul_flops: float,
    profile: bool = False,
    batch_scale: int = 1,
    tf32: bool = False,
    guard: bool = True,
    timm_reference: bool = False,
    compile_options: dict | None = None,
    conv_patch_embed: bool = False,
    module_options: dict | None = None,
) -> dict:
    """Images/s of ``steps`` back-to-back steps (one sync at the end), MFU, peak memory; compile time if compiled;
    with ``profile``, where the device time of two more steps goes.

    ``compile``: the module's ``compile`` option (False, "blocks" or "all"); ``tf32``: float32 matmuls in TF32 for
    this part; ``guard``: keep the step's non-finite check; ``timm_reference``: time :class:`TimmStep` instead;
    ``conv_patch_embed``: timm's convolution as the patch embedding instead of our matmul (``ViT.patch_tokens``);
    ``module_options``: LOCAPretrainModule arguments to change (e.g. ``prototype_precision``)."""
    _memory_reset(device)
    if compile:
        _allow_recompiles()
    batch_size = cfg["batch_size"] * batch_scale
    tf32_before, options_before = torch.backends.cuda.matmul.allow_tf32, LOCAPretrainModule.compile_options
    torch.backends.cuda.matmul.allow_tf32 = tf32
    LOCAPretrainModule.compile_options = dict(compile_options or {})
    if conv_patch_embed:
        ViT.patch_tokens = _conv_patch_tokens
    try:
        if timm_reference:
            step = TimmStep(cfg["timm_reference"], batch_size, cfg["geometry"]["reference_size"], device, bool(compile))
            module, batch, flops = None, None, step.flops()
        else:
            module = build_module(
                cfg["backbone"],
                compile=compile,
                reference_size=cfg["geometry"]["reference_size"],
                **{**cfg["module"], **(module_options or {})},
            ).to(device)
            module.nonfinite.enabled = guard  # off: the step without its host sync
            batch = synthetic_batch(batch_size, device, **cfg["geometry"])
            step = TrainStep(module, batch, precision="bf16-mixed", fused=True)
            flops = loca_step_flops(module, batch)["total"]
        return _time_step(step, device, compile, warmup, steps, batch_size, flops, matmul_flops, profile)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
        LOCAPretrainModule.compile_options = options_before
        ViT.patch_tokens = _MATMUL_PATCH_TOKENS
        _memory_reset(device)


def _time_step(
    step: Any,
    device: torch.device,
    compile: bool | str,
    warmup: int,
    steps: int,
    b: int,
    flops: int,
    matmul_flops: float,
    profile: bool,
) -> dict:
    """Time ``step`` (a TrainStep or TimmStep of batch ``b`` and ``flops`` counted FLOPs): see :func:`bench_step`."""
    start = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_step = []
    for i in range(3):  # a few individually synchronised steps, for the spread
        t0 = time.perf_counter()
        step(warmup + i)
        sync(device)
        per_step.append(time.perf_counter() - t0)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + 3 + i)
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    peak = _peak_memory_gb(device)
    backbone = []
    if hasattr(step, "backbone_only"):
        step.backbone_only(0)
        for i in range(3):
            t0 = time.perf_counter()
            step.backbone_only(i)
            sync(device)
            backbone.append(time.perf_counter() - t0)
    out = {
        "compile": compile,
        "batch_size": b,
        "warmup_steps": warmup,
        "warmup_s": warmup_s,
        "step_s": step_s,
        "step_s_synced": [round(t, 5) for t in per_step],
        "images_per_s": b / step_s,
        "gflop_per_image": flops / b / 1e9,
        "achieved_tflop_per_s": flops / step_s / 1e12,
        "mfu": flops / step_s / matmul_flops,
        "outside_backbone_share": 1.0 - statistics.median(backbone) / statistics.median(per_step) if backbone else None,
        "peak_memory_gb": peak,
        "peak_memory_per_image_mb": None if peak is None else peak * 1024 / b,
    }
    if profile:
        out["profile"] = profile_steps(step, device, first=warmup + 3 + steps)
    if compile:  # 3 expected: student large query, student focal queries (dynamic), teacher (no grad)
        from torch._dynamo.utils import counters

        out["dynamo_unique_graphs"] = counters["stats"]["unique_graphs"]  # counted since the process started
        out["dynamo_graph_breaks"] = sum(counters["graph_break"].values())
    return out


def bench_data(images: int, batch_size: int, workers: int, seconds: float) -> dict:
    """LOCA samples/s of one worker (in-process, one thread) and of a DataLoader with ``workers`` workers."""
    try:
        from pipeline import bench_data_loader, bench_data_worker, write_jpegs  # needs cv2 + albumentations
    except ImportError as error:
        return {"skipped": f"data pipeline needs opencv-python-headless and albumentations ({error})"}
    views = dict(reference_size=224, query_size=224, focal_size=96, num_focal=9, patch_size=16)
    with tempfile.TemporaryDirectory(prefix="loca_gpu_bench_") as tmp:
        folder = Path(tmp)
        paths = write_jpegs(folder, images)
        one = bench_data_worker(paths, views, batch_size, repeats=2)
        # enough items for ~``seconds`` of loading at the expected rate, whole batches per worker
        per_epoch = max(batch_size * workers * 2, int(one["samples_per_s"] * workers * seconds))
        repeat = max(1, per_epoch // len(paths))
        loader = bench_data_loader(folder, paths * repeat, views, batch_size, workers, epochs=1)
    return {
        "one_worker_samples_per_s": one["samples_per_s"],
        "stage_ms_per_sample": one["stage_ms_per_sample"],
        "workers": workers,
        "loader_samples_per_s": loader["samples_per_s"],
        "one_worker_x_cores": one["samples_per_s"] * workers,
    }


STEP_PARTS: dict[str, dict] = {  # part -> bench_step options (see the module docstring)
    "eager": dict(compile=False),
    "compiled": dict(compile="blocks"),
    "compiled_all": dict(compile="all"),
    "compiled_all_b2x": dict(compile="all", batch_scale=2),
    "compiled_all_proto_bf16": dict(compile="all", module_options={"prototype_precision": "bfloat16"}),
    "compiled_all_proto_bf16_b2x": dict(
        compile="all", batch_scale=2, module_options={"prototype_precision": "bfloat16"}
    ),
    "compiled_all_tf32": dict(compile="all", tf32=True),
    "compiled_all_autotune": dict(compile="all", compile_options={"mode": "max-autotune-no-cudagraphs"}),
    "eager_conv": dict(compile=False, conv_patch_embed=True),
    "compiled_all_conv": dict(compile="all", conv_patch_embed=True),
    "eager_tf32": dict(compile=False, tf32=True),
    "eager_no_guard": dict(compile=False, guard=False),
    "timm_eager": dict(compile=False, timm_reference=True),
    "timm_compiled": dict(compile="blocks", timm_reference=True),
}
OTHER_PARTS = ("attention", "patch_embed", "prototype_precision", "data")
DEFAULT_PARTS = "eager,data,compiled,compiled_all,compiled_all_proto_bf16"


def format_table(result: dict) -> str:
    """A short markdown table of the run."""
    rows = ["| measurement | value |", "|---|---|"]
    rows.append(f"| device | {result['device']} |")
    rows.append(
        f"| dense bf16 matmul {result['matmul_n']}^3 | {result['matmul_tflop_per_s']:.4g} TFLOP/s (at the end: "
        f"{result.get('matmul_tflop_per_s_end', float('nan')):.4g}) |"
    )
    step_keys = [k for k in STEP_PARTS if result.get(k)]
    for key in step_keys:
        step = result[key]
        if "error" in step:
            rows.append(f"| {key} | error: {step['error'].strip().splitlines()[-1]} |")
            continue
        mem = (
            "n/a"
            if step["peak_memory_gb"] is None
            else (f"{step['peak_memory_gb']:.1f} GB ({step['peak_memory_per_image_mb']:.0f} MB/image)")
        )
        what = f"timm {result['timm_reference']} supervised" if key.startswith("timm") else f"LOCA {result['backbone']}"
        outside = step.get("outside_backbone_share")
        outside = "" if outside is None else f"outside backbone {100 * outside:.0f}%, "
        rows.append(
            f"| {key}: {what} step, batch {step['batch_size']}, bf16 | "
            f"{step['images_per_s']:.0f} images/s, {step['step_s'] * 1e3:.1f} ms/step, "
            f"{step['achieved_tflop_per_s']:.4g} TFLOP/s, MFU {step['mfu']:.3f}, {outside}"
            f"peak {mem}, warmup {step['warmup_s']:.0f} s |"
        )
    for key in step_keys:
        prof = result[key].get("profile")
        if prof:
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["shares"].items())
            top = "; ".join(f"{t['name'][:60]} {t['ms_per_step']:.1f} ms" for t in prof["top"][:5])
            rows.append(
                f"| profile, {key} | {prof['device_ms_per_step']:.1f} ms/step on the device: {shares}. Top: {top} |"
            )
    for key, unit in (("attention", "ms per layer, fwd+bwd"), ("patch_embed", "ms, fwd + weight grad")):
        part = result.get(key)
        if part and "error" in part:
            rows.append(f"| {key} | error: {part['error'].strip().splitlines()[-1]} |")
        elif part:
            for shape, row in part.items():
                values = ", ".join(f"{k} {v}" if isinstance(v, str) else f"{k} {v:.3g}" for k, v in row.items())
                rows.append(f"| {key} {shape} ({unit}) | {values} |")
    data = result.get("data")
    if data and "skipped" in data:
        rows.append(f"| data pipeline | skipped: {data['skipped']} |")
    elif data and "error" in data:
        rows.append(f"| data pipeline | error: {data['error'].strip().splitlines()[-1]} |")
    elif data:
        rows.append(f"| data, 1 worker | {data['one_worker_samples_per_s']:.0f} samples/s |")
        rows.append(
            f"| data, DataLoader {data['workers']} workers | {data['loader_samples_per_s']:.0f} samples/s "
            f"(1 worker x {data['workers']} = {data['one_worker_x_cores']:.0f}) |"
        )
        best = max(
            (result[k]["images_per_s"] for k in step_keys if not k.startswith("timm") and "images_per_s" in result[k]),
            default=None,
        )
        if best:
            rows.append(f"| data / GPU consumption | {data['loader_samples_per_s'] / best:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/gpu.json")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--tiny", action="store_true", help="tiny model and batch (smoke run)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the batch (default 128; tiny 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; compiled: +3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20)")
    parser.add_argument(
        "--parts", default=DEFAULT_PARTS, help=f"comma-separated parts, in order (default {DEFAULT_PARTS})"
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled parts")
    parser.add_argument("--no-data", action="store_true", help="leave out the data pipeline measurement")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: all CPU cores)")
    parser.add_argument("--profile", action="store_true", help="also profile two steps: top kernels, time shares")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in STEP_PARTS and p not in OTHER_PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {sorted(STEP_PARTS) + list(OTHER_PARTS)}")
    if args.no_compile:
        parts = [p for p in parts if p in OTHER_PARTS or not STEP_PARTS[p]["compile"]]
    if args.no_data:
        parts = [p for p in parts if p != "data"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --device cpu --tiny for a smoke run")
    cfg = dict(TINY if args.tiny else FULL)
    if args.batch_size:
        cfg["batch_size"] = args.batch_size
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    steps = args.steps if args.steps is not None else (2 if args.tiny else 20)
    cores = os.cpu_count() or 1
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cpu_cores": cores,
        "backbone": cfg["backbone"],
        "timm_reference": cfg["timm_reference"],
        "matmul_n": cfg["matmul_n"],
        "parts": parts,
        "command": " ".join(["python", *sys.argv]),
    }
    print(f"device {result['device']}, torch {torch.__version__}, {cores} CPU cores; parts {parts}", flush=True)
    matmul = matmul_rate(device, torch.bfloat16, cfg["matmul_n"], repeats=10 if device.type == "cuda" else 3)
    result["matmul_tflop_per_s"] = matmul / 1e12
    print(f"bf16 matmul {cfg['matmul_n']}^3: {matmul / 1e12:.1f} TFLOP/s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a run cut short still leaves what it measured
        result["total_s"] = time.perf_counter() - t_start
        out.write_text(json.dumps(result, indent=2) + "\n")

    for part in parts:
        t_part = time.perf_counter()
        try:
            if part == "attention":
                result[part] = bench_attention(device, cfg)
                print(f"{part}: {result[part]}", flush=True)
            elif part == "patch_embed":
                result[part] = bench_patch_embed(device, cfg)
                print(f"{part}: {result[part]}", flush=True)
            elif part == "prototype_precision":
                result[part] = bench_prototype_precision(device, cfg)
                print(f"{part}: {result[part]}", flush=True)
            elif part == "data":
                result["data"] = bench_data(
                    images=16 if args.tiny else 64,
                    batch_size=8 if args.tiny else 32,
                    workers=args.workers or cores,
                    seconds=1.0 if args.tiny else 8.0,
                )
            else:
                options = STEP_PARTS[part]
                extra = 3 if options["compile"] else 0
                result[part] = bench_step(
                    device,
                    cfg,
                    warmup=warmup + extra,
                    steps=steps,
                    matmul_flops=matmul,
                    profile=args.profile,
                    **options,
                )
                print(f"{part}: {result[part]['images_per_s']:.1f} images/s, MFU {result[part]['mfu']:.3f}", flush=True)
        except Exception:  # keep what was measured: an OOM or a compile failure must not lose the other numbers
            result[part] = {"error": traceback.format_exc()}
            print(result[part]["error"], flush=True)
            _memory_reset(device)
        result.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t_part, 1)
        save()
    # matmul again at the end: a drifting clock (thermal, other tenants) shows as a difference between the two
    result["matmul_tflop_per_s_end"] = matmul_rate(device, torch.bfloat16, cfg["matmul_n"], repeats=5) / 1e12
    result["table"] = format_table(result)
    save()
    print(result["table"])
    print(f"wrote {out} in {result['total_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()

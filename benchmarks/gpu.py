"""LOCA ViT-B/16 training step on one GPU: images/s, MFU against a bf16 matmul measured in the same run, peak memory,
eager and with torch.compile (of the transformer blocks); and the data pipeline's samples/s on this machine's CPU.

    python benchmarks/gpu.py                              # one CUDA GPU, < 5 minutes; JSON to bench_results/gpu.json
    python benchmarks/gpu.py --profile                    # also: top kernels and matmul/attention/other shares
    python benchmarks/gpu.py --device cpu --tiny          # smoke run without a GPU (tiny model, seconds)

Run from the repository root. Needs torch (with CUDA), numpy, timm and lightning (LOCAPretrainModule is a
LightningModule); nothing else of this package's dependencies. The data part also needs opencv-python-headless and
albumentations: without them it is skipped with a note (then compare against the per-worker rate of `make bench`).
The step is the module's own ``training_step`` (bf16 autocast), backward, gradient clipping, fused AdamW and the
teacher's EMA update (benchmarks/common.py: TrainStep); FLOPs are counted as in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
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

from common import TrainStep, build_module, loca_step_flops, matmul_rate, sync, synthetic_batch  # noqa: E402

TINY = dict(
    backbone="vit_test_patch16",
    batch_size=4,
    geometry=dict(reference_size=64, query_size=64, focal_size=32, num_focal=2),
    module=dict(num_prototypes=64, projection_hidden_dim=64, projection_dim=16),
    matmul_n=512,
)
FULL = dict(
    backbone="vit_base_patch16",
    batch_size=128,
    geometry=dict(reference_size=224, query_size=224, focal_size=96, num_focal=9),
    module=dict(),
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
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "sm80_", "addmm", "aten::mm", "aten::bmm")),
)


def profile_steps(step: TrainStep, device: torch.device, first: int, count: int = 2, rows: int = 25) -> dict:
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


def bench_step(
    device: torch.device,
    cfg: dict,
    compile: bool,
    warmup: int,
    steps: int,
    matmul_flops: float,
    profile: bool = False,
) -> dict:
    """Images/s of ``steps`` back-to-back steps (one sync at the end), MFU, peak memory; compile time if compiled;
    with ``profile``, where the device time of two more steps goes."""
    _memory_reset(device)
    if compile:
        _allow_recompiles()
    module = build_module(
        cfg["backbone"], compile=compile, reference_size=cfg["geometry"]["reference_size"], **cfg["module"]
    ).to(device)
    batch = synthetic_batch(cfg["batch_size"], device, **cfg["geometry"])
    step = TrainStep(module, batch, precision="bf16-mixed", fused=True)
    flops = loca_step_flops(module, batch)["total"]
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
    step.backbone_only(0)
    backbone = []
    for i in range(3):
        t0 = time.perf_counter()
        step.backbone_only(i)
        sync(device)
        backbone.append(time.perf_counter() - t0)
    b = cfg["batch_size"]
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
        "outside_backbone_share": 1.0 - statistics.median(backbone) / statistics.median(per_step),
        "peak_memory_gb": peak,
        "peak_memory_per_image_mb": None if peak is None else peak * 1024 / b,
    }
    if profile:
        out["profile"] = profile_steps(step, device, first=warmup + 3 + steps)
    if compile:  # 3 expected: student large query, student focal queries (dynamic), teacher (no grad)
        from torch._dynamo.utils import counters

        out["dynamo_unique_graphs"] = counters["stats"]["unique_graphs"]
        out["dynamo_graph_breaks"] = sum(counters["graph_break"].values())
    del step, module, batch
    _memory_reset(device)
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


def format_table(result: dict) -> str:
    """A short markdown table of the run."""
    rows = ["| measurement | value |", "|---|---|"]
    rows.append(f"| device | {result['device']} |")
    rows.append(
        f"| dense bf16 matmul {result['matmul_n']}^3 | {result['matmul_tflop_per_s']:.4g} TFLOP/s (at the end: "
        f"{result.get('matmul_tflop_per_s_end', float('nan')):.4g}) |"
    )
    for key in ("eager", "compiled"):
        step = result.get(key)
        if not step:
            continue
        if "error" in step:
            rows.append(f"| LOCA step, {key} | error: {step['error'].splitlines()[-1]} |")
            continue
        mem = (
            "n/a"
            if step["peak_memory_gb"] is None
            else (f"{step['peak_memory_gb']:.1f} GB ({step['peak_memory_per_image_mb']:.0f} MB/image)")
        )
        rows.append(
            f"| LOCA {result['backbone']} step, batch {step['batch_size']}, bf16, {key} | "
            f"{step['images_per_s']:.0f} images/s, {step['step_s'] * 1e3:.1f} ms/step, "
            f"{step['achieved_tflop_per_s']:.4g} TFLOP/s, MFU {step['mfu']:.3f}, outside backbone "
            f"{100 * step['outside_backbone_share']:.0f}%, peak {mem}, warmup {step['warmup_s']:.0f} s |"
        )
    for key in ("eager", "compiled"):
        prof = (result.get(key) or {}).get("profile")
        if prof:
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["shares"].items())
            top = "; ".join(f"{t['name'][:60]} {t['ms_per_step']:.1f} ms" for t in prof["top"][:5])
            rows.append(
                f"| profile, {key} | {prof['device_ms_per_step']:.1f} ms/step on the device: {shares}. Top: {top} |"
            )
    data = result.get("data")
    if data and "skipped" in data:
        rows.append(f"| data pipeline | skipped: {data['skipped']} |")
    elif data and "error" in data:
        rows.append(f"| data pipeline | error: {data['error'].splitlines()[-1]} |")
    elif data:
        rows.append(f"| data, 1 worker | {data['one_worker_samples_per_s']:.0f} samples/s |")
        rows.append(
            f"| data, DataLoader {data['workers']} workers | {data['loader_samples_per_s']:.0f} samples/s "
            f"(1 worker x {data['workers']} = {data['one_worker_x_cores']:.0f}) |"
        )
        best = max(
            (result[k]["images_per_s"] for k in ("eager", "compiled") if result.get(k) and "images_per_s" in result[k]),
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
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    parser.add_argument("--no-data", action="store_true", help="skip the data pipeline measurement")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: all CPU cores)")
    parser.add_argument("--profile", action="store_true", help="also profile two steps: top kernels, time shares")
    args = parser.parse_args(argv)
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
        "matmul_n": cfg["matmul_n"],
        "command": " ".join(["python", *sys.argv]),
    }
    print(f"device {result['device']}, torch {torch.__version__}, {cores} CPU cores", flush=True)
    matmul = matmul_rate(device, torch.bfloat16, cfg["matmul_n"], repeats=10 if device.type == "cuda" else 3)
    result["matmul_tflop_per_s"] = matmul / 1e12
    print(f"bf16 matmul {cfg['matmul_n']}^3: {matmul / 1e12:.1f} TFLOP/s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a run cut short still leaves what it measured
        result["total_s"] = time.perf_counter() - t_start
        out.write_text(json.dumps(result, indent=2) + "\n")

    # compile last: it is the slowest and the riskiest part
    parts = ["eager"] + ([] if args.no_data else ["data"]) + ([] if args.no_compile else ["compiled"])
    for part in parts:
        try:
            if part == "data":
                result["data"] = bench_data(
                    images=16 if args.tiny else 64,
                    batch_size=8 if args.tiny else 32,
                    workers=args.workers or cores,
                    seconds=1.0 if args.tiny else 8.0,
                )
            else:
                compiled = part == "compiled"
                result[part] = bench_step(
                    device, cfg, compiled, warmup + (3 if compiled else 0), steps, matmul, profile=args.profile
                )
                print(f"{part}: {result[part]['images_per_s']:.1f} images/s, MFU {result[part]['mfu']:.3f}", flush=True)
        except Exception:  # keep what was measured: an OOM or a compile failure must not lose the other numbers
            result[part] = {"error": traceback.format_exc()}
            print(result[part]["error"], flush=True)
            _memory_reset(device)
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

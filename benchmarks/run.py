"""`make bench`: data pipeline, LOCA training step and segmentation inference throughput on this machine's CPU.

    python benchmarks/run.py --out bench_results/bench.json            # everything (~10-15 min on 2 cores)
    python benchmarks/run.py --parts step --models vit_small_patch16   # one part, one model
    python benchmarks/run.py --parts shards                            # tar shards vs folder vs http (shard_bench.py)
    python benchmarks/run.py --quick                                   # a shorter run (fewer repeats and images)
    python benchmarks/run.py --parts step --compile                    # also the step with compile: all (inductor)
    python benchmarks/run.py --parts step --release-python /tmp/jaxenv/bin/python --scenic /path/to/scenic
        # adds the authors' JAX step, timed right after ours (set-up: benchmarks/jax_release.py)

Each part runs in a fresh process, so that its peak resident memory is its own. Every timing is the median of
several repeats; each row also records how many cores OTHER processes kept busy meanwhile ("others"), because a
shared machine makes numbers noisy. FLOP counting: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from common import RELEASED, TrainStep, build_module, loca_step_flops, synthetic_batch
from machine import OtherLoad, machine_info, peak_rss_mb, wait_until_quiet
from pipeline import bench_data  # noqa: F401  (run_isolated calls parts by name)
from shard_bench import bench_shards, format_shard_rows  # noqa: F401

from loca_lightning.malloc import keep_freed_memory


# ---------------------------------------------------------------------------------------------- training step
def bench_step(
    backbone: str = "vit_small_patch16",
    batch_size: int = 8,
    warmup: int = 2,
    repeats: int = 5,
    precision: str = "bf16-mixed",
    geometry: dict | None = None,
    fused: bool = True,
    matmul_n: int = 4096,
    keep_memory: bool = False,
    threads: int | None = None,
    **module_kwargs: Any,
) -> dict:
    """Step time, images/s, FLOPs and MFU (against a matmul measured between the steps) of one LOCA model,
    plus the share of the step spent outside the backbone.

    ``keep_memory`` lets glibc keep freed memory (``keep_freed_memory``): large temporaries then stop being
    page-faulted in afresh every step. ``threads`` sets torch's intra-op threads (default: torch's choice).
    ``module_kwargs`` go to LOCAPretrainModule; with ``compile`` the warmup has two more steps and its time
    (compilation included) is reported as ``warmup_s``.
    """
    device = torch.device("cpu")
    if keep_memory:
        keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    geometry = dict(RELEASED if geometry is None else geometry)
    module = build_module(backbone, reference_size=geometry["reference_size"], **module_kwargs)
    patch = module.student.backbone.patch_size
    batch = synthetic_batch(batch_size, device, patch=patch, **geometry)
    step = TrainStep(module, batch, precision=precision, fused=fused)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    flops = loca_step_flops(module, batch)
    if module_kwargs.get("compile"):
        warmup += 2
    start = time.perf_counter()
    for i in range(warmup):
        step(i)
    warmup_s = time.perf_counter() - start
    rss_before = peak_rss_mb()
    a = torch.randn(matmul_n, matmul_n, dtype=dtype)
    b = torch.randn(matmul_n, matmul_n, dtype=dtype)
    torch.mm(a, b)

    def clocks(fn: Any) -> tuple[float, float]:
        """(wall, process CPU) seconds of ``fn()``."""
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu

    steps, matmuls, backbones = [], [], []
    load = OtherLoad().start()
    for i in range(repeats):  # interleaved, so that all three see the same machine
        matmuls.append(min((clocks(lambda: torch.mm(a, b)) for _ in range(3)), key=lambda t: t[0]))
        steps.append(clocks(lambda i=i: step(warmup + i)))
        backbones.append(clocks(lambda i=i: step.backbone_only(i)))
    others = load.stop()
    step_s, step_cpu_s = (statistics.median(t[k] for t in steps) for k in (0, 1))
    matmul_s, matmul_cpu_s = (statistics.median(t[k] for t in matmuls) for k in (0, 1))
    matmul_flops = 2 * matmul_n**3 / matmul_s
    backbone_s, backbone_cpu_s = (statistics.median(t[k] for t in backbones) for k in (0, 1))
    return {
        "backbone": backbone,
        "batch_size": batch_size,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "keep_memory": keep_memory,
        "compile": module_kwargs.get("compile", False),
        "warmup_s": warmup_s,
        "step_s": step_s,
        "step_s_all": [round(t[0], 4) for t in steps],
        "images_per_s": batch_size / step_s,
        "gflop_per_image": flops["total"] / batch_size / 1e9,
        "flops_breakdown_per_image_gflop": {k: round(v / batch_size / 1e9, 3) for k, v in flops.items()},
        "matmul_gflop_per_s": matmul_flops / 1e9,
        "achieved_gflop_per_s": flops["total"] / step_s / 1e9,
        "mfu": flops["total"] / step_s / matmul_flops,
        "backbone_only_s": backbone_s,
        "outside_backbone_share": 1.0 - backbone_s / step_s,
        # The same in process CPU seconds: what the step costs the cores it gets, whatever else runs. With one
        # thread this is the step time of a dedicated core; with more it also counts threads waiting for others.
        "step_cpu_s": step_cpu_s,
        "mfu_cpu_time": flops["total"] / step_cpu_s / (2 * matmul_n**3 / matmul_cpu_s),
        "outside_backbone_share_cpu_time": 1.0 - backbone_cpu_s / step_cpu_s,
        "rss_after_warmup_mb": rss_before,
        "others_cores": others,
    }


# ---------------------------------------------------------------------------------------------- segmentation
def bench_segmentation(
    backbone: str = "vit_small_patch16",
    height: int = 512,
    width: int = 683,
    window: int = 512,
    stride: int = 512,
    num_classes: int = 150,
    warmup: int = 1,
    repeats: int = 5,
) -> dict:
    """Sliding-window evaluation (bf16 autocast, the module's own predict_logits + argmax) of one image."""
    from loca_lightning.segmentation.module import SegmentationFinetuneModule

    module = SegmentationFinetuneModule(
        num_classes=num_classes,
        backbone=backbone,
        image_size=window,
        window=window,
        stride=stride,
        inference_mode="slide",
        test_scale=None,  # the image as given: the windows measured are those of height x width
    ).eval()
    image = torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def predict(_: int) -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            module.predict_logits(image).argmax(1)

    for i in range(warmup):
        predict(i)
    load = OtherLoad().start()
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        predict(i)
        times.append(time.perf_counter() - start)
    return {
        "backbone": backbone,
        "image": [height, width],
        "window": window,
        "stride": stride,
        "s_per_image": statistics.median(times),
        "images_per_s": 1.0 / statistics.median(times),
        "others_cores": load.stop(),
    }


# ---------------------------------------------------------------------------------------------- driver
def _call_with_memory(fn_name: str, kwargs: dict, quiet: float | None) -> dict:
    if quiet is not None:
        wait_until_quiet(quiet)
    result = globals()[fn_name](**kwargs)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_isolated(fn_name: str, kwargs: dict, quiet: float | None = None) -> dict:
    """Run ``fn_name(**kwargs)`` of this file in a fresh process; its peak resident memory is added to the result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_call_with_memory, fn_name, kwargs, quiet).result()


def _fmt_mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MB"


def _fmt_others(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(results: dict) -> str:
    """One markdown table of every measured row."""
    rows = ["| part | setting | throughput | detail | peak RSS | others |", "|---|---|---|---|---|---|"]
    data = results.get("data")
    if data:
        one = data["one_worker"]
        stages = ", ".join(
            f"{k} {v:.2f}" for k, v in one["stage_ms_per_sample"].items() if k != "views_with_photometrics"
        )
        rows.append(
            f"| data | 1 worker, {data['image_size'][1]}x{data['image_size'][0]} JPEG, 11 views, batch "
            f"{data['batch_size']} | {one['samples_per_s']:.0f} samples/s | ms/sample: {stages} | "
            f"{data['peak_rss_mb']:.0f} MB | {_fmt_others(one['others_cores'])} |"
        )
        if "loader" in data:
            ld = data["loader"]
            rows.append(
                f"| data | DataLoader, {ld['workers']} workers | {ld['samples_per_s']:.0f} samples/s | "
                f"{ld['samples_per_s'] / ld['workers']:.0f} per worker | {_fmt_mb(ld['pss_with_workers_mb'])} PSS, "
                f"main + workers | {_fmt_others(ld['others_cores'])} |"
            )
    for step in results.get("step", []):
        malloc = ", malloc keeps freed memory" if step.get("keep_memory") else ""
        if step.get("compile"):
            malloc += f", compile: {step['compile']} (warmup {step['warmup_s']:.0f} s)"
        rows.append(
            f"| step | {step['backbone']}, batch {step['batch_size']}, {step['precision']}, "
            f"{step.get('threads', '?')} threads{malloc} | "
            f"{step['images_per_s']:.2f} images/s ({step['step_s']:.3f} s/step) | "
            f"{step['gflop_per_image']:.1f} GFLOP/image, {step['achieved_gflop_per_s']:.0f} GFLOP/s vs matmul "
            f"{step['matmul_gflop_per_s']:.0f}: MFU {step['mfu']:.2f} (in CPU time: {step['mfu_cpu_time']:.2f}); outside "
            f"backbone {100 * step['outside_backbone_share']:.0f}% | {step['peak_rss_mb']:.0f} MB | "
            f"{_fmt_others(step['others_cores'])} |"
        )
    seg = results.get("segmentation")
    if seg:
        rows.append(
            f"| segmentation | {seg['backbone']}, sliding window {seg['window']}/{seg['stride']}, "
            f"{seg['image'][0]}x{seg['image'][1]}, bf16 | {seg['images_per_s']:.2f} images/s | "
            f"{seg['s_per_image']:.3f} s/image | {seg['peak_rss_mb']:.0f} MB | "
            f"{_fmt_others(seg['others_cores'])} |"
        )
    if results.get("shards"):
        rows += format_shard_rows(results["shards"])
    release = {r["variant"]: r for r in results.get("release", [])}
    for step in results.get("step", []):
        ref = release.get(RELEASE_VARIANTS.get(step["backbone"], ""))
        if ref and ref["batch"] == step["batch_size"]:
            rows.append(
                f"| step, JAX release | {step['backbone']}, batch {ref['batch']}, {ref['precision']}, "
                f"{ref['cpu_count']} cores, scenic/projects/loca unmodified | {ref['images_per_second']:.2f} images/s "
                f"({ref['seconds_per_step_median']:.3f} s/step) | ours {step['precision']}"
                f"{', malloc keeps freed memory' if step.get('keep_memory') else ''}"
                f"{', compile: ' + str(step['compile']) if step.get('compile') else ''}: "
                f"{step['images_per_s'] / ref['images_per_second']:.2f}x | n/a | n/a |"
            )
    return "\n".join(rows)


RELEASE_VARIANTS = {"vit_tiny_patch16": "Ti/16", "vit_small_patch16": "S/16", "vit_base_patch16": "B/16"}


def bench_release(python: str, scenic: str, backbone: str, batch_size: int, steps: int) -> dict:
    """The authors' JAX step (benchmarks/jax_release.py) in its own environment ``python``."""
    if backbone not in RELEASE_VARIANTS:
        raise SystemExit(f"--release-python: no released variant for {backbone}; one of {sorted(RELEASE_VARIANTS)}")
    script = Path(__file__).with_name("jax_release.py")
    command = [
        python,
        str(script),
        "--scenic",
        scenic,
        "--variant",
        RELEASE_VARIANTS[backbone],
        "--batch",
        str(batch_size),
        "--steps",
        str(steps),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/bench.json", help="where to write the JSON")
    parser.add_argument(
        "--parts", default="data,shards,step,segmentation", help="comma-separated: data,shards,step,segmentation"
    )
    parser.add_argument("--models", default="vit_tiny_patch16,vit_small_patch16", help="backbones of the step part")
    parser.add_argument("--batch-size", type=int, default=8, help="per-step batch of the step part")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median reported)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the data part")
    parser.add_argument("--fp32", action="store_true", help="also time the step in float32")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the bf16 step with compile: all (inductor; compilation is part of the untimed warmup)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the step (default: torch's)")
    parser.add_argument(
        "--keep-memory",
        choices=["no", "yes", "both"],
        default="both",
        help="time the step with glibc keeping freed memory (keep_freed_memory), without, or both",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats and images: a smoke run")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        metavar="CORES",
        help="before each part, wait (up to 10 min) until other processes use fewer than CORES cores",
    )
    parser.add_argument(
        "--release-python",
        default=None,
        metavar="PYTHON",
        help="also time the authors' JAX step (benchmarks/jax_release.py) with this interpreter (needs --scenic)",
    )
    parser.add_argument("--scenic", default=None, help="folder containing the scenic package, for --release-python")
    args = parser.parse_args(argv)
    if (args.release_python is None) != (args.scenic is None):
        parser.error("--release-python and --scenic go together")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"data", "shards", "step", "segmentation"})
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from data, shards, step, segmentation")
    repeats = 3 if args.quick else args.repeats
    results: dict[str, Any] = {
        "machine": machine_info(),
        "command": " ".join(["python", *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if "data" in parts:
        kwargs = dict(images=48 if args.quick else 96, repeats=repeats, workers=args.workers)
        results["data"] = run_isolated("bench_data", kwargs, args.wait_quiet)
    if "shards" in parts:
        results["shards"] = run_isolated("bench_shards", dict(quick=args.quick, repeats=repeats), args.wait_quiet)
    if "step" in parts:
        results["step"] = []
        precisions = ["bf16-mixed"] + (["32"] if args.fp32 else [])
        keep = {"no": [False], "yes": [True], "both": [False, True]}[args.keep_memory]
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            for precision in precisions:
                compiles = [False] + (["all"] if args.compile and precision == "bf16-mixed" else [])
                for keep_memory, compile in [(k, c) for k in keep for c in compiles]:
                    kwargs = dict(
                        backbone=model,
                        batch_size=args.batch_size,
                        repeats=repeats,
                        precision=precision,
                        keep_memory=keep_memory,
                        threads=args.threads,
                        compile=compile,
                    )
                    results["step"].append(run_isolated("bench_step", kwargs, args.wait_quiet))
            if args.release_python:  # right after ours, so that both see the same machine state
                if args.wait_quiet is not None:
                    wait_until_quiet(args.wait_quiet)
                results.setdefault("release", []).append(
                    bench_release(args.release_python, args.scenic, model, args.batch_size, repeats)
                )
    if "segmentation" in parts:
        kwargs = dict(repeats=repeats)
        results["segmentation"] = run_isolated("bench_segmentation", kwargs, args.wait_quiet)
    results["table"] = format_table(results)
    print(results["table"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()

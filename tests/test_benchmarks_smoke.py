"""The benchmark scripts at tiny sizes, so that they cannot rot; and the analytic FLOP count against torch's counter."""

from __future__ import annotations

import json
import sys

import common  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import gpu
import pipeline
import pytest
import run
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

GEOMETRY = dict(reference_size=64, query_size=64, focal_size=32, num_focal=2)
HEADS = dict(num_prototypes=32, projection_hidden_dim=64, projection_dim=16)
VIEWS = dict(reference_size=32, query_size=32, focal_size=16, num_focal=2, patch_size=8)

pytestmark = pytest.mark.filterwarnings("ignore:.*self.log")  # the step runs without a Trainer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine run faster (and steadier) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("apply_cluster_loss", [True, False])
def test_analytic_step_flops_equal_torch_flop_counter(apply_cluster_loss):
    torch.manual_seed(0)
    module = common.build_module("vit_test_patch16", apply_cluster_loss=apply_cluster_loss, reference_size=64, **HEADS)
    batch = common.synthetic_batch(2, torch.device("cpu"), **GEOMETRY)
    step = common.TrainStep(module, batch)
    # the teacher's attention (no gradients) as the math kernel's matmuls, which the counter sees (it skips the CPU
    # flash kernel); with gradients attention is plain matmuls on the CPU anyway
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        step(0)
    analytic = common.loca_step_flops(module, batch)
    assert analytic["total"] == counter.get_total_flops()  # every matmul counted, exactly
    assert analytic["total"] == sum(v for k, v in analytic.items() if k != "total")


def test_train_step_updates_student_and_teacher():
    module = common.build_module("vit_test_patch16", reference_size=64, **HEADS)
    batch = common.synthetic_batch(2, torch.device("cpu"), **GEOMETRY)
    student = [p.detach().clone() for p in module.student.parameters()]
    teacher = [p.detach().clone() for p in module.teacher.parameters()]
    loss = common.TrainStep(module, batch, lr=1e-2)(0)
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(student, module.student.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(teacher, module.teacher.parameters()))


@pytest.mark.slow
def test_cpu_benchmark_parts_at_tiny_sizes(tmp_path):
    results = {
        "data": pipeline.bench_data(
            images=4, batch_size=2, repeats=1, workers=1, epochs=1, views=VIEWS, image_size=(48, 64)
        ),
        "step": [
            run.bench_step(
                "vit_test_patch16", batch_size=2, warmup=1, repeats=1, geometry=GEOMETRY, matmul_n=64, **HEADS
            )
        ],
        "segmentation": run.bench_segmentation(
            "vit_test_patch16", height=40, width=72, window=32, stride=32, num_classes=3, repeats=1
        ),
    }
    for part in ("data", "segmentation"):
        results[part]["peak_rss_mb"] = 1.0
    results["step"][0]["peak_rss_mb"] = 1.0
    assert results["data"]["one_worker"]["samples_per_s"] > 0
    assert results["data"]["loader"]["samples_per_s"] > 0
    step = results["step"][0]
    assert step["images_per_s"] > 0 and 0 < step["mfu"] and step["gflop_per_image"] > 0
    # the row is consistent with itself and with the FLOP count of the model it timed
    assert step["images_per_s"] == pytest.approx(step["batch_size"] / step["step_s"])
    assert step["achieved_gflop_per_s"] == pytest.approx(step["gflop_per_image"] * step["images_per_s"])
    assert step["mfu"] == pytest.approx(step["achieved_gflop_per_s"] / step["matmul_gflop_per_s"])
    module = common.build_module("vit_test_patch16", reference_size=GEOMETRY["reference_size"], **HEADS)
    flops = common.loca_step_flops(module, common.synthetic_batch(2, torch.device("cpu"), **GEOMETRY))
    assert step["gflop_per_image"] == pytest.approx(flops["total"] / 2 / 1e9)
    assert results["segmentation"]["images_per_s"] > 0
    table = run.format_table(results)
    assert table.count("\n| data |") == 2 and "| step | vit_test_patch16" in table and "| segmentation |" in table
    json.dumps(results)  # the JSON file takes exactly this


def test_release_rows_give_the_ratio_to_our_step_of_the_same_model_and_batch():
    ours = {
        "backbone": "vit_small_patch16",
        "batch_size": 8,
        "precision": "bf16-mixed",
        "keep_memory": True,
        "threads": 2,
        "images_per_s": 3.2,
        "step_s": 2.5,
        "gflop_per_image": 82.7,
        "achieved_gflop_per_s": 265.0,
        "matmul_gflop_per_s": 400.0,
        "mfu": 0.66,
        "mfu_cpu_time": 0.66,
        "outside_backbone_share": 0.28,
        "peak_rss_mb": 3000.0,
        "others_cores": 0.0,
    }
    release = {
        "variant": "S/16",
        "batch": 8,
        "precision": "float32",
        "cpu_count": 2,
        "images_per_second": 1.6,
        "seconds_per_step_median": 5.0,
    }
    table = run.format_table({"step": [ours, {**ours, "batch_size": 16}], "release": [release]})
    rows = [row for row in table.splitlines() if row.startswith("| step, JAX release")]
    assert len(rows) == 1 and "1.60 images/s" in rows[0] and "2.00x" in rows[0]  # batch 16 has no release row


def test_release_benchmark_names_a_missing_scenic_folder(tmp_path):
    with pytest.raises(SystemExit, match="expected a folder containing scenic/projects/loca"):
        run.bench_release(sys.executable, str(tmp_path), "vit_small_patch16", batch_size=2, steps=1)
    with pytest.raises(SystemExit, match="no released variant"):
        run.bench_release(sys.executable, str(tmp_path), "vit_test_patch16", batch_size=2, steps=1)


@pytest.mark.slow
def test_gpu_script_runs_on_the_cpu_at_tiny_size(tmp_path):
    out = tmp_path / "gpu.json"
    parts = "eager,eager_conv,eager_no_guard,timm_eager,attention,patch_embed,prototype_precision,compiled_all"
    gpu.main(
        ["--device", "cpu", "--tiny", "--no-compile", "--no-data", "--warmup", "1", "--steps", "1", "--profile"]
        + ["--parts", parts, "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert "compiled_all" not in result["parts"]  # --no-compile drops the compiled parts
    for part in ("eager", "eager_conv", "eager_no_guard", "timm_eager"):
        assert result[part]["images_per_s"] > 0 and result[part]["mfu"] > 0, part
    assert result["matmul_tflop_per_s"] > 0 and "LOCA vit_test_patch16 step" in result["table"]
    assert "timm vit_tiny_patch16_224 supervised step" in result["table"]
    shares = result["eager"]["profile"]["shares"]
    assert shares["matmul"] > 0 and sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert all(row["default"] > 0 and row["MATH"] > 0 for row in result["attention"].values())
    assert len(result["attention"]) == 4 and len(result["patch_embed"]) == 2
    assert all(row["conv"] > 0 and row["max_abs_diff_bf16"] < 0.1 for row in result["patch_embed"].values())
    errors = result["prototype_precision"]["max_abs_error"]  # float32 < bf16 inputs < bf16 result, all small
    assert errors["float32"] < 1e-5 < errors["bfloat16 (bf16 inputs, float32 sums)"] < errors["bf16 result (autocast)"]
    assert (
        errors["bf16 result (autocast)"] < 4e-3 and result["prototype_precision"]["bfloat16_kernel_vs_rounding"] < 1e-5
    )


@pytest.mark.slow
def test_compiled_step_row(monkeypatch):
    from loca_lightning.pretrain.module import LOCAPretrainModule

    monkeypatch.setattr(LOCAPretrainModule, "compile_options", {"backend": "aot_eager"})  # tracing without codegen
    step = run.bench_step(
        "vit_test_patch16", batch_size=2, warmup=1, repeats=1, geometry=GEOMETRY, matmul_n=64, compile="all", **HEADS
    )
    assert step["compile"] == "all" and step["warmup_s"] > 0 and step["images_per_s"] > 0
    release = {
        "variant": "Ti/16",
        "batch": 2,
        "precision": "float32",
        "cpu_count": 2,
        "images_per_second": 1.0,
        "seconds_per_step_median": 2.0,
    }
    table = run.format_table(
        {"step": [{**step, "backbone": "vit_tiny_patch16", "peak_rss_mb": 1.0}], "release": [release]}
    )
    assert "compile: all (warmup" in table and "ours bf16-mixed, compile: all: " in table


def test_train_step_runs_the_modules_own_optimizer_clipping_and_ema(monkeypatch):
    module = common.build_module("vit_test_patch16", reference_size=64, **HEADS)
    batch = common.synthetic_batch(2, torch.device("cpu"), **GEOMETRY)
    calls = []
    for hook in ("configure_optimizers", "optimizer_step", "configure_gradient_clipping"):
        original = getattr(module, hook)
        monkeypatch.setattr(module, hook, lambda *a, _h=hook, _f=original, **k: (calls.append(_h), _f(*a, **k))[1])
    step = common.TrainStep(module, batch)
    step(0)
    assert calls == [
        "configure_optimizers",
        "optimizer_step",
        "configure_gradient_clipping",
    ]  # clipping: in the closure
    assert isinstance(step.optimizer, torch.optim.AdamW) and step.optimizer.defaults["fused"]
    # the module's parameter groups: q/k/v biases decayed, the other 1-D parameters not
    decayed = {p for g in step.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    qkv_bias = module.student.backbone.blocks[0].attn.qkv.bias
    assert qkv_bias in decayed and module.student.backbone.blocks[0].norm1.weight not in decayed

"""Lightning DDP (gloo, 2 CPU processes) trains exactly like one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here starts processes
SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).parent.parent


def _run(script: str, *args: str, timeout: int = 240) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": "127.0.0.1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    env.pop("LOCAL_RANK", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        cwd=ROOT,
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def key_bias_slice(key: str, numel: int) -> slice | None:
    """Where the attention key bias sits in a packed bias: timm's ``qkv`` (q, k, v) or the location head's ``kv``."""
    if key.endswith("attn.qkv.bias"):
        return slice(numel // 3, 2 * numel // 3)
    if key.endswith("location_head.attn.kv.bias"):
        return slice(0, numel // 2)
    return None


def assert_states_close(actual: dict, expected: dict, atol: float) -> None:
    for key, value in expected.items():
        other = actual[key]
        keys = key_bias_slice(key, value.numel())
        if keys is None:
            torch.testing.assert_close(other, value, rtol=1e-4, atol=atol, msg=key)
            continue
        # A key bias adds one constant to all of a query's attention logits: its gradient is exactly zero in exact
        # arithmetic, so what AdamW applies is rounding noise normalised to +-lr, which differs between reduction
        # orders. Compare query and value biases as everything else; the key bias may drift by up to lr per step
        # (peak lr 1e-3, at most 4 steps here).
        mask = torch.ones(value.numel(), dtype=torch.bool)
        mask[keys] = False
        torch.testing.assert_close(other[mask], value[mask], rtol=1e-4, atol=atol, msg=key)
        torch.testing.assert_close(other[keys], value[keys], rtol=0, atol=4e-3, msg=key)


GLOO = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """3 steps of one process on batches of 4 (tests/scripts/ddp_pretrain.py): what every DDP run here must equal."""
    out = tmp_path_factory.mktemp("single") / "single.pt"
    _run("ddp_pretrain.py", "1", "4", "3", str(out))
    single = torch.load(out)
    assert single["world_size"] == 1
    # the comparisons have teeth: training moved the weights by far more than their tolerance
    step = max((v.float() - single["initial"][k].float()).abs().max().item() for k, v in single["state_dict"].items())
    assert step > 1e-4
    return single


@GLOO
@pytest.mark.parametrize(
    "variant",
    [
        pytest.param((), id="plain"),
        # compile: all traces the losses, whose global sums all-reduce inside autograd Functions (aot_eager backend:
        # the same dynamo graphs and autograd as inductor, without code generation on 2 cores)
        pytest.param(("all",), id="compile-all"),
        # micro_batch_size 1: each rank's batch of 2 in chunks of 1, the first chunk's backward inside DDP's forward
        pytest.param(("false", "1"), id="micro-batches"),
    ],
)
def test_ddp_two_processes_equal_one_process_on_the_same_global_batch(
    tmp_path: Path, single_process: dict, variant: tuple[str, ...]
) -> None:
    # An unshuffled DistributedSampler: rank r takes samples r, r+2, ...; a global batch of 4 is the same 4 samples as
    # the single process's batch, and losses, Sinkhorn and me-max are reduced over both ranks.
    _run("ddp_pretrain.py", "2", "2", "3", str(tmp_path / "ddp.pt"), *variant)
    ddp = torch.load(tmp_path / "ddp.pt")
    assert ddp["world_size"] == 2
    assert_states_close(ddp["state_dict"], single_process["state_dict"], atol=1e-6)


@pytest.fixture(scope="module")
def fsdp2_once(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """4 FSDP2 steps in one go (tests/scripts/fsdp2_pretrain.py)."""
    folder = tmp_path_factory.mktemp("fsdp2")
    _run("fsdp2_pretrain.py", "4", "0", str(folder / "once"), str(folder / "once.pt"))
    once = torch.load(folder / "once.pt")
    assert once["param_type"] == "DTensor" and once["global_step"] == 4
    return once


@GLOO
def test_fsdp2_trains_and_resumes_from_a_sharded_checkpoint(tmp_path: Path, fsdp2_once: dict) -> None:
    # ModelParallelStrategy -> configure_model shards student and teacher (DTensor parameters); 4 steps in one go
    # equal 2 steps, a stop, and a resume from the distributed checkpoint (last.ckpt is a folder of shards).
    _run("fsdp2_pretrain.py", "4", "2", str(tmp_path / "resumed"), str(tmp_path / "resumed.pt"))
    once, resumed = fsdp2_once, torch.load(tmp_path / "resumed.pt")
    assert resumed["global_step"] == 4
    assert (tmp_path / "resumed" / "last.ckpt").is_dir()
    assert_states_close(resumed["state_dict"], once["state_dict"], atol=1e-5)
    initial = once["initial"]
    for prefix in ("student.", "teacher."):  # both moved: the EMA update works on the sharded parameters
        moved = max((v - initial[k]).abs().max().item() for k, v in once["state_dict"].items() if k.startswith(prefix))
        assert moved > 1e-6, prefix
    teacher_qkv = once["state_dict"]["teacher.backbone.blocks.0.attn.qkv.weight"]
    student_qkv = once["state_dict"]["student.backbone.blocks.0.attn.qkv.weight"]
    start = initial["teacher.backbone.blocks.0.attn.qkv.weight"]
    # teacher = EMA of the student: it lies between its start and the student, much nearer the start
    assert (teacher_qkv - start).abs().max() < (student_qkv - start).abs().max()


@GLOO
def test_fsdp2_micro_batches_equal_whole_batches(tmp_path: Path, fsdp2_once: dict) -> None:
    # micro_batch_size 1: each rank's batch of 2 in chunks of 1; every chunk's backward reduce-scatters into the shards.
    # The student's pass without gradient must see the weights its pass with gradient sees (the resized position table
    # of the focal queries once went stale under FSDP2), and the first chunks' gradients must survive zero_grad.
    _run("fsdp2_pretrain.py", "4", "0", str(tmp_path / "micro"), str(tmp_path / "micro.pt"), "1")
    micro = torch.load(tmp_path / "micro.pt")
    assert micro["param_type"] == "DTensor" and micro["global_step"] == 4
    assert_states_close(micro["state_dict"], fsdp2_once["state_dict"], atol=1e-6)


def test_fsdp_config_prints() -> None:
    # configs/pretrain_fsdp.yaml targets GPUs; on CPU we check that it parses into the intended strategy.
    done = subprocess.run(
        [sys.executable, "-m", "loca_lightning.cli", "fit", "--config", "configs/pretrain_fsdp.yaml", "--print_config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout
    assert "class_path: lightning.pytorch.strategies.FSDPStrategy" in printed
    assert "- timm.models.vision_transformer.Block" in printed and "state_dict_type: sharded" in printed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@GLOO
def test_two_nodes_with_torchrun_train_the_demo_config(tmp_path: Path) -> None:
    # Two "nodes" of one process each on localhost, joined by torchrun's static rendezvous; Lightning reads the
    # torchelastic environment (ranks, world size) that torchrun sets.
    port = str(_free_port())
    overrides = [
        "--trainer.num_nodes=2",
        "--trainer.devices=1",
        "--trainer.strategy=ddp",
        "--trainer.precision=32-true",
        "--trainer.max_steps=2",
        "--trainer.max_epochs=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        "--data.init_args.synthetic_length=16",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.persistent_workers=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={rank}",
                "--nproc-per-node=1",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "loca_lightning.cli",
                "fit",
                "--config",
                "configs/demo/pretrain.yaml",
                *overrides,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:  # a node left waiting for its peer must not outlive the test
            if node.poll() is None:
                node.kill()
                node.communicate()
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{output[-4000:]}"
    assert "MEMBER: 2/2" in outputs[1]  # the second node's process is global rank 1 of 2
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2

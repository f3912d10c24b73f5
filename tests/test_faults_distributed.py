"""Faults of a multi-process job: a rank killed with SIGKILL ends the whole job promptly with a loadable checkpoint
left, and two "nodes" joined by torchrun train exactly like one process on the same global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _jobs import ROOT, Job, _free_port
from test_distributed import assert_states_close

from loca_lightning.resume import newest_good_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend"),
]
SCRIPTS = Path(__file__).parent / "scripts"
DEATH_BOUND_S = 60  # measured 10-11 s on a shared 2-core machine at load 7

# 64 scenes / batch 2 / 2 processes: 16 steps, a checkpoint after each one, logger off.
PRETRAIN = [
    "--config", str(ROOT / "configs" / "demo" / "pretrain.yaml"), "--trainer.max_epochs=1",
    "--data.init_args.synthetic_length=64", "--data.init_args.synthetic_image_size=48",
    "--data.init_args.batch_size=2", "--data.init_args.num_workers=1", "--data.init_args.views.num_focal=2",
    "--trainer.callbacks=[]", "--trainer.logger=false", "--checkpoint.dirpath=checkpoints",
    "--checkpoint.every_n_train_steps=1",
]  # fmt: skip


@pytest.mark.parametrize("rank", [0, 1])
def test_sigkill_of_either_rank_ends_the_job_promptly_with_a_loadable_checkpoint(tmp_path: Path, rank: int) -> None:
    job = Job(tmp_path / "job", PRETRAIN, 2, {})
    folder = tmp_path / "job" / "checkpoints"
    try:
        deadline = time.monotonic() + 300
        while (found := newest_good_checkpoint(folder)) is None or found.global_step < 2:
            assert all(p.poll() is None for p in job.processes), job.text()
            if time.monotonic() > deadline:
                job.dump()
                raise AssertionError("no checkpoint of step 2 in 300 s:\n" + job.text())
            time.sleep(0.1)
        os.kill(job.processes[rank].pid, signal.SIGKILL)
        killed = time.monotonic()
        survivor = job.processes[1 - rank]
        code = survivor.wait(timeout=DEATH_BOUND_S)
        took = time.monotonic() - killed
    finally:
        job.kill()
    assert code != 0, job.text()  # the survivor fails: a supervisor must not take the job for a finished run
    print(f"rank {1 - rank} exited with {code} {took:.1f} s after rank {rank} was killed")
    found = newest_good_checkpoint(folder)
    assert found is not None and found.global_step >= 2
    checkpoint = torch.load(found.path, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == found.global_step and checkpoint["state_dict"]


def _run(*command: str, cwd: Path = ROOT) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(SCRIPTS)]),
    }
    for key in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in ("LOCAL_RANK", "RANK")]:
        del env[key]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_nodes_with_torchrun_equal_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    # 2 "nodes" of one process each (batch 2) against one process (batch 4): rank r takes samples r, r+2, ..., masks
    # are a function of the sample (tests/scripts/ddp_pretrain.py), 3 steps.
    port = str(_free_port())
    single = _run(sys.executable, str(SCRIPTS / "nodes_pretrain.py"), "1", "4", "3", str(tmp_path / "single.pt"))
    nodes = [
        _run(
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node-rank={node}",
            "--nproc-per-node=1",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            str(SCRIPTS / "nodes_pretrain.py"),
            "2",
            "2",
            "3",
            str(tmp_path / "nodes.pt"),
        )  # fmt: skip
        for node in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in [single, *nodes]]
    finally:
        for p in [single, *nodes]:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, output in zip([single, *nodes], outputs):
        assert p.returncode == 0, output[-4000:]
    one, two = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "nodes.pt")
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["num_nodes"] == 2
    # The loss is a global quantity (its sums and normalisers are all-reduced): every rank reports the single process's
    # loss at every step.
    assert len(one["losses"]) == len(two["losses"]) == 3
    for step, (mine, ranks) in enumerate(zip(one["losses"], two["losses"])):
        assert ranks == pytest.approx([mine[0]] * 2, rel=1e-5), step
    assert_states_close(two["state_dict"], one["state_dict"], atol=1e-6)
    moved = max((v.float() - one["initial"][k].float()).abs().max().item() for k, v in one["state_dict"].items())
    assert moved > 1e-4  # the update is far larger than the tolerance


def test_multi_gpu_configs_carry_the_process_group_timeout() -> None:
    # A dead peer leaves NCCL ranks waiting until this timeout (docs/scaling.md); Lightning's default is 30 minutes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    configs = ["pretrain.yaml", "pretrain_vits16.yaml", "pretrain_fsdp.yaml"]
    printing = [
        subprocess.Popen(
            [sys.executable, "-m", "loca_lightning.cli", "fit", "--config", f"configs/{config}", "--print_config"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for config in configs
    ]
    for config, process in zip(configs, printing):
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, f"{config}: {err[-2000:]}"
        assert "      timeout: 0:20:00\n" in out, config

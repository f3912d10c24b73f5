"""Pre-emption through the ``loca`` command, as a cluster delivers it: a real signal lands in one phase of a step (data
loading, forward, backward, optimizer + EMA), every rank stops after that step with one checkpoint, rank 0 requeues
under SLURM (a fake ``scontrol`` records the call and kills the job, as SLURM does), and the restarted run (under
SLURM the same command with no ``--ckpt_path``, elsewhere ``--ckpt_path last``) ends bit for bit equal to a run left
alone. SLURM is played with its environment variables; 2 DDP processes are started as ``srun`` starts them."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from _jobs import JOB_ID, Job, signal_at
from test_kill_resume import PRETRAIN as KILL_RESUME_PRETRAIN
from test_kill_resume import SEGMENTATION

from loca_lightning.preemption import EXIT_PREEMPTED

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend"),
]

# 32 scenes / batch 4: 8 steps per epoch on 1 process, 4 on each of 2; 2 epochs. The shipped logger settings
# (TensorBoard under runs/demo/pretrain, versioned) decide where checkpoints go.
PRETRAIN = [*KILL_RESUME_PRETRAIN, "--trainer.callbacks=[]"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_run(actual: dict, expected: dict) -> None:
    """Weights, optimizer state and step equal bit for bit."""
    assert actual["global_step"] == expected["global_step"]
    assert actual["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(value, actual["state_dict"][key]), key
    for mine, theirs in zip(
        expected["optimizer_states"][0]["state"].values(), actual["optimizer_states"][0]["state"].values()
    ):
        for key, value in mine.items():
            assert torch.equal(value, theirs[key]), key


def checkpoints(folder: Path) -> Path:
    """The checkpoint folder of the run in ``folder`` (the shipped logger: the only version folder)."""
    versions = sorted((folder / "runs").glob("*/*/version_*"))
    assert len(versions) == 1, versions  # a resumed run continues in its own version folder
    return versions[0] / "checkpoints"


def expect_preempted(job: Job, step: int, requeued: bool) -> None:
    """The job stopped after ``step`` with ``hpc_ckpt_<step>.ckpt``; requeued: scontrol was called and killed it."""
    codes = job.wait()
    text = job.text()
    log = job.folder.parent / "scontrol.log"
    calls = log.read_text().splitlines() if log.exists() else []
    if requeued:
        assert calls and calls[-1] == f"requeue {JOB_ID}", text
        assert codes[0] == -signal.SIGKILL, (codes, text)
        log.unlink()
    else:
        assert calls == [], calls
        assert codes == [EXIT_PREEMPTED] * len(codes), (codes, text)
    assert f"pre-empted: stopped after step {step}" in text, text
    hpc = list(checkpoints(job.folder).glob("hpc_ckpt_*.ckpt"))
    assert [p.name for p in hpc] == [f"hpc_ckpt_{step}.ckpt"], hpc  # older ones are removed
    assert load(hpc[0])["global_step"] == step


def test_one_process_preempted_in_every_phase_resumes_bit_for_bit(tmp_path: Path) -> None:
    # One chain pre-empted 4 times, once in each phase of a step, against one uninterrupted run (alongside): SIGUSR1
    # under SLURM (requeue; the requeued job has no --ckpt_path) for the first two, then SIGTERM under SLURM and
    # SIGINT outside it (exit 75, no requeue; then --ckpt_path last). Step 7 is the last of the first epoch: a stop at
    # an epoch boundary.
    reference = Job(tmp_path / "reference", PRETRAIN)
    chain = tmp_path / "chain"
    try:
        expect_preempted(Job(chain, PRETRAIN, 1, {}, *signal_at(2, "data", "SIGUSR1")), 3, requeued=True)
        job = Job(chain, PRETRAIN, 1, {"SLURM_RESTART_COUNT": "1"}, *signal_at(7, "forward", "SIGUSR1"))
        expect_preempted(job, 8, requeued=True)
        job = Job(chain, PRETRAIN, 1, {"SLURM_RESTART_COUNT": "2"}, *signal_at(9, "backward", "SIGTERM"))
        expect_preempted(job, 10, requeued=False)  # SIGTERM under SLURM: never a requeue
        expect_preempted(
            Job(chain, PRETRAIN, 1, None, "--ckpt_path=last", *signal_at(12, "optimizer", "SIGINT")), 13, False
        )
        # The newest file truncated (a full disk) and a whole checkpoint of a later step under the atomic writer's
        # temporary name: the first is named and passed over, the second never counts.
        folder = checkpoints(chain)
        data = (folder / "hpc_ckpt_13.ckpt").read_bytes()
        (folder / "hpc_ckpt_15.ckpt").write_bytes(data[: len(data) // 2])
        torch.save({**load(folder / "hpc_ckpt_13.ckpt"), "global_step": 15}, folder / ".last.ckpt.x1y2z3.tmp")
        final = Job(chain, PRETRAIN, 1, None, "--ckpt_path=last")
        assert final.wait() == [0], final.text()
        assert (
            f"skipping checkpoint {Path('runs/demo/pretrain/version_0/checkpoints/hpc_ckpt_15.ckpt')}" in final.text()
        )
        assert (
            "resuming from runs/demo/pretrain/version_0/checkpoints/hpc_ckpt_13.ckpt (global step 13)" in final.text()
        )
    except BaseException:
        reference.kill()
        raise
    assert reference.wait() == [0], reference.text()
    assert_same_run(load(checkpoints(chain) / "last.ckpt"), load(checkpoints(reference.folder) / "last.ckpt"))
    assert load(checkpoints(chain) / "last.ckpt")["global_step"] == 16


def test_two_ddp_processes_preempted_by_one_rank_or_the_whole_job_resume_bit_for_bit(tmp_path: Path) -> None:
    # Segmentation (drop path, a validation every 5 steps) on 2 processes, 4 steps per epoch each. Started as srun
    # starts them: SIGUSR1 reaches rank 1 only (forward of step 1), then every process of the job, DataLoader workers
    # included, as srun delivers it (data loading of step 4, the first of the second epoch, just before the validation
    # of step 5); the requeued jobs have no --ckpt_path. Then started by Lightning itself (no SLURM): SIGTERM reaches
    # the main process only (rank 0, optimizer + EMA of step 5), and --ckpt_path last finishes. Reference: the srun-
    # style job left alone.
    reference = Job(tmp_path / "reference", SEGMENTATION, 2, {})
    chain = tmp_path / "chain"
    try:
        expect_preempted(Job(chain, SEGMENTATION, 2, {}, *signal_at(1, "forward", "SIGUSR1", ranks=[1])), 2, True)
        job = Job(chain, SEGMENTATION, 2, {"SLURM_RESTART_COUNT": "1"}, *signal_at(4, "data", "SIGUSR1", [0], "job"))
        expect_preempted(job, 5, requeued=True)
        job = Job(chain, SEGMENTATION, 2, None, "--ckpt_path=last", *signal_at(5, "optimizer", "SIGTERM", ranks=[0]))
        expect_preempted(job, 6, requeued=False)
        final = Job(chain, SEGMENTATION, 2, None, "--ckpt_path=last")
        assert final.wait() == [0], final.text()
    except BaseException:
        reference.kill()
        raise
    assert reference.wait() == [0, 0], reference.text()
    assert_same_run(load(checkpoints(chain) / "last.ckpt"), load(checkpoints(reference.folder) / "last.ckpt"))
    assert load(checkpoints(chain) / "last.ckpt")["global_step"] == 8

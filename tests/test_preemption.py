"""Pre-emption through the ``loca`` command, as a cluster delivers it: a real signal lands in one phase of a step (data
loading, forward, backward, optimizer + EMA), every rank stops after that step with one checkpoint, rank 0 requeues
under SLURM (a fake ``scontrol`` records the call and kills the job, as SLURM does), and the restarted run (under
SLURM the same command with no ``--ckpt_path``, elsewhere ``--ckpt_path last``) ends bit for bit equal to a run left
alone. SLURM is played with its environment variables; 2 DDP processes are started as ``srun`` starts them."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loca_lightning.preemption import EXIT_PREEMPTED

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend"),
]
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "demo"
TIMEOUT = 300

# 32 scenes / batch 4: 8 steps per epoch on 1 process, 4 on each of 2; 2 epochs. The shipped logger settings
# (TensorBoard under runs/demo/pretrain, versioned) decide where checkpoints go.
PRETRAIN = [
    "--config", str(CONFIGS / "pretrain.yaml"), "--trainer.max_epochs=2", "--model.init_args.drop_path_rate=0.1",
    "--data.init_args.synthetic_length=32", "--data.init_args.synthetic_image_size=48",
    "--data.init_args.batch_size=4", "--data.init_args.num_workers=1", "--data.init_args.views.num_focal=2",
    "--trainer.callbacks=[]",
]  # fmt: skip
SEGMENTATION = [
    "--config", str(CONFIGS / "seg.yaml"), "--trainer.max_steps=-1", "--trainer.max_epochs=2",
    "--trainer.val_check_interval=5", "--model.init_args.drop_path_rate=0.1",
    "--data.init_args.synthetic_length=32", "--data.init_args.synthetic_val_length=2",
    "--data.init_args.synthetic_image_size=48", "--data.init_args.crop_size=32", "--data.init_args.base_size=[48,48]",
    "--model.init_args.image_size=32", "--model.init_args.window=32", "--model.init_args.stride=16",
    "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=2", "--data.init_args.num_workers=1",
]  # fmt: skip
JOB_ID = "4242"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_scontrol(folder: Path) -> Path:
    """A ``scontrol`` that appends its arguments to ``scontrol.log`` and then kills its caller's process group (the
    job), as ``scontrol requeue`` of a running job does."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder / "scontrol.log"}"\nkill -KILL 0\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def slurm_env(rank: int, ntasks: int, restarts: int = 0) -> dict[str, str]:
    """What srun sets for one task of a one-node job (the variables Lightning's SLURMEnvironment reads)."""
    return {
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": "loca-test",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NTASKS_PER_NODE": str(ntasks),
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_RESTART_COUNT": str(restarts),
    }


class Job:
    """One ``loca fit`` job: 1 process, or ``ntasks`` processes started as srun starts them, in one process group."""

    def __init__(self, folder: Path, args: list[str], ntasks: int = 1, slurm: dict | None = None, *extra: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.log = folder / f"job-{len(list(folder.glob('job-*.log')))}.log"
        port = str(_free_port())
        base = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
            "PATH": os.pathsep.join([str(fake_scontrol(folder.parent)), os.environ.get("PATH", "")]),
        }
        for key in [k for k in base if k.startswith("SLURM_") or k in ("LOCAL_RANK", "RANK", "WORLD_SIZE")]:
            del base[key]
        command = [sys.executable, "-m", "loca_lightning.cli", "fit", *args, "--trainer.enable_progress_bar=false"]
        command += [f"--trainer.devices={ntasks}", *(["--trainer.strategy=ddp"] if ntasks > 1 else []), *extra]
        self.processes: list[subprocess.Popen] = []
        with open(self.log, "w") as handle:
            for rank in range(ntasks if slurm is not None else 1):
                env = {**base, **({k: v for k, v in slurm.items()} if slurm is not None else {})}
                if slurm is not None:
                    env.update(slurm_env(rank, ntasks, int(slurm.get("SLURM_RESTART_COUNT", 0))))
                group = 0 if not self.processes else self.processes[0].pid
                self.processes.append(
                    subprocess.Popen(
                        command, cwd=folder, env=env, stdout=handle, stderr=subprocess.STDOUT, process_group=group
                    )
                )

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        """Exit statuses of every process (the whole group is killed if it overruns)."""
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.processes]
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL whatever is left of the job's process group."""
        if any(p.poll() is None for p in self.processes):
            try:
                os.killpg(self.processes[0].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for p in self.processes:
                p.wait()

    def text(self) -> str:
        """The job's output so far."""
        return self.log.read_text()[-6000:]


def signal_at(step: int, phase: str, sig: str, ranks: list[int] | None = None, to: str = "self") -> list[str]:
    """CLI arguments that add tests/_signals.py's SignalAt callback."""
    args = ["--trainer.callbacks+=_signals.SignalAt", f"--trainer.callbacks.step={step}"]
    args += [f"--trainer.callbacks.phase={phase}", f"--trainer.callbacks.signal={sig}", f"--trainer.callbacks.to={to}"]
    return args + ([f"--trainer.callbacks.ranks=[{','.join(map(str, ranks))}]"] if ranks is not None else [])


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
    # under SLURM (requeue; the requeued job has no --ckpt_path) for the first two, SIGTERM then SIGINT outside SLURM
    # (exit 75; --ckpt_path last) for the others. Step 7 is the last of the first epoch: a stop at an epoch boundary.
    reference = Job(tmp_path / "reference", PRETRAIN)
    chain = tmp_path / "chain"
    try:
        expect_preempted(Job(chain, PRETRAIN, 1, {}, *signal_at(2, "data", "SIGUSR1")), 3, requeued=True)
        job = Job(chain, PRETRAIN, 1, {"SLURM_RESTART_COUNT": "1"}, *signal_at(7, "forward", "SIGUSR1"))
        expect_preempted(job, 8, requeued=True)
        expect_preempted(
            Job(chain, PRETRAIN, 1, None, "--ckpt_path=last", *signal_at(9, "backward", "SIGTERM")), 10, False
        )
        expect_preempted(
            Job(chain, PRETRAIN, 1, None, "--ckpt_path=last", *signal_at(12, "optimizer", "SIGINT")), 13, False
        )
        final = Job(chain, PRETRAIN, 1, None, "--ckpt_path=last")
        assert final.wait() == [0], final.text()
        assert "resuming from" in final.text() and "(global step 13)" in final.text()
    except BaseException:
        reference.kill()
        raise
    assert reference.wait() == [0], reference.text()
    assert_same_run(load(checkpoints(chain) / "last.ckpt"), load(checkpoints(reference.folder) / "last.ckpt"))
    assert load(checkpoints(chain) / "last.ckpt")["global_step"] == 16


def test_segmentation_preempted_resumes_bit_for_bit(tmp_path: Path) -> None:
    # Segmentation with drop path and a validation every 5 steps: SIGTERM in the backward of step 5, right after a
    # validation, and --ckpt_path last.
    reference = Job(tmp_path / "reference", SEGMENTATION)
    chain = tmp_path / "chain"
    try:
        expect_preempted(Job(chain, SEGMENTATION, 1, None, *signal_at(5, "backward", "SIGTERM")), 6, requeued=False)
        final = Job(chain, SEGMENTATION, 1, None, "--ckpt_path=last")
        assert final.wait() == [0], final.text()
    except BaseException:
        reference.kill()
        raise
    assert reference.wait() == [0], reference.text()
    assert_same_run(load(checkpoints(chain) / "last.ckpt"), load(checkpoints(reference.folder) / "last.ckpt"))


def test_two_ddp_processes_preempted_by_one_rank_or_the_whole_job_resume_bit_for_bit(tmp_path: Path) -> None:
    # 2 processes started as srun starts them. SIGUSR1 reaches rank 1 only (forward), then every process of the job
    # including the DataLoader workers (data loading), then SIGTERM reaches rank 0 only (optimizer + EMA): never a
    # requeue. Reference: the same 2-process run left alone.
    reference = Job(tmp_path / "reference", PRETRAIN, 2, {})
    chain = tmp_path / "chain"
    try:
        expect_preempted(Job(chain, PRETRAIN, 2, {}, *signal_at(1, "forward", "SIGUSR1", ranks=[1])), 2, True)
        job = Job(chain, PRETRAIN, 2, {"SLURM_RESTART_COUNT": "1"}, *signal_at(4, "data", "SIGUSR1", [0], to="job"))
        expect_preempted(job, 5, requeued=True)
        job = Job(chain, PRETRAIN, 2, {"SLURM_RESTART_COUNT": "2"}, *signal_at(6, "optimizer", "SIGTERM", ranks=[0]))
        expect_preempted(job, 7, requeued=False)
        final = Job(chain, PRETRAIN, 2, {}, "--ckpt_path=last")
        assert final.wait() == [0, 0], final.text()
    except BaseException:
        reference.kill()
        raise
    assert reference.wait() == [0, 0], reference.text()
    assert_same_run(load(checkpoints(chain) / "last.ckpt"), load(checkpoints(reference.folder) / "last.ckpt"))
    assert load(checkpoints(chain) / "last.ckpt")["global_step"] == 8

"""Jobs of ``loca fit`` as a cluster runs them, for the fault tests: 1 process, or several started as ``srun`` starts
them (SLURM played with its environment variables), in one process group of their own, with a fake ``scontrol``."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300
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
            "PYTHONFAULTHANDLER": "1",  # a hung job's stacks go to its log when dump() aborts it
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
        except subprocess.TimeoutExpired:
            self.dump()
            raise
        finally:
            self.kill()

    def dump(self) -> None:
        """Abort the processes still running so that faulthandler writes every thread's stack to the log."""
        for p in self.processes:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGABRT)
        time.sleep(3)

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

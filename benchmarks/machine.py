"""What the benchmarks ran on, and how busy other processes kept the machine while they ran (Linux /proc)."""

from __future__ import annotations

import os
import platform
import resource
import time

import torch

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_info() -> dict:
    """CPU model, core count, torch build and threads: the context every number needs."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have used since boot (None without /proc)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    return (sum(fields[:8]) - idle - steal) / _HZ


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used) of every process in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _HZ)  # ppid, utime + stime
    return table


def _tree(root: int, table: dict[int, tuple[int, float]]) -> list[int]:
    """``root`` and its living descendants."""
    members = []
    for pid in table:
        p = pid
        while p > 1 and p != root:
            p = table.get(p, (0, 0.0))[0]
        if p == root:
            members.append(pid)
    return members


def _tree_seconds(root: int) -> float:
    """CPU seconds used by ``root`` and all its living descendants (DataLoader workers included)."""
    table = _process_table()
    return sum(table[pid][1] for pid in _tree(root, table))


class OtherLoad:
    """Average number of cores that OTHER processes kept busy between ``start()`` and ``stop()``.

    A shared machine makes timings noisy; each measurement records this so that a reader can tell a clean
    number from a contended one. ``None`` where /proc is unavailable.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._start: tuple[float, float | None, float] | None = None
        self.own_cpu_s: float | None = None

    def _own_seconds(self) -> float:
        # Living descendants through /proc, exited (waited-for) ones through RUSAGE_CHILDREN.
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return _tree_seconds(self.pid) + children.ru_utime + children.ru_stime

    def start(self) -> OtherLoad:
        self._start = (time.monotonic(), _busy_seconds(), self._own_seconds())
        return self

    def stop(self) -> float | None:
        """Cores used by other processes on average since ``start()``; also sets ``own_cpu_s``."""
        if self._start is None:
            raise RuntimeError("OtherLoad.stop() before start()")
        t0, busy0, own0 = self._start
        busy1 = _busy_seconds()
        self.own_cpu_s = self._own_seconds() - own0  # this process tree's CPU seconds: robust to contention
        if busy0 is None or busy1 is None:
            return None
        elapsed = max(time.monotonic() - t0, 1e-9)
        return max(0.0, (busy1 - busy0 - self.own_cpu_s) / elapsed)


def wait_until_quiet(max_other_cores: float = 0.25, window_s: float = 3.0, timeout_s: float = 600.0) -> float | None:
    """Block until other processes use fewer than ``max_other_cores`` for ``window_s`` (or ``timeout_s`` passes).

    Returns the last measured load of others.
    """
    deadline = time.monotonic() + timeout_s
    load = None
    while time.monotonic() < deadline:
        monitor = OtherLoad().start()
        time.sleep(window_s)
        load = monitor.stop()
        if load is None or load < max_other_cores:
            break
    return load


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tree_pss_mb(root: int | None = None) -> float | None:
    """Proportional set size of a process and its living descendants in MiB: shared pages counted once in all,
    so forked DataLoader workers are not charged for their parent's memory. None without /proc."""
    root = os.getpid() if root is None else root
    total, found = 0.0, False
    for pid in _tree(root, _process_table()):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                pss = [line for line in f if line.startswith("Pss:")]
        except OSError:
            continue
        if pss:
            total += int(pss[0].split()[1]) / 1024
            found = True
    return total if found else None

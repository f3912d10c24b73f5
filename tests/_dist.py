"""Run a function on several CPU processes joined by a gloo process group and collect what each rank returns."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, store_file: str, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    if sys.platform.startswith("linux"):
        # containers often have a hostname that does not resolve: keep gloo on the loopback interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    # a file store needs no free port, so parallel test runs cannot collide
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo processes; return their results by rank.

    ``fn`` must be a module-level function (it is pickled by name) and return something ``torch.save`` can store.
    """
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world_size, os.path.join(tmp, "store"), tmp, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world_size)]

"""The non-finite guard decides for all processes at once: every rank skips the step, or every rank stops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "nonfinite_ddp.py"
ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")]


def _run(policy: str, out: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": "127.0.0.1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    env.pop("LOCAL_RANK", None)
    # a rank that skipped or stopped alone would leave the other waiting in a collective: the timeout catches a hang
    return subprocess.run(
        [sys.executable, str(SCRIPT), policy, str(out)], cwd=ROOT, env=env, timeout=240, capture_output=True, text=True
    )


def test_one_rank_nonfinite_makes_every_rank_skip_the_step(tmp_path: Path) -> None:
    done = _run("skip", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 3  # the skipped batch did not count as a step
    for key, value in ranks[0]["state_dict"].items():
        assert torch.equal(value, ranks[1]["state_dict"][key]), key  # the replicas never diverged
    assert all(torch.isfinite(v).all() for v in ranks[0]["state_dict"].values() if v.is_floating_point())


def test_one_rank_nonfinite_makes_every_rank_stop_after_the_rescue_checkpoint(tmp_path: Path) -> None:
    done = _run("stop", tmp_path)
    assert done.returncode != 0
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    for error in errors:  # both ranks stopped, each naming the step and the rescue file
        assert "non-finite loss at step 1" in error and "nonfinite-step1.ckpt" in error
    checkpoint = torch.load(tmp_path / "nonfinite-step1.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 1  # the last good state: weights before the poisoned step

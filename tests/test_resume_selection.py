"""Which checkpoint a resume takes: the newest good one by global step (never a temporary file, never by name), a
corrupt one named and passed over; ``loca fit --ckpt_path last`` with nothing to resume, or an explicit corrupt file,
stops with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loca_lightning.resume import checkpoint_step, newest_good_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _save(path: Path, step: int) -> Path:
    torch.save({"global_step": step, "state_dict": {"w": torch.full((4,), float(step))}}, path)
    return path


def test_the_highest_global_step_wins_not_the_name_nor_a_temporary_file(tmp_path: Path, capsys) -> None:
    _save(tmp_path / "last.ckpt", 12)
    _save(tmp_path / "hpc_ckpt_3.ckpt", 5)  # an hpc checkpoint older than last.ckpt
    _save(tmp_path / "epoch=0-step=10.ckpt", 10)
    _save(tmp_path / ".last.ckpt.abc123.tmp", 40)  # the atomic writer's temporary file: never a candidate
    _save(tmp_path / ".hpc_ckpt_9.ckpt.x1.tmp", 41)
    _save(tmp_path / "nonfinite-step30.ckpt", 30)  # a state that leads into a non-finite loss
    found = newest_good_checkpoint(tmp_path)
    assert found is not None and (Path(found.path).name, found.global_step) == ("last.ckpt", 12)
    assert capsys.readouterr().err == ""


def test_a_truncated_or_empty_newest_checkpoint_is_named_and_passed_over(tmp_path: Path, capsys) -> None:
    _save(tmp_path / "last.ckpt", 12)
    data = _save(tmp_path / "hpc_ckpt_20.ckpt", 20).read_bytes()
    (tmp_path / "hpc_ckpt_20.ckpt").write_bytes(data[: len(data) // 2])  # a node lost mid-write, without our writer
    (tmp_path / "epoch=1-step=16.ckpt").write_bytes(b"")  # a full disk
    found = newest_good_checkpoint(tmp_path)
    assert found is not None and (Path(found.path).name, found.global_step) == ("last.ckpt", 12)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("loca: skipping checkpoint ") for line in lines)
    assert "hpc_ckpt_20.ckpt: it does not load" in " ".join(lines) and "epoch=1-step=16.ckpt" in " ".join(lines)


def test_a_sharded_checkpoint_folder_counts_by_its_metadata(tmp_path: Path) -> None:
    _save(tmp_path / "last.ckpt", 4)
    sharded = tmp_path / "hpc_ckpt_6.ckpt"
    sharded.mkdir()
    _save(sharded / "meta.pt", 6)  # Lightning's sharded checkpoints keep global_step etc. in meta.pt
    (tmp_path / "broken.ckpt").mkdir()  # a folder whose writer died before the metadata
    assert checkpoint_step(sharded) == 6
    found = newest_good_checkpoint(tmp_path)
    assert found is not None and Path(found.path) == sharded


def test_an_empty_or_missing_folder_has_nothing(tmp_path: Path) -> None:
    assert newest_good_checkpoint(tmp_path / "absent") is None
    assert newest_good_checkpoint(tmp_path) is None


def _loca_fit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    command = [sys.executable, "-m", "loca_lightning.cli", "fit", "--config", str(ROOT / "configs/demo/pretrain.yaml")]
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_loca_fit_ckpt_path_last_with_nothing_to_resume_or_a_corrupt_file_stops_with_one_line(tmp_path: Path) -> None:
    # The shipped logger settings (runs/demo/pretrain/version_<n>): a previous run that never saved a checkpoint.
    (tmp_path / "runs" / "demo" / "pretrain" / "version_0").mkdir(parents=True)
    done = _loca_fit(tmp_path, "--ckpt_path", "last")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("loca: error:")]
    assert errors == [
        "loca: error: --ckpt_path last: no checkpoint to resume in runs/demo/pretrain/version_<n>/checkpoints"
    ]
    assert sorted(p.name for p in (tmp_path / "runs" / "demo" / "pretrain").iterdir()) == ["version_0"]  # no new run
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 half a zip")
    done = _loca_fit(tmp_path, "--ckpt_path", str(broken))
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("loca: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"loca: error: --ckpt_path {broken}: the checkpoint does not load")

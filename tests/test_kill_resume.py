"""Resume after SIGKILL through the ``loca`` command, as a pre-empted job does it: a run killed mid-epoch (DataLoader
workers alive, a batch prefetched) and resumed with ``--ckpt_path <its last.ckpt>`` ends with the weights, optimizer
state and step of an uninterrupted run, bit for bit. Pretraining on 1 process and on 2 DDP processes (gloo),
segmentation with drop path and a validation inside the epochs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import torch

from loca_lightning.data.shard_writer import shards_pattern, write_shards
from loca_lightning.data.synthetic import SyntheticScenes

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "demo"

# 32 scenes / batch 4 = 8 steps per epoch (per process: 2 DDP processes take 4 scenes each), 2 epochs. Killed after
# the 3rd step of the second epoch: the resumed run skips 3 batches of an epoch whose order it must redraw.
PRETRAIN = [
    "--config", str(CONFIGS / "pretrain.yaml"), "--trainer.max_epochs=2", "--model.init_args.drop_path_rate=0.1",
    "--data.init_args.synthetic_length=32", "--data.init_args.synthetic_image_size=48",
    "--data.init_args.batch_size=4", "--data.init_args.num_workers=1", "--data.init_args.views.num_focal=2",
]  # fmt: skip
SEGMENTATION = [
    "--config", str(CONFIGS / "seg.yaml"), "--trainer.max_steps=-1", "--trainer.max_epochs=2",
    "--trainer.val_check_interval=5", "--model.init_args.drop_path_rate=0.1",
    "--data.init_args.synthetic_length=32", "--data.init_args.synthetic_val_length=2",
    "--data.init_args.synthetic_image_size=48", "--data.init_args.crop_size=32", "--data.init_args.base_size=[48,48]",
    "--model.init_args.image_size=32", "--model.init_args.window=32", "--model.init_args.stride=16",
    "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=2", "--data.init_args.num_workers=1",
]  # fmt: skip
CASES = {
    "pretrain_1_process": (PRETRAIN, 1, 11),
    "pretrain_2_ddp_processes": (PRETRAIN, 2, 7),  # 4 steps per epoch per process
    "segmentation_1_process": (SEGMENTATION, 1, 11),
}


# The same run from 32 JPEG scenes in tar shards of 7, 7, 7, 7 and 4 (uneven: the DDP ranks' samples come from shards
# of different sizes). The 1-process run is resumed with 2 workers instead of 1: batches do not depend on the workers.
SHARD_CASES = {
    "pretrain_shards_1_process_resumed_with_2_workers": (1, 11, ["--data.init_args.num_workers=2"]),
    "pretrain_shards_2_ddp_processes": (2, 7, []),
}


def _shard_args(folder: Path) -> list[str]:
    """PRETRAIN reading 32 scenes written as JPEGs into tar shards under ``folder``."""
    scenes = SyntheticScenes(length=32, image_size=48, with_masks=False, seed=0)
    paths = [folder / "images" / f"{i:03d}.jpg" for i in range(32)]
    paths[0].parent.mkdir(parents=True)
    for i, path in enumerate(paths):
        assert cv2.imwrite(str(path), scenes[i]["image"][:, :, ::-1])
    pattern = shards_pattern(write_shards(paths, folder / "shards", 7))
    return [*PRETRAIN, "--data.init_args.source=shards", f"--data.init_args.shards={pattern}"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(folder: Path, args: list[str], devices: int, *extra: str) -> subprocess.Popen:
    """``loca fit`` in ``folder`` (its own process group, so that a kill takes the DDP peers and workers too)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    env.pop("LOCAL_RANK", None)
    command = [
        sys.executable,
        "-m",
        "loca_lightning.cli",
        "fit",
        *args,
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.devices={devices}",
        *(["--trainer.strategy=ddp"] if devices > 1 else []),
        "--checkpoint.dirpath=checkpoints",
        "--checkpoint.every_n_train_steps=1",
        *extra,
    ]
    log = folder / f"loca-{len(list(folder.glob('loca-*.log')))}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command, cwd=folder, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    process.log = log
    return process


def _finish(process: subprocess.Popen, timeout: float = 300) -> None:
    try:
        code = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 0, f"loca fit exited with {code}:\n" + _log(process)


def _log(process: subprocess.Popen) -> str:
    return process.log.read_text()[-4000:]


def _step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # not written yet (the writer renames a finished file into place, so never half a file)
        return -1


def _kill_at(process: subprocess.Popen, checkpoint: Path, step: int, timeout: float = 300) -> None:
    """SIGKILL the run's whole process group once ``checkpoint`` reports ``step``."""
    deadline = time.monotonic() + timeout
    try:
        while _step(checkpoint) < step:
            assert process.poll() is None, "the run ended before it was killed:\n" + _log(process)
            assert time.monotonic() < deadline, f"no checkpoint of step {step} after {timeout} s"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path: Path, case: str) -> None:
    args, devices, kill_step = CASES[case]
    _kill_resume_and_compare(tmp_path, args, devices, kill_step)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_sigkill_mid_epoch_then_resume_from_shards_equals_an_uninterrupted_run(tmp_path: Path, case: str) -> None:
    devices, kill_step, resume_extra = SHARD_CASES[case]
    _kill_resume_and_compare(tmp_path, _shard_args(tmp_path), devices, kill_step, resume_extra)


def _kill_resume_and_compare(
    tmp_path: Path, args: list[str], devices: int, kill_step: int, resume_extra: list[str] = ()
) -> None:
    once = _start(tmp_path / "once", args, devices)  # the uninterrupted run, alongside the others
    killed = _start(
        tmp_path / "killed",
        args,
        devices,
        "--trainer.callbacks+=_pause.PauseAfter",
        f"--trainer.callbacks.step={kill_step}",
    )
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    try:
        _kill_at(killed, last, kill_step)
        assert killed.returncode == -signal.SIGKILL
        saved = torch.load(last, map_location="cpu", weights_only=True)
        assert saved["global_step"] == kill_step
        assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 3  # mid-epoch
        _finish(_start(tmp_path / "killed", args, devices, f"--ckpt_path={last}", *resume_extra))
    except BaseException:
        os.killpg(once.pid, signal.SIGKILL)
        raise
    _finish(once)
    once = torch.load(tmp_path / "once" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == once["global_step"] == kill_step + (5 if devices == 1 else 1)
    assert once["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in once["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for mine, theirs in zip(
        once["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()
    ):
        for key, value in mine.items():
            assert torch.equal(value, theirs[key]), key
    moved = max((v.float() - saved["state_dict"][k].float()).abs().max().item() for k, v in once["state_dict"].items())
    assert moved > 1e-5  # the steps after the kill changed the weights: the comparison has teeth

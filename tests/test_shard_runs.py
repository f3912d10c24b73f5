"""Training from tar shards through real processes: 2 gloo processes over uneven shards (equal steps, every sample
once), and `loca fit` with the demo config from shards past a corrupt member and a short shard."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_shards import VIEWS, write_jpegs  # tests/ is on sys.path under pytest

from loca_lightning.data.pretrain import LOCAPretrainDataModule
from loca_lightning.data.shard_writer import shards_pattern, write_shards
from loca_lightning.data.shards import index_shard
from loca_lightning.pretrain.views import LOCAViews


def _ddp_epoch(rank: int, world_size: int, pattern: str) -> dict:
    """Lightning's DistributedSampler over uneven shards: batches per rank, the samples each rank draws, and the
    images really loaded (one worker), with a collective per batch as a training step has."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DataLoader, DistributedSampler

    dm = LOCAPretrainDataModule(
        source="shards", shards=pattern, views=LOCAViews(**VIEWS), batch_size=4, num_workers=1, pin_memory=False
    )
    with _replace_dunder_methods(DataLoader, "dataset"):  # what the Trainer does around train_dataloader()
        loader = dm.train_dataloader()
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    loader = _update_dataloader(loader, sampler)
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world_size)]
    torch.distributed.all_gather(counts, torch.tensor([len(loader)]))
    assert len({int(c) for c in counts}) == 1, f"ranks disagree on the steps per epoch: {counts}"
    steps = 0
    for batch in loader:
        assert batch["reference"].shape[0] == 4
        torch.distributed.all_reduce(torch.ones(1))  # a rank with fewer batches would leave the other waiting here
        steps += 1
    return {"steps": steps, "batches": [list(b) for b in loader.batch_sampler]}


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_gloo_processes_over_uneven_shards_take_equal_steps_and_see_every_sample(tmp_path: Path) -> None:
    from _dist import run_distributed

    images = write_jpegs(tmp_path / "images", 30, shape=(24, 24))
    sizes = [3, 17, 1, 9]  # deliberately uneven: one shard holds a single sample
    patterns = []
    for k, (start, size) in enumerate(zip(np.cumsum([0] + sizes[:-1]), sizes)):
        patterns += [str(s) for s in write_shards(images[start : start + size], tmp_path / f"set{k}", size)]
    listing = tmp_path / "shards.txt"
    listing.write_text("\n".join(patterns) + "\n")
    results = run_distributed(_ddp_epoch, 2, str(listing))
    assert [r["steps"] for r in results] == [3, 3]  # 15 samples per rank, batches of 4, the last partial one dropped
    drawn = [i for r in results for batch in r["batches"] for i in batch]
    assert all(len(set(sum(r["batches"], []))) == len(sum(r["batches"], [])) for r in results)  # none twice per rank
    # every sample at most once across ranks; only the two dropped partial batches (3 each) miss the epoch
    assert len(set(drawn)) == len(drawn) == 24 and set(drawn) <= set(range(30))


@pytest.mark.slow
def test_demo_config_trains_from_shards_past_a_corrupt_member_and_a_truncated_shard(tmp_path: Path) -> None:
    """`loca fit --config configs/demo/pretrain.yaml --data.init_args.shards PATTERN`: one argument switches the demo
    from synthetic scenes to shards; a bad member and a shard cut short are named, replaced and counted. The shard is
    rewritten whole with 5 of its 10 samples (a tar cut inside a member stops the run at start-up); while training
    it reads as a shard truncated after start-up does (`test_shard_truncated_after_start_up_...`)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    shards = write_shards(write_jpegs(tmp_path / "images", 40, shape=(48, 48)), tmp_path / "shards", 10)
    offsets, _ = index_shard(str(shards[0]))
    with open(shards[0], "r+b") as handle:
        handle.seek(int(offsets[2]))
        handle.write(b"garbage!" * 40)
    with tarfile.open(shards[3]) as tar:  # a shard that holds 5 of the 10 samples _info.json counts
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()[:10]]
    with tarfile.open(shards[3], "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    command = [
        sys.executable, "-m", "loca_lightning.cli", "fit", "--config", str(root / "configs/demo/pretrain.yaml"),
        f"--data.init_args.shards={shards_pattern(shards)}", "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=1", "--trainer.max_epochs=2", "--data.init_args.views.num_focal=2", "--trainer.callbacks=[]", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--checkpoint.dirpath=ckpt",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root), "LOCA_SHARD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    printed = subprocess.run([*command, "--print_config"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert f"shards: {shards_pattern(shards)}" in printed.stdout, printed.stderr[-2000:]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "train-000000.tar[sample 2]" in run.stderr  # the corrupt member, named
    assert "train-000003.tar holds 5 of its 10 samples" in run.stderr  # the short shard, named
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 10  # 40 samples / 8 = 5 steps an epoch, whatever was skipped
    assert saved["state_dict"]["skipped_images"] >= 1

"""A few LOCA pretraining steps on CPU, in one process or under Lightning DDP (gloo); saves the final weights.

Usage: python ddp_pretrain.py DEVICES PER_DEVICE_BATCH STEPS OUT.pt [COMPILE [MICRO]]   (run by
tests/test_distributed.py)
COMPILE: a value of the module's ``compile`` option ("false" for none), traced with torch.compile's aot_eager backend
(no code generation). MICRO: the module's ``micro_batch_size``.
Masks are derived from each sample (a hash of its targets) instead of a random generator, so that a sample draws
the same masks whichever process it lands on.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from _fake_loca import FakeLOCADataModule  # tests/, on PYTHONPATH (tests/test_distributed.py)
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from loca_lightning.distributed import destroy_process_groups
from loca_lightning.pretrain.module import LOCAPretrainModule

TINY = dict(
    backbone="vit_test_patch16",
    reference_size=64,
    num_prototypes=32,
    projection_hidden_dim=64,
    projection_dim=16,
    drop_path_rate=0.0,
    warmup_epochs=0.5,
    reference_mask="unstructured",
    lr_reference_batch=4,
)  # peak lr 1e-3: steps large enough for the comparison to mean something


def sample_keep(targets: Tensor, num_tokens: int, keep: int, salt: int) -> Tensor:
    """Keep-indices ``[B, keep]`` drawn from a generator seeded by each sample's targets (the same on any rank)."""
    rows = []
    for row in targets:
        seed = int((row.long() + 2).mul(torch.arange(1, row.numel() + 1)).sum()) * 31 + salt
        generator = torch.Generator().manual_seed(seed)
        rows.append(torch.randperm(num_tokens, generator=generator)[:keep].sort().values)
    return torch.stack(rows).to(targets.device)


class SampleMasks(LOCAPretrainModule):
    """Masks as a function of the sample (its target_large), recorded in training_step."""

    def training_step(self, batch, batch_idx):
        self._targets = batch["target_large"]
        return super().training_step(batch, batch_idx)

    def select_reference_keep(self, batch_size: int) -> Tensor:
        return sample_keep(self._targets, self.num_positions, self.reference_keep, salt=1)

    def select_query_keep(self, batch_size: int, num_tokens: int) -> Tensor:
        keep = min(self.hparams.query_keep, num_tokens)
        return sample_keep(self._targets, num_tokens, keep, salt=2)


class StridedData(FakeLOCADataModule):
    """Rank r of n takes samples r, r+n, r+2n, ...: together the ranks' batches are the single process's batch."""

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler)


def main() -> None:
    devices, per_device, steps, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    compile = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "false" else False
    micro = int(sys.argv[6]) if len(sys.argv) > 6 else None
    torch.set_num_threads(1)
    L.seed_everything(0)
    SampleMasks.compile_options = {"backend": "aot_eager"}
    model = SampleMasks(**TINY, compile=compile, micro_batch_size=micro)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        use_distributed_sampler=False,
    )
    trainer.fit(model, StridedData(batch_size=per_device, length=16))
    if trainer.is_global_zero:
        torch.save({"state_dict": model.state_dict(), "initial": initial, "world_size": trainer.world_size}, out)
    destroy_process_groups()  # before Python shuts down: see loca_lightning/distributed.py


if __name__ == "__main__":
    main()

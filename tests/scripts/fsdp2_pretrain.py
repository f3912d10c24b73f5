"""A few LOCA pretraining steps under Lightning's ModelParallelStrategy (FSDP2, gloo, 2 CPU processes), optionally
stopping halfway and resuming from the sharded checkpoint; rank 0 saves the full final weights.

Usage: python fsdp2_pretrain.py STEPS STOP_AT(0 = none) CKPT_DIR OUT.pt [MICRO]   (run by tests/test_distributed.py)
MICRO: the module's ``micro_batch_size``.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from _fake_loca import StopAt  # tests/, on PYTHONPATH (tests/test_distributed.py)
from ddp_pretrain import TINY, SampleMasks, StridedData  # this script's folder
from lightning.pytorch.strategies import ModelParallelStrategy

from loca_lightning.distributed import destroy_process_groups


def fit(steps: int, stop: int, ckpt_dir: str, resume: bool, micro: int | None) -> L.LightningModule:
    L.seed_everything(0)
    model = SampleMasks(**TINY, micro_batch_size=micro)
    model.initial = {k: v.clone() for k, v in model.state_dict().items()}  # before sharding
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=1
    )
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[checkpoint] + ([StopAt(stop)] if stop else []),
    )
    # 8 samples, 2 per rank: 2 steps per epoch, so a stop after step 2 is at an epoch boundary (a plain DataLoader
    # cannot resume mid-epoch)
    trainer.fit(model, StridedData(batch_size=2, length=8), ckpt_path="last" if resume else None)
    return trainer, model


def main() -> None:
    steps, stop, ckpt_dir, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    micro = int(sys.argv[5]) if len(sys.argv) > 5 else None
    torch.set_num_threads(1)
    trainer, model = fit(steps, stop, ckpt_dir, resume=False, micro=micro)
    if stop:
        trainer, model = fit(steps, 0, ckpt_dir, resume=True, micro=micro)
    full = {}
    for key, value in model.state_dict().items():  # DTensor shards -> full tensors (a collective: all ranks)
        full[key] = value.full_tensor() if hasattr(value, "full_tensor") else value
    sharded = type(model.student.backbone.blocks[0].attn.qkv.weight).__name__
    if trainer.is_global_zero:
        torch.save(
            {"state_dict": full, "initial": model.initial, "global_step": trainer.global_step, "param_type": sharded},
            out,
        )
    destroy_process_groups()  # before Python shuts down: see loca_lightning/distributed.py


if __name__ == "__main__":
    main()

"""A few LOCA pretraining steps on ``NODES`` "nodes" of one process each (under torchrun, which sets the ranks), or on
one process; rank 0 saves the final weights and every rank's loss at each step.

Usage: python nodes_pretrain.py NODES PER_PROCESS_BATCH STEPS OUT.pt   (run by tests/test_faults_distributed.py)
The model, masks and data are those of ddp_pretrain.py: masks are a function of the sample, and rank r of n takes
samples r, r+n, ..., so n processes see the single process's global batch.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from ddp_pretrain import TINY, SampleMasks, StridedData
from lightning.pytorch.strategies import DDPStrategy

from loca_lightning.distributed import destroy_process_groups


class RecordLosses(L.Callback):
    """Every rank's training loss at each step, gathered on all ranks: ``losses[step][rank]``."""

    def __init__(self) -> None:
        self.losses: list[list[float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().float().reshape(1)
        gathered = trainer.strategy.all_gather(loss) if trainer.world_size > 1 else loss
        self.losses.append([float(v) for v in gathered.reshape(-1)])


def main() -> None:
    nodes, per_process, steps, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = SampleMasks(**TINY)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    record = RecordLosses()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=nodes,
        strategy=DDPStrategy(process_group_backend="gloo") if nodes > 1 else "auto",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        use_distributed_sampler=False,
        callbacks=[record],
    )
    trainer.fit(model, StridedData(batch_size=per_process, length=16))
    if trainer.is_global_zero:
        state = {"state_dict": model.state_dict(), "initial": initial, "world_size": trainer.world_size}
        torch.save({**state, "losses": record.losses, "num_nodes": trainer.num_nodes}, out)
    destroy_process_groups()  # before Python shuts down: see loca_lightning/distributed.py


if __name__ == "__main__":
    main()

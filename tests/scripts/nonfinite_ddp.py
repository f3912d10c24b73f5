"""Two LOCA processes under Lightning DDP (gloo, CPU); only rank 1's loss is NaN at step 1.

Usage: python nonfinite_ddp.py skip|stop OUT_DIR   (run by tests/test_nonfinite.py)
skip: both ranks must skip that step and finish with the same weights (a rank skipping alone would leave the other
waiting for gradients); each rank saves its final state to OUT_DIR/rank{r}.pt. stop: both ranks must stop after the
rescue checkpoint; each writes the error to OUT_DIR/rank{r}.err and exits with 3.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from _fake_loca import FakeLOCADataModule
from lightning.pytorch.strategies import DDPStrategy

from loca_lightning.pretrain.module import LOCAPretrainModule

TINY = dict(
    backbone="vit_test_patch16",
    reference_size=64,
    num_prototypes=32,
    projection_hidden_dim=64,
    projection_dim=16,
    drop_path_rate=0.0,
    warmup_epochs=0.5,
    lr_reference_batch=4,
)


class PoisonRankOne(LOCAPretrainModule):
    def compute_losses(self, *args):
        out = super().compute_losses(*args)
        if self.global_step == 1 and self.global_rank == 1:
            out["loss"] = out["loss"] * float("nan")
        return out


def main() -> None:
    policy, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = PoisonRankOne(**TINY, on_nonfinite=policy)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo"),
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    try:
        trainer.fit(model, FakeLOCADataModule(batch_size=2, length=16))
    except FloatingPointError as error:
        (out / f"rank{trainer.global_rank}.err").write_text(str(error))
        sys.exit(3)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": trainer.global_step}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()

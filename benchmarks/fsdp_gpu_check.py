"""Exercise configs/pretrain_fsdp.yaml's strategy on one CUDA GPU: classic FSDP (one unit per Block, backbones and
heads), activation checkpointing, bf16-mixed, gradient clipping by norm, EMA teacher, sharded checkpoint save/resume.

    python benchmarks/fsdp_gpu_check.py --out DIR      # needs torch with CUDA, lightning, timm; no albumentations

Random batches of the documented layout (tests/_fake_loca.py) stand in for images, so the data stack is not needed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.strategies import FSDPStrategy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _fake_loca import FakeLOCADataModule  # noqa: E402
from timm.models.vision_transformer import Block  # noqa: E402

from loca_lightning.backbones.vit import ViT  # noqa: E402
from loca_lightning.pretrain.heads import LocationHead, ProjectionHead  # noqa: E402
from loca_lightning.pretrain.module import LOCAPretrainModule  # noqa: E402


def strategy_from_config() -> FSDPStrategy:
    """The FSDPStrategy that configs/pretrain_fsdp.yaml describes (policies resolved to classes)."""
    config = yaml.safe_load((ROOT / "configs" / "pretrain_fsdp.yaml").read_text())["trainer"]["strategy"]["init_args"]
    names = {
        "timm.models.vision_transformer.Block": Block,
        "loca_lightning.backbones.vit.ViT": ViT,
        "loca_lightning.pretrain.heads.LocationHead": LocationHead,
        "loca_lightning.pretrain.heads.ProjectionHead": ProjectionHead,
    }
    return FSDPStrategy(
        sharding_strategy=config["sharding_strategy"],
        auto_wrap_policy={names[n] for n in config["auto_wrap_policy"]},
        activation_checkpointing_policy={names[n] for n in config["activation_checkpointing_policy"]},
        state_dict_type=config["state_dict_type"],
    )


class Timer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def run(out: Path, steps: int, ckpt: str | None, batch: int) -> LOCAPretrainModule:
    model = LOCAPretrainModule(backbone="vit_small_patch16", warmup_epochs=0.1)
    timer = Timer()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=strategy_from_config(),
        precision="bf16-mixed",
        max_steps=steps,
        gradient_clip_val=1.0,
        gradient_clip_algorithm="norm",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[timer, L.pytorch.callbacks.ModelCheckpoint(dirpath=out, save_last=True)],
    )
    data = FakeLOCADataModule(batch_size=batch, length=batch * 8, size=224, focal=96, num_focal=9)
    trainer.fit(model, data, ckpt_path=ckpt)
    times = sorted(timer.times[2:]) or timer.times
    print(
        f"steps {trainer.global_step}, median step {times[len(times) // 2] * 1e3:.1f} ms at batch {batch}, "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, loss {float(trainer.callback_metrics['loss']):.4f}"
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_results/fsdp_check")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    out = Path(args.out)
    run(out, 6, None, args.batch)
    model = run(out, 10, str(out / "last.ckpt"), args.batch)
    print(
        "resumed from the sharded last.ckpt and trained to step 10; teacher finite:",
        all(torch.isfinite(p).all() for p in model.teacher.parameters()),
    )


if __name__ == "__main__":
    main()

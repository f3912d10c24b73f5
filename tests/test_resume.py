"""Exact resume: N steps in one go equal N/2 steps, a stop, and ``ckpt_path="last"`` for the rest (CPU).

Compared after the last step: student and teacher weights, optimizer state, lr schedule and the step counters.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from _fake_loca import StopAt
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from loca_lightning.checkpointing import AtomicCheckpointIO
from loca_lightning.data.pretrain import LOCAPretrainDataModule
from loca_lightning.pretrain.module import LOCAPretrainModule
from loca_lightning.pretrain.views import LOCAViews
from loca_lightning.segmentation.module import SegmentationFinetuneModule

TINY = dict(
    backbone="vit_test_patch16",
    reference_size=64,
    num_prototypes=32,
    projection_hidden_dim=64,
    projection_dim=16,
    drop_path_rate=0.1,
    warmup_epochs=1,
    reference_mask="unstructured",
)
VIEWS = dict(reference_size=64, query_size=64, focal_size=32, num_focal=2, patch_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _trainer(root: Path, max_steps: int, callbacks=(), every: int | None = None) -> L.Trainer:
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=every)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=max_steps,
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[checkpoint, *callbacks],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=root,
    )


def _pretrain_data() -> LOCAPretrainDataModule:
    return LOCAPretrainDataModule(
        source="synthetic",
        synthetic_length=12,
        synthetic_image_size=72,
        views=LOCAViews(**VIEWS),
        batch_size=4,
        num_workers=0,
        pin_memory=False,
        seed=3,
    )


def _state(trainer: L.Trainer, module: L.LightningModule) -> dict:
    optimizer = trainer.optimizers[0]
    return {
        "weights": {k: v.clone() for k, v in module.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "lrs": [g["lr"] for g in optimizer.param_groups],
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
    }


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _pretrain_run(root: Path, total: int, stop: int | None, every: int | None) -> dict:
    L.seed_everything(0)
    module, data = LOCAPretrainModule(**TINY), _pretrain_data()
    trainer = _trainer(root, total, [StopAt(stop)] if stop else [], every)
    trainer.fit(module, data)
    if stop:
        assert trainer.global_step == stop
        L.seed_everything(123)  # a fresh process: nothing but the checkpoint carries the state over
        module, data = LOCAPretrainModule(**TINY), _pretrain_data()
        trainer = _trainer(root, total, [], every)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, data, ckpt_path="last")
        assert not [w for w in caught if "other hyperparameters" in str(w.message)]
    assert trainer.global_step == total
    return _state(trainer, module)


@pytest.mark.parametrize("stop", [3, 2, 4], ids=["epoch_boundary", "mid_first_epoch", "mid_second_epoch"])
def test_pretraining_resume_is_exact(tmp_path: Path, stop: int) -> None:
    # 12 scenes / batch 4 = 3 steps per epoch: stop 3 resumes at an epoch boundary, 2 and 4 inside an epoch (the
    # loader's state_dict makes the resumed epoch skip the batches already trained on, without replaying them).
    every = 1  # last.ckpt after every step, as a run that is pre-empted at any time would have it
    once = _pretrain_run(tmp_path / "once", 6, None, every)
    resumed = _pretrain_run(tmp_path / "resumed", 6, stop, every)
    _assert_same(once, resumed)


def test_mask_generator_state_round_trips_through_the_checkpoint() -> None:
    module = LOCAPretrainModule(**TINY, query_keep=6)
    first = module.select_query_keep(2, 16)
    checkpoint: dict = {"hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    expected = module.select_query_keep(2, 16)
    other = LOCAPretrainModule(**TINY, query_keep=6)
    torch.manual_seed(99)
    other.on_load_checkpoint(checkpoint)
    assert torch.equal(other.select_query_keep(2, 16), expected)
    assert not torch.equal(first, expected)  # the sequence moves on: masks differ from step to step


# ---------------------------------------------------------------------------------------------- segmentation
def _seg_loader() -> DataLoader:
    from loca_lightning.data.synthetic import SyntheticScenes

    scenes = SyntheticScenes(length=8, image_size=32, num_classes=3, seed=0)
    items = [
        {
            "image": torch.from_numpy(s["image"]).permute(2, 0, 1).contiguous(),
            "mask": torch.from_numpy(s["mask"]).long(),
        }
        for s in (scenes[i] for i in range(len(scenes)))
    ]
    return DataLoader(items, batch_size=2, shuffle=False)


def _seg_run(root: Path, total: int, stop: int | None) -> dict:
    def make() -> SegmentationFinetuneModule:
        return SegmentationFinetuneModule(
            num_classes=3,
            backbone="vit_test_patch16",
            image_size=32,
            window=32,
            stride=32,
            drop_path_rate=0.2,
            inference_mode="whole",
        )

    L.seed_everything(0)
    module = make()
    trainer = _trainer(root, total, [StopAt(stop)] if stop else [], every=1)
    trainer.fit(module, _seg_loader())
    if stop:
        L.seed_everything(5)
        module = make()
        trainer = _trainer(root, total, [], every=1)
        trainer.fit(module, _seg_loader(), ckpt_path="last")
    assert trainer.global_step == total
    return _state(trainer, module)


def test_segmentation_resume_at_epoch_boundary_is_exact(tmp_path: Path) -> None:
    # 8 images / batch 2 = 4 steps per epoch; drop path on, so the global RNG state must be carried too. A plain
    # DataLoader has no state_dict, so Lightning restarts an interrupted epoch from its first batch: only a stop at
    # an epoch boundary is exact for such loaders.
    _assert_same(_seg_run(tmp_path / "once", 6, None), _seg_run(tmp_path / "resumed", 6, 4))


# ---------------------------------------------------------------------------------------------- non-finite loss
class Poisoned(LOCAPretrainModule):
    """NaN loss at step 2."""

    def compute_losses(self, *args):
        out = super().compute_losses(*args)
        if self.global_step == 2:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nonfinite_loss_saves_the_last_good_state_before_stopping(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = Poisoned(**TINY)
    trainer = _trainer(tmp_path / "ckpts", 6)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2: .*nonfinite-step2.ckpt"):
        trainer.fit(module, _pretrain_data())
    saved = torch.load(tmp_path / "ckpts" / "nonfinite-step2.ckpt", weights_only=False)
    assert saved["global_step"] == 2
    weights = module.state_dict()  # the NaN step never reached the optimizer: these are the weights of step 2
    assert saved["state_dict"].keys() == weights.keys()
    for key, value in saved["state_dict"].items():
        assert torch.equal(value, weights[key]) and torch.isfinite(value.float()).all(), key


def test_nonfinite_checkpoint_goes_to_the_root_dir_without_a_checkpoint_callback(tmp_path: Path) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=4,
        default_root_dir=tmp_path,
    )
    with pytest.raises(FloatingPointError):
        trainer.fit(Poisoned(**TINY), _pretrain_data())
    assert (tmp_path / "nonfinite-step2.ckpt").is_file()


# ---------------------------------------------------------------------------------------------- checkpoint files
def test_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(4)}, path)

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    restored = torch.load(path)
    assert restored["step"] == 1 and torch.equal(restored["w"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path)["step"] == 3


def test_cli_trainer_writes_checkpoints_atomically() -> None:
    from loca_lightning.cli import LOCACLI

    cli = LOCACLI(
        args=[
            "--model=loca_lightning.LOCAPretrainModule",
            "--model.backbone=vit_test_patch16",
            "--model.reference_size=64",
            "--data=loca_lightning.LOCAPretrainDataModule",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
        ],
        run=False,
    )
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_changed_hyperparameters_are_listed_on_load() -> None:
    old = LOCAPretrainModule(**TINY)
    checkpoint = {"hyper_parameters": dict(old.hparams), "state_dict": old.state_dict()}
    new = LOCAPretrainModule(**{**TINY, "base_lr": 5e-4, "reference_mask": "consecutive"})
    with pytest.warns(UserWarning, match="base_lr: 0.001 -> 0.0005; .*reference_mask: 'unstructured' -> 'consecutive'"):
        new.on_load_checkpoint(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LOCAPretrainModule(**TINY).on_load_checkpoint(checkpoint)  # same config: silent

    seg_kwargs = dict(num_classes=3, backbone="vit_test_patch16", image_size=32, window=32, stride=32)
    seg = SegmentationFinetuneModule(**seg_kwargs)
    checkpoint = {"hyper_parameters": dict(seg.hparams)}
    seg.on_save_checkpoint(checkpoint)
    with pytest.warns(UserWarning, match=r"segmentation checkpoint .*stride: 32 -> 16"):
        SegmentationFinetuneModule(**{**seg_kwargs, "stride": 16}).on_load_checkpoint(checkpoint)

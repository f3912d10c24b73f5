"""Image loggers and the online dense probe: they log what they should, and leave training exactly as it was."""

import contextlib
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from _fake_loca import FakeLOCADataModule
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from loca_lightning import rng as rng_module
from loca_lightning.callbacks import LOCAImageLogger, OnlineDenseProbe, SegmentationImageLogger, mask_palette
from loca_lightning.cli import LOCACLI
from loca_lightning.data.segmentation import SegmentationDataModule
from loca_lightning.pretrain.module import LOCAPretrainModule
from loca_lightning.segmentation.module import SegmentationFinetuneModule
from loca_lightning.visualize import blend, colorize, patch_labels, to_uint8_image

TINY = dict(
    backbone="vit_test_patch16",
    reference_size=64,
    num_prototypes=32,
    projection_hidden_dim=64,
    projection_dim=16,
    drop_path_rate=0.0,
    warmup_epochs=1,
)


def _probe_data() -> SegmentationDataModule:
    return SegmentationDataModule(
        layout="synthetic",
        synthetic_image_size=32,
        synthetic_length=16,
        synthetic_val_length=4,
        crop_size=32,
        base_size=(32, 32),
        batch_size=4,
        eval_batch_size=2,
        num_workers=0,
        persistent_workers=False,
        pin_memory=False,
    )


def _pretrain(tmp_path: Path, callbacks: list, logger=False, log_every_n_steps: int = 1) -> LOCAPretrainModule:
    L.seed_everything(0)
    model = LOCAPretrainModule(**TINY)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=logger,
        callbacks=callbacks,
        deterministic=True,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=log_every_n_steps,
    )
    trainer.fit(model, datamodule=FakeLOCADataModule(batch_size=4, length=16, size=64, focal=32, num_focal=2))
    return model


def test_probe_and_image_logger_leave_pretraining_unchanged(tmp_path):
    plain = _pretrain(tmp_path / "plain", [])
    probe = OnlineDenseProbe(datamodule=_probe_data(), every_n_steps=2, val_batches=1, lr=1e-2)
    images = LOCAImageLogger(every_n_steps=2, num_images=2, num_queries=3, num_attention_queries=2)
    logger = TensorBoardLogger(tmp_path / "tb", name="run")
    watched = _pretrain(tmp_path / "watched", [probe, images], logger=logger)

    plain_state, watched_state = plain.state_dict(), watched.state_dict()
    assert plain_state.keys() == watched_state.keys()
    for key, value in plain_state.items():
        assert torch.equal(value, watched_state[key]), key  # bit-identical pretraining

    assert [step for step, _ in probe.history] == [2, 4]
    assert all(0.0 <= miou <= 1.0 for _, miou in probe.history)
    assert images.logged_steps == [2, 4]
    events = EventAccumulator(str(Path(logger.log_dir)), size_guidance={"images": 0}).Reload()
    tags = set(events.Tags()["images"])
    assert {
        "loca/reference_band",
        "loca/query_positions",
        "loca/pca_teacher",
        "loca/pca_student",
        "loca/attention_teacher",
        "loca/attention_student",
    } <= tags
    assert [e.step for e in events.Images("loca/pca_teacher")] == [2, 4]
    assert "probe/mIoU" in events.Tags()["scalars"]


def test_image_logger_runs_no_forward_between_logging_steps(tmp_path):
    calls = []

    class Counting(LOCAImageLogger):
        def on_fit_start(self, trainer, pl_module):
            pl_module.student.backbone.blocks[-1].register_forward_hook(lambda *args: calls.append(trainer.global_step))

    _pretrain(tmp_path, [Counting(every_n_steps=3)], logger=TensorBoardLogger(tmp_path, name="tb"))
    # Training runs the student's last block twice per step (large and focal queries), seen at global_step 0..3;
    # the logger adds one PCA forward after step 3 only (its attention path calls the last block's parts directly).
    assert calls == [0, 0, 1, 1, 2, 2, 3, 3, 3]


def test_probe_logs_every_evaluation_whatever_the_trainers_logging_interval(tmp_path):
    # Lightning writes self.log values only every log_every_n_steps; the probe's points must not depend on that.
    probe = OnlineDenseProbe(datamodule=_probe_data(), every_n_steps=2, train_every_n_steps=2, val_batches=1)
    logger = TensorBoardLogger(tmp_path / "tb", name="run")
    _pretrain(tmp_path, [probe], logger=logger, log_every_n_steps=3)
    events = EventAccumulator(str(Path(logger.log_dir)), size_guidance={"scalars": 0}).Reload()
    points = events.Scalars("probe/mIoU")
    assert [e.step for e in points] == [step for step, _ in probe.history] == [2, 4]
    assert [e.value for e in points] == pytest.approx([miou for _, miou in probe.history])


def test_without_its_own_rng_the_probe_would_change_training(tmp_path, monkeypatch):
    # Negative control: the equality test above is sensitive (the probe's shuffling draws from torch's RNG).
    plain = _pretrain(tmp_path / "plain", [])
    monkeypatch.setattr(rng_module.OwnRNG, "active", lambda self: contextlib.nullcontext())
    leaky = _pretrain(tmp_path / "leaky", [OnlineDenseProbe(datamodule=_probe_data(), every_n_steps=2, val_batches=1)])
    assert not torch.equal(plain.student.backbone.pos_embed, leaky.student.backbone.pos_embed)


def test_probe_learns_and_its_training_is_separate(tmp_path):
    L.seed_everything(0)
    model = LOCAPretrainModule(**TINY)
    probe = OnlineDenseProbe(datamodule=_probe_data(), lr=0.05)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    probe.setup(trainer, model, "fit")
    before = [p.detach().clone() for p in model.parameters()]
    weight = probe.probe.weight.detach().clone()
    batch = probe._next_train_batch()
    probe._next_train_batch = lambda: batch  # the same batch every time: the probe's loss on it must fall
    tokens, _ = probe._features(model, batch["image"])
    labels = patch_labels(batch["mask"], 16, 9)  # [B, 2, 2]

    @torch.no_grad()
    def loss() -> float:
        return float(F.cross_entropy(probe.probe(tokens).flatten(0, 1), labels.flatten(), ignore_index=255))

    start = loss()
    for _ in range(20):
        probe.train_probe(model)
    assert loss() < 0.8 * start
    assert not torch.equal(weight, probe.probe.weight)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # backbone untouched, no grads
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.teacher.training  # modes restored


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_image_logger_renders_and_restores_modes():
    torch.manual_seed(0)
    model = LOCAPretrainModule(**TINY)
    model.teacher.eval()  # an unusual mix of modes must survive
    batch = FakeLOCADataModule(batch_size=3, length=3, size=64, focal=32).train_dataloader().__iter__().__next__()
    model.training_step(batch, 0)
    state = torch.get_rng_state()
    out = LOCAImageLogger(num_images=2, num_attention_queries=3, scale=2).render(model, batch)
    assert torch.equal(state, torch.get_rng_state())
    assert model.student.training and not model.teacher.training
    assert out["loca/reference_band"].shape == (128, 2 * 128 + 2, 3)
    assert out["loca/attention_teacher"].shape == (2 * 128 + 2, 3 * 128 + 4, 3)
    for image in out.values():
        assert image.dtype == np.uint8 and image.ndim == 3


def test_segmentation_logger_overlays_with_palette_and_skips_other_loggers(tmp_path):
    torch.manual_seed(0)
    model = SegmentationFinetuneModule(
        num_classes=9, backbone="vit_test_patch16", image_size=32, window=32, stride=32, drop_path_rate=0.0
    )
    data = _probe_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    palette = mask_palette(data.palette)
    logger = SegmentationImageLogger(num_images=2, alpha=0.5)
    out = logger.render(model, batch, palette)
    assert out.shape == (2 * 32 + 2, 3 * 32 + 4, 3)
    image = to_uint8_image(batch["image"][1])
    truth = blend(image, colorize(batch["mask"][1].numpy(), palette), 0.5)
    assert np.array_equal(out[34:, :32], image) and np.array_equal(out[34:, 34:66], truth)
    assert model.training

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[SegmentationImageLogger(every_n_steps=1)],
        log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=data)
    assert trainer.callbacks[0].logged_steps == []  # no TensorBoard logger: nothing drawn, no error


def test_callbacks_from_a_lightning_cli_config(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["loca"])
    config = {
        "model": {"class_path": "loca_lightning.LOCAPretrainModule", "init_args": TINY},
        "data": {"class_path": "_fake_loca.FakeLOCADataModule"},
        "trainer": {
            "callbacks": [
                {"class_path": "loca_lightning.callbacks.LOCAImageLogger", "init_args": {"every_n_steps": 100}},
                {
                    "class_path": "loca_lightning.callbacks.OnlineDenseProbe",
                    "init_args": {
                        "every_n_steps": 50,
                        "data": {"layout": "synthetic", "crop_size": 32, "synthetic_image_size": 48},
                    },
                },
            ],
            "logger": False,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LOCACLI(args=["--config", str(path)], run=False)
    found = {type(c).__name__: c for c in cli.trainer.callbacks}
    assert found["LOCAImageLogger"].every_n_steps == 100
    assert found["OnlineDenseProbe"].every_n_steps == 50
    hparams = found["OnlineDenseProbe"].datamodule.hparams
    assert hparams.crop_size == 32 and hparams.synthetic_image_size == 48 and hparams.batch_size == 16


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="every_n_steps"):
        LOCAImageLogger(every_n_steps=0)
    with pytest.raises(ValueError, match="alpha"):
        SegmentationImageLogger(alpha=2.0)
    with pytest.raises(ValueError, match="val_batches"):
        OnlineDenseProbe(val_batches=0)
    with pytest.raises(ValueError, match="OnlineDenseProbe data"):
        OnlineDenseProbe(data={"crop_sise": 32})
    with pytest.raises(ValueError, match="needs its labelled data"):
        OnlineDenseProbe()  # no silent fallback to some default dataset

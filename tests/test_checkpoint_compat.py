"""A checkpoint written by an earlier state of the code (commit 71ccf7d, before the module split; the version number
was 0.1.0 then as now) still loads, exports and resumes.

tests/data/loca_pretrain_v0.ckpt: LOCAPretrainModule(backbone="vit_test_patch8", backbone_kwargs={"img_size": 32},
reference_size=32, num_prototypes=16, projection_hidden_dim=32, projection_dim=8, drop_path_rate=0.1, warmup_epochs=1,
query_keep_ratio=0.4) after 2 steps on FakeLOCADataModule(batch_size=2, length=4, size=32, focal=16, num_focal=1,
patch=8), written by ``trainer.save_checkpoint`` with the code of commit 71ccf7d.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from _fake_loca import FakeLOCADataModule

from loca_lightning.cli import main
from loca_lightning.pretrain.module import LOCAPretrainModule

OLD = Path(__file__).parent / "data" / "loca_pretrain_v0.ckpt"


def test_old_checkpoint_loads_weights_only_with_every_tensor():
    saved = torch.load(OLD, weights_only=True)
    with pytest.warns(UserWarning, match="query_keep"):  # the old ratio is read as its count (6 of 16)
        model = LOCAPretrainModule.load_from_checkpoint(OLD, weights_only=True)
    state = model.state_dict()
    assert state.keys() == saved["state_dict"].keys()
    for key, value in saved["state_dict"].items():
        assert torch.equal(state[key], value), key
    assert model.reference_keep == 3 and model.teacher is not None


@pytest.mark.slow
def test_old_checkpoint_resumes_training(tmp_path):
    model = LOCAPretrainModule(
        backbone="vit_test_patch8",
        backbone_kwargs={"img_size": 32},
        reference_size=32,
        num_prototypes=16,
        projection_hidden_dim=32,
        projection_dim=8,
        drop_path_rate=0.1,
        warmup_epochs=1,
        query_keep=6,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = FakeLOCADataModule(batch_size=2, length=4, size=32, focal=16, num_focal=1, patch=8)
    trainer.fit(model, data, ckpt_path=OLD)
    assert trainer.global_step == 3
    optimizer = model.optimizers().optimizer
    exp_avg = {id(p): optimizer.state[p]["exp_avg"] for g in optimizer.param_groups for p in g["params"]}
    qkv = model.student.backbone.blocks[0].attn.qkv.bias
    assert optimizer.state[qkv]["step"] == 3  # its Adam moments came back with it from the regrouped state
    assert id(qkv) in exp_avg and all(torch.isfinite(p).all() for p in model.parameters())


def test_old_checkpoint_exports(tmp_path, capsys):
    main(["export", str(OLD), str(tmp_path / "vit.pth")])
    assert "timm.create_model(" in capsys.readouterr().out
    assert (tmp_path / "vit.pth").is_file()

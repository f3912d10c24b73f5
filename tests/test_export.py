"""`loca export`: timm-loadable backbone weights (strict) that give the module's features, for both networks; a file that
is not a checkpoint gets its actual problem named."""

import argparse
import json
import re

import lightning as L
import pytest
import timm
import torch
from _fake_loca import FakeLOCADataModule

from loca_lightning.cli import main
from loca_lightning.pretrain.module import LOCAPretrainModule
from loca_lightning.segmentation.module import SegmentationFinetuneModule

TINY = dict(
    backbone="vit_test_patch16",
    reference_size=64,
    num_prototypes=32,
    projection_hidden_dim=64,
    projection_dim=16,
    drop_path_rate=0.0,
    warmup_epochs=1,
)


def _trainer(tmp_path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def _load_exported(out) -> tuple[torch.nn.Module, dict]:
    config = json.loads((out.parent / (out.name + ".json")).read_text())
    model = timm.create_model(config["timm_name"], pretrained=False, **config["timm_kwargs"])
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    return model.eval(), config


def _assert_same_features(timm_model, backbone) -> None:
    size = backbone.pos_grid[0] * backbone.patch_size  # timm's fixed input size is the stored table's
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone.eval()(images)  # [B, N, D]
        got = timm_model.forward_features(images)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-5


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pretrain")
    L.seed_everything(0)
    model = LOCAPretrainModule(**TINY, momentum_base=0.5)  # a fast EMA: the teacher differs from the student
    trainer = _trainer(tmp_path)
    trainer.fit(model, datamodule=FakeLOCADataModule(batch_size=4, length=8, size=64, focal=32))
    path = tmp_path / "loca.ckpt"
    trainer.save_checkpoint(path)
    return path, model


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_export_loads_strictly_and_matches(pretrain_ckpt, tmp_path, capsys, which):
    ckpt, model = pretrain_ckpt
    out = tmp_path / f"{which}.pth"
    main(["export", str(ckpt), str(out), "--weights", which])
    printed = capsys.readouterr().out
    timm_model, config = _load_exported(out)
    assert config["weights"] == which and "timm.create_model(" in printed and str(out) in printed
    source = model.teacher.backbone if which == "teacher" else model.student.backbone
    _assert_same_features(timm_model, source)
    other = model.student.backbone if which == "teacher" else model.teacher.backbone
    with torch.no_grad():
        images = torch.randn(1, 3, 224, 224)
        assert not torch.allclose(timm_model.forward_features(images), other.eval()(images), atol=1e-5)


def test_export_refuses_to_overwrite_without_force(pretrain_ckpt, tmp_path, capsys):
    ckpt, _ = pretrain_ckpt
    out = tmp_path / "w.pth"
    main(["export", str(ckpt), str(out)])
    assert json.loads((tmp_path / "w.pth.json").read_text())["weights"] == "teacher"  # the default
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(ckpt), str(out), "--weights", "student"])
    assert exit_info.value.code == 2 and "--force" in capsys.readouterr().err
    assert out.read_bytes() == before
    main(["export", str(ckpt), str(out), "--weights", "student", "--force"])
    assert json.loads((tmp_path / "w.pth.json").read_text())["weights"] == "student"


def test_export_segmentation_checkpoint_keeps_its_grid(tmp_path):
    torch.manual_seed(0)
    model = SegmentationFinetuneModule(
        num_classes=3, backbone="vit_test_patch16", image_size=48, window=48, stride=48, drop_path_rate=0.0
    )
    trainer = _trainer(tmp_path)
    trainer.strategy.connect(model)  # save a checkpoint without fitting
    path = tmp_path / "seg.ckpt"
    trainer.save_checkpoint(path)
    out = tmp_path / "seg.pth"
    main(["export", str(path), str(out)])  # no teacher here: the default exports the only backbone
    timm_model, config = _load_exported(out)
    assert config["weights"] == "student"
    assert config["timm_kwargs"]["img_size"] == 48
    assert timm_model.pos_embed.shape[1] == 9  # 3x3 table, not resampled
    _assert_same_features(timm_model, model.backbone)


def _not_checkpoints(tmp_path, real_ckpt) -> dict:
    """Files people hand to `loca export` by mistake -> what the error must call them."""
    import numpy as np
    from PIL import Image

    files = {}
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "image.png")
    files["image.png"] = "it is a PNG image"
    (tmp_path / "empty.ckpt").write_bytes(b"")
    files["empty.ckpt"] = r"empty \(0 bytes\)"
    data = real_ckpt.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])  # a download cut short
    files["cut.ckpt"] = "truncated or damaged checkpoint: its zip directory"
    (tmp_path / "config.ckpt").write_text("model:\n  class_path: x\n")
    files["config.ckpt"] = "it is a text file"
    np.savez(tmp_path / "arrays.npz", a=np.ones(2))
    files["arrays.npz"] = "numpy .npz archive"
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    files["weights.h5"] = "HDF5 file"
    (tmp_path / "flax.msgpack").write_bytes(b"\x82\xa6params\x80\xa5state\x80")
    files["flax.msgpack"] = "msgpack data"
    torch.save({"not": "tensors", "obj": argparse.Namespace(a=1)}, tmp_path / "objects.pt")
    files["objects.pt"] = r"pickle of Python objects \(argparse.Namespace\) without any tensor"
    torch.save({"weight": torch.ones(2)}, tmp_path / "state_dict.pth")
    files["state_dict.pth"] = "not the checkpoint of a loca-lightning module: it holds 1 entry"
    return files


def test_a_file_that_is_not_a_checkpoint_gets_its_actual_problem_named(pretrain_ckpt, tmp_path, capsys):
    for name, problem in _not_checkpoints(tmp_path, pretrain_ckpt[0]).items():
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(tmp_path / name), str(tmp_path / "out.pth")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, name
        assert re.search(problem, err), f"{name}: {err}"
        assert name in err and "--trust" not in err and "execute" not in err, f"{name}: {err}"
        assert not (tmp_path / "out.pth").exists()


def test_trust_is_suggested_for_a_lightning_checkpoint_that_stores_objects(pretrain_ckpt, tmp_path, capsys):
    checkpoint = torch.load(pretrain_ckpt[0], weights_only=True)
    checkpoint["run_args"] = argparse.Namespace(note="made by a custom training script")
    path = tmp_path / "objects.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(SystemExit):
        main(["export", str(path), str(tmp_path / "out.pth")])
    err = capsys.readouterr().err
    assert "is a Lightning checkpoint that stores Python objects" in err and "argparse.Namespace" in err
    assert "--trust" in err
    main(["export", str(path), str(tmp_path / "out.pth"), "--trust"])  # the user made it: loads
    assert (tmp_path / "out.pth").is_file()

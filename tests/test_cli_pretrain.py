"""`loca fit` for pretraining: the released recipe prints as configured, and the demo config trains and checkpoints."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

from loca_lightning.backbones import build_backbone, load_backbone_weights
from loca_lightning.cli import LOCACLI, main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_print_config_shows_the_released_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "pretrain.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    model, data = config["model"], config["data"]
    assert model["class_path"] == "loca_lightning.LOCAPretrainModule"
    recipe = model["init_args"]
    assert recipe["backbone"] == "vit_base_patch16"
    assert recipe["base_lr"] == pytest.approx(1e-3) and recipe["lr_reference_batch"] == 1024
    assert recipe["weight_decay"] == pytest.approx(0.1) and recipe["warmup_epochs"] == 15
    assert recipe["reference_keep_ratio"] == pytest.approx(0.2)
    assert recipe["query_keep"] == 70
    assert recipe["num_prototypes"] == 4096 and recipe["momentum_base"] == pytest.approx(0.996)
    assert recipe["prototype_precision"] == "bfloat16"  # the release's TPU numerics for the prototype cosines
    assert recipe["optimizer"]["class_path"] == "torch.optim.AdamW"
    views = data["init_args"]["views"]["init_args"]
    assert (views["query_size"], views["focal_size"], views["num_focal"]) == (224, 96, 9)
    assert "reference_size" not in views and "patch_size" not in views  # linked from the model: given once
    assert config["trainer"]["max_epochs"] == 100 and config["trainer"]["gradient_clip_val"] == 1.0
    # The global batch of the recipe: 8 devices x 128.
    assert config["trainer"]["devices"] * data["init_args"]["batch_size"] == 1024


@pytest.mark.slow
def test_demo_config_fits_and_writes_a_loadable_checkpoint(tmp_path):
    main([
        "fit", "--config", str(CONFIGS / "demo" / "pretrain.yaml"),
        "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.init_args.synthetic_length=8", "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
        "--data.init_args.views.num_focal=2",
    ])  # fmt: skip
    checkpoints = sorted(tmp_path.glob("pretrain/version_*/checkpoints/last.ckpt"))
    assert len(checkpoints) == 1
    checkpoint = torch.load(checkpoints[0], map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2  # 8 scenes / batch 4, one epoch
    assert checkpoint["hyper_parameters"]["backbone"] == "vit_pico_patch8"
    # The teacher's backbone is what finetuning starts from: it must load strictly into a fresh ViT.
    backbone = build_backbone("vit_pico_patch8", img_size=64)
    report = load_backbone_weights(backbone, str(checkpoints[0]), which="teacher")
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    teacher = {
        k[len("teacher.backbone.") :]: v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("teacher.backbone.")
    }
    torch.testing.assert_close(backbone.state_dict()["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])
    events = list(tmp_path.glob("pretrain/version_*/events.out.tfevents.*"))
    assert events, "TensorBoard logs missing"
    # the resolved config lives in the run's own (version) folder
    assert sorted(tmp_path.rglob("config.yaml")) == [checkpoints[0].parent.parent / "config.yaml"]


def test_loca_keeps_freed_memory_unless_told_not_to(monkeypatch) -> None:
    import loca_lightning.malloc as malloc

    calls = []
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.delenv("LOCA_KEEP_FREED_MEMORY", raising=False)
    malloc.tune_malloc()
    assert calls == [1]
    monkeypatch.setenv("LOCA_KEEP_FREED_MEMORY", "0")
    malloc.tune_malloc()
    assert calls == [1]


def test_views_take_the_models_geometry_and_a_missing_root_is_one_line(tmp_path, capsys, monkeypatch):
    # the demo config gives reference_size once (model) and the patch through the backbone's name
    monkeypatch.setattr(sys, "argv", ["loca"])  # as `loca` sees it (pytest's own arguments make LightningCLI warn)
    cli = LOCACLI(
        args=[
            "--config",
            str(CONFIGS / "demo" / "pretrain.yaml"),
            "--trainer.logger=false",
            "--model.init_args.reference_size=48",
        ],
        run=False,
    )
    views = cli.datamodule.views
    assert (views.reference_size, views.patch_size) == (48, 8) == (cli.model.hparams.reference_size, 8)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "pretrain.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.init_args.root is not set" in err[0] and "--data.init_args.root=" in err[0]

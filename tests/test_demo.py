"""The demo pipeline end to end with a minuscule budget: pretrain -> two finetunes -> table, figure, results; the
experiment's table and command line."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from examples import demo, experiment, stages

PRETRAIN = [
    "--model.init_args.backbone=vit_test_patch8",
    "--trainer.max_epochs=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.synthetic_length=8",
    "--data.init_args.batch_size=4",
    "--data.init_args.num_workers=0",
    "--data.init_args.views.num_focal=1",
]
FINETUNE = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.synthetic_length=8",
    "--data.init_args.synthetic_val_length=2",
    "--data.init_args.batch_size=4",
    "--data.init_args.num_workers=0",
]


def _quick_pretrain_config(folder):
    """configs/demo/pretrain.yaml with its image logger and dense probe at every step, on a few probe scenes."""
    config = yaml.safe_load((stages.CONFIG_DIR / "pretrain.yaml").read_text())
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c["init_args"] for c in config["trainer"]["callbacks"]}
    callbacks["LOCAImageLogger"]["every_n_steps"] = 1
    probe = callbacks["OnlineDenseProbe"]
    probe.update(every_n_steps=1, train_every_n_steps=1, val_batches=1)
    probe["data"].update(synthetic_length=4, synthetic_val_length=2, synthetic_image_size=64)
    folder.mkdir()
    (folder / "pretrain.yaml").write_text(yaml.safe_dump(config))  # seg.yaml comes from configs/demo
    return folder


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_demo_pipeline_smoke(tmp_path, capsys):
    config_dir = _quick_pretrain_config(tmp_path / "configs")
    out = tmp_path / "out"
    results = demo.run_demo(
        out,
        seed=0,
        pretrain_extra=PRETRAIN,
        finetune_extra=FINETUNE,
        config_dir=config_dir,
        num_figure_images=2,
        location_images=8,
    )
    printed = capsys.readouterr().out
    assert "| LOCA |" in printed and "| random init |" in printed and "location accuracy" in printed

    # Fair comparison: same steps, and the finetuning hyperparameters differ in the initial weights only.
    fine = results["finetune"]
    assert set(fine) == {"loca", "random"}
    assert fine["loca"]["steps"] == fine["random"]["steps"] == 2
    assert results["finetune_hparams_differ"] == ["pretrained"]
    for metrics in fine.values():
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("mIoU", "mAcc", "aAcc"))

    pre = results["pretrain"]
    assert pre["steps"] == 2 and pre["backbone"] == "vit_test_patch8"
    assert pre["chance"] == pytest.approx(1 / 16)  # 32-pixel reference, 8-pixel patches
    assert 0.0 <= pre["location_accuracy_heldout"] <= 1.0
    assert (out / "pretrain_loca").is_dir() and pre["checkpoint"].endswith("last.ckpt")

    # What a newcomer sees in TensorBoard for the pretraining: the image logger's pictures and the probe's curve.
    events = EventAccumulator(pre["log_dir"], size_guidance={"images": 0, "scalars": 0}).Reload()
    assert {
        "loca/reference_band",
        "loca/query_positions",
        "loca/pca_teacher",
        "loca/pca_student",
        "loca/attention_teacher",
        "loca/attention_student",
    } <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("loca/pca_teacher")] == [1, 2]
    assert [e.step for e in events.Scalars("probe/mIoU")] == pre["probe_curve"][0] and len(pre["probe_curve"][0]) == 2
    assert 0.0 <= pre["probe_miou"] <= 1.0 and "Online dense probe" in printed

    saved = json.loads((out / "results.json").read_text())
    assert saved["finetune"] == fine
    assert (out / "results.md").read_text().startswith("| init | mIoU")
    figure = np.asarray(Image.open(out / "demo.png"))
    assert figure.ndim == 3 and min(figure.shape[:2]) > 200
    for name in ("finetune_loca", "finetune_random"):
        assert list((out / name).glob("version_*/events.out.tfevents.*")), f"no TensorBoard logs for {name}"


def test_demo_configs_are_found_next_to_the_examples_or_in_a_given_folder(tmp_path):
    assert stages.config_path("seg.yaml") == stages.CONFIG_DIR / "seg.yaml"
    assert (stages.CONFIG_DIR / "pretrain.yaml").is_file()
    (tmp_path / "pretrain.yaml").write_text("{}")
    assert stages.config_path("pretrain.yaml", tmp_path) == tmp_path / "pretrain.yaml"
    assert stages.config_path("seg.yaml", tmp_path) == stages.CONFIG_DIR / "seg.yaml"
    with pytest.raises(FileNotFoundError, match="nothing.yaml"):
        stages.config_path("nothing.yaml", tmp_path)


def test_overrides_are_checked():
    assert stages.overrides(["trainer.max_steps=3"]) == ["--trainer.max_steps=3"]
    with pytest.raises(ValueError, match="key=value"):
        stages.overrides(["trainer.max_steps"])


def test_experiment_table_mean_and_spread():
    rows = [
        {"kind": "finetune", "seed": s, "init": init, "label_fraction": f, "mIoU": v}
        for s, (a, b) in enumerate([(0.5, 0.3), (0.7, 0.5)])
        for init, f, v in (("loca", 1.0, a), ("loca", 0.1, b), ("random", 1.0, a - 0.2), ("random", 0.1, b - 0.2))
    ] + [{"kind": "pretrain", "seed": s, "variant": "loca", "location_accuracy_heldout": 0.4} for s in (0, 1)]
    table = experiment.format_experiment_table(rows, (1.0, 0.1))
    lines = table.splitlines()
    assert lines[0].startswith("| init | mIoU, 100% labels | mIoU, 10% labels |")
    # mean 60.0, sample std of (50, 70) = 14.1
    assert lines[2] == "| LOCA | 60.0 ± 14.1 | 40.0 ± 14.1 | 40.0 ± 0.0 | 2 |"
    assert lines[3] == "| random init | 40.0 ± 14.1 | 20.0 ± 14.1 | - | 2 |"


def test_experiment_command_passes_seeds_overrides_and_variants(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_experiment", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(demo, "tune_malloc", lambda: None)
    monkeypatch.setattr(demo.torch, "set_num_threads", lambda n: None)
    demo.main(
        [
            "--experiment",
            "--out",
            "x",
            "--seeds",
            "0",
            "1",
            "--variants",
            "loca",
            "--pretrain",
            "trainer.max_epochs=200",
            "model.init_args.final_lr_ratio=1.0",
        ]
    )
    (out, seeds, pre, fine, config_dir), kwargs = calls[0]
    assert (out, seeds, fine, kwargs) == ("x", [0, 1], [], {"variants": ["loca"]})
    assert pre == ["--trainer.max_epochs=200", "--model.init_args.final_lr_ratio=1.0"]
    with pytest.raises(SystemExit):
        demo.main(["--experiment", "--variants", "dino"])

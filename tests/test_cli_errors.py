"""A user's mistakes in configs and files end in one line on stderr with exit status 2; bugs keep their traceback
(loca_lightning/errors.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from loca_lightning.cli import main
from loca_lightning.errors import one_line_user_errors, user_error

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["loca"])


def one_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The single stderr line of a `loca` command that must exit with status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("loca: error: ")
    return err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU runs the config")
@pytest.mark.parametrize("config", ["seg_ade.yaml", "pretrain.yaml"])
def test_a_gpu_config_on_a_machine_without_one_shows_the_cpu_flags(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = one_line(["fit", "--config", str(CONFIGS / config), "--data.init_args.root", str(tmp_path)], capsys)
    assert "trainer.accelerator: gpu" in line and "no GPU" in line
    flags = line.split("on the CPU: ")[1].split()
    assert flags[:4] == ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    assert ("--trainer.strategy" in flags) == (config == "pretrain.yaml")  # ddp across GPUs: auto on one CPU


def test_a_dataset_folder_without_its_layout_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ade" / "ADEChallengeData2016" / "images").mkdir(parents=True)  # no images/training
    args = ["fit", "--config", str(CONFIGS / "seg_ade.yaml"), "--data.init_args.root", str(tmp_path / "ade")]
    args += [
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger",
        "false",
        "--model.init_args.backbone",
        "vit_test_patch16",
    ]
    line = one_line(args, capsys)
    assert "images/training" in line and "does not exist" in line


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.init_args.pretrained", "config.yaml"], "config.yaml' is not a PyTorch checkpoint"),
        (["--model.init_args.num_classes", "0"], "num_classes must be >= 1, got 0"),
        (["--model.init_args.image_size", "60"], "image_size=60 is not a multiple of the patch size 8"),
        (["--ckpt_path", "missing.ckpt"], "ckpt_path 'missing.ckpt' does not exist"),
        (["--ckpt_path", "config.yaml"], "config.yaml' is not a PyTorch checkpoint: it is a text file"),
    ],
)
def test_config_values_that_cannot_work_are_one_line(extra: list[str], message: str, capsys) -> None:
    Path("config.yaml").write_text("not: weights\n")
    args = ["fit", "--config", str(CONFIGS / "demo" / "seg.yaml"), "--trainer.logger", "false", *extra]
    assert message in one_line(args, capsys)


def _wrong_call() -> None:
    from loca_lightning.lr_schedules import poly

    poly(None, 10)  # a bug: Python's own TypeError inside the package, not a check of the user's input


def test_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TypeError):
        _wrong_call()
    try:
        _wrong_call()
    except TypeError as error:
        assert user_error(error) is None
    with pytest.raises(TypeError), one_line_user_errors():
        _wrong_call()
    with pytest.raises(RuntimeError), one_line_user_errors():  # an error inside torch
        from loca_lightning.ema import ema_update

        ema_update([torch.zeros(2)], [torch.zeros(3)], 0.5)
    from loca_lightning.data.seg_layouts import ade20k_samples

    with pytest.raises(FileNotFoundError) as info:  # a check of the user's input, raised on purpose
        ade20k_samples("/nonexistent", "training")
    wrapped = ValueError("Does not validate against any of the Union subtypes")  # as jsonargparse wraps it
    wrapped.__cause__ = info.value
    assert user_error(wrapped) is info.value
    monkeypatch.setenv("LOCA_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError), one_line_user_errors():  # on request, every traceback
        ade20k_samples("/nonexistent", "training")

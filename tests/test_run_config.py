"""The resolved config of a run is saved in the run's own folder and never over a file the run did not write: a
user's ``config.yaml`` in the working folder survives ``loca fit --config config.yaml --trainer.logger=false``."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from loca_lightning.callbacks.run_config import HEADER, SaveRunConfig
from loca_lightning.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.synthetic_length=8",
    "--data.init_args.batch_size=4",
    "--data.init_args.num_workers=0",
    "--data.init_args.views.num_focal=1",
]


@pytest.mark.slow
def test_users_config_in_the_working_folder_survives_runs_without_a_logger(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["loca"])
    torch.set_num_threads(1)
    mine = "# my experiment: do not lose these notes\n" + (CONFIGS / "demo" / "pretrain.yaml").read_text()
    (tmp_path / "config.yaml").write_text(mine)
    main(["fit", "--config", "config.yaml", "--trainer.max_steps=1", *TINY])
    assert (tmp_path / "config.yaml").read_text() == mine
    saved = tmp_path / "checkpoints" / "config.yaml"  # no logger: next to the checkpoints
    text = saved.read_text()
    assert text.startswith(HEADER + "\n")
    assert yaml.safe_load(text)["model"]["class_path"] == "loca_lightning.LOCAPretrainModule"

    # Resumed into the same folder: the run replaces the config it wrote itself, and still not the user's.
    main(["fit", "--config", "config.yaml", "--trainer.max_steps=2", "--ckpt_path=checkpoints/last.ckpt", *TINY])
    assert (tmp_path / "config.yaml").read_text() == mine
    assert yaml.safe_load(saved.read_text())["ckpt_path"] == "checkpoints/last.ckpt"
    assert sorted(p.name for p in tmp_path.rglob("*.yaml")) == ["config.yaml", "config.yaml"]


class _Parser:
    def dump(self, config, skip_none=False) -> str:
        return "seed_everything: 0\n"


def _saver(inputs: list[str]) -> SaveRunConfig:
    return SaveRunConfig(
        _Parser(), SimpleNamespace(get=lambda key, default=None: inputs if key == "config" else default)
    )


def test_only_a_config_the_project_wrote_is_replaced(tmp_path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("# the user's\nseed_everything: 7\n")
    assert Path(_saver([]).write(str(folder))).name == "config-1.yaml"
    assert (folder / "config.yaml").read_text() == "# the user's\nseed_everything: 7\n"
    assert Path(_saver([]).write(str(folder))).name == "config-1.yaml"  # written by a run: replaced
    (folder / "config.yaml").write_text(HEADER + "\nseed_everything: 3\n")
    assert Path(_saver([]).write(str(folder))).name == "config.yaml"
    assert (folder / "config.yaml").read_text() == HEADER + "\nseed_everything: 0\n"
    # a saved config given back as this run's --config input is not overwritten either
    (folder / "config.yaml").write_text(HEADER + "\nseed_everything: 3\n")
    inputs = [str(folder / "config.yaml")]
    assert Path(_saver(inputs).write(str(folder))).name == "config-1.yaml"
    assert (folder / "config.yaml").read_text() == HEADER + "\nseed_everything: 3\n"


@pytest.mark.parametrize("content", [b"\xff\xfe binary", b""])
def test_unreadable_or_empty_files_are_not_the_projects(tmp_path, content) -> None:
    (tmp_path / "config.yaml").write_bytes(content)
    assert Path(_saver([]).write(str(tmp_path))).name == "config-1.yaml"
    assert (tmp_path / "config.yaml").read_bytes() == content

"""`loca --help` lists the subcommands beside LightningCLI's from one table, each has its own `--help`, and a
subcommand imports only what it uses (`loca export` loads neither OpenCV, albumentations nor the datasets)."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from loca_lightning import cli

ROOT = Path(__file__).resolve().parents[1]


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_loca_help_lists_every_subcommand_with_its_help_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["loca"])  # LightningCLI reads sys.argv for its own warnings
    out = _help(capsys, ["--help"])
    listed = out[out.index("Available subcommands:") :]
    for name in ["fit", "validate", "test", "predict", *cli.SUBCOMMANDS]:
        assert f"\n    {name} " in listed, f"{name} is not listed in `loca --help`:\n{listed}"
    for _, help_line in cli.SUBCOMMANDS.values():
        assert " ".join(help_line.split()[:3]) in " ".join(listed.split())


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_each_subcommand_has_its_own_help(capsys, name):
    out = _help(capsys, [name, "--help"])
    assert out.startswith(f"usage: loca {name} "), out[:200]


def test_a_new_subcommand_is_one_table_entry(capsys, monkeypatch):
    calls = []
    fake = types.ModuleType("fake_loca_subcommand")
    fake.main = calls.append
    monkeypatch.setitem(sys.modules, "fake_loca_subcommand", fake)
    monkeypatch.setitem(cli.SUBCOMMANDS, "shards", ("fake_loca_subcommand:main", "Check the shards of a dataset."))
    cli.main(["shards", "DIR", "--flag"])
    assert calls == [["DIR", "--flag"]]
    monkeypatch.setattr(sys, "argv", ["loca"])
    listed = _help(capsys, ["--help"])
    assert "\n    shards " in listed and "Check the shards of a dataset." in listed


@pytest.mark.slow  # a fresh interpreter that imports torch and lightning: ~5 s idle, more on a busy machine
@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_subcommand_help_imports_neither_opencv_nor_albumentations_nor_datasets(name):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "loca_lightning.cli", name, "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"usage: loca {name} ")
    # -X importtime writes one "import time: self | cumulative | name" line per module imported
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "loca_lightning.backbones.vit" in imported  # the lines are read correctly (export needs the backbones)
    heavy = {"cv2", "albumentations", "loca_lightning.data.seg_datasets", "loca_lightning.data.pretrain"}
    assert not heavy & imported, f"`loca {name} --help` imports {sorted(heavy & imported)}"

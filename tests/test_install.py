"""The package as a user installs it: `pip install .` (a built wheel, not editable) into a fresh virtual environment,
then `loca --help` and a short `loca fit --config FILE` from a folder outside the checkout. And nothing in the package
finds files by climbing out of it (configs/, examples/ and tests/ are not installed)."""

from __future__ import annotations

import ast
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "loca_lightning"

# A few steps of LOCA pretraining on synthetic scenes; no logger, so only a checkpoint is written (in the run folder).
TINY_FIT = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False},
    "model": {"class_path": "loca_lightning.LOCAPretrainModule", "init_args": {
        "backbone": "vit_test_patch8", "reference_size": 32, "num_prototypes": 32, "projection_hidden_dim": 64,
        "projection_dim": 16, "drop_path_rate": 0.0, "warmup_epochs": 1}},
    "data": {"class_path": "loca_lightning.LOCAPretrainDataModule", "init_args": {
        "source": "synthetic", "synthetic_length": 8, "synthetic_image_size": 64, "batch_size": 4, "num_workers": 0,
        "persistent_workers": False, "pin_memory": False,
        "views": {"reference_size": 32, "query_size": 32, "focal_size": 16, "num_focal": 1, "patch_size": 8}}},
}  # fmt: skip


def _run(command: list, cwd: Path, env: dict, timeout: int = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    # Build from a copy of what the build reads, so that it writes nothing (build/, *.egg-info) into the checkout.
    source = tmp_path / "source"
    shutil.copytree(PACKAGE, source / "loca_lightning", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)

    # A fresh venv that sees this environment's packages (torch, lightning, pip, setuptools: no download) *after* its
    # own site-packages, through a plain path in a .pth file. The .pth files of this environment are not processed, so
    # an editable install of the checkout here stays invisible there. (`venv --system-site-packages` would expose the
    # base interpreter's packages, not this venv's.)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    venv_site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, {}).strip()
    )
    ours = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (venv_site / "outer_environment.pth").write_text("".join(f"{path}\n" for path in ours if Path(path).is_dir()))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", LOCA_KEEP_FREED_MEMORY="0")

    _run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--ignore-installed",
            "--disable-pip-version-check",
            "--no-input",
            str(source),
        ],
        tmp_path,
        env,
    )

    elsewhere = tmp_path / "elsewhere"  # no checkout here or above: only the installed package can be imported
    elsewhere.mkdir()
    where = _run([python, "-c", "import loca_lightning; print(loca_lightning.__file__)"], elsewhere, env).strip()
    assert Path(where).is_relative_to(venv_site), where
    files = _run(
        [python, "-c", "from importlib.metadata import files; print('\\n'.join(map(str, files('loca-lightning'))))"],
        elsewhere,
        env,
    ).split()
    assert files and all(
        f.split("/")[0] in ("loca_lightning", "loca_lightning-0.1.0.dist-info") or f.endswith("bin/loca") for f in files
    ), files
    assert "loca_lightning/cli.py" in files and not any("configs" in f or "examples" in f for f in files)

    loca = venv / "bin" / "loca"
    assert "export" in _run([loca, "--help"], elsewhere, env)
    (elsewhere / "tiny.yaml").write_text(yaml.safe_dump(TINY_FIT))
    _run([loca, "fit", "--config", "tiny.yaml", "--checkpoint.dirpath", "ckpt"], elsewhere, env)
    assert (elsewhere / "ckpt" / "last.ckpt").is_file()


def _docstrings(tree: ast.AST) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return {id(n.body[0].value) for n in nodes if n.body and isinstance(n.body[0], ast.Expr)}


def test_the_package_reaches_nothing_outside_itself() -> None:
    """No ``__file__`` paths and no code strings naming the checkout's folders: the installed wheel has neither."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "__file__":
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: __file__")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if any(folder in node.value for folder in ("configs/", "examples/", "tests/")):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:60]!r}")
    assert not problems, "\n".join(problems)

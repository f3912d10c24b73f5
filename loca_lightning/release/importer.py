"""``loca import-release SRC OUT``: the authors' flax checkpoint -> a LOCAPretrainModule checkpoint + timm weights.

OUT (a folder) gets ``loca_pretrain.ckpt`` (student = the release's ``params``, teacher = its ``ema_params``, heads
included; ``LOCAPretrainModule(**hyper_parameters)`` rebuilds the model; ``loca export``, ``pretrained=`` and
``init_weights=`` read it), ``timm_<weights>.pth`` + ``.json`` (as ``loca export`` writes them) and ``import.json``
(source, sha256, step, sizes, what was ignored). Everything is written to a temporary folder next to OUT and renamed
at the end: a failed import writes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from loca_lightning.backbones.loading import describe_differences, state_dict_differences
from loca_lightning.export import backbone_from_checkpoint, load_instructions, write_timm_files
from loca_lightning.release.convert import (
    RELEASE_ACTIVATION,
    ReleaseArchitecture,
    backbone_entries,
    backbone_spec,
    check_no_extra,
    check_same_tree,
    convert_tree,
    infer_architecture,
    location_head_entries,
    module_kwargs,
    parse_release_tree,
    projection_entries,
)
from loca_lightning.release.flax_files import ReleaseFormatError, read_flax_msgpack, resolve_checkpoint_file
from loca_lightning.weights_files import load_weights_file

CHECKPOINT_NAME = "loca_pretrain.ckpt"


def sha256(path: Path) -> str:
    """Hex digest of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def release_module_checkpoint(
    source: str | os.PathLike, allow_custom_size: bool = False
) -> tuple[dict[str, Any], dict[str, Any], ReleaseArchitecture]:
    """``(checkpoint, record, architecture)``: a LOCAPretrainModule checkpoint dict holding the release's weights,
    and what the import found (for ``import.json``)."""
    from loca_lightning.pretrain.module import LOCAPretrainModule

    path = resolve_checkpoint_file(source)
    release = parse_release_tree(read_flax_msgpack(path), path)
    arch = infer_architecture(release.params, path)
    backbone, overrides, custom = backbone_spec(arch, allow_custom_size, path)
    kwargs = module_kwargs(arch, backbone, overrides)

    groups = {"student.backbone.": backbone_entries(arch), "student.location_head.": location_head_entries(arch)}
    if arch.projection is not None:
        groups["student.projection."] = projection_entries(arch)
    state, used = convert_tree(release.params, groups, "params", path, arch)
    check_no_extra(release.params, used, "params", path)
    ignored = list(release.ignored)
    if release.ema_params is not None:
        check_same_tree(release.params, release.ema_params, path)
    teacher_source = None
    if arch.projection is not None:  # our teacher: EMA backbone and projection head (the release's runs just those)
        teacher_source = "ema_params" if release.ema_params is not None else "params"
        teacher_tree = release.ema_params if release.ema_params is not None else release.params
        teacher_groups = {"teacher.backbone.": backbone_entries(arch), "teacher.projection.": projection_entries(arch)}
        teacher, used = convert_tree(teacher_tree, teacher_groups, teacher_source, path, arch)
        state.update(teacher)
        if release.ema_params is not None:
            ignored.append(
                {
                    "path": "ema_params/{cross_attention_block,final_norm,position_predictor}",
                    "leaves": len(set(teacher_tree) - used),
                    "reason": "the teacher's location head: the release never runs it and our teacher has none",
                }
            )
    elif release.ema_params is not None:
        ignored.append(
            {
                "path": "ema_params",
                "leaves": len(release.ema_params),
                "reason": "location-only variant: the release never uses its EMA copy, our module has no teacher",
            }
        )

    with torch.device("meta"):  # the model's keys and shapes, without allocating it
        module = LOCAPretrainModule(**kwargs)
    expected = module.state_dict()
    for key, value in expected.items():  # not weights of the release (a run's counters): the module's initial values
        if not key.startswith(("student.", "teacher.")):
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    wrong = state_dict_differences(expected, state)
    if any(wrong.values()):  # the mapping and our module disagree: a bug here, not a bad file
        raise RuntimeError(
            f"the converted weights do not fit LOCAPretrainModule({kwargs}): "
            + "; ".join(describe_differences(wrong, shown=8))
        )
    record = {
        "source": str(path.resolve()),
        "sha256": sha256(path),
        "format": "flax msgpack, " + ("TrainState state dict" if release.kind == "train_state" else "params tree"),
        "global_step": release.global_step,
        "architecture": arch.as_dict(),
        "activation": RELEASE_ACTIVATION,
        "backbone": backbone,
        "backbone_kwargs": kwargs["backbone_kwargs"],
        "module_kwargs": kwargs,
        "custom_size": custom,
        "student": "params",
        "teacher": teacher_source,
        "ignored": ignored,
    }
    checkpoint = {
        "state_dict": {k: state[k] for k in expected},
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": L.__version__,
        "release_import": record,
    }
    return checkpoint, record, arch


def import_release(
    source: str | os.PathLike,
    out: str | os.PathLike,
    weights: str | None = None,
    force: bool = False,
    allow_custom_size: bool = False,
) -> dict[str, Any]:
    """Import a release checkpoint into the folder ``out``; return the import record (with ``files`` and ``call``).

    ``weights``: which network becomes the timm weights (default: the teacher, or the student of a location-only run).
    """
    out = Path(out)
    if weights not in (None, "teacher", "student"):
        raise ValueError(f"weights must be 'teacher' or 'student', got {weights!r}")
    if out.exists() and not force:
        raise FileExistsError(f"{str(out)!r} exists; pass --force to replace it")
    checkpoint, record, arch = release_module_checkpoint(source, allow_custom_size)
    if weights == "teacher" and arch.projection is None:
        raise ReleaseFormatError(
            f"{record['source']!r} is a location-only run (no projection head): it has no teacher; "
            "use --weights student"
        )
    weights = weights or ("teacher" if arch.projection is not None else "student")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".importing", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; OUT gets the permissions of any new folder
        torch.save(checkpoint, tmp / CHECKPOINT_NAME)
        del checkpoint
        # Read back as `loca export` does (weights_only=True): what we wrote is what every reader gets.
        backbone = backbone_from_checkpoint(load_weights_file(tmp / CHECKPOINT_NAME), weights)
        timm_name = f"timm_{weights}.pth"
        call = write_timm_files(backbone, tmp / timm_name, str(out / CHECKPOINT_NAME), weights)
        files = [CHECKPOINT_NAME, timm_name, timm_name + ".json", "import.json"]
        record.update(timm_weights=weights, files=files, timm_create_model=call)
        (tmp / "import.json").write_text(json.dumps(record, indent=2) + "\n")
        _replace(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an existing ``out`` (only with ``force``) goes last."""
    if not out.exists() and not out.is_symlink():
        tmp.rename(out)
        return
    if not force:
        raise FileExistsError(f"{str(out)!r} appeared while importing; pass --force to replace it")
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def import_release_main(argv: Sequence[str]) -> None:
    """Command-line front end of :func:`import_release`."""
    parser = argparse.ArgumentParser(
        prog="loca import-release",
        description="Import a checkpoint of the authors' LOCA release (scenic, flax msgpack; no JAX needed) as a "
        "LOCAPretrainModule checkpoint and timm weights (tanh GELU, as the release).",
    )
    parser.add_argument(
        "src",
        help="a flax checkpoint file (TrainState written by the release's trainer, possibly "
        "without opt_state, or a bare params tree), or a folder: its newest checkpoint_<step>",
    )
    parser.add_argument("out", help=f"output folder: {CHECKPOINT_NAME}, timm_<weights>.pth(.json), import.json")
    parser.add_argument(
        "--weights",
        choices=["teacher", "student"],
        default=None,
        help="which network becomes the timm weights (default: the teacher = ema_params; the student "
        "of a location-only run); the module checkpoint holds both",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    parser.add_argument(
        "--custom-size",
        action="store_true",
        help="import a ViT of a size other than Ti/S/B/L/H (as a ViT with overridden sizes)",
    )
    args = parser.parse_args(list(argv))
    try:
        record = import_release(args.src, args.out, args.weights, args.force, args.custom_size)
    except (FileExistsError, FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as error:
        parser.exit(2, f"loca import-release: error: {' '.join(str(error).split())}\n")
    out = Path(args.out)
    arch = record["architecture"]
    step = "" if record["global_step"] is None else f" at step {record['global_step']}"
    print(
        f"imported {record['source']}{step}: ViT {arch['patch_size']}/{arch['embed_dim']}, depth {arch['depth']}, "
        f"{arch['num_heads']} heads as {record['backbone']}" + (" with custom sizes" if record["custom_size"] else "")
    )
    print("wrote " + ", ".join(str(out / name) for name in record["files"]))
    model_args = ", ".join(f"{k}={v!r}" for k, v in record["module_kwargs"].items())
    print(
        f"pretrain from it: LOCAPretrainModule(init_weights={str(out / CHECKPOINT_NAME)!r}, {model_args}); "
        f"segmentation: pretrained={str(out / CHECKPOINT_NAME)!r}"
    )
    print(f"{record['timm_weights']} backbone in timm; load it with:")
    print(load_instructions(out / f"timm_{record['timm_weights']}.pth", record["timm_create_model"]))

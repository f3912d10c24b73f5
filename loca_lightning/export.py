"""``loca export CKPT OUT``: a checkpoint's backbone as timm weights plus a JSON of the model config, and the timm
architecture name and arguments under which a backbone's weights load strictly."""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loca_lightning.backbones import build_backbone, load_backbone_weights
from loca_lightning.backbones.vit import ViT
from loca_lightning.weights_files import (
    CheckpointFileError,
    extract_backbone_state_dict,
    is_lightning_checkpoint,
    load_weights_file,
)

# timm architecture names whose defaults match (patch, width, depth, heads); other sizes override a base name.
_TIMM_NAMES: dict[tuple[int, int, int, int], str] = {
    (16, 192, 12, 3): "vit_tiny_patch16_224",
    (16, 384, 12, 6): "vit_small_patch16_224",
    (16, 768, 12, 12): "vit_base_patch16_224",
    (16, 1024, 24, 16): "vit_large_patch16_224",
    (8, 384, 12, 6): "vit_small_patch8_224",
    (8, 768, 12, 12): "vit_base_patch8_224",
}


def timm_model_kwargs(backbone: ViT) -> tuple[str, dict[str, Any]]:
    """A timm architecture name and the keyword arguments under which it has exactly ``backbone``'s weights."""
    config = dict(backbone.timm_config)
    key = (config["patch_size"], config["embed_dim"], config["depth"], config["num_heads"])
    name = _TIMM_NAMES.get(key, "vit_base_patch16_224")
    kwargs = dict(config)
    kwargs.update(class_token=False, global_pool="avg", fc_norm=False, num_classes=0)
    return name, kwargs


def timm_create_model_call(backbone: ViT) -> str:
    """The ``timm.create_model(...)`` call (as text) that builds a model loading the exported weights strictly."""
    name, kwargs = timm_model_kwargs(backbone)
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"timm.create_model({name!r}, pretrained=False, {args})"


def export_timm_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """A detached, contiguous float32 copy of the backbone's state dict, in timm's key format."""
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in backbone.state_dict().items()}


def export_backbone(module: Any, which: str = "teacher") -> ViT:
    """A standalone copy (eval mode, on the CPU, trainable) of a LOCAPretrainModule's teacher or student backbone."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    if which == "teacher" and module.teacher is None:
        raise ValueError("this run has no teacher (apply_cluster_loss: false); export which='student'")
    source = module.teacher.backbone if which == "teacher" else module.student.backbone
    return copy.deepcopy(source).cpu().eval().requires_grad_(True)


def backbone_from_checkpoint(checkpoint: Mapping[str, Any], which: str = "teacher") -> ViT:
    """Rebuild the backbone stored in a LOCA or segmentation checkpoint, with its own positional grid."""
    hparams = checkpoint.get("hyper_parameters", {})
    name = hparams.get("backbone")
    if not isinstance(name, str):
        raise KeyError("the checkpoint has no 'backbone' hyperparameter: is it a loca-lightning checkpoint?")
    state = extract_backbone_state_dict(checkpoint, which, key="--weights")
    kwargs = dict(hparams.get("backbone_kwargs") or {})
    probe = build_backbone(name, **kwargs)
    side = math.isqrt(state["pos_embed"].shape[1]) if "pos_embed" in state else probe.pos_grid[0]
    kwargs["img_size"] = side * probe.patch_size  # keep the checkpoint's own table, do not resample it
    backbone = build_backbone(name, **kwargs)
    load_backbone_weights(backbone, state, which=which)
    return backbone.eval()


def default_weights(checkpoint: Mapping[str, Any]) -> str:
    """``"teacher"`` when the checkpoint has a teacher backbone (LOCA pretraining), else ``"student"``."""
    state = checkpoint.get("state_dict", checkpoint)
    return "teacher" if any(str(k).startswith(("teacher.backbone.", "teacher_backbone.")) for k in state) else "student"


def export_checkpoint(
    ckpt: str | Path, out: str | Path, which: str | None = None, force: bool = False, trust: bool = False
) -> str:
    """Write ``out`` (timm state dict) and ``out`` + ``.json`` (config); return the ``timm.create_model`` call.

    ``which=None`` exports the teacher of a pretraining checkpoint and the backbone of a segmentation checkpoint.
    """
    out = Path(out)
    config_path = out.with_name(out.name + ".json")
    for path in (out, config_path):
        if path.exists() and not force:
            raise FileExistsError(f"{str(path)!r} exists; pass --force to overwrite it")
    checkpoint = load_weights_file(ckpt, trust=trust)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, Mapping):
        if is_lightning_checkpoint(checkpoint):
            found = "none" if hparams is None else f"a {type(hparams).__name__}"
            problem = f"is a Lightning checkpoint without a mapping of hyperparameters ({found})"
        else:
            problem = f"is not the checkpoint of a loca-lightning module: it holds {_describe_keys(checkpoint)}"
        raise CheckpointFileError(
            f"{str(ckpt)!r} {problem}. `loca export` reads a .ckpt written by `loca fit` (timm weights need no export)"
        )
    which = which or default_weights(checkpoint)
    backbone = backbone_from_checkpoint(checkpoint, which)
    return write_timm_files(backbone, out, str(ckpt), which)


def write_timm_files(backbone: ViT, out: str | Path, source: str, which: str) -> str:
    """Write ``backbone`` as a timm state dict ``out`` and its config ``out`` + ``.json``; return the
    ``timm.create_model`` call that loads it (``source``, ``which``: recorded in the JSON)."""
    out = Path(out)
    name, kwargs = timm_model_kwargs(backbone)
    call = timm_create_model_call(backbone)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(export_timm_state_dict(backbone), tmp)
    tmp.replace(out)  # atomic: no half-written file if killed
    config = {"timm_name": name, "timm_kwargs": kwargs, "source_checkpoint": source, "weights": which}
    out.with_name(out.name + ".json").write_text(json.dumps(config, indent=2) + "\n")
    return call


def load_instructions(out: str | Path, call: str) -> str:
    """The lines that load exported weights ``out`` with timm (printed by ``loca export`` and ``loca import-release``)."""
    return "\n".join(
        [
            "import timm, torch",
            f"model = {call}",
            f"model.load_state_dict(torch.load({str(out)!r}, weights_only=True), strict=True)",
        ]
    )


def _describe_keys(checkpoint: Mapping[str, Any]) -> str:
    keys = [str(k) for k in checkpoint]
    if not keys:
        return "nothing"
    return f"{len(keys)} {'entry' if len(keys) == 1 else 'entries'} ({', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''})"


def export_main(argv: Sequence[str]) -> None:
    """Command-line front end of :func:`export_checkpoint`."""
    parser = argparse.ArgumentParser(prog="loca export", description=__doc__)
    parser.add_argument("ckpt", help="a loca-lightning checkpoint (.ckpt)")
    parser.add_argument("out", help="output file for the timm state dict (.pth)")
    parser.add_argument(
        "--weights",
        choices=["teacher", "student"],
        default=None,
        help="which pretraining network to export (default: the teacher when there is one, "
        "else the checkpoint's only backbone)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    parser.add_argument(
        "--trust",
        action="store_true",
        help="allow full unpickling of the checkpoint (only for files you made yourself)",
    )
    args = parser.parse_args(list(argv))
    try:
        call = export_checkpoint(args.ckpt, args.out, args.weights, args.force, args.trust)
    except (FileExistsError, FileNotFoundError, KeyError, ValueError, RuntimeError) as error:
        parser.exit(2, f"loca export: error: {error}\n")
    print(f"wrote {args.out} and {args.out}.json; load it with:")
    print(load_instructions(args.out, call))

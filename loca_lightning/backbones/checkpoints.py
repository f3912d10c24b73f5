"""Backbone weights in and out: timm state dicts, LOCA checkpoints, positional-table resizing, timm export.

Files are loaded with ``torch.load(..., weights_only=True)``: weights are data, not code. A full Lightning
checkpoint written by this project loads that way too; a file that needs arbitrary unpickling is refused unless
the caller passes ``trust=True`` (only for files you made yourself), and a file that is no checkpoint at all gets an
error saying what it is (``loca_lightning.weights_files``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from loca_lightning.backbones.vit import ViT, resize_pos_embed
from loca_lightning.weights_files import CheckpointFileError, read_weights_file

# Where the backbone lives inside a LOCAPretrainModule / SegmentationFinetuneModule state dict.
BACKBONE_PREFIXES: dict[str, tuple[str, ...]] = {
    "teacher": ("teacher.backbone.", "teacher_backbone."),
    "student": ("student.backbone.", "student_backbone.", "backbone."),
}

# timm architecture names whose defaults match (patch, width, depth, heads); other sizes override a base name.
_TIMM_NAMES: dict[tuple[int, int, int, int], str] = {
    (16, 192, 12, 3): "vit_tiny_patch16_224",
    (16, 384, 12, 6): "vit_small_patch16_224",
    (16, 768, 12, 12): "vit_base_patch16_224",
    (16, 1024, 24, 16): "vit_large_patch16_224",
    (8, 384, 12, 6): "vit_small_patch8_224",
    (8, 768, 12, 12): "vit_base_patch8_224",
}


def load_weights_file(path: str | os.PathLike, trust: bool = False) -> Mapping[str, Any]:
    """Load a checkpoint or state-dict file safely (``weights_only=True``); ``trust=True`` allows full unpickling.

    A file that is not one (an image, a truncated download, another framework's format) raises
    :class:`~loca_lightning.weights_files.CheckpointFileError` naming what it is.
    """
    checkpoint = read_weights_file(path, trust=trust)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFileError(
            f"{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint or state dict (a mapping of names to tensors)"
        )
    return checkpoint


def extract_backbone_state_dict(checkpoint: Mapping[str, Any], which: str = "teacher") -> dict[str, Tensor]:
    """The backbone's state dict from a LOCA/segmentation checkpoint, a ``{"state_dict"|"model": ...}`` wrapper,
    or a plain timm-format state dict (returned as is)."""
    if which not in BACKBONE_PREFIXES:
        raise ValueError(f"which must be one of {sorted(BACKBONE_PREFIXES)}, got {which!r}")
    state = checkpoint
    for wrapper in ("state_dict", "model", "module"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    for prefix in BACKBONE_PREFIXES[which]:
        found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found
    if which == "teacher":
        other = [p for p in BACKBONE_PREFIXES["student"] if any(k.startswith(p) for k in state)]
        if other and not any(k.startswith("teacher") for k in state):
            raise KeyError(f"the checkpoint has no teacher weights (it has {other[0]!r}...); use which='student'")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def adapt_state_dict(state: Mapping[str, Tensor], backbone: ViT) -> dict[str, Tensor]:
    """Resize the positional table of ``state`` to ``backbone``'s grid; drop timm's empty head/class entries."""
    state = dict(state)
    for key in ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"):
        if key in state and key not in backbone.state_dict():
            state.pop(key)
    if "pos_embed" in state:
        table = state["pos_embed"]
        target = backbone.pos_embed
        if table.shape[-1] == target.shape[-1] and table.shape[1] != target.shape[1]:
            side = int(round(table.shape[1] ** 0.5))
            if side * side != table.shape[1]:
                raise ValueError(
                    f"pos_embed has {table.shape[1]} entries, not a square grid; a class-token table cannot be loaded "
                    "into a backbone without class token"
                )
            state["pos_embed"] = resize_pos_embed(table, (side, side), backbone.pos_grid)
    return state


def load_backbone_weights(
    backbone: ViT,
    source: str | os.PathLike | Mapping[str, Any],
    which: str = "teacher",
    strict: bool = True,
    trust: bool = False,
) -> dict[str, list[str]]:
    """Load timm-format or LOCA-checkpoint weights into ``backbone``, resizing the positional table to its grid.

    Strict by default: any missing, unexpected or mis-shaped key raises an error that lists them. With
    ``strict=False`` the same lists are returned (``missing``, ``unexpected``, ``mismatched``) and nothing is hidden.
    """
    checkpoint = load_weights_file(source, trust=trust) if isinstance(source, (str, os.PathLike)) else source
    state = adapt_state_dict(extract_backbone_state_dict(checkpoint, which), backbone)
    own = backbone.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    report = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    if strict and (missing or unexpected or mismatched):
        name = source if isinstance(source, (str, os.PathLike)) else "the given state dict"
        lines = [f"weights from {name} do not match the backbone:"]
        for kind, keys in report.items():
            if keys:
                shown = ", ".join(keys[:12]) + (f" ... (+{len(keys) - 12} more)" if len(keys) > 12 else "")
                lines.append(f"  {kind} ({len(keys)}): {shown}")
        raise ValueError("\n".join(lines))
    loadable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    backbone.load_state_dict(loadable, strict=False)
    return report


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

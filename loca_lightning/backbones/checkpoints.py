"""Backbone weights in and out: timm state dicts, LOCA checkpoints, positional-table resizing, timm export.

Files are loaded with ``torch.load(..., weights_only=True)``: weights are data, not code. A full Lightning
checkpoint written by this project loads that way too; a file that needs arbitrary unpickling is refused unless
the caller passes ``trust=True`` (only for files you made yourself), and a file that is no checkpoint at all gets an
error saying what it is (``loca_lightning.weights_files``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loca_lightning.backbones.vit import ViT, resize_pos_embed
from loca_lightning.weights_files import CheckpointFileError, read_weights_file

# Where the backbone lives inside a LOCAPretrainModule / SegmentationFinetuneModule state dict.
BACKBONE_PREFIXES: dict[str, tuple[str, ...]] = {
    "teacher": ("teacher.backbone.", "teacher_backbone."),
    "student": ("student.backbone.", "student_backbone."),
}
FINETUNED_PREFIX = "backbone."  # a finetuned model's only backbone: what either choice means in its checkpoint

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


def extract_backbone_state_dict(
    checkpoint: Mapping[str, Any], which: str = "teacher", key: str = "which"
) -> dict[str, Tensor]:
    """The backbone's state dict from a LOCA checkpoint (its ``which`` backbone), a finetuned checkpoint (its only
    backbone, whichever ``which``), a ``{"state_dict"|"model": ...}`` wrapper, or a plain timm-format state dict
    (returned as is). ``key`` names the setting that chose ``which``, for the messages."""
    if which not in BACKBONE_PREFIXES:
        raise ValueError(f"{key} must be one of {sorted(BACKBONE_PREFIXES)}, got {which!r}")
    state = checkpoint
    for wrapper in ("state_dict", "model", "module"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    for prefix in (*BACKBONE_PREFIXES[which], FINETUNED_PREFIX):
        found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if found and (prefix != FINETUNED_PREFIX or which == "student" or not _has(state, "student")):
            return found
    if which == "teacher" and _has(state, "student"):
        raise KeyError(f"the checkpoint has no teacher weights, only a student's: set {key} to 'student'")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _has(state: Mapping[str, Any], which: str) -> bool:
    """Whether ``state`` holds a backbone under one of ``which``'s prefixes."""
    return any(str(k).startswith(BACKBONE_PREFIXES[which]) for k in state)


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


def state_dict_differences(own: Mapping[str, Tensor], theirs: Mapping[str, Tensor]) -> dict[str, list[str]]:
    """Keys of ``theirs`` (a file's weights) that do not fit ``own`` (a model's): ``missing``, ``unexpected`` and
    ``mismatched`` (``key: checkpoint shape vs model shape``)."""
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in theirs.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = sorted(k for k in own if k not in theirs)
    unexpected = sorted(k for k in theirs if k not in own)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def describe_differences(report: Mapping[str, list[str]], shown: int = 12) -> list[str]:
    """One ``kind (count): first keys`` entry per non-empty list of :func:`state_dict_differences`."""
    return [
        f"{kind} ({len(keys)}): "
        + ", ".join(keys[:shown])
        + (f" ... (+{len(keys) - shown} more)" if len(keys) > shown else "")
        for kind, keys in report.items()
        if keys
    ]


def load_backbone_weights(
    backbone: ViT,
    source: str | os.PathLike | Mapping[str, Any],
    which: str = "teacher",
    strict: bool = True,
    trust: bool = False,
    key: str = "which",
) -> dict[str, list[str]]:
    """Load timm-format or LOCA-checkpoint weights into ``backbone``, resizing the positional table to its grid.

    Strict by default: any missing, unexpected or mis-shaped key raises an error that lists them. With
    ``strict=False`` the same lists are returned (``missing``, ``unexpected``, ``mismatched``) and nothing is hidden.
    ``key`` names the setting that chose ``which``, for the messages.
    """
    checkpoint = load_weights_file(source, trust=trust) if isinstance(source, (str, os.PathLike)) else source
    state = adapt_state_dict(extract_backbone_state_dict(checkpoint, which, key), backbone)
    own = backbone.state_dict()
    report = state_dict_differences(own, state)
    if strict and any(report.values()):
        name = source if isinstance(source, (str, os.PathLike)) else "the given state dict"
        raise ValueError(
            "\n  ".join([f"weights from {name} do not match the backbone:", *describe_differences(report)])
        )
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


def _activation_name(act_layer: Any) -> str:
    """A comparable name: unset (``None``) and ``"gelu"`` are both the exact GELU of timm's default."""
    if act_layer is None:
        return "gelu"
    return act_layer if isinstance(act_layer, str) else getattr(act_layer, "__name__", str(act_layer))


def recorded_activation(path: str | os.PathLike, checkpoint: Mapping[str, Any]) -> tuple[bool, str | None]:
    """``(recorded, act_layer)``: the MLP activation a weights file was made with, where it says so.

    A loca-lightning checkpoint records it in ``hyper_parameters.backbone_kwargs.act_layer`` (absent: timm's exact
    GELU); a timm state dict written by ``loca export`` in its sibling ``<file>.json`` (``timm_kwargs.act_layer``).
    Any other file records nothing: ``(False, None)``.
    """
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, Mapping):
        return True, dict(hparams.get("backbone_kwargs") or {}).get("act_layer")
    sidecar = Path(path).with_name(Path(path).name + ".json")
    if sidecar.is_file():
        import json

        try:
            config = json.loads(sidecar.read_text())
        except ValueError as error:
            raise ValueError(f"{str(sidecar)!r} is not valid JSON ({error})") from error
        if isinstance(config, Mapping) and isinstance(config.get("timm_kwargs"), Mapping):
            return True, config["timm_kwargs"].get("act_layer")
    return False, None


def check_activation(
    act_layer: Any, path: str | os.PathLike, checkpoint: Mapping[str, Any], key: str, adopt: bool = True
) -> Any:
    """The activation to build with: the user's ``act_layer`` when set, else (``adopt``) the one ``checkpoint`` records.

    Raises ValueError naming both and the config ``key`` when they differ: the user set another one, or (``adopt=False``,
    the model is built already) left it unset while the checkpoint records another one.
    """
    recorded, theirs = recorded_activation(path, checkpoint)
    if not recorded or (act_layer is None and adopt):
        return theirs if recorded else act_layer
    if _activation_name(act_layer) != _activation_name(theirs):
        mine = repr(_activation_name(act_layer)) if act_layer is not None else "unset (exact GELU)"
        raise ValueError(
            f"{str(path)!r} was trained with act_layer {_activation_name(theirs)!r} but {key} is {mine}: "
            f"set {key}: {_activation_name(theirs)}"
        )
    return act_layer


def load_module_weights(
    module: nn.Module,
    path: str | os.PathLike,
    act_layer: Any = None,
    prefixes: tuple[str, ...] = ("student.", "teacher."),
) -> None:
    """Load the weights under ``prefixes`` of a module checkpoint (e.g. ``loca import-release``'s) into ``module``,
    strictly: a missing, unexpected or mis-shaped key is an error naming the file and the keys, and so is an activation
    other than ``act_layer`` (the module's ``backbone_kwargs.act_layer``). Other entries (a run's counters) are not
    weights and are left as they are."""
    checkpoint = load_weights_file(path)
    check_activation(act_layer, path, checkpoint, "model.init_args.backbone_kwargs.act_layer", adopt=False)
    state = checkpoint.get("state_dict", checkpoint)
    theirs = {k: v for k, v in state.items() if k.startswith(prefixes)}
    own = {k: v for k, v in module.state_dict().items() if k.startswith(prefixes)}
    report = state_dict_differences(own, theirs)
    if any(report.values()):
        raise ValueError(f"weights in {str(path)!r} do not fit this model: " + "; ".join(describe_differences(report)))
    module.load_state_dict(theirs, strict=False)  # every key under the prefixes is present and checked above

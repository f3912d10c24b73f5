"""Fitting a state dict to a backbone or a module: the positional table resized to the backbone's grid, the keys
compared (missing, unexpected, mis-shaped) and loaded strictly.

Reading the files themselves (safely, ``weights_only=True``) and finding a backbone inside a checkpoint is
:mod:`loca_lightning.weights_files`; a run's own Lightning checkpoints are :mod:`loca_lightning.checkpointing`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from loca_lightning.backbones.vit import ViT, resize_pos_embed
from loca_lightning.weights_files import check_activation, extract_backbone_state_dict, load_weights_file


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

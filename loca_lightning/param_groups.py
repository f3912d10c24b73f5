"""Optimizer parameter groups: which parameters are weight-decayed, and layer-wise lr decay for ViTs.

Two policies use them. Pretraining follows the release: every parameter of 2+ dimensions is decayed, plus the q/k/v
biases (``decay_suffixes``), ``pos_embed`` included. Finetuning follows timm and Segmenter-style recipes
(:func:`finetune_param_groups`): 1-D parameters and what the modules' ``no_weight_decay()`` name are not decayed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from torch import nn


def param_groups(
    model: nn.Module,
    weight_decay: float | None,
    no_decay_names: Iterable[str] = (),
    layer_decay: float | None = None,
    num_layers: int | None = None,
    layer_id: Callable[[str], int] | None = None,
    decay_suffixes: Iterable[str] = (),
) -> list[dict]:
    """Optimizer parameter groups: no weight decay on 1-D parameters (biases, norms) nor on ``no_decay_names``,
    except the 1-D parameters whose names end with one of ``decay_suffixes``; optional layer-wise lr decay
    (``lr_scale = layer_decay ** (num_layers + 1 - layer_id(name))``).

    ``weight_decay=None``: the decayed groups carry no ``weight_decay`` of their own, so the optimizer's applies (the
    others get 0). Frozen parameters (``requires_grad=False``) are left out; each group lists its ``names``.
    """
    exclude = set(no_decay_names)
    suffixes = tuple(decay_suffixes)
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shaped = param.ndim > 1 or (bool(suffixes) and name.endswith(suffixes))
        decay = shaped and name not in exclude and name.rsplit(".", 1)[-1] not in exclude
        layer = 0
        scale = 1.0
        if layer_decay is not None:
            if num_layers is None or layer_id is None:
                raise ValueError("layer_decay needs num_layers and layer_id")
            layer = layer_id(name)
            scale = layer_decay ** (num_layers + 1 - layer)
        key = (decay, layer)
        if key not in groups:
            groups[key] = {"params": [], "lr_scale": scale, "names": []}
            if not decay or weight_decay is not None:
                groups[key]["weight_decay"] = weight_decay if decay else 0.0
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def finetune_param_groups(
    model: nn.Module, parts: Iterable[str], layer_decay: float | None = None, num_layers: int | None = None
) -> list[dict]:
    """Finetuning's groups (without ``names``): the optimizer's weight decay on parameters of 2+ dimensions except
    those that ``no_weight_decay()`` of the submodules ``parts`` (e.g. ``backbone``, ``decoder``) name; none on 1-D
    parameters; layer-wise lr decay over a ViT of ``num_layers`` blocks under ``backbone.`` when ``layer_decay``."""
    exempt: set[str] = set()
    for part in parts:
        names = getattr(model.get_submodule(part), "no_weight_decay", lambda: ())()  # a user's decoder may have none
        exempt.update(f"{part}.{name}" for name in names)
    layer_id = None if num_layers is None else (lambda name: vit_layer_id(name, num_layers))
    groups = param_groups(model, None, exempt, layer_decay=layer_decay, num_layers=num_layers, layer_id=layer_id)
    for group in groups:
        group.pop("names")
    return groups


def vit_layer_id(name: str, num_layers: int, backbone_prefix: str = "backbone.") -> int:
    """Layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, everything after the blocks num_layers + 1."""
    if not name.startswith(backbone_prefix):
        return num_layers + 1  # decoder / heads
    rest = name[len(backbone_prefix) :]
    if rest.startswith(("patch_embed", "pos_embed", "cls_token", "norm_pre")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", rest)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1

"""Registry of backbone builders: ``register_backbone``, ``build_backbone``, ``list_backbones``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from loca_lightning.backbones.vit import ViT

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a builder ``fn(**overrides) -> nn.Module`` under ``name``."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"a backbone named {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def build_backbone(name: str, **overrides: Any) -> nn.Module:
    """Build the registered backbone ``name``; keyword overrides replace its defaults (e.g. ``drop_path_rate``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; registered backbones: {', '.join(list_backbones())}")
    return _REGISTRY[name](**overrides)


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_REGISTRY)


def backbone_patch_size(name: str, overrides: dict[str, Any] | None = None) -> int:
    """The patch size of ``build_backbone(name, **overrides)``, without building its weights."""
    overrides = overrides or {}
    if "patch_size" in overrides:
        return int(overrides["patch_size"])
    if name in VIT_SIZES:
        return VIT_SIZES[name][0]
    with torch.device("meta"):  # a registered custom backbone: its structure only
        return int(build_backbone(name, **overrides).patch_size)


# name: (patch, width, depth, heads). Ti/S/B/L/H follow the ViT paper; "pico"/"test" are small sizes for CPU demos and
# tests. The positional table is stored for a 224-pixel input (14x14 at patch 16) and resized to any other grid.
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "vit_test_patch16": (16, 32, 2, 2),
    "vit_test_patch8": (8, 32, 2, 2),
    "vit_pico_patch16": (16, 96, 4, 3),
    "vit_pico_patch8": (8, 96, 4, 3),
    "vit_tiny_patch16": (16, 192, 12, 3),
    "vit_small_patch16": (16, 384, 12, 6),
    "vit_base_patch16": (16, 768, 12, 12),
    "vit_large_patch16": (16, 1024, 24, 16),
    "vit_huge_patch16": (16, 1280, 32, 16),
    "vit_tiny_patch8": (8, 192, 12, 3),
    "vit_small_patch8": (8, 384, 12, 6),
    "vit_base_patch8": (8, 768, 12, 12),
}


def _vit_builder(patch: int, width: int, depth: int, heads: int) -> Callable[..., nn.Module]:
    def build(**overrides: Any) -> nn.Module:
        kwargs: dict[str, Any] = dict(img_size=224, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads)
        kwargs.update(overrides)
        return ViT(**kwargs)

    build.__doc__ = f"ViT patch {patch}, width {width}, depth {depth}, {heads} heads, no class token."
    return build


for _name, _size in VIT_SIZES.items():
    register_backbone(_name)(_vit_builder(*_size))

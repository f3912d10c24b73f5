"""Backbones: a registry of class-token-free ViTs built on timm, and the loading of weights into them."""

from loca_lightning.backbones.loading import load_backbone_weights
from loca_lightning.backbones.registry import build_backbone, list_backbones, register_backbone
from loca_lightning.backbones.vit import ViT, resize_pos_embed

__all__ = [
    "ViT",
    "build_backbone",
    "list_backbones",
    "load_backbone_weights",
    "register_backbone",
    "resize_pos_embed",
]

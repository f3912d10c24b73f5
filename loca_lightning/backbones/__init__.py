"""Backbones: a registry of class-token-free ViTs built on timm, and their checkpoint helpers."""

from loca_lightning.backbones.checkpoints import (
    export_timm_state_dict,
    load_backbone_weights,
    timm_create_model_call,
)
from loca_lightning.backbones.registry import build_backbone, list_backbones, register_backbone
from loca_lightning.backbones.vit import ViT, resize_pos_embed

__all__ = [
    "ViT",
    "build_backbone",
    "export_timm_state_dict",
    "list_backbones",
    "load_backbone_weights",
    "register_backbone",
    "resize_pos_embed",
    "timm_create_model_call",
]

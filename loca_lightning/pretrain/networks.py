"""The two networks of LOCA: the student (backbone, location head, projection head) and its EMA teacher."""

from __future__ import annotations

import copy

from torch import Tensor, nn

from loca_lightning.backbones.vit import ViT
from loca_lightning.pretrain.heads import LocationHead, ProjectionHead
from loca_lightning.pretrain.init import release_init_

# flax's q/k/v biases are [heads, head_dim] and the release decays every parameter whose ndim != 1: ours are fused
# 1-D vectors, decayed by name to match (the output projection's bias is 1-D in both and is not decayed).
QKV_BIASES = ("attn.qkv.bias", "attn.q.bias", "attn.kv.bias")


class LOCAStudent(nn.Module):
    """The trained network: backbone, location head and (when clustering is on) projection head."""

    def __init__(self, backbone: ViT, location_head: LocationHead, projection: ProjectionHead | None) -> None:
        super().__init__()
        self.backbone, self.location_head, self.projection = backbone, location_head, projection


class LOCATeacher(nn.Module):
    """EMA copy of the student's backbone and projection head (the parts the teacher runs); no gradients."""

    def __init__(self, student: LOCAStudent) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(student.backbone).requires_grad_(False)
        self.projection = copy.deepcopy(student.projection).requires_grad_(False)

    def ema_pairs(self, student: LOCAStudent) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher parameters, student parameters) in matching order."""
        pairs = [(self.backbone, student.backbone), (self.projection, student.projection)]
        return [p for t, _ in pairs for p in t.parameters()], [p for _, s in pairs for p in s.parameters()]


def build_student(
    backbone: ViT,
    num_positions: int,
    projection: tuple[int, int, int] | None,
    prototype_precision: str = "float32",
    release_init: bool = True,
    act_layer: str | None = None,
) -> LOCAStudent:
    """The student around ``backbone``: a location head with one logit per reference position (the backbone's
    width, heads and MLP ratio) and, unless ``projection`` is None, a projection head of ``(hidden, bottleneck,
    prototypes)``; the heads' MLPs use ``act_layer`` (timm's name, e.g. ``gelu_tanh``; None: exact GELU);
    initialised as the release does (else timm's truncated normal)."""
    heads = backbone.blocks[0].attn.num_heads
    mlp_ratio = backbone.timm_config["mlp_ratio"]
    location_head = LocationHead(backbone.embed_dim, heads, num_positions, mlp_ratio=mlp_ratio, act_layer=act_layer)
    head = (
        None
        if projection is None
        else ProjectionHead(
            backbone.embed_dim, *projection, prototype_precision=prototype_precision, act_layer=act_layer
        )
    )
    if release_init:
        release_init_(backbone, location_head, head)
    return LOCAStudent(backbone, location_head, head)

"""LOCA's initialisation as the released JAX code (scenic, flax) does it, for the student's backbone and heads."""

from __future__ import annotations

import torch
from torch import nn

from loca_lightning.backbones.vit import ViT, release_init_vit_
from loca_lightning.pretrain.heads import LocationHead, ProjectionHead


@torch.no_grad()
def release_init_(backbone: ViT, location_head: LocationHead, projection: ProjectionHead | None) -> None:
    """Initialise backbone and heads in place as the release does.

    Backbone: :func:`~loca_lightning.backbones.vit.release_init_vit_` (positional table std 1/sqrt(D),
    Xavier-uniform attention and MLP kernels, LeCun-normal patch embedding). Location head: Xavier-uniform attention
    and MLP kernels, LeCun-normal position predictor. Projection MLP: LeCun normal. timm's truncated normal(0.02)
    everywhere is 3-5x smaller at small widths (Xavier std 0.10 at D=96).
    """
    dim = backbone.embed_dim
    release_init_vit_(backbone)
    attn, mlp = location_head.attn, location_head.mlp
    for weight in (attn.q.weight, attn.kv.weight[:dim], attn.kv.weight[dim:], attn.proj.weight):
        nn.init.xavier_uniform_(weight)  # key and value are two [D, D] kernels packed in kv
    for layer in (attn.q, attn.kv, attn.proj):
        nn.init.zeros_(layer.bias)
    for layer in (mlp.fc1, mlp.fc2):
        nn.init.xavier_uniform_(layer.weight)
        nn.init.normal_(layer.bias, std=1e-6)
    linears = [location_head.position_predictor]
    if projection is not None:
        linears += [m for m in projection.mlp if isinstance(m, nn.Linear)]
    for layer in linears:  # flax's default kernel init (LeCun normal), zero bias
        nn.init.trunc_normal_(layer.weight, std=layer.in_features**-0.5)
        nn.init.zeros_(layer.bias)

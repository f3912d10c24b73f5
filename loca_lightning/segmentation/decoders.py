"""Segmenter decoders (Strudel et al. 2021): a linear head and the mask transformer.

Both map encoder patch tokens [B, N, D] (N = gh * gw, row-major) to patch-grid logits
[B, C, gh, gw]; the caller upsamples them bilinearly to the image.
"""

from __future__ import annotations

import inspect

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn


def _init_segmenter(module: nn.Module) -> None:
    """Segmenter's init: truncated-normal(.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _tokens_to_grid(x: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """[B, N, C] row-major tokens -> [B, C, gh, gw]."""
    gh, gw = grid_size
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw)


def _check_tokens(tokens: Tensor, grid_size: tuple[int, int], embed_dim: int) -> None:
    gh, gw = grid_size
    if tokens.ndim != 3 or tokens.shape[1] != gh * gw or tokens.shape[2] != embed_dim:
        raise ValueError(
            f"tokens must be [B, gh*gw={gh * gw}, embed_dim={embed_dim}] for grid_size {tuple(grid_size)}, "
            f"got shape {tuple(tokens.shape)}"
        )


class LinearDecoder(nn.Module):
    """Patch tokens -> Linear(D, classes) -> patch-grid logits."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.head = nn.Linear(embed_dim, num_classes)
        self.apply(_init_segmenter)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (none here beyond the usual 1-D rule)."""
        return set()

    def forward(self, tokens: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """tokens [B, N, D], grid_size (gh, gw) -> logits [B, C, gh, gw]."""
        _check_tokens(tokens, grid_size, self.embed_dim)
        return _tokens_to_grid(self.head(tokens), grid_size)


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer: class embeddings ride through transformer blocks with the
    patches; masks are cosines between projected patch and class embeddings, then a LayerNorm."""

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        depth: int = 2,
        num_heads: int | None = None,
        decoder_dim: int | None = None,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        decoder_dim = decoder_dim or embed_dim
        # Segmenter uses 64-wide heads (d_model // 64); tiny test sizes get one head.
        num_heads = num_heads or max(1, decoder_dim // 64)
        if decoder_dim % num_heads:
            raise ValueError(f"decoder_dim={decoder_dim} is not divisible by num_heads={num_heads}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.decoder_dim = decoder_dim

        self.proj_dec = nn.Linear(embed_dim, decoder_dim)
        self.class_embed = nn.Parameter(torch.zeros(1, num_classes, decoder_dim))  # [1, C, d]
        drop_rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                decoder_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                proj_drop=dropout,
                attn_drop=dropout,
                drop_path=rate,
                norm_layer=nn.LayerNorm,
            )
            for rate in drop_rates
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.apply(_init_segmenter)
        trunc_normal_(self.class_embed, std=0.02)
        # Plain matrices with 1/sqrt(d) Gaussian entries, as Segmenter (not Linear layers).
        scale = decoder_dim**-0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(decoder_dim, decoder_dim))
        self.proj_classes = nn.Parameter(scale * torch.randn(decoder_dim, decoder_dim))

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: the learnable class embeddings."""
        return {"class_embed"}

    def forward(self, tokens: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """tokens [B, N, D], grid_size (gh, gw) -> mask logits [B, C, gh, gw]."""
        _check_tokens(tokens, grid_size, self.embed_dim)
        num_patches = tokens.shape[1]
        x = self.proj_dec(tokens)  # [B, N, d]
        x = torch.cat([x, self.class_embed.expand(x.shape[0], -1, -1)], dim=1)  # [B, N + C, d]
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches = x[:, :num_patches] @ self.proj_patch  # [B, N, d]
        classes = x[:, num_patches:] @ self.proj_classes  # [B, C, d]
        patches = nn.functional.normalize(patches, dim=-1)
        classes = nn.functional.normalize(classes, dim=-1)
        masks = patches @ classes.transpose(1, 2)  # [B, N, C] cosines in [-1, 1]
        return _tokens_to_grid(self.mask_norm(masks), grid_size)


DECODERS: dict[str, type[nn.Module]] = {
    "linear": LinearDecoder,
    "mask_transformer": MaskTransformerDecoder,
}


def build_decoder(name: str, embed_dim: int, num_classes: int, **kwargs) -> nn.Module:
    """Build a decoder by name ("linear" or "mask_transformer"); unknown names or options raise."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; allowed names: {sorted(DECODERS)}")
    cls = DECODERS[name]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "embed_dim", "num_classes"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"decoder {name!r} got unknown options {unknown}; allowed: {sorted(allowed)}")
    return cls(embed_dim=embed_dim, num_classes=num_classes, **kwargs)

"""A Vision Transformer without class token that returns patch tokens, built on timm's VisionTransformer.

Only the embedding step differs from timm: the positional table is resized to whatever grid the input has
(bilinear, antialiased when shrinking), the caller may keep a subset of tokens (after positional embeddings,
before the blocks, as LOCA's large query does), and may skip positional embeddings altogether (LOCA's
location-only variant). Blocks, drop path and weight init are timm's; attention is timm's module and math, with
its kernel chosen by :func:`attention` (faster on the CPU when training). The state dict is timm's own,
so ``timm.create_model(..., class_token=False, global_pool="avg", fc_norm=False, num_classes=0)`` loads it strictly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """``softmax(q k^T / sqrt(head_dim)) v`` for ``q [B, H, Nq, hd]``, ``k, v [B, H, Nk, hd]``.

    On the CPU under autograd: logits and softmax in float32 (float64 stays float64) with autocast off, the
    probabilities cast to ``v``'s dtype for the product with ``v``: the numerics of flash-attention kernels, as plain
    matmuls. There, under bf16 autocast, SDPA's flash kernel has a slow backward at ViT sequence lengths and its math
    kernel upcasts q, k, v and both products to float32; this is faster than either (docs/performance-history-2026-11.md).
    Elsewhere (GPUs, or no gradients) ``F.scaled_dot_product_attention`` with torch's kernel choice.
    """
    if q.device.type != "cpu" or not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    compute = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast("cpu", enabled=False):
        logits = (q.to(compute) * q.shape[-1] ** -0.5) @ k.to(compute).transpose(-2, -1)  # [B, H, Nq, Nk]
        probs = logits.softmax(dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        return probs.to(v.dtype) @ v


class SelfAttention(nn.Module):
    """timm's ``Attention`` computed with :func:`attention`: built from a timm module, whose submodules it takes
    over (same names, so the state dict is timm's), with timm's forward (qkv, optional q/k norms, attention, optional
    norm, proj, dropouts). Gated attention (timm's ``gated=True``) is not supported."""

    def __init__(self, timm_attention: nn.Module) -> None:
        super().__init__()
        if getattr(timm_attention, "gate", None) is not None:
            raise ValueError("SelfAttention does not support timm's gated attention")
        self.num_heads: int = timm_attention.num_heads
        self.head_dim: int = timm_attention.head_dim
        self.scale: float = self.head_dim**-0.5  # as timm's (the attention maps of visualize.py use it)
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            module = getattr(timm_attention, name, None)  # older timm versions have no post-attention norm
            setattr(self, name, nn.Identity() if module is None else module)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("SelfAttention is full bidirectional attention: no attn_mask, no is_causal")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, hd] each
        q, k = self.q_norm(q), self.k_norm(k)
        x = attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        return self.proj_drop(self.proj(x))


class TensorDropPath(DropPath):
    """timm's DropPath (stochastic depth per sample, survivors scaled by 1 / keep) with the keep probability in a
    non-persistent buffer: torch.compile guards on Python floats, so float rates that differ per block would
    compile one graph per block (and hit dynamo's recompile limit); a tensor rate lets all blocks share one."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__(drop_prob, scale_by_keep)
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < self.keep_prob  # [B, 1, ...]
        scale = torch.where(keep, self.keep_prob.reciprocal(), 0.0) if self.scale_by_keep else keep.float()
        return x * scale.to(x.dtype)


class DropPathBlock(Block):
    """timm's ``Block`` whose two residual branches can take explicit per-sample drop-path multipliers.

    ``forward(x, drop_path=None)`` is timm's forward (each branch draws its own stochastic-depth mask).
    ``drop_path [2, B]`` instead multiplies the attention and MLP branches of sample b by ``drop_path[:, b]``
    (0 for a dropped branch, 1 / keep probability for a kept one), so that two passes can skip the same blocks for
    the same image, as the released LOCA code does for the teacher's reference pass and the student's large-query
    pass. Same submodules and state dict as timm's block. In eval mode the multipliers are ignored.
    """

    def forward(  # type: ignore[override]
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, drop_path: Tensor | None = None
    ) -> Tensor:
        if drop_path is None or not self.training:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        scale = drop_path.to(x.dtype).view(2, -1, *([1] * (x.ndim - 1)))  # [2, B, 1, 1]
        x = x + scale[0] * self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        return x + scale[1] * self.ls2(self.mlp(self.norm2(x)))


def resize_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Resize a positional table ``[1, gh*gw, D]`` from ``old_grid`` to ``new_grid`` (bilinear, antialiased when shrinking).

    The same grid returns the input itself, bit for bit.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    _, n, dim = pos_embed.shape
    if n != old_grid[0] * old_grid[1]:
        raise ValueError(f"positional table has {n} entries, which is not the grid {old_grid[0]}x{old_grid[1]}")
    table = pos_embed.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # [1, D, gh, gw]
    shrinking = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    table = F.interpolate(
        table.float(), size=tuple(new_grid), mode="bilinear", align_corners=False, antialias=shrinking
    ).to(pos_embed.dtype)
    return table.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)


@torch.no_grad()
def release_init_vit_(vit: VisionTransformer) -> None:
    """Initialise ``vit`` in place as the released LOCA code (scenic, flax) initialises its encoder.

    Positional table normal with std 1/sqrt(D); patch embedding LeCun normal (flax's Conv default), zero bias;
    attention: Xavier-uniform kernels for query, key, value (three [D, D] kernels, packed in timm's ``qkv``) and
    the output projection, zero biases; MLP: Xavier-uniform kernels, biases normal(1e-6); LayerNorms at one and
    zero. timm's default (truncated normal 0.02 for every linear layer) is 3-5x smaller at the widths of small
    models (Xavier std at D=96: 0.10 for attention, 0.065 for the MLP). On the demo's 4-block width-96 ViT the
    two gave the same location accuracy and the same finetuning result within noise (docs/experiments.md).
    """
    dim = vit.embed_dim
    if getattr(vit, "pos_embed", None) is not None:
        nn.init.normal_(vit.pos_embed, std=dim**-0.5)
    proj = vit.patch_embed.proj
    nn.init.trunc_normal_(proj.weight, std=(proj.weight[0].numel()) ** -0.5)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    for block in vit.blocks:
        attn, mlp = block.attn, block.mlp
        for chunk in attn.qkv.weight.chunk(3, dim=0):
            nn.init.xavier_uniform_(chunk)
        nn.init.xavier_uniform_(attn.proj.weight)
        for layer in (attn.qkv, attn.proj):
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        for layer in (mlp.fc1, mlp.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=1e-6)
    for module in vit.modules():
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ViT(VisionTransformer):
    """Pre-norm ViT without class token: ``forward(images [B,3,H,W]) -> patch tokens [B, N, D]`` after the final norm.

    ``img_size`` fixes the stored positional table (e.g. 224 -> 14x14 for patch 16); any input whose sides are
    multiples of the patch size works, with the table resized to its grid.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        qkv_bias: bool = True,
        grad_checkpointing: bool = False,
        **timm_kwargs: Any,
    ) -> None:
        config: dict[str, Any] = dict(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            **timm_kwargs,
        )
        super().__init__(
            **{"block_fn": DropPathBlock, **config},
            drop_path_rate=drop_path_rate,
            class_token=False,
            global_pool="avg",
            fc_norm=False,
            num_classes=0,
        )
        self.patch_embed.strict_img_size = False  # any multiple of the patch size; the grid follows the input
        for block in self.blocks:  # timm's attention with a faster kernel choice when training on the CPU
            block.attn = SelfAttention(block.attn)
        if drop_path_rate > 0:  # every block the same module types (rate 0 multiplies by exactly 1): one compiled
            for block in self.blocks:  # graph serves all blocks; no state-dict change
                for name in ("drop_path1", "drop_path2"):
                    layer = getattr(block, name, None)
                    if isinstance(layer, (DropPath, nn.Identity)):
                        rate = getattr(layer, "drop_prob", 0.0)
                        setattr(block, name, TensorDropPath(rate, getattr(layer, "scale_by_keep", True)))
        self.grad_checkpointing = grad_checkpointing
        self.timm_config = config  # the arguments under which timm's VisionTransformer has these weights (export)

    @property
    def patch_size(self) -> int:
        """Side of a square patch in pixels."""
        return self.patch_embed.patch_size[0]

    @property
    def pos_grid(self) -> tuple[int, int]:
        """Grid of the stored positional table."""
        return tuple(self.patch_embed.grid_size)

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid of an input of ``(H, W)`` pixels; raises if a side is not a multiple of the patch size."""
        h, w = image_size
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {p}")
        return h // p, w // p

    def pos_embed_for(self, grid: tuple[int, int]) -> Tensor:
        """Positional table ``[1, gh*gw, D]`` for ``grid``: the stored one, or resized from it on every call.

        Not cached: FSDP2 and FSDP refill a parameter's storage when they gather it, without the version counter that a
        cache could key on, so a cached table went stale under them (the student's no-grad passes then differed from
        its grad passes). A resize is small next to the forward pass it feeds."""
        grid = tuple(grid)
        if grid == self.pos_grid:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, self.pos_grid, grid)

    def patch_tokens(self, images: Tensor) -> Tensor:
        """Patch embedding ``[B, N, D]``: timm's stride-p convolution computed as one matmul on the image cut into
        patches (same weights, same result up to summation order). With 3 input channels the convolution kernels
        are slow: on an H100 the matmul form made the ViT-B/16 LOCA step faster (docs/performance-history-2026-11.md)."""
        embed = self.patch_embed
        proj = embed.proj
        p = self.patch_size
        plain = (
            isinstance(proj, nn.Conv2d)
            and tuple(proj.kernel_size) == (p, p) == tuple(proj.stride)
            and proj.padding in ((0, 0), "valid")
            and proj.dilation == (1, 1)
            and proj.groups == 1
            and embed.flatten
            and not getattr(embed, "dynamic_img_pad", False)
        )
        if not plain:
            return embed(images)
        b, c, h, w = images.shape
        patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return embed.norm(F.linear(patches, proj.weight.flatten(1), proj.bias))  # (c, kh, kw) order as the conv

    def embed(self, images: Tensor, keep_index: Tensor | None = None, use_pos_embed: bool = True) -> Tensor:
        """Patch embedding + positional embedding, then the optional token selection: ``[B, N or K, D]``."""
        grid = self.grid_size(images.shape[-2:])
        x = self.patch_tokens(images)  # [B, N, D]
        if use_pos_embed:
            x = x + self.pos_embed_for(grid)
        if keep_index is not None:  # keep_index [B, K] of token positions
            x = torch.gather(x, 1, keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.norm_pre(self.pos_drop(x))

    def sample_drop_path(self, batch_size: int) -> Tensor | None:
        """Per-sample stochastic-depth multipliers ``[depth, 2, B]`` for one pass (attention and MLP branch of each
        block): 0 where a branch is dropped, 1 / keep probability where kept; drawn from the global torch RNG.
        None in eval mode or without drop path."""
        layers = [block.drop_path1 for block in self.blocks]  # both branches of a block share its rate
        if not self.training or not all(isinstance(layer, TensorDropPath) for layer in layers):
            return None
        keep = torch.stack([layer.keep_prob for layer in layers])  # [depth]
        draw = torch.rand(len(self.blocks), 2, batch_size, device=keep.device) < keep[:, None, None]
        return draw.float() / keep[:, None, None]

    def forward_tokens(self, x: Tensor, drop_path: Tensor | None = None) -> Tensor:
        """Run already embedded tokens ``[B, N, D]`` through the blocks and the final norm; ``drop_path``
        ``[depth, 2, B]`` gives every block's drop-path multipliers (:class:`DropPathBlock`), else each draws its own."""
        for i, block in enumerate(self.blocks):
            kwargs = {} if drop_path is None else {"drop_path": drop_path[i]}
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False, **kwargs)
            else:
                x = block(x, **kwargs)
        return self.norm(x)

    def forward_features(  # type: ignore[override]
        self,
        images: Tensor,
        keep_index: Tensor | None = None,
        use_pos_embed: bool = True,
        drop_path: Tensor | None = None,
    ) -> Tensor:
        """Patch tokens ``[B, N, D]`` (or ``[B, K, D]`` with ``keep_index``) after the final LayerNorm."""
        tokens = self.embed(images, keep_index=keep_index, use_pos_embed=use_pos_embed)
        return self.forward_tokens(tokens, drop_path=drop_path)

    def forward(  # type: ignore[override]
        self,
        images: Tensor,
        keep_index: Tensor | None = None,
        use_pos_embed: bool = True,
        drop_path: Tensor | None = None,
    ) -> Tensor:
        """Same as :meth:`forward_features`: the backbone's output is its patch tokens."""
        return self.forward_features(images, keep_index=keep_index, use_pos_embed=use_pos_embed, drop_path=drop_path)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """timm's convention: parameters users commonly exclude from weight decay (LOCA's recipe decays them)."""
        return {"pos_embed"}

"""LOCA's two heads: the cross-attention location head and the projection/prototype (clustering) head.

Both are plain ``nn.Module``s whose state dicts hold ordinary ``weight``/``bias`` tensors (no weight-norm
parametrisation), so EMA copies, FSDP wrapping and checkpoints treat them like any other layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Mlp, get_act_layer
from torch import Tensor, nn

from loca_lightning.backbones.vit import attention

_LN_EPS = 1e-6  # as timm's ViT and the released JAX code (flax's default)
PROTOTYPE_PRECISIONS = ("float32", "bfloat16")


def check_prototype_precision(value: str) -> None:
    """Raise ValueError unless ``value`` is one of :data:`PROTOTYPE_PRECISIONS`."""
    if value not in PROTOTYPE_PRECISIONS:
        raise ValueError(f"prototype_precision must be one of {PROTOTYPE_PRECISIONS}, got {value!r}")


# torch >= 2.9 multiplies bf16 matrices into a float32 result on CUDA in one kernel (aten::mm.dtype)
_CUDA_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _mm_bf16_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of two bfloat16 matrices with float32 accumulation and a float32 result."""
    if a.is_cuda and _CUDA_MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    # Elsewhere the same numbers up to summation order: a product of two bf16 values is exact in float32.
    return torch.mm(a.float(), b.float())


class Bf16DotFp32(torch.autograd.Function):
    """``a @ b.T`` (``a [N, d]``, ``b [K, d]``, float32) with both rounded to bfloat16, float32 accumulation and
    result; the backward's products the same way (the incoming gradient rounded to bfloat16). This is what a float32
    dot product computes on a TPU at JAX's default precision, where the released LOCA code ran."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        ctx.save_for_backward(a16, b16)
        return _mm_bf16_fp32(a16, b16.t())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        a16, b16 = ctx.saved_tensors
        g16 = grad.to(torch.bfloat16)
        grad_a = _mm_bf16_fp32(g16, b16) if ctx.needs_input_grad[0] else None
        grad_b = _mm_bf16_fp32(g16.t(), a16) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


ActLayer = str | Callable[..., nn.Module] | None


def _activation(act_layer: ActLayer) -> Callable[..., nn.Module]:
    """The MLP activation: ``None`` is exact GELU; a name as timm's ``act_layer`` (``"gelu_tanh"``: flax's GELU)."""
    if act_layer is None:
        return nn.GELU
    layer = get_act_layer(act_layer)
    if layer is None:
        raise ValueError(f"unknown activation {act_layer!r}")
    return layer


def _init_timm_style(module: nn.Module) -> None:
    """timm's ViT init: truncated normal (std .02) Linear weights, zero biases, LayerNorm ones/zeros."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class CrossAttention(nn.Module):
    """Multi-head attention where ``query [B, Q, D]`` attends to ``context [B, R, D]`` (no query-query attention)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, context: Tensor) -> Tensor:
        """Return the attended values ``[B, Q, D]``."""
        b, nq, d = query.shape
        nr = context.shape[1]
        q = self.q(query).reshape(b, nq, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, Q, hd]
        kv = self.kv(context).reshape(b, nr, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # [B, H, R, hd] each
        out = attention(q, k, v)  # [B, H, Q, hd]
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class LocationHead(nn.Module):
    """One pre-norm cross-attention block (queries -> visible reference tokens), then LayerNorm and a linear
    layer to one logit per reference position: ``forward(query [B, Q, D], reference [B, R, D]) -> [B, Q, P]``.

    Every query token is processed independently given the reference, so tokens of several query views of
    the same image may be concatenated along Q and processed in one call with the same result. ``act_layer``: the
    MLP's activation (exact GELU by default; ``"gelu_tanh"`` for the released weights), as the backbone's.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_positions: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act_layer: ActLayer = None,
    ) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or num_positions <= 0:
            raise ValueError(
                f"dim, num_heads and num_positions must be positive, got {dim}, {num_heads}, {num_positions}"
            )
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        self.dim = dim
        self.num_positions = num_positions
        self.norm_query = nn.LayerNorm(dim, eps=_LN_EPS)
        self.norm_reference = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm_mlp = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=_activation(act_layer))
        self.norm_out = nn.LayerNorm(dim, eps=_LN_EPS)
        self.position_predictor = nn.Linear(dim, num_positions)
        self.apply(_init_timm_style)

    def forward(self, query: Tensor, reference: Tensor) -> Tensor:
        """Return position logits ``[B, Q, num_positions]`` for every query token."""
        if query.dim() != 3 or reference.dim() != 3:
            raise ValueError(
                f"query and reference must be [B, Q, D] and [B, R, D], got shapes {tuple(query.shape)} "
                f"and {tuple(reference.shape)}"
            )
        if query.shape[0] != reference.shape[0]:
            raise ValueError(
                f"query and reference must have the same batch size (one reference per image), got "
                f"{query.shape[0]} and {reference.shape[0]}"
            )
        if query.shape[-1] != self.dim or reference.shape[-1] != self.dim:
            raise ValueError(
                f"query and reference must have feature size {self.dim}, got {query.shape[-1]} "
                f"and {reference.shape[-1]}"
            )
        x = query + self.attn(self.norm_query(query), self.norm_reference(reference))  # [B, Q, D]
        x = x + self.mlp(self.norm_mlp(x))
        return self.position_predictor(self.norm_out(x))  # [B, Q, P]


class ProjectionHead(nn.Module):
    """MLP to an L2-normalised bottleneck, then cosine similarities to ``num_prototypes`` unit-norm prototypes:
    ``forward(x [..., D]) -> [..., num_prototypes]`` with values in [-1, 1].

    The bottleneck normalisation and the prototype layer run in float32 even under autocast: the Sinkhorn
    temperature (0.05) turns bf16 rounding of a cosine (~4e-3) into logit noise of ~0.08.
    ``prototype_precision="bfloat16"`` rounds the normalised features and prototypes to bfloat16 for the prototype
    layer's product but keeps float32 sums and cosines (:class:`Bf16DotFp32`; largest error over 4096 x 4096 unit
    vector pairs 8e-4, against 1.5e-3 for a bf16 result and 7e-7 in float32): the numerics of the released code on
    TPUs, and one bf16 kernel instead of a float32 one on GPUs (its effect on the step: benchmarks/README.md). On the CPU it gives the same numbers through a float32 product (no speed-up there). ``act_layer``: the
    MLP's activation between its Linear layers (exact GELU by default; ``"gelu_tanh"`` for the released weights).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_prototypes: int = 4096,
        num_layers: int = 3,
        prototype_precision: Literal["float32", "bfloat16"] = "float32",
        act_layer: ActLayer = None,
    ) -> None:
        super().__init__()
        check_prototype_precision(prototype_precision)
        self.prototype_precision = prototype_precision
        if num_layers < 1:
            raise ValueError(
                f"num_layers must be >= 1 (the number of Linear layers before the bottleneck norm), got {num_layers}"
            )
        if min(in_dim, hidden_dim, bottleneck_dim, num_prototypes) <= 0:
            raise ValueError(
                f"in_dim, hidden_dim, bottleneck_dim and num_prototypes must be positive, got "
                f"{in_dim}, {hidden_dim}, {bottleneck_dim}, {num_prototypes}"
            )
        self.in_dim = in_dim
        # num_layers counts Linear layers: D -> hidden (-> hidden)* -> bottleneck, GELU between them.
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        act = _activation(act_layer)
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                layers.append(act())
            layers.append(nn.Linear(d_in, d_out))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Linear(bottleneck_dim, num_prototypes, bias=False)
        self.apply(_init_timm_style)
        # Unit-norm prototype rows at init (as released): the stored norm sets the effective step size
        # of the normalised weight, so start it at 1.
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def normalized_prototypes(self) -> Tensor:
        """The prototype matrix actually used, ``[num_prototypes, bottleneck_dim]``, rows of unit length (float32)."""
        return F.normalize(self.prototypes.weight.float(), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Return cosine logits ``[..., num_prototypes]`` (float32)."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"x must have feature size {self.in_dim} in its last dimension, got shape {tuple(x.shape)}"
            )
        z = self.mlp(x)  # [..., bottleneck]
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1)
            prototypes = self.normalized_prototypes()
            if self.prototype_precision == "bfloat16":
                cosines = Bf16DotFp32.apply(z.reshape(-1, z.shape[-1]), prototypes)  # [N, K] float32
                return cosines.view(*z.shape[:-1], prototypes.shape[0])
            return F.linear(z, prototypes)  # [..., K]

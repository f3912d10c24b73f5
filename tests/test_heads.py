"""Tests of LOCA's location head (cross-attention) and projection/prototype head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loca_lightning.pretrain.heads import Bf16DotFp32, LocationHead, ProjectionHead

DIM, HEADS, POSITIONS = 24, 3, 10


def _location_head(dtype: torch.dtype = torch.float32, seed: int = 0) -> LocationHead:
    torch.manual_seed(seed)
    head = LocationHead(DIM, HEADS, POSITIONS, mlp_ratio=2.0).to(dtype)
    # Non-trivial norms and biases, so the equivalence tests exercise every parameter.
    with torch.no_grad():
        for name, param in head.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return head.eval()


def _reference_location_head(head: LocationHead, query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The same block written with torch's own MultiheadAttention, to check heads, scale and wiring."""
    dim = query.shape[-1]
    mha = nn.MultiheadAttention(dim, HEADS, batch_first=True).to(query.dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([head.attn.q.weight, head.attn.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([head.attn.q.bias, head.attn.kv.bias]))
        mha.out_proj.weight.copy_(head.attn.proj.weight)
        mha.out_proj.bias.copy_(head.attn.proj.bias)
    kv = head.norm_reference(reference)
    x = query + mha(head.norm_query(query), kv, kv, need_weights=False)[0]
    h = F.gelu(head.mlp.fc1(head.norm_mlp(x)))
    x = x + head.mlp.fc2(h)
    return head.position_predictor(head.norm_out(x))


def test_location_head_shape() -> None:
    head = _location_head()
    out = head(torch.randn(2, 7, DIM), torch.randn(2, 5, DIM))
    assert out.shape == (2, 7, POSITIONS)


def test_location_head_matches_torch_multihead_attention() -> None:
    head = _location_head(torch.float64)
    query, reference = torch.randn(3, 7, DIM, dtype=torch.float64), torch.randn(3, 5, DIM, dtype=torch.float64)
    torch.testing.assert_close(head(query, reference), _reference_location_head(head, query, reference))


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_location_head_concatenated_queries_equal_separate_calls(dtype: torch.dtype, atol: float) -> None:
    # LOCA concatenates the large query (70 kept tokens) and the focal queries (9 x 36) of one image along Q.
    head = _location_head(dtype)
    gen = torch.Generator().manual_seed(1)
    reference = torch.randn(2, 6, DIM, generator=gen, dtype=dtype)
    large = torch.randn(2, 7, DIM, generator=gen, dtype=dtype)
    focal = [torch.randn(2, 4, DIM, generator=gen, dtype=dtype) for _ in range(3)]
    together = head(torch.cat([large, *focal], dim=1), reference)
    apart = torch.cat([head(large, reference)] + [head(f, reference) for f in focal], dim=1)
    torch.testing.assert_close(together, apart, atol=atol, rtol=0)
    # and one token alone is the same as that token among others
    torch.testing.assert_close(head(large[:, 3:4], reference), together[:, 3:4], atol=atol, rtol=0)


def test_location_head_query_order_equivariant_and_reference_order_invariant() -> None:
    head = _location_head(torch.float64)
    query, reference = torch.randn(2, 8, DIM, dtype=torch.float64), torch.randn(2, 5, DIM, dtype=torch.float64)
    out = head(query, reference)
    perm_q, perm_r = torch.randperm(8), torch.randperm(5)
    torch.testing.assert_close(head(query[:, perm_q], reference), out[:, perm_q])
    torch.testing.assert_close(head(query, reference[:, perm_r]), out)


def test_location_head_each_image_uses_its_own_reference() -> None:
    head = _location_head(torch.float64)
    query, reference = torch.randn(2, 4, DIM, dtype=torch.float64), torch.randn(2, 5, DIM, dtype=torch.float64)
    out = head(query, reference)
    torch.testing.assert_close(head(query[1:], reference[1:]), out[1:])
    assert not torch.allclose(head(query[1:], reference[:1]), out[1:])


def test_location_head_timm_init() -> None:
    torch.manual_seed(0)
    head = LocationHead(256, 4, 196)
    for name, module in head.named_modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
            assert module.eps == 1e-6
        elif isinstance(module, nn.Linear):
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
            assert abs(module.weight.std().item() - 0.02) < 0.002, name
    assert head.mlp.fc1.out_features == 4 * 256


def test_location_head_bad_input() -> None:
    with pytest.raises(ValueError, match="divisible"):
        LocationHead(10, 3, 4)
    head = _location_head()
    with pytest.raises(ValueError, match="batch size"):
        head(torch.randn(2, 3, DIM), torch.randn(3, 5, DIM))
    with pytest.raises(ValueError, match="feature size"):
        head(torch.randn(2, 3, DIM + 1), torch.randn(2, 5, DIM))
    with pytest.raises(ValueError, match=r"\[B, Q, D\]"):
        head(torch.randn(3, DIM), torch.randn(2, 5, DIM))


def _projection_head(num_prototypes: int = 32) -> ProjectionHead:
    torch.manual_seed(0)
    return ProjectionHead(DIM, hidden_dim=48, bottleneck_dim=16, num_prototypes=num_prototypes)


def test_projection_head_structure() -> None:
    head = ProjectionHead(DIM, hidden_dim=48, bottleneck_dim=16, num_prototypes=32, num_layers=3)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(DIM, 48), (48, 48), (48, 16)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert head.prototypes.bias is None and head.prototypes.weight.shape == (32, 16)
    # plain tensors only: EMA, FSDP and checkpoints see ordinary weights
    assert set(head.state_dict()) == {
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "mlp.4.weight",
        "mlp.4.bias",
        "prototypes.weight",
    }
    torch.testing.assert_close(head.prototypes.weight.norm(dim=1), torch.ones(32))
    one_layer = ProjectionHead(DIM, bottleneck_dim=16, num_prototypes=8, num_layers=1)
    assert [type(m) for m in one_layer.mlp] == [nn.Linear]


def test_projection_head_outputs_are_cosines() -> None:
    head = _projection_head()
    x = 5 * torch.randn(2, 7, DIM)
    out = head(x)
    assert out.shape == (2, 7, 32) and out.dtype == torch.float32
    expected = F.cosine_similarity(head.mlp(x)[..., None, :], head.prototypes.weight, dim=-1)
    torch.testing.assert_close(out, expected)
    assert out.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(head.normalized_prototypes().norm(dim=1), torch.ones(32))


def test_projection_head_invariant_to_prototype_scale() -> None:
    head = _projection_head()
    x = torch.randn(5, DIM)
    before = head(x)
    with torch.no_grad():
        head.prototypes.weight.mul_(torch.linspace(0.01, 100.0, 32)[:, None])  # every row a different norm
    after = head(x)
    torch.testing.assert_close(after, before)
    assert after.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(head.normalized_prototypes().norm(dim=1), torch.ones(32))


def test_projection_head_prototype_gradient_is_orthogonal_to_rows() -> None:
    # Weight norm with gain 1: the loss cannot change a row's length, so its gradient is orthogonal to the row.
    head = _projection_head()
    with torch.no_grad():
        head.prototypes.weight.mul_(3.0)
    (head(torch.randn(6, DIM)) ** 2).sum().backward()
    grad, weight = head.prototypes.weight.grad, head.prototypes.weight
    assert grad.abs().max() > 1e-4
    torch.testing.assert_close((grad * weight).sum(dim=1), torch.zeros(32), atol=1e-6, rtol=0)


def test_heads_under_bf16_autocast() -> None:
    loc, proj = _location_head(), _projection_head()
    query, reference = torch.randn(2, 5, DIM), torch.randn(2, 4, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = loc(query, reference)
        cosines = proj(query)
    assert logits.shape == (2, 5, POSITIONS) and torch.isfinite(logits).all()
    assert cosines.dtype == torch.float32 and cosines.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(cosines, proj(query), atol=0.05, rtol=0)


def test_projection_head_bad_input() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(DIM, num_layers=0)
    with pytest.raises(ValueError, match="feature size"):
        _projection_head()(torch.randn(3, DIM + 1))


def test_projection_head_zero_bottleneck_gives_zero_not_nan() -> None:
    # zero input and zero biases (the init) give a zero bottleneck vector: F.normalize's eps keeps it finite
    out = _projection_head()(torch.zeros(1, DIM))
    assert torch.equal(out, torch.zeros(1, 32))


def test_bf16_dot_rounds_the_inputs_and_keeps_float32_sums_and_gradients() -> None:
    # Bf16DotFp32 is exactly: round a, b (and in the backward the incoming gradient) to bf16, multiply-add in float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 24, generator=g, requires_grad=True)
    b = torch.randn(19, 24, generator=g, requires_grad=True)
    grad_out = torch.randn(37, 19, generator=g)
    out = Bf16DotFp32.apply(a, b)
    out.backward(grad_out)

    def r(t: torch.Tensor) -> torch.Tensor:  # bf16 rounding, then exact arithmetic
        return t.detach().bfloat16().double()

    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (r(a) @ r(b).T).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(a.grad, (r(grad_out) @ r(b)).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(b.grad, (r(grad_out).T @ r(a)).float(), rtol=0, atol=1e-5)
    # float32 results, not bf16 ones: most values are not representable in bf16
    assert (out.detach().bfloat16().float() != out.detach()).float().mean() > 0.9
    # and the inputs really are rounded: not the float32 product
    assert (out.detach() - a.detach() @ b.detach().T).abs().max() > 1e-4


def test_bfloat16_prototype_precision_changes_only_the_rounding_of_the_cosines() -> None:
    head = _projection_head()
    bf16 = _projection_head()
    bf16.prototype_precision = "bfloat16"
    assert ProjectionHead(DIM, prototype_precision="bfloat16").prototype_precision == "bfloat16"
    x = torch.randn(3, 5, DIM)
    exact, rounded = head(x), bf16(x)
    assert rounded.shape == exact.shape == (3, 5, 32) and rounded.dtype == torch.float32
    z = F.normalize(head.mlp(x).detach(), dim=-1)
    expected = z.bfloat16().double() @ head.normalized_prototypes().detach().bfloat16().double().T
    torch.testing.assert_close(rounded, expected.float(), rtol=0, atol=1e-6)
    error = (rounded - exact).abs().max()
    assert 1e-5 < error < 4e-3  # bf16 input rounding: below one bf16 ulp of a cosine near 1
    (rounded**2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bf16.parameters())
    with pytest.raises(ValueError, match="prototype_precision must be one of"):
        ProjectionHead(DIM, prototype_precision="float16")

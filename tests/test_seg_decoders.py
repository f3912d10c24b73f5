"""Segmenter decoders: shapes, token layout, unit-vector masks, init, gradients, registry."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block

from loca_lightning.segmentation.decoders import LinearDecoder, MaskTransformerDecoder, build_decoder

EMBED, CLASSES = 48, 5


def _decoders():
    torch.manual_seed(0)
    return [
        LinearDecoder(EMBED, CLASSES),
        MaskTransformerDecoder(EMBED, CLASSES, depth=2, num_heads=2, decoder_dim=32),
    ]


@pytest.mark.parametrize("grid", [(32, 32), (20, 30)])
def test_output_shapes(grid):
    tokens = torch.randn(2, grid[0] * grid[1], EMBED)
    for decoder in _decoders():
        assert decoder(tokens, grid).shape == (2, CLASSES, *grid)


def test_linear_decoder_is_row_major_linear_map():
    decoder = LinearDecoder(EMBED, CLASSES)
    tokens = torch.randn(2, 4 * 6, EMBED)
    out = decoder(tokens, (4, 6))
    i, j = 3, 1
    expected = tokens[:, i * 6 + j] @ decoder.head.weight.T + decoder.head.bias
    torch.testing.assert_close(out[:, :, i, j], expected)


def test_mask_transformer_is_equivariant_to_token_order():
    # no positional information inside the decoder: permuting patches permutes the masks
    decoder = MaskTransformerDecoder(EMBED, CLASSES, num_heads=2).eval()
    tokens = torch.randn(1, 4 * 5, EMBED)
    perm = torch.randperm(20)
    out = decoder(tokens, (4, 5)).flatten(2)
    out_perm = decoder(tokens[:, perm], (4, 5)).flatten(2)
    torch.testing.assert_close(out_perm, out[:, :, perm], atol=1e-5, rtol=1e-5)


def test_masks_are_cosines_of_unit_vectors_then_layernorm():
    decoder = MaskTransformerDecoder(EMBED, CLASSES, num_heads=2, decoder_dim=32).eval()
    seen = {}
    decoder.decoder_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("features", o))
    decoder.mask_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("pre_norm", i[0]))
    tokens = 10 * torch.randn(2, 6 * 7, EMBED)
    out = decoder(tokens, (6, 7))
    pre = seen["pre_norm"]  # [B, N, C]
    assert pre.shape == (2, 42, CLASSES)
    assert pre.abs().max() <= 1 + 1e-6
    feats = seen["features"]
    patches = feats[:, :42] @ decoder.proj_patch
    classes = feats[:, 42:] @ decoder.proj_classes
    cosine = torch.einsum("bnd,bcd->bnc", patches, classes) / (
        patches.norm(dim=-1)[:, :, None] * classes.norm(dim=-1)[:, None, :]
    )
    torch.testing.assert_close(pre, cosine)
    # then a LayerNorm over classes (weight 1, bias 0 at init), reshaped row-major to the grid
    mean, var = pre.mean(-1, keepdim=True), pre.var(-1, unbiased=False, keepdim=True)
    normed = (pre - mean) / torch.sqrt(var + decoder.mask_norm.eps)  # [B, N, C]
    torch.testing.assert_close(out, normed.transpose(1, 2).reshape(2, CLASSES, 6, 7))


def test_segmenter_init_and_structure():
    torch.manual_seed(0)
    linear = LinearDecoder(256, 150)
    assert torch.all(linear.head.bias == 0)
    assert linear.head.weight.std().item() == pytest.approx(0.02, rel=0.1)

    mask = MaskTransformerDecoder(128, 150, drop_path=0.2, dropout=0.1)
    assert len(mask.blocks) == 2 and all(isinstance(b, Block) for b in mask.blocks)
    assert mask.blocks[0].attn.num_heads == 2  # 64-wide heads by default
    assert mask.class_embed.shape == (1, 150, 128)
    assert mask.class_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert mask.proj_patch.std().item() == pytest.approx(128**-0.5, rel=0.1)
    assert mask.proj_classes.std().item() == pytest.approx(128**-0.5, rel=0.1)
    assert torch.all(mask.proj_dec.bias == 0)
    assert mask.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)  # linear over depth, 0 first
    for module in (linear, mask):
        names = dict(module.named_parameters())
        assert set(module.no_weight_decay()) <= set(names)
    assert mask.no_weight_decay() == {"class_embed"}


@pytest.mark.parametrize("index", [0, 1])
def test_gradients_reach_every_parameter(index):
    decoder = _decoders()[index].train()
    tokens = torch.randn(2, 4 * 3, EMBED, requires_grad=True)
    target = torch.randint(0, CLASSES, (2, 4, 3))
    loss = torch.nn.functional.cross_entropy(decoder(tokens, (4, 3)), target)
    loss.backward()
    for name, param in decoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert tokens.grad.abs().sum() > 0


def test_build_decoder():
    assert isinstance(build_decoder("linear", EMBED, CLASSES), LinearDecoder)
    mask = build_decoder("mask_transformer", EMBED, CLASSES, depth=1, num_heads=4, decoder_dim=64)
    assert isinstance(mask, MaskTransformerDecoder) and len(mask.blocks) == 1 and mask.decoder_dim == 64
    with pytest.raises(ValueError, match="'linear'.*'mask_transformer'"):
        build_decoder("upernet", EMBED, CLASSES)
    with pytest.raises(ValueError, match="depth"):
        build_decoder("linear", EMBED, CLASSES, depth=2)


def test_bad_shapes_raise():
    linear, mask = _decoders()
    with pytest.raises(ValueError, match="grid_size"):
        linear(torch.randn(1, 10, EMBED), (3, 4))
    with pytest.raises(ValueError, match="embed_dim"):
        mask(torch.randn(1, 12, EMBED + 1), (3, 4))
    with pytest.raises(ValueError, match="divisible"):
        MaskTransformerDecoder(EMBED, CLASSES, num_heads=5)

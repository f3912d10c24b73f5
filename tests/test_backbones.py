"""Backbone registry, token selection, positional-table resizing, weights in and out."""

import pytest
import timm
import torch

from loca_lightning.backbones import (
    build_backbone,
    list_backbones,
    load_backbone_weights,
    register_backbone,
    resize_pos_embed,
)
from loca_lightning.backbones.vit import attention
from loca_lightning.export import export_timm_state_dict, timm_create_model_call, timm_model_kwargs
from loca_lightning.weights_files import CheckpointFileError, UntrustedCheckpointError


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_names_and_errors():
    names = list_backbones()
    for name in [
        "vit_tiny_patch16",
        "vit_small_patch16",
        "vit_base_patch16",
        "vit_large_patch16",
        "vit_huge_patch16",
        "vit_small_patch8",
        "vit_base_patch8",
        "vit_test_patch16",
    ]:
        assert name in names
    with pytest.raises(ValueError, match="unknown backbone 'vit_nope'.*vit_base_patch16"):
        build_backbone("vit_nope")
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("vit_test_patch16")(lambda **kw: None)


@pytest.mark.parametrize("size,grid", [(224, 14), (96, 6), (512, 32)])
def test_shapes_for_grids(size, grid):
    model = build_backbone("vit_test_patch16").eval()
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, grid * grid, 32)


def test_sizes_match_the_vit_family():
    model = build_backbone("vit_small_patch16")
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (384, 12, 6)
    assert model.pos_embed.shape == (1, 196, 384)
    huge = build_backbone("vit_huge_patch16", depth=1)  # override keeps the test light
    assert huge.embed_dim == 1280 and huge.blocks[0].attn.num_heads == 16


def test_non_multiple_of_patch_is_an_error():
    model = build_backbone("vit_test_patch16")
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        model(torch.randn(1, 3, 100, 96))


def test_keep_all_tokens_equals_no_keep_index():
    model = build_backbone("vit_test_patch16").eval()
    x = torch.randn(2, 3, 96, 96)
    keep = torch.arange(36).expand(2, -1)
    torch.testing.assert_close(model(x, keep_index=keep), model(x), rtol=0, atol=0)


def test_keep_subset_equals_running_on_those_positions():
    model = build_backbone("vit_test_patch16").eval()
    x = torch.randn(2, 3, 96, 96)
    keep = torch.stack([torch.randperm(36)[:10], torch.randperm(36)[:10]])
    out = model(x, keep_index=keep)
    embedded = model.patch_tokens(x) + model.pos_embed_for((6, 6))  # [B, 36, D]
    manual = torch.stack([model.forward_tokens(embedded[b : b + 1, keep[b]])[0] for b in range(2)])
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-6)


def test_skip_pos_embed_changes_output_and_is_position_free():
    model = build_backbone("vit_test_patch16").eval()
    x = torch.randn(1, 3, 64, 64)
    with_pos, without = model(x), model(x, use_pos_embed=False)
    assert not torch.allclose(with_pos, without)
    # Without positions the ViT is permutation-equivariant: shuffling the tokens shuffles the outputs.
    perm = torch.randperm(16)
    embedded = model.patch_tokens(x)
    torch.testing.assert_close(model.forward_tokens(embedded[:, perm]), without[:, perm], rtol=1e-5, atol=1e-6)


def test_resize_same_grid_is_identity_and_resize_is_smooth():
    model = build_backbone("vit_test_patch16")
    table = model.pos_embed
    assert resize_pos_embed(table, (14, 14), (14, 14)) is table
    assert torch.equal(model.pos_embed_for((14, 14)), table)
    # a table that is linear in the coordinates stays close to linear after bilinear upsampling
    ramp = torch.linspace(0, 1, 14)
    linear = (ramp[:, None] + 0 * ramp[None, :]).reshape(1, 196, 1)
    up = resize_pos_embed(linear, (14, 14), (32, 32)).reshape(32, 32)
    assert torch.all(up[1:, :] >= up[:-1, :] - 1e-6)
    down = resize_pos_embed(table, (14, 14), (6, 6))
    assert down.shape == (1, 36, 32)


def test_resized_pos_table_follows_the_parameter_however_it_is_written():
    # FSDP2 writes gathered weights into a parameter's storage without bumping its version counter, as ``.data`` does
    model = build_backbone("vit_test_patch16").eval()
    with torch.no_grad():
        first = model.pos_embed_for((6, 6)).clone()
        model.pos_embed.add_(1.0)
        torch.testing.assert_close(model.pos_embed_for((6, 6)), first + 1.0, rtol=0, atol=1e-5)
        version = model.pos_embed._version
        model.pos_embed.data.add_(1.0)
        assert model.pos_embed._version == version  # the write a version-keyed cache cannot see
        torch.testing.assert_close(model.pos_embed_for((6, 6)), first + 2.0, rtol=0, atol=1e-5)


def test_export_timm_strict_load_identical_features():
    model = build_backbone("vit_test_patch16").eval()
    state = export_timm_state_dict(model)
    name, kwargs = timm_model_kwargs(model)
    reference = timm.create_model(name, pretrained=False, **kwargs).eval()
    reference.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 224, 224)
    diff = (reference.forward_features(x) - model(x)).abs().max().item()
    assert diff < 1e-5
    call = timm_create_model_call(model)
    assert call.startswith("timm.create_model(") and "class_token=False" in call and "global_pool='avg'" in call


def test_export_uses_timm_architecture_name_for_standard_sizes():
    name, kwargs = timm_model_kwargs(build_backbone("vit_small_patch16"))
    assert name == "vit_small_patch16_224" and kwargs["depth"] == 12
    name, kwargs = timm_model_kwargs(build_backbone("vit_small_patch16", depth=1))  # non-standard: explicit kwargs
    assert kwargs["depth"] == 1 and kwargs["embed_dim"] == 384


def test_load_checkpoint_with_other_grid_resizes_table(tmp_path):
    source = build_backbone("vit_test_patch16")  # 14x14 table
    target = build_backbone("vit_test_patch16", img_size=512)  # 32x32 table
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"teacher.backbone.{k}": v for k, v in source.state_dict().items()}}, path)
    report = load_backbone_weights(target, path, which="teacher")
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    expected = resize_pos_embed(source.pos_embed.detach(), (14, 14), (32, 32))
    torch.testing.assert_close(target.pos_embed.detach(), expected)
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_load_plain_timm_state_dict_and_student_choice(tmp_path):
    source = build_backbone("vit_test_patch16")
    timm_model = timm.create_model(*[timm_model_kwargs(source)[0]], pretrained=False, **timm_model_kwargs(source)[1])
    timm_model.load_state_dict(export_timm_state_dict(source))
    target = build_backbone("vit_test_patch16")
    load_backbone_weights(target, timm_model.state_dict())
    torch.testing.assert_close(target.state_dict(), source.state_dict())
    with pytest.raises(KeyError, match="no teacher weights"):
        load_backbone_weights(target, {f"student.backbone.{k}": v for k, v in source.state_dict().items()})
    load_backbone_weights(target, {f"student.backbone.{k}": v for k, v in source.state_dict().items()}, which="student")


def test_other_model_size_fails_naming_keys():
    small = build_backbone("vit_test_patch16")
    bigger = build_backbone("vit_test_patch16", embed_dim=48, depth=3)
    with pytest.raises(ValueError) as info:
        load_backbone_weights(small, bigger.state_dict())
    message = str(info.value)
    assert "mismatched" in message and "blocks.0.attn.qkv.weight" in message
    assert "unexpected" in message and "blocks.2." in message
    report = load_backbone_weights(small, bigger.state_dict(), strict=False)
    assert any(k.startswith("blocks.2.") for k in report["unexpected"])


def test_weights_only_refuses_code(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "obj": Evil()}, path)
    with pytest.raises(
        CheckpointFileError, match=r"not a checkpoint: it is a pickle of Python objects \(builtins.print\)"
    ):
        load_backbone_weights(build_backbone("vit_test_patch16"), path)
    torch.save({"state_dict": {"pos_embed": torch.zeros(1)}, "obj": Evil()}, path)
    with pytest.raises(UntrustedCheckpointError, match=r"weights file .*builtins.print.*can run code.*trust=True"):
        load_backbone_weights(build_backbone("vit_test_patch16"), path)
    assert "executed" not in capsys.readouterr().out


def test_gradient_checkpointing_same_gradients():
    model = build_backbone("vit_test_patch16", drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6)


def test_drop_path_linear_over_depth():
    model = build_backbone("vit_tiny_patch16", drop_path_rate=0.1)
    rates = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in model.blocks]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.1) < 1e-6


@pytest.mark.parametrize("name, size", [("vit_test_patch16", (64, 96)), ("vit_pico_patch8", (40, 24))])
def test_patch_embedding_as_a_matmul_equals_timms_convolution(name, size):
    # The embedding cuts the image into patches and multiplies by the conv kernel: same output and weight gradient.
    model = build_backbone(name)
    images = torch.randn(3, 3, *size)
    tokens = model.patch_tokens(images)
    reference = model.patch_embed(images)  # timm's PatchEmbed: stride-p convolution, flatten, norm
    grid = (size[0] // model.patch_size) * (size[1] // model.patch_size)
    assert tokens.shape == reference.shape == (3, grid, model.embed_dim)
    torch.testing.assert_close(tokens, reference, rtol=1e-5, atol=1e-5)
    weight = model.patch_embed.proj.weight
    grad_mm = torch.autograd.grad(tokens.square().sum(), weight)[0]
    grad_conv = torch.autograd.grad(reference.square().sum(), weight)[0]
    torch.testing.assert_close(grad_mm, grad_conv, rtol=1e-4, atol=1e-4)
    assert grad_mm.abs().max() > 1e-2  # a real gradient, not two zeros


def test_attention_under_autograd_equals_sdpa_in_float64():
    # the CPU training path (plain matmuls) computes the same function as SDPA, values and gradients
    q, k, v = (torch.randn(3, 4, n, 16, dtype=torch.float64, requires_grad=True) for n in (7, 11, 11))
    out = attention(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    with torch.no_grad():
        reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        assert torch.equal(attention(q, k, v), reference)  # without gradients: SDPA itself
    ref_grads = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v).square().sum(), (q, k, v))
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-10)


def test_attention_under_bf16_autocast_keeps_float32_logits():
    # bf16 q, k, v: float32 logits and softmax (the numerics of flash kernels), so the error against float64 stays
    # that of SDPA's float32 math kernel, well below what bf16 logits (timm's unfused path under autocast) give
    gen = torch.Generator().manual_seed(0)
    exact = [torch.randn(8, 6, 70, 64, generator=gen, dtype=torch.float64) * 1.5 for _ in range(3)]
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in exact)
    reference = torch.nn.functional.scaled_dot_product_attention(*(x.detach().double() for x in (q, k, v)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
        bf16_logits = ((q * 64**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    math_kernel = torch.nn.functional.scaled_dot_product_attention(*(x.float() for x in (q, k, v))).bfloat16()
    assert out.dtype == torch.bfloat16

    def max_error(x: torch.Tensor) -> float:
        return (x.double() - reference).abs().max().item()

    error, math_error, bf16_error = max_error(out), max_error(math_kernel), max_error(bf16_logits)
    assert error < 2 * math_error and error < 0.5 * bf16_error, (error, math_error, bf16_error)


def test_self_attention_is_timms_attention_with_its_state_dict():
    model = build_backbone("vit_test_patch16")
    name, kwargs = timm_model_kwargs(model)
    timm_model = timm.create_model(name, pretrained=False, **kwargs)
    assert list(model.blocks[0].attn.state_dict()) == list(timm_model.blocks[0].attn.state_dict())
    model.load_state_dict(export_timm_state_dict(timm_model.double()), strict=False)
    model.double()
    x = torch.randn(2, 9, model.embed_dim, dtype=torch.float64)
    for grad in (True, False):  # both paths: plain matmuls with gradients, SDPA without
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(model.blocks[0].attn(x), timm_model.blocks[0].attn(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="attn_mask"):
        model.blocks[0].attn(x, attn_mask=torch.ones(9, 9, dtype=torch.bool))


def test_drop_path_block_is_timms_block_without_multipliers_and_drops_branches_with_them():
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    model = build_backbone("vit_test_patch16", drop_path_rate=0.0)
    ours = model.blocks[0]
    timm_block = Block(32, 2, qkv_bias=True)
    timm_block.load_state_dict(ours.state_dict(), strict=True)  # same submodules, same keys
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(ours.eval()(x), timm_block.eval()(x), rtol=1e-6, atol=1e-6)  # attention kernels differ
    ours.train()
    kept = torch.ones(2, 3)
    torch.testing.assert_close(ours(x, drop_path=kept), timm_block.train()(x), rtol=1e-6, atol=1e-6)
    # sample 0 skips the attention branch, sample 1 the MLP branch, sample 2 is scaled by 1 / keep = 2 in both
    multipliers = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0]])
    out = ours(x, drop_path=multipliers)
    attn_only = x + ours.attn(ours.norm1(x))
    torch.testing.assert_close(out[0], (x + ours.mlp(ours.norm2(x)))[0])
    torch.testing.assert_close(out[1], attn_only[1])
    doubled = x + 2 * ours.attn(ours.norm1(x))
    torch.testing.assert_close(out[2], (doubled + 2 * ours.mlp(ours.norm2(doubled)))[2])


def test_sampled_drop_path_follows_the_linear_rates():
    torch.manual_seed(0)
    model = build_backbone("vit_test_patch16", drop_path_rate=0.5).train()  # 2 blocks: rates 0 and 0.5
    scales = model.sample_drop_path(4000)
    assert scales.shape == (2, 2, 4000)
    assert torch.equal(scales[0], torch.ones(2, 4000))  # rate 0: never dropped
    assert set(scales[1].unique().tolist()) == {0.0, 2.0}  # kept branches are scaled by 1 / keep
    assert abs((scales[1] == 0).float().mean().item() - 0.5) < 0.03
    assert model.eval().sample_drop_path(4) is None
    assert build_backbone("vit_test_patch16", drop_path_rate=0.0).train().sample_drop_path(4) is None


def _antialiased_weights(old: int, new: int) -> torch.Tensor:
    """``[new, old]`` rows of jax.image.resize's 'bilinear' (triangle kernel widened by the scale when shrinking,
    weights renormalised inside the image), written from its definition."""
    scale = new / old
    width = max(1.0, 1.0 / scale)
    centres = (torch.arange(new, dtype=torch.float64) + 0.5) / scale - 0.5  # sample points in input coordinates
    distance = (centres[:, None] - torch.arange(old, dtype=torch.float64)[None, :]).abs() / width
    weights = (1 - distance).clamp_min(0)
    return weights / weights.sum(1, keepdim=True)


@pytest.mark.parametrize("old, new", [(4, 3), (14, 6), (4, 2), (6, 14)])
def test_positional_table_resize_is_the_releases_antialiased_bilinear(old, new):
    # a known answer written from jax.image.resize's definition: switching antialiasing off fails it when shrinking
    table = torch.randn(1, old * old, 8, dtype=torch.float64)
    resized = resize_pos_embed(table, (old, old), (new, new)).reshape(new, new, 8)
    w = _antialiased_weights(old, new)
    expected = torch.einsum("ia,jb,abd->ijd", w, w, table.reshape(old, old, 8))
    torch.testing.assert_close(resized, expected, rtol=1e-6, atol=1e-6)

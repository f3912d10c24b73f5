"""Schedules, EMA and parameter groups against tables of numbers."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from loca_lightning.ema import ema_momentum, ema_update
from loca_lightning.lr_schedules import poly, warmup_cosine
from loca_lightning.param_groups import param_groups, vit_layer_id
from loca_lightning.pretrain.optimization import warmup_cosine_optimization


def test_warmup_cosine_table():
    total, warmup = 100, 10
    assert warmup_cosine(0, total, warmup) == 0.0  # lr at step 0 is 0
    assert warmup_cosine(5, total, warmup) == pytest.approx(0.5)
    assert warmup_cosine(10, total, warmup) == pytest.approx(1.0)
    assert warmup_cosine(55, total, warmup) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the cosine
    assert warmup_cosine(100, total, warmup) == pytest.approx(0.01)
    values = [warmup_cosine(s, total, warmup) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_poly_table():
    assert poly(0, 100) == 1.0
    assert poly(50, 100) == pytest.approx(0.5**0.9)
    assert poly(100, 100) == 0.0
    assert poly(100, 100, min_ratio=1e-4) == pytest.approx(1e-4)


def test_ema_momentum_first_middle_last():
    total = 100
    assert ema_momentum(0, total) == pytest.approx(0.996)
    assert ema_momentum(50, total) == pytest.approx(1 - 0.004 * 0.5)  # cos(pi/2) = 0
    assert ema_momentum(99, total) == pytest.approx(1 - 0.004 * 0.5 * (1 + math.cos(math.pi * 0.99)))  # last step
    assert ema_momentum(100, total) == pytest.approx(1.0)
    assert ema_momentum(25, total) == pytest.approx(1 - 0.004 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_ema_update_formula():
    teacher = [torch.ones(3), torch.zeros(2, 2)]
    student = [torch.full((3,), 3.0), torch.ones(2, 2)]
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher[0], torch.full((3,), 0.9 + 0.3))
    torch.testing.assert_close(teacher[1], torch.full((2, 2), 0.1))


def test_param_groups_no_decay_on_1d():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model.register_parameter("pos_embed", nn.Parameter(torch.zeros(1, 3, 4)))
    groups = param_groups(model, weight_decay=0.1)
    by_name = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert by_name == {"0.weight": 0.1, "0.bias": 0.0, "1.weight": 0.0, "1.bias": 0.0, "pos_embed": 0.1}
    groups = param_groups(model, weight_decay=0.1, no_decay_names=["pos_embed"])
    assert {n: g["weight_decay"] for g in groups for n in g["names"]}["pos_embed"] == 0.0
    groups = param_groups(model, weight_decay=0.1, decay_suffixes=["0.bias"])  # a 1-D parameter decayed by name
    assert {n: g["weight_decay"] for g in groups for n in g["names"]}["0.bias"] == 0.1


def test_layer_decay_scales():
    assert vit_layer_id("backbone.pos_embed", 12) == 0
    assert vit_layer_id("backbone.blocks.3.mlp.fc1.weight", 12) == 4
    assert vit_layer_id("backbone.norm.weight", 12) == 13
    assert vit_layer_id("decoder.head.weight", 12) == 13


def _trainer(accumulate: int) -> SimpleNamespace:
    """What warmup_cosine_optimization reads of a Trainer: 2 processes of 4 images, 10 batches per epoch."""
    return SimpleNamespace(
        estimated_stepping_batches=100 // accumulate,
        datamodule=SimpleNamespace(batch_size=4),
        world_size=2,
        accumulate_grad_batches=accumulate,
        num_training_batches=10,
        max_epochs=10,
    )


def test_gradient_accumulation_is_warned_about_once_at_the_start(recwarn):
    model = nn.Linear(3, 2)
    groups = param_groups(model, 0.1)
    warmup_cosine_optimization(_trainer(1), groups, torch.optim.AdamW, 1e-3, 1024, 1.0, 0.01)
    assert not [w for w in recwarn if "accumulate_grad_batches" in str(w.message)]
    with pytest.warns(UserWarning, match=r"accumulate_grad_batches=4: .* batch of 32, .* micro-batch of 8") as caught:
        config, total = warmup_cosine_optimization(_trainer(4), groups, torch.optim.AdamW, 1e-3, 1024, 1.0, 0.01)
    assert len([w for w in caught if "accumulate_grad_batches" in str(w.message)]) == 1
    assert config["lr_scheduler"]["scheduler"].base_lrs[0] == pytest.approx(1e-3 * 32 / 1024) and total == 25


@pytest.mark.parametrize("fused", [False, True])
def test_norm_clipping_under_bf16_works_with_a_fused_optimizer(fused):
    """The released configs use fused AdamW, clipping and bf16-mixed: Lightning's plugin refuses to clip for a fused
    optimizer; ours clips it by global norm like the unfused one (same gradients after clipping)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from loca_lightning.pretrain.performance import clip_gradients

    model = nn.Linear(4, 3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    expected = [
        p.grad * (1.0 / torch.cat([q.grad.flatten() for q in model.parameters()]).norm()) for p in model.parameters()
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    module = SimpleNamespace(trainer=SimpleNamespace(model=model, precision_plugin=MixedPrecision("bf16-mixed", "cpu")))
    module.clip_gradients = lambda opt, value, algorithm: module.trainer.precision_plugin.clip_gradients(
        opt, value, algorithm
    )
    clip_gradients(module, optimizer, 1.0, "norm")
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=0)
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert total == pytest.approx(1.0, rel=1e-5)

"""LOCAPretrainModule: EMA teacher, schedules, variants, reuse by subclassing, non-finite guard, export."""

import math

import lightning as L
import pytest
import torch
from _fake_loca import FakeLOCADataModule

from loca_lightning.data.synthetic import SyntheticScenes
from loca_lightning.ema import ema_momentum
from loca_lightning.export import export_backbone
from loca_lightning.pretrain.evaluation import location_accuracy
from loca_lightning.pretrain.masks import band_keep_index, random_keep_index, reference_keep_count
from loca_lightning.pretrain.module import LOCAPretrainModule
from loca_lightning.pretrain.views import LOCAViews

TINY = dict(
    backbone="vit_test_patch16",
    reference_size=64,
    num_prototypes=32,
    projection_hidden_dim=64,
    projection_dim=16,
    drop_path_rate=0.0,
    warmup_epochs=1,
)


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        max_epochs=1,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def test_band_masks():
    band = band_keep_index(5, 196, 39, "consecutive", torch.device("cpu"))
    assert band.shape == (5, 39)
    assert torch.all(band[:, 1:] - band[:, :-1] == 1) and band.min() >= 0 and band.max() <= 195
    first = band_keep_index(2, 196, 39, "first", torch.device("cpu"))
    assert torch.equal(first[1], torch.arange(39))
    subset = random_keep_index(3, 196, 70, torch.device("cpu"))
    assert all(len(set(row.tolist())) == 70 for row in subset)
    with pytest.raises(ValueError, match="reference_mask"):
        band_keep_index(1, 10, 2, "diagonal", torch.device("cpu"))


def test_constructor_validates_keys():
    with pytest.raises(ValueError, match="reference_keep_ratio must be in \\(0, 1\\]"):
        LOCAPretrainModule(**{**TINY, "reference_keep_ratio": 1.5})
    with pytest.raises(ValueError, match="query_keep must be >= 1"):
        LOCAPretrainModule(**{**TINY, "query_keep": 0})
    with pytest.raises(ValueError, match="reference_size 60 is not a multiple of the patch size 16"):
        LOCAPretrainModule(**{**TINY, "reference_size": 60})
    with pytest.raises(ValueError, match="unknown backbone"):
        LOCAPretrainModule(**{**TINY, "backbone": "resnet50"})


def test_band_offset_is_uniform_over_every_position():
    # N - K + 1 = 14 offsets for a band of 3 of 16 tokens, the last one included (the release's randint(0, N-K+1))
    generator = torch.Generator().manual_seed(0)
    offsets = band_keep_index(14000, 16, 3, "consecutive", torch.device("cpu"), generator)[:, 0]
    counts = torch.bincount(offsets, minlength=16)
    assert counts[14:].sum() == 0  # a band never runs past the grid
    assert counts[:14].min() > 850 and counts[:14].max() < 1150  # 1000 expected each; 5 standard deviations


def test_reference_band_keeps_the_floor_of_the_ratio():
    assert [reference_keep_count(0.2, n) for n in (196, 64, 16, 4)] == [39, 12, 3, 1]  # int(0.2 * N), at least one
    assert LOCAPretrainModule(**{**TINY, "reference_size": 128}).reference_keep == 12  # 8x8 grid: 12, not 13


def test_weight_decay_reaches_qkv_biases_as_in_the_release():
    # flax's q/k/v biases are [heads, head_dim] (ndim 2) and decayed; the output projection's bias is 1-D there too
    model = LOCAPretrainModule(**TINY)
    trainer = _trainer(max_steps=1)
    trainer.fit(model, FakeLOCADataModule())
    decay = {id(p): g["weight_decay"] for g in model.optimizers().optimizer.param_groups for p in g["params"]}
    named = {n: decay[id(p)] for n, p in model.student.named_parameters()}
    assert named["backbone.blocks.0.attn.qkv.bias"] == named["location_head.attn.q.bias"] == 0.1
    assert named["location_head.attn.kv.bias"] == named["backbone.pos_embed"] == 0.1
    for name in (
        "backbone.blocks.0.attn.proj.bias",
        "backbone.blocks.0.norm1.weight",
        "location_head.attn.proj.bias",
        "backbone.blocks.0.mlp.fc1.bias",
        "backbone.patch_embed.proj.bias",
    ):
        assert named[name] == 0.0, name


class _SameViews(FakeLOCADataModule):
    """The large query is the reference itself: with all its tokens kept, teacher and student see the same input."""

    def train_dataloader(self):
        for batch in super().train_dataloader():
            batch["query_large"] = batch["reference"].clone()
            yield batch


class _Recorder(LOCAPretrainModule):
    def encode_reference(self, reference, reference_keep, drop_path=None):
        keys, targets = super().encode_reference(reference, reference_keep, drop_path)
        self.teacher_tokens = self.teacher.backbone(reference, drop_path=drop_path).detach()
        return keys, targets

    def encode_queries(self, query_large, query_focal, large_keep, drop_path=None):
        tokens = super().encode_queries(query_large, query_focal, large_keep, drop_path)
        self.large_tokens = tokens[:, : large_keep.shape[1]].detach()
        return tokens


@pytest.mark.parametrize("shared", [True, False])
def test_teacher_reference_and_student_large_query_skip_the_same_blocks(shared):
    # Teacher = student at step 0 and the same image in both passes: their tokens are equal exactly when both passes
    # skip the same blocks for each image (the release's one dropout rng for both); independent draws differ.
    torch.manual_seed(0)
    model = _Recorder(**{**TINY, "drop_path_rate": 0.5, "shared_drop_path": shared, "query_keep": 16})
    _trainer(max_steps=1).fit(model, _SameViews(batch_size=8))
    same = [torch.allclose(a, b, atol=1e-5) for a, b in zip(model.teacher_tokens, model.large_tokens)]
    assert all(same) if shared else not all(same)


def test_teacher_is_ema_of_student_and_gets_no_gradients():
    torch.manual_seed(0)
    # A large lr and a low momentum make the EMA step visible far above float tolerance.
    model = LOCAPretrainModule(**{**TINY, "momentum_base": 0.5, "base_lr": 10.0, "warmup_epochs": 0})
    assert all(not p.requires_grad for p in model.teacher.parameters())
    seen = {}

    class Probe(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            if trainer.global_step == 0:
                seen["teacher_grads"] = [p.grad for p in module.teacher.parameters()]
                seen["teacher_before"] = [p.detach().clone() for p in module.teacher.parameters()]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == 0:
                seen["teacher_after"] = [p.detach().clone() for p in module.teacher.parameters()]
                seen["student_after"] = [
                    p.detach().clone()
                    for p in list(module.student.backbone.parameters()) + list(module.student.projection.parameters())
                ]

    _trainer(max_steps=2, callbacks=[Probe()]).fit(model, FakeLOCADataModule())
    assert all(g is None for g in seen["teacher_grads"])
    m = ema_momentum(0, model.total_steps, base=0.5)
    assert m == 0.5
    moved = 0.0
    for before, after, student in zip(seen["teacher_before"], seen["teacher_after"], seen["student_after"]):
        torch.testing.assert_close(after, m * before + (1 - m) * student, rtol=0, atol=1e-6)
        moved = max(moved, float((after - before).abs().max()))
    assert moved > 1e-3  # the update really happened


def test_momentum_schedule_first_middle_last():
    model = LOCAPretrainModule(**TINY)
    model.total_steps = 200
    assert model.momentum_at(0) == pytest.approx(0.996)
    assert model.momentum_at(100) == pytest.approx(0.998)
    assert model.momentum_at(200) == pytest.approx(1.0)


def test_lr_schedule_and_batch_scaling():
    model = LOCAPretrainModule(**{**TINY, "base_lr": 1e-3, "warmup_epochs": 1})
    lrs = []

    class LR(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

    _trainer(max_epochs=2, callbacks=[LR()]).fit(model, FakeLOCADataModule(batch_size=4, length=16))
    peak = 1e-3 * 4 / 1024  # global batch 4
    assert lrs[0] == 0.0  # lr at step 0 is 0
    assert lrs[4] == pytest.approx(peak)  # end of the 4-step warmup epoch
    assert lrs[-1] == pytest.approx(peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 3 / 4))))
    decays = {g["weight_decay"] for g in model.optimizers().optimizer.param_groups}
    assert decays == {0.0, 0.1}


def test_location_only_variant_has_no_teacher():
    model = LOCAPretrainModule(**{**TINY, "apply_cluster_loss": False})
    assert model.teacher is None and model.student.projection is None
    _trainer(max_steps=2).fit(model, FakeLOCADataModule())
    with pytest.raises(ValueError, match="no teacher"):
        export_backbone(model, "teacher")
    assert export_backbone(model, "student").pos_embed.shape == model.student.backbone.pos_embed.shape


def test_subclass_overriding_one_hook_trains_with_plain_trainer():
    calls = []

    class FirstTokens(LOCAPretrainModule):
        def select_reference_keep(self, batch_size):
            calls.append(batch_size)
            return torch.arange(self.reference_keep, device=self.device).expand(batch_size, -1)

    model = FirstTokens(**TINY)
    _trainer(max_steps=3).fit(model, FakeLOCADataModule(batch_size=4))
    assert calls == [4, 4, 4]
    assert model.global_step == 3


def test_nonfinite_loss_stops_with_step_and_components_or_skips(tmp_path):
    class Poisoned(LOCAPretrainModule):
        def compute_losses(self, *args):
            out = super().compute_losses(*args)
            if self.global_step == 1:
                out["loss_location"] = out["loss_location"] * float("nan")
                out["loss"] = out["loss"] * float("nan")
            return out

    with pytest.raises(FloatingPointError, match="non-finite loss at step 1: .*loss_location=nan"):
        _trainer(max_steps=3, default_root_dir=tmp_path).fit(Poisoned(**TINY), FakeLOCADataModule())
    assert (tmp_path / "nonfinite-step1.ckpt").is_file()  # the last good state, in the run's folder (not the cwd)
    model = Poisoned(**{**TINY, "on_nonfinite": "skip"})
    _trainer(max_steps=3, default_root_dir=tmp_path).fit(model, FakeLOCADataModule())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_export_backbone_copies_teacher_and_checkpoint_loads_weights_only(tmp_path):
    model = LOCAPretrainModule(**TINY)
    trainer = _trainer(max_steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(model, FakeLOCADataModule())
    exported = export_backbone(model, "teacher")
    for (name, a), b in zip(exported.state_dict().items(), model.teacher.backbone.state_dict().values()):
        assert torch.equal(a, b.cpu()), name
    ckpt = next(tmp_path.rglob("*.ckpt"))
    checkpoint = torch.load(ckpt, weights_only=True)  # our checkpoints are plain data
    assert checkpoint["hyper_parameters"]["backbone"] == "vit_test_patch16"


@pytest.mark.slow
@pytest.mark.parametrize("prototype_precision", ["float32", "bfloat16"])
def test_compile_all_traces_the_step_with_the_same_losses_and_gradients(monkeypatch, prototype_precision):
    # torch.compile's aot_eager backend traces what inductor would compile (dynamo graphs, autograd) without code
    # generation, so the test checks the plumbing (blocks, heads, losses, Sinkhorn) in seconds.
    monkeypatch.setattr(LOCAPretrainModule, "compile_options", {"backend": "aot_eager"})
    batch = FakeLOCADataModule(batch_size=4).dataset
    batch = torch.utils.data.default_collate([batch[i] for i in range(4)])
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    results = []
    for compile in (False, "all"):
        torch.manual_seed(0)
        model = LOCAPretrainModule(**TINY, compile=compile, prototype_precision=prototype_precision)
        model.configure_model()
        assert model.teacher.projection.prototype_precision == prototype_precision
        torch.manual_seed(1)  # the same masks
        out = model.training_step(batch, 0)
        out.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads, model))
    (loss, grads, _), (loss_c, grads_c, compiled) = results
    assert counters["stats"]["unique_graphs"] >= 4  # blocks, teacher targets, location and clustering terms traced
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_c.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the state dict keys do not change with compilation (checkpoints move between compiled and eager runs)
    assert list(compiled.state_dict()) == list(results[0][2].state_dict())


def test_compile_option_is_checked():
    with pytest.raises(ValueError, match="compile must be false, true, 'blocks' or 'all', got 'full'"):
        LOCAPretrainModule(**TINY, compile="full")
    with pytest.raises(ValueError, match="prototype_precision must be one of"):
        LOCAPretrainModule(**TINY, apply_cluster_loss=False, prototype_precision="tf32")


def test_logged_prototype_perplexity_is_that_of_the_student_query_logits():
    # the step derives it from the me-max term (exp(-me_max)) instead of a second softmax pass: same number
    from loca_lightning.pretrain.losses import mean_assignment_perplexity

    torch.manual_seed(0)
    model = LOCAPretrainModule(**TINY)
    query_tokens = torch.randn(2, 7, model.student.backbone.embed_dim)
    keys = torch.randn(2, model.reference_keep, model.student.backbone.embed_dim)
    targets = torch.softmax(torch.randn(2, model.num_positions, 32), dim=-1)
    target = torch.randint(-1, model.num_positions, (2, 7))
    out = model.compute_losses(query_tokens, keys, targets, target)
    expected = mean_assignment_perplexity(model.student.projection(query_tokens), model.hparams.student_temperature)
    torch.testing.assert_close(out["prototype_perplexity"], expected, rtol=1e-6, atol=0)
    assert 1.0 <= out["prototype_perplexity"].item() <= 32.0


def test_held_out_location_accuracy_draws_its_own_masks():
    """The evaluation's token masks come from torch seed 0, whatever state the model's own mask generator is in, and
    that generator (training's) is left where it was."""
    model = LOCAPretrainModule(
        backbone="vit_test_patch8",
        backbone_kwargs=dict(img_size=32),
        reference_size=32,
        num_prototypes=32,
        projection_hidden_dim=64,
        projection_dim=16,
    )
    views = LOCAViews(reference_size=32, query_size=32, focal_size=16, num_focal=2, patch_size=8, photometric=False)
    scenes = SyntheticScenes(length=16, image_size=48, seed=0, with_masks=False)
    images = [scenes[i]["image"] for i in range(len(scenes))]
    results = []
    for seed in (1, 2):
        model.mask_generator.get(torch.device("cpu")).manual_seed(seed)  # where training left it
        before = model.mask_generator.state().clone()
        results.append(location_accuracy(model, views, images, seed=3))
        assert torch.equal(model.mask_generator.state(), before)
    assert results[0] == results[1]

"""SegmentationFinetuneModule under a plain lightning.Trainer (CPU, tiny sizes): it learns, takes a user decoder,
initialises from LOCA checkpoints, builds layer-decayed lr groups, freezes, and evaluates at the original image size
(native or through a test scale)."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from loca_lightning.backbones import build_backbone, resize_pos_embed
from loca_lightning.data.seg_datasets import pad_collate
from loca_lightning.data.segmentation import SegmentationDataModule
from loca_lightning.data.synthetic import SyntheticScenes
from loca_lightning.segmentation.metrics import SegmentationMetric
from loca_lightning.segmentation.module import SegmentationFinetuneModule

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_trainer(**kwargs) -> L.Trainer:
    """A quiet CPU trainer without logger or checkpoints."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def make_module(**kwargs) -> SegmentationFinetuneModule:
    defaults = dict(
        num_classes=3,
        backbone="vit_test_patch16",
        image_size=SIZE,
        window=SIZE,
        stride=SIZE,
        drop_path_rate=0.0,
        inference_mode="whole",
        test_scale=None,  # native size: the scenes are small (the default is ADE20K's (2048, 512))
    )
    return SegmentationFinetuneModule(**{**defaults, **kwargs})


class Scenes(Dataset):
    """Procedural scenes as module items: image uint8 [3, H, W], mask int64 [H, W]."""

    def __init__(self, length: int, seed: int, num_classes: int = 3, size: int = SIZE) -> None:
        self.scenes = SyntheticScenes(length=length, image_size=size, num_classes=num_classes, seed=seed)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict:
        scene = self.scenes[index]
        image = torch.from_numpy(scene["image"]).permute(2, 0, 1).contiguous()  # [3, H, W] uint8
        return {"image": image, "mask": torch.from_numpy(scene["mask"]).long()}


def loader(length: int, seed: int, batch_size: int = 8, shuffle: bool = False, **kwargs) -> DataLoader:
    return DataLoader(Scenes(length, seed, **kwargs), batch_size=batch_size, shuffle=shuffle)


def backbone_state(module: SegmentationFinetuneModule) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}


# ---------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_short_finetune_beats_constant_predictor() -> None:
    """200 AdamW steps on 3-class scenes lift val mIoU far above the best constant prediction of the same val set."""
    L.seed_everything(0)
    val = loader(16, seed=2)
    best_constant = 0.0
    for label in range(3):  # a constant predictor at its best: always the class that scores highest
        metric = SegmentationMetric(3)
        for batch in val:
            metric.update(torch.full_like(batch["mask"], label), batch["mask"])
        best_constant = max(best_constant, float(metric.compute()["mIoU"]))
    module = make_module(backbone="vit_test_patch8", optimizer=functools.partial(torch.optim.AdamW, lr=2e-3))
    trainer = make_trainer(max_steps=200)
    trainer.fit(module, loader(1600, seed=1, shuffle=True), val)
    miou = float(trainer.callback_metrics["val/mIoU"])
    print(f"learning test: val mIoU {miou:.4f} vs best constant predictor {best_constant:.4f}")
    assert 0.15 < best_constant < 0.35  # background-heavy scenes: the comparison is not trivial
    assert miou > best_constant + 0.15
    assert float(trainer.callback_metrics["train/loss"]) < 1.0  # ln(3) = 1.10 at chance


# ---------------------------------------------------------------------------------------------- reuse
class GridConvDecoder(nn.Module):
    """A user decoder: patch tokens -> 3x3 convolution over the patch grid."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(embed_dim, num_classes, kernel_size=3, padding=1)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        grid_tokens = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)  # [B, D, gh, gw]
        return self.conv(grid_tokens)  # [B, C, gh, gw]


def test_user_decoder_trains_under_plain_trainer() -> None:
    decoder = GridConvDecoder(32, 3)
    before = decoder.conv.weight.detach().clone()
    module = make_module(decoder=decoder, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    assert module.decoder is decoder and "decoder" not in module.hparams
    trainer = make_trainer(max_steps=3)
    trainer.fit(module, loader(24, seed=1, shuffle=True), loader(4, seed=2))
    assert trainer.global_step == 3
    assert not torch.equal(decoder.conv.weight, before)
    assert 0.0 <= float(trainer.callback_metrics["val/mIoU"]) <= 1.0


# ---------------------------------------------------------------------------------------------- initialisation
def write_loca_checkpoint(path: Path, backbone: str = "vit_test_patch16") -> tuple[nn.Module, nn.Module]:
    """A LOCAPretrainModule-style checkpoint: teacher and student backbones (14x14 tables) plus a head."""
    torch.manual_seed(0)
    teacher, student = build_backbone(backbone), build_backbone(backbone)  # two different random inits
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state.update({f"student.backbone.{k}": v for k, v in student.state_dict().items()})
    state["student.location_head.out.weight"] = torch.zeros(196, 32)
    torch.save({"state_dict": state, "hyper_parameters": {"backbone": backbone, "reference_size": 224}}, path)
    return teacher, student


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_init_from_loca_checkpoint(tmp_path: Path, which: str) -> None:
    teacher, student = write_loca_checkpoint(tmp_path / "loca.ckpt")
    source = {"teacher": teacher, "student": student}[which]
    kwargs = {} if which == "teacher" else {"pretrained_weights": "student"}  # the teacher is the default
    module = make_module(pretrained=str(tmp_path / "loca.ckpt"), **kwargs)
    loaded, expected = module.backbone.state_dict(), source.state_dict()
    assert loaded.keys() == expected.keys()
    assert tuple(expected["pos_embed"].shape) == (1, 196, 32) and tuple(loaded["pos_embed"].shape) == (1, 16, 32)
    assert torch.equal(loaded["pos_embed"], resize_pos_embed(expected["pos_embed"], (14, 14), (4, 4)))
    for key in expected.keys() - {"pos_embed"}:
        assert torch.equal(loaded[key], expected[key]), key
    other = student if which == "teacher" else teacher
    assert not torch.equal(loaded["blocks.0.attn.qkv.weight"], other.state_dict()["blocks.0.attn.qkv.weight"])


def test_init_from_a_real_pretraining_checkpoint(tmp_path: Path) -> None:
    """A LOCAPretrainModule's own state dict and hyperparameters, as its Lightning checkpoints store them."""
    from loca_lightning.pretrain.module import LOCAPretrainModule

    torch.manual_seed(0)
    pretrain = LOCAPretrainModule(
        backbone="vit_test_patch16", projection_hidden_dim=64, projection_dim=16, num_prototypes=32
    )
    with torch.no_grad():  # after training the EMA teacher differs from the student
        for param in pretrain.teacher.backbone.parameters():
            param.add_(torch.randn_like(param))
    path = tmp_path / "pretrain.ckpt"
    torch.save({"state_dict": pretrain.state_dict(), "hyper_parameters": dict(pretrain.hparams)}, path)
    for which in ("teacher", "student"):
        source = getattr(pretrain, which).backbone.state_dict()
        loaded = make_module(pretrained=str(path), pretrained_weights=which).backbone.state_dict()
        assert torch.equal(loaded["pos_embed"], resize_pos_embed(source["pos_embed"], (14, 14), (4, 4)))
        for key in source.keys() - {"pos_embed"}:
            assert torch.equal(loaded[key], source[key]), (which, key)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
def test_finetuned_checkpoint_restores_without_the_pretraining_file(tmp_path: Path) -> None:
    write_loca_checkpoint(tmp_path / "loca.ckpt")
    module = make_module(pretrained=str(tmp_path / "loca.ckpt"))
    trainer = make_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, loader(8, seed=1))
    trainer.save_checkpoint(tmp_path / "finetuned.ckpt")
    (tmp_path / "loca.ckpt").unlink()  # e.g. finetuned elsewhere; the weights are in the finetuned checkpoint
    restored = SegmentationFinetuneModule.load_from_checkpoint(tmp_path / "finetuned.ckpt")
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    saved = torch.load(tmp_path / "finetuned.ckpt", weights_only=True)
    assert saved["pretrained_source"] == str(tmp_path / "loca.ckpt") and module.hparams.pretrained is not None


def test_checkpoint_of_other_architecture_fails_at_construction(tmp_path: Path) -> None:
    write_loca_checkpoint(tmp_path / "pico.ckpt", backbone="vit_pico_patch16")
    with pytest.raises(
        ValueError, match=r"(?s)model\.init_args\.pretrained=.*pico\.ckpt.*mismatched.*blocks\.0\."
    ) as info:
        make_module(pretrained=str(tmp_path / "pico.ckpt"))
    assert "unexpected" in str(info.value)  # pico's blocks 2-3 have no place in a depth-2 backbone


def test_num_classes_disagreeing_with_datamodule_fails_at_setup() -> None:
    data = SegmentationDataModule(
        layout="synthetic",
        synthetic_length=8,
        synthetic_val_length=2,
        synthetic_image_size=SIZE,
        crop_size=SIZE,
        num_workers=0,
        pin_memory=False,
    )
    with pytest.raises(ValueError, match=r"model\.num_classes=5 but the data has 9 classes"):
        make_trainer().validate(make_module(num_classes=5), datamodule=data)


# ---------------------------------------------------------------------------------------------- optimisation
def expected_lr_scale(name: str, decay: float) -> float:
    """Layer-wise decay for a depth-2 ViT: embeddings decay^3, block i decay^(2-i), final norm and decoder 1."""
    if name.startswith(("backbone.patch_embed.", "backbone.pos_embed")):
        return decay**3
    for block in range(2):
        if name.startswith(f"backbone.blocks.{block}."):
            return decay ** (2 - block)
    return 1.0


class LearningRateProbe(L.Callback):
    """Records each parameter's learning rate at the first training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.lr_of = {id(p): g["lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]}


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
def test_layer_decay_groups_have_expected_lr_ratios() -> None:
    module = make_module(layer_decay=0.5)
    probe = LearningRateProbe()
    make_trainer(max_steps=1, limit_val_batches=0, callbacks=[probe]).fit(module, loader(8, seed=1))
    names = dict(module.named_parameters())
    assert sorted(probe.lr_of) == sorted(id(p) for p in names.values())  # every parameter, in one group only
    reference_lr = probe.lr_of[id(module.decoder.head.weight)]
    assert reference_lr == pytest.approx(1e-3)  # the default optimizer's lr at step 0 of the poly schedule
    scales = {name: probe.lr_of[id(p)] / reference_lr for name, p in names.items()}
    for name, scale in scales.items():
        assert scale == pytest.approx(expected_lr_scale(name, 0.5), rel=1e-6), name
    assert sorted({round(s, 6) for s in scales.values()}) == [0.125, 0.25, 0.5, 1.0]


class BackboneModeProbe(L.Callback):
    """Records whether the backbone was in training mode at each training batch."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes.append(pl_module.backbone.training)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
def test_frozen_backbone_gets_no_gradient() -> None:
    module = make_module(freeze_backbone=True, drop_path_rate=0.1)
    before, decoder_before = backbone_state(module), module.decoder.head.weight.detach().clone()
    probe = BackboneModeProbe()
    trainer = make_trainer(max_steps=3, limit_val_batches=0, callbacks=[probe])
    trainer.fit(module, loader(24, seed=1, shuffle=True))
    assert all(p.grad is None and not p.requires_grad for p in module.backbone.parameters())
    for key, value in module.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(module.decoder.head.weight, decoder_before)
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in module.decoder.parameters()}
    assert probe.modes == [False, False, False]  # a frozen encoder runs without drop path


# ---------------------------------------------------------------------------------------------- evaluation
class OddSizedScenes(Dataset):
    """Two native-size evaluation items whose sides are not multiples of 16; some pixels ignored (255)."""

    sizes = ((50, 70), (37, 45))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> dict:
        height, width = self.sizes[index]
        scene = SyntheticScenes(length=2, image_size=(height, width), num_classes=3, seed=5)[index]
        mask = torch.from_numpy(scene["mask"]).long()  # [H, W]
        mask[:3] = 255
        image = torch.from_numpy(scene["image"]).permute(2, 0, 1).contiguous()  # [3, H, W]
        return {"image": image, "mask": mask, "name": str(index), "image_path": f"odd/{index}"}


class MetricProbe(L.Callback):
    """Copies the validation metric's dataset sums after the last batch (before the epoch end resets them)."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        metric = pl_module.val_metric
        self.sums = {k: getattr(metric, k).clone() for k in ("area_intersect", "area_union", "area_label")}


@pytest.mark.parametrize("test_scale", [None, (100, 40)])
@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_evaluation_keeps_labels(mode: str, test_scale: tuple[int, int] | None) -> None:
    """Padded batches of odd-sized images score exactly the labelled pixels at their original size, as image-by-image
    inference does, at native size or resized to a test scale (50x70 -> 40x56, 37x45 -> 40x49) and back."""
    torch.manual_seed(0)
    module = make_module(inference_mode=mode, window=32, stride=16, test_scale=test_scale)
    dataset = OddSizedScenes()
    probe = MetricProbe()
    make_trainer(callbacks=[probe]).validate(module, DataLoader(dataset, batch_size=2, collate_fn=pad_collate))
    items = [dataset[i] for i in range(len(dataset))]
    labelled = sum(int((item["mask"] != 255).sum()) for item in items)
    assert int(probe.sums["area_label"].sum()) == labelled  # every label at its own pixel, none from padding
    expected = SegmentationMetric(3)
    module.eval()
    seen: list[tuple[int, int]] = []
    module.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        for item in items:
            logits = module.predict_logits(item["image"][None])
            assert logits.shape[-2:] == item["mask"].shape  # scores at the original size, labels untouched
            expected.update(logits.argmax(1), item["mask"][None])
    if mode == "whole":  # the model sees each image once, at the test scale
        assert seen == ([(50, 70), (37, 45)] if test_scale is None else [(40, 56), (40, 49)])
    for key, value in probe.sums.items():
        assert torch.equal(value, getattr(expected, key)), key
    assert np.prod(items[0]["mask"].shape) == 50 * 70


def test_random_init_choices() -> None:
    # "release" = the distribution LOCA pretraining starts from (Xavier q/k/v kernels, std 1/sqrt(D) positions),
    # so that "pretrained vs random" compares a trained network with its own starting point.
    kwargs = dict(num_classes=3, backbone="vit_pico_patch16", image_size=64, window=64, stride=64)
    release = SegmentationFinetuneModule(**kwargs, init="release").backbone
    timm = SegmentationFinetuneModule(**kwargs).backbone
    dim = 96
    assert release.blocks[0].attn.qkv.weight[:dim].std().item() == pytest.approx(dim**-0.5, rel=0.1)
    assert release.pos_embed.std().item() == pytest.approx(dim**-0.5, rel=0.1)
    assert timm.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    with pytest.raises(ValueError, match="init must be 'timm' or 'release'"):
        SegmentationFinetuneModule(**kwargs, init="xavier")


class WeightDecayProbe(L.Callback):
    """Records each parameter's weight decay in the optimizer at the first training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.decay_of = {id(p): g["weight_decay"] for g in trainer.optimizers[0].param_groups for p in g["params"]}


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
@pytest.mark.parametrize("layer_decay", [None, 0.5])
def test_finetuning_decays_only_matrices_outside_no_weight_decay(layer_decay: float | None) -> None:
    """With AdamW(weight_decay=0.05), only parameters of 2+ dimensions that neither the backbone's nor the decoder's
    ``no_weight_decay()`` names are decayed: biases, norms, ``pos_embed`` and the class embeddings are not."""
    module = make_module(
        decoder="mask_transformer",
        decoder_kwargs={"depth": 1, "num_heads": 2},
        layer_decay=layer_decay,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05),
    )
    probe = WeightDecayProbe()
    make_trainer(max_steps=1, limit_val_batches=0, callbacks=[probe]).fit(module, loader(8, seed=1))
    exempt = {"backbone.pos_embed", "decoder.class_embed"}
    assert exempt <= dict(module.named_parameters()).keys()
    decay = {name: probe.decay_of[id(p)] for name, p in module.named_parameters()}
    expected = {name: 0.0 if p.ndim <= 1 or name in exempt else 0.05 for name, p in module.named_parameters()}
    assert decay == expected
    assert sorted(set(expected.values())) == [0.0, 0.05]


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
def test_a_finetuned_checkpoint_initialises_the_backbone_with_the_default_weights_choice(tmp_path: Path) -> None:
    """A finetuned segmentation checkpoint has one backbone: the default ``pretrained_weights="teacher"`` takes it."""
    finetuned = make_module()
    make_trainer(max_steps=1, limit_val_batches=0).fit(finetuned, loader(8, seed=1))
    torch.save({"state_dict": finetuned.state_dict(), "hyper_parameters": dict(finetuned.hparams)}, tmp_path / "a.ckpt")
    for which in ("teacher", "student"):
        module = make_module(num_classes=5, pretrained=str(tmp_path / "a.ckpt"), pretrained_weights=which)
        for key, value in finetuned.backbone.state_dict().items():
            assert torch.equal(module.backbone.state_dict()[key], value), (which, key)


def test_a_checkpoint_without_teacher_names_the_key_to_set(tmp_path: Path) -> None:
    student = build_backbone("vit_test_patch16")
    torch.save({"state_dict": {f"student.backbone.{k}": v for k, v in student.state_dict().items()}}, tmp_path / "s.pt")
    with pytest.raises(ValueError, match=r"model\.init_args\.pretrained=.*set model\.init_args\.pretrained_weights to"):
        make_module(pretrained=str(tmp_path / "s.pt"))
    make_module(pretrained=str(tmp_path / "s.pt"), pretrained_weights="student")

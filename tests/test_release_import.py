"""`loca import-release`: the authors' flax checkpoints -> our LOCA module, timm weights and segmentation, without JAX.

The release files are written here with plain msgpack in flax's format (tests/_release_files.py); the reference
outputs come from a numpy forward pass of the release's architecture written from the flax layout.
"""

import hashlib
import json
import re

import lightning as L
import msgpack
import numpy as np
import pytest
import timm
import torch
from _fake_loca import FakeLOCADataModule
from _release_files import (
    backbone_features,
    bfloat16_ext,
    flax_bytes,
    leaf_paths,
    location_logits,
    map_leaves,
    prototype_cosines,
    random_params,
    train_state,
)
from timm.layers.activations import GELUTanh

from loca_lightning.cli import main
from loca_lightning.pretrain.module import LOCAPretrainModule
from loca_lightning.release import ReleaseFormatError, import_release, read_flax_msgpack
from loca_lightning.release.convert import ReleaseArchitecture, backbone_spec
from loca_lightning.segmentation.module import SegmentationFinetuneModule

pytestmark = pytest.mark.usefixtures("one_thread")  # small shared CPUs: no threads waiting on each other
CUSTOM = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0)  # the tiny model as overrides of vit_base_patch16
TOL = 1e-5


def _images(seed: int, batch: int = 2, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)  # NHWC


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _max_error(got: torch.Tensor, expected: np.ndarray) -> float:
    assert tuple(got.shape) == expected.shape
    return float(np.abs(got.detach().double().numpy() - expected).max())


@pytest.fixture(scope="module")
def trees():
    params = random_params(seed=0)
    ema = map_leaves(
        lambda a: (a + 0.05 * np.random.default_rng(1).standard_normal(a.shape)).astype(np.float32), params
    )
    return params, ema


@pytest.fixture(scope="module")
def release_files(tmp_path_factory, trees):
    """The three shapes a release file comes in: full TrainState, stripped of opt_state, bare params tree."""
    params, ema = trees
    folder = tmp_path_factory.mktemp("release")
    files = {
        "train_state": flax_bytes(train_state(params, ema, step=7)),
        "stripped": flax_bytes(train_state(params, ema, step=7, opt_state=False)),
        "params": flax_bytes(params, chunk_bytes=4096),  # big leaves in flax's chunked form
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


@pytest.fixture(scope="module")
def imported(tmp_path_factory, release_files):
    out = tmp_path_factory.mktemp("imported") / "loca"
    import_release(release_files["train_state"], out, allow_custom_size=True)
    return out


def _module(out) -> LOCAPretrainModule:
    checkpoint = torch.load(out / "loca_pretrain.ckpt", map_location="cpu", weights_only=True)
    module = LOCAPretrainModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module.eval()


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(["import-release", *map(str, argv)])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.startswith("loca import-release: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------------ reading flax files
def test_reads_flax_msgpack_leaves(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    tree = {
        "a": {"f32": values, "i64": np.arange(5, dtype=np.int64), "scalar": np.float32(2.5), "c": 1 + 2j},
        "chunked": np.arange(40, dtype=np.float32).reshape(4, 10),
        "step": 3,
        "none": None,
    }
    data = msgpack.unpackb(flax_bytes(tree, chunk_bytes=16), raw=False)  # add a bfloat16 leaf as flax writes one
    data["a"]["bf16"] = bfloat16_ext(np.array([1.0, -2.5, 0.15625], dtype=np.float32))
    (tmp_path / "f").write_bytes(msgpack.packb(data, use_bin_type=True))
    read = read_flax_msgpack(tmp_path / "f")
    np.testing.assert_array_equal(read["a"]["f32"], values)
    assert read["a"]["i64"].dtype == np.int64 and read["a"]["scalar"] == np.float32(2.5) and read["a"]["c"] == 1 + 2j
    np.testing.assert_array_equal(read["chunked"], tree["chunked"])
    np.testing.assert_array_equal(read["a"]["bf16"], [1.0, -2.5, 0.15625])  # exact in bfloat16
    assert read["step"] == 3 and read["none"] is None


# ------------------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("kind", ["train_state", "stripped", "params"])
def test_import_matches_numpy_release_forward(tmp_path, release_files, trees, kind):
    params, ema = trees
    out = tmp_path / "out"
    record = import_release(release_files[kind], out, allow_custom_size=True)
    module = _module(out)
    reference, query = _images(0), _images(1)
    teacher_tree = params if kind == "params" else ema  # a bare params tree has no EMA: the teacher starts equal
    with torch.no_grad():
        for net, tree in ((module.student, params), (module.teacher, teacher_tree)):
            ref_tokens, query_tokens = net.backbone(_nchw(reference)), net.backbone(_nchw(query))
            ref_np, query_np = backbone_features(tree, reference), backbone_features(tree, query)
            assert _max_error(ref_tokens, ref_np) < TOL and _max_error(query_tokens, query_np) < TOL
            assert _max_error(net.projection(query_tokens), prototype_cosines(tree, query_np)) < TOL
        logits = module.student.location_head(
            module.student.backbone(_nchw(query)), module.student.backbone(_nchw(reference))
        )
    expected = location_logits(params, backbone_features(params, query), backbone_features(params, reference))
    assert _max_error(logits, expected) < TOL
    assert isinstance(module.student.backbone.blocks[0].mlp.act, GELUTanh)  # flax's nn.gelu
    assert isinstance(module.student.location_head.mlp.act, GELUTanh) and isinstance(
        module.student.projection.mlp[1], GELUTanh
    )
    assert record["teacher"] == ("params" if kind == "params" else "ema_params")
    assert record["global_step"] == (None if kind == "params" else 7)
    assert record["sha256"] == hashlib.sha256(release_files[kind].read_bytes()).hexdigest()
    assert record["architecture"] == dict(
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_dim=256,
        pos_grid=4,
        num_positions=16,
        reference_size=64,
        projection_hidden_dim=128,
        projection_dim=32,
        num_prototypes=64,
    )
    ignored = {item["path"]: item["leaves"] for item in record["ignored"]}
    if kind == "train_state":
        assert ignored["opt_state"] == 2 * len(leaf_paths(params)) + 3 and "rng" in ignored and "metadata" in ignored
    if kind != "params":
        assert ignored["ema_params/{cross_attention_block,final_norm,position_predictor}"] == 22
    else:
        assert ignored == {}


def test_layouts_of_single_tensors(imported, trees):
    params = trees[0]
    state = torch.load(imported / "loca_pretrain.ckpt", weights_only=True)["state_dict"]
    kernel = params["ToTokenSequence_0"]["embedding"]["kernel"]  # [p, p, 3, D] HWIO
    conv = state["student.backbone.patch_embed.proj.weight"]  # [D, 3, p, p]
    assert conv[5, 2, 3, 7] == float(kernel[3, 7, 2, 5])
    table = params["ToTokenSequence_0"]["posembed_input"]  # [1, 4, 4, D]: token row * 4 + col
    assert torch.equal(state["student.backbone.pos_embed"][0, 2 * 4 + 3], torch.from_numpy(table[0, 2, 3]))
    attn = params["encoderblock_1"]["MultiHeadDotProductAttention_0"]
    qkv = state["student.backbone.blocks.1.attn.qkv.weight"]  # rows: q, k, v; within each, head h at h*hd
    assert qkv[64 + 32 + 5, 9] == float(attn["key"]["kernel"][9, 1, 5])
    assert state["student.backbone.blocks.1.attn.qkv.bias"][128 + 32 + 5] == float(attn["value"]["bias"][1, 5])
    assert state["student.backbone.blocks.1.attn.proj.weight"][9, 32 + 5] == float(attn["out"]["kernel"][1, 5, 9])
    prototypes = params["projection_head_for_clustering_prediction"]["prototypes"]["kernel"]  # [bottleneck, K]
    assert torch.equal(state["student.projection.prototypes.weight"], torch.from_numpy(prototypes.T.copy()))


# ------------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_timm_weights_from_the_import(tmp_path, release_files, trees, capsys, which):
    out = tmp_path / "out"
    args = ["import-release", str(release_files["train_state"]), str(out), "--custom-size"]
    main(args + ([] if which == "teacher" else ["--weights", which]))  # the teacher by default
    printed = capsys.readouterr().out
    config = json.loads((out / f"timm_{which}.pth.json").read_text())
    assert config["weights"] == which and config["timm_kwargs"]["act_layer"] == "gelu_tanh"
    assert config["source_checkpoint"] == str(out / "loca_pretrain.ckpt")
    assert "act_layer='gelu_tanh'" in printed and "timm.create_model(" in printed and f"timm_{which}.pth" in printed
    model = timm.create_model(config["timm_name"], pretrained=False, **config["timm_kwargs"])
    model.load_state_dict(torch.load(out / f"timm_{which}.pth", weights_only=True), strict=True)
    images = _images(2)
    tree = trees[1] if which == "teacher" else trees[0]
    with torch.no_grad():
        assert _max_error(model.eval().forward_features(_nchw(images)), backbone_features(tree, images)) < TOL
    assert json.loads((out / "import.json").read_text())["timm_weights"] == which


def test_loca_export_reads_the_module_checkpoint(imported, tmp_path, trees):
    main(["export", str(imported / "loca_pretrain.ckpt"), str(tmp_path / "s.pth"), "--weights", "student"])
    config = json.loads((tmp_path / "s.pth.json").read_text())
    model = timm.create_model(config["timm_name"], pretrained=False, **config["timm_kwargs"])
    model.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=True), strict=True)
    images = _images(3)
    with torch.no_grad():
        assert _max_error(model.eval().forward_features(_nchw(images)), backbone_features(trees[0], images)) < TOL


def test_standard_sizes_map_to_registered_backbones(tmp_path):
    def arch(patch, dim, depth, heads, mlp):
        return ReleaseArchitecture(patch, dim, depth, heads, mlp, 14, 196, (2048, 256, 4096))

    assert backbone_spec(arch(16, 384, 12, 6, 1536)) == ("vit_small_patch16", {}, False)
    assert backbone_spec(arch(16, 1280, 32, 16, 5120)) == ("vit_huge_patch16", {}, False)
    assert backbone_spec(arch(8, 768, 12, 12, 3072)) == ("vit_base_patch8", {}, False)
    with pytest.raises(ReleaseFormatError, match="MLP 1000.*not a known size.*vit_base_patch16.*--custom-size"):
        backbone_spec(arch(16, 768, 12, 12, 1000))
    # end to end: a ViT-Ti/16 params tree needs no --custom-size and loads as vit_tiny_patch16
    params = random_params(seed=5, dim=192, depth=12, heads=3, mlp=768, grid=14, projection=(64, 16, 32))
    (tmp_path / "ti").write_bytes(flax_bytes(params))
    record = import_release(tmp_path / "ti", tmp_path / "out")
    assert record["backbone"] == "vit_tiny_patch16" and record["backbone_kwargs"] == {"act_layer": "gelu_tanh"}
    assert record["custom_size"] is False
    assert json.loads((tmp_path / "out" / "timm_teacher.pth.json").read_text())["timm_name"] == "vit_tiny_patch16_224"


def test_location_only_variant(tmp_path):
    params = random_params(seed=3, projection=None)
    (tmp_path / "loc").write_bytes(flax_bytes(train_state(params, params, opt_state=False)))
    record = import_release(tmp_path / "loc", tmp_path / "out", allow_custom_size=True)
    assert record["timm_weights"] == "student" and record["teacher"] is None  # no teacher in this variant
    assert any(item["path"] == "ema_params" for item in record["ignored"])
    module = _module(tmp_path / "out")
    assert module.teacher is None and module.student.projection is None and not module.hparams.apply_cluster_loss
    with pytest.raises(ReleaseFormatError, match="location-only.*--weights student"):
        import_release(tmp_path / "loc", tmp_path / "out2", weights="teacher", allow_custom_size=True)
    assert not (tmp_path / "out2").exists()


def test_folder_takes_the_newest_checkpoint(tmp_path, trees):
    params, ema = trees
    for step in (3, 12, 100):  # numeric order, not text order: 100 > 12 > 3
        (tmp_path / "run" / f"checkpoint_{step}").parent.mkdir(exist_ok=True)
        (tmp_path / "run" / f"checkpoint_{step}").write_bytes(
            flax_bytes(train_state(params, ema, step, opt_state=False))
        )
    record = import_release(tmp_path / "run", tmp_path / "out", allow_custom_size=True)
    assert record["global_step"] == 100 and record["source"].endswith("checkpoint_100")


# ------------------------------------------------------------------------------------------------ writing OUT
def test_existing_out_needs_force(tmp_path, release_files, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    err = _cli_error(capsys, [release_files["stripped"], out, "--custom-size"])
    assert "--force" in err and str(out) in err and (out / "mine.txt").read_text() == "keep me"
    main(["import-release", str(release_files["stripped"]), str(out), "--custom-size", "--force"])
    assert not (out / "mine.txt").exists() and (out / "loca_pretrain.ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or replaced folder left


def test_nothing_written_when_the_import_fails(tmp_path, release_files, monkeypatch):
    import loca_lightning.release.importer as importer

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(importer, "write_timm_files", fail)  # fails after the module checkpoint was written
    with pytest.raises(OSError, match="disk full"):
        import_release(release_files["stripped"], tmp_path / "out", allow_custom_size=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "a.txt").write_text("previous import")
    with pytest.raises(OSError):
        import_release(release_files["stripped"], tmp_path / "old", force=True, allow_custom_size=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (
        tmp_path / "old" / "a.txt"
    ).read_text() == "previous import"


# ------------------------------------------------------------------------------------------------ bad input
def _bad_tree(trees, change):
    params = map_leaves(lambda a: a, trees[0])
    change(params)
    return flax_bytes(train_state(params, None, opt_state=False))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("text", r"is not a flax msgpack checkpoint"),
        ("truncated", r"is truncated: its \d+ bytes end inside the msgpack data"),
        ("empty", r"is empty"),
        ("zip", r"is a zip file \(a PyTorch checkpoint\?\)"),
        (
            "list",
            r"holds a list, not a LOCA checkpoint: expected a LOCA TrainState \(keys opt_state, ema_params, params",
        ),
        (
            "other_dict",
            r"is not a LOCA checkpoint: expected a LOCA TrainState \(keys opt_state, ema_params, params.*"
            r"params tree \(ToTokenSequence_0, encoderblock_0.*found keys: model, optimizer, step",
        ),
        ("extra_top", r"top-level keys \['schedule'\] that a LOCA TrainState does not have"),
        (
            "unknown_size",
            r"width 64, depth 2, 2 heads, MLP 256\) is not a known size \(known: vit_tiny_patch16.*--custom-size",
        ),
        (
            "missing_leaf",
            r"params does not match a LOCA model with patch 16, width 64.*missing leaves \(1\): "
            r"encoderblock_1/LayerNorm_1/bias",
        ),
        ("extra_leaf", r"params has leaves a LOCA model does not have \(1\): encoderblock_0/extra/kernel"),
        ("bad_shape", r"mis-shaped leaves \(1\): final_norm/scale \(65,\) \(expected \(64,\)\)"),
        ("ema_differs", r"ema_params is not the tree of params: missing \(1\): encoder_norm/bias"),
        ("bad_positions", r"17 positions for a 4x4 table"),
        ("batch_stats", r"non-empty 'state'.*the LOCA release keeps none"),
        ("orbax", r"is an Orbax checkpoint folder.*msgpack_serialize\(ocp.PyTreeCheckpointer\(\).restore\("),
        ("empty_folder", r"holds no flax checkpoint file \(named checkpoint_<step>\)"),
        ("missing", r"does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, release_files, trees, case, expected):
    src = tmp_path / "src"
    good = release_files["train_state"].read_bytes()
    if case == "text":
        src.write_text("step: 100\nweights: somewhere else\n")
    elif case == "truncated":
        src.write_bytes(good[: len(good) // 2])
    elif case == "empty":
        src.write_bytes(b"")
    elif case == "zip":
        torch.save({"w": torch.zeros(1)}, src)
    elif case == "list":
        src.write_bytes(flax_bytes([1, 2, 3]))
    elif case == "other_dict":
        src.write_bytes(flax_bytes({"model": {"w": np.zeros(3, np.float32)}, "optimizer": {}, "step": 3}))
    elif case == "extra_top":
        src.write_bytes(flax_bytes({"params": trees[0], "schedule": {"lr": np.float32(1.0)}}))
    elif case == "unknown_size":
        src = release_files["stripped"]
    elif case == "missing_leaf":
        src.write_bytes(_bad_tree(trees, lambda p: p["encoderblock_1"]["LayerNorm_1"].pop("bias")))
    elif case == "extra_leaf":
        src.write_bytes(
            _bad_tree(trees, lambda p: p["encoderblock_0"].update(extra={"kernel": np.zeros(3, np.float32)}))
        )
    elif case == "bad_shape":
        src.write_bytes(_bad_tree(trees, lambda p: p["final_norm"].update(scale=np.ones(65, np.float32))))
    elif case == "ema_differs":
        ema = map_leaves(lambda a: a, trees[1])
        ema["encoder_norm"].pop("bias")
        src.write_bytes(flax_bytes(train_state(trees[0], ema, opt_state=False)))
    elif case == "bad_positions":
        src.write_bytes(
            _bad_tree(
                trees,
                lambda p: p.update(
                    position_predictor={"kernel": np.zeros((64, 17), np.float32), "bias": np.zeros(17, np.float32)}
                ),
            )
        )
    elif case == "batch_stats":
        state = train_state(trees[0], None, opt_state=False)
        state["state"] = {"batch_stats": {"mean": np.zeros(3, np.float32)}}
        src.write_bytes(flax_bytes(state))
    elif case == "orbax":
        (src / "checkpoint_5").mkdir(parents=True)
        for name in ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt"):
            (src / "checkpoint_5" / name).write_text("{}")
    elif case == "empty_folder":
        src.mkdir()
    custom = [] if case == "unknown_size" else ["--custom-size"]
    out = tmp_path / "out"
    before = sorted(tmp_path.iterdir())
    err = _cli_error(capsys, [src, out, *custom])
    assert re.search(expected, err), err
    assert str(src) in err
    assert sorted(tmp_path.iterdir()) == before  # nothing written, no temporary folder left


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["import-release", "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0
    assert "loca import-release" in text and "--weights" in text and "--force" in text and "--custom-size" in text
    from loca_lightning.cli import SUBCOMMANDS

    assert "import-release" in SUBCOMMANDS  # listed by `loca --help` (tests/test_cli_subcommands.py)


# ------------------------------------------------------------------------------------------------ downstream use
def _segmentation(pretrained, **backbone_kwargs) -> SegmentationFinetuneModule:
    return SegmentationFinetuneModule(
        num_classes=3,
        backbone="vit_base_patch16",
        backbone_kwargs={**CUSTOM, **backbone_kwargs},
        image_size=64,
        window=64,
        stride=64,
        drop_path_rate=0.0,
        pretrained=str(pretrained),
    )


@pytest.mark.parametrize("source", ["loca_pretrain.ckpt", "timm_teacher.pth"])
def test_segmentation_adopts_the_release_activation(imported, trees, tmp_path, source):
    module = _segmentation(imported / source)
    assert isinstance(module.backbone.blocks[0].mlp.act, GELUTanh)
    assert module.hparams.backbone_kwargs["act_layer"] == "gelu_tanh"  # saved: a finetuned checkpoint rebuilds it
    images = _images(4)
    with torch.no_grad():
        assert _max_error(module.backbone.eval()(_nchw(images)), backbone_features(trees[1], images)) < TOL
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "seg.ckpt")
    reloaded = SegmentationFinetuneModule.load_from_checkpoint(tmp_path / "seg.ckpt", weights_only=True)
    assert isinstance(reloaded.backbone.blocks[0].mlp.act, GELUTanh)
    same = _segmentation(imported / source, act_layer="gelu_tanh")  # the same choice, set explicitly: fine
    assert isinstance(same.backbone.blocks[1].mlp.act, GELUTanh)
    with pytest.raises(
        ValueError,
        match=r"trained with act_layer 'gelu_tanh' but model.init_args.backbone_kwargs.act_layer is "
        r"'gelu': set model.init_args.backbone_kwargs.act_layer: gelu_tanh",
    ):
        _segmentation(imported / source, act_layer="gelu")


def test_pretraining_starts_from_the_import(imported, tmp_path):
    path = imported / "loca_pretrain.ckpt"
    kwargs = json.loads((imported / "import.json").read_text())["module_kwargs"]
    L.seed_everything(0)
    module = LOCAPretrainModule(**kwargs, init_weights=str(path), drop_path_rate=0.0, warmup_epochs=0)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items() if k != "skipped_images")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=FakeLOCADataModule(batch_size=2, length=2, size=64, focal=32))
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
    moved = module.student.backbone.state_dict()["blocks.0.attn.qkv.weight"]
    assert not torch.equal(moved, saved["student.backbone.blocks.0.attn.qkv.weight"])
    assert isinstance(module.student.location_head.mlp.act, GELUTanh)
    # the run's checkpoint holds the weights: it loads without the file it started from
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    path.rename(tmp_path / "moved.ckpt")
    try:
        again = LOCAPretrainModule.load_from_checkpoint(tmp_path / "run.ckpt", weights_only=True)
    finally:
        (tmp_path / "moved.ckpt").rename(path)
    assert torch.equal(again.student.backbone.state_dict()["blocks.0.attn.qkv.weight"], moved)
    # the activation and the sizes must be the checkpoint's: each mismatch is an error naming the file
    plain = {**kwargs, "backbone_kwargs": {k: v for k, v in kwargs["backbone_kwargs"].items() if k != "act_layer"}}
    with pytest.raises(
        ValueError,
        match=r"loca_pretrain.ckpt' was trained with act_layer 'gelu_tanh' but "
        r"model.init_args.backbone_kwargs.act_layer is unset \(exact GELU\)",
    ):
        LOCAPretrainModule(**plain, init_weights=str(path))
    with pytest.raises(
        ValueError,
        match=r"weights in '.*loca_pretrain.ckpt' do not fit this model: mismatched \(2\): "
        r"student.projection.prototypes.weight",
    ):
        LOCAPretrainModule(**{**kwargs, "num_prototypes": 32}, init_weights=str(path))
    assert LOCAPretrainModule.load_from_checkpoint(path, weights_only=True).hparams.num_prototypes == 64


def test_a_checkpoint_trained_with_another_activation_is_refused_on_load():
    # `loca test --ckpt_path` builds the model from the config, then loads the checkpoint: a tanh-GELU checkpoint must
    # not silently run with exact GELU
    from loca_lightning.pretrain.module import LOCAPretrainModule
    from loca_lightning.segmentation.module import SegmentationFinetuneModule

    seg = dict(num_classes=3, backbone="vit_test_patch16", image_size=32, drop_path_rate=0.0)
    tanh = SegmentationFinetuneModule(**seg, backbone_kwargs={"act_layer": "gelu_tanh"})
    checkpoint = {"state_dict": tanh.state_dict(), "hyper_parameters": dict(tanh.hparams)}
    with pytest.raises(ValueError, match="act_layer 'gelu_tanh'.*model.init_args.backbone_kwargs.act_layer"):
        SegmentationFinetuneModule(**seg).on_load_checkpoint(checkpoint)
    SegmentationFinetuneModule(**seg, backbone_kwargs={"act_layer": "gelu_tanh"}).on_load_checkpoint(checkpoint)
    loca = dict(
        backbone="vit_test_patch16", reference_size=64, num_prototypes=16, projection_hidden_dim=32, projection_dim=8
    )
    pretrained = LOCAPretrainModule(**loca, backbone_kwargs={"act_layer": "gelu_tanh"})
    checkpoint = {"state_dict": pretrained.state_dict(), "hyper_parameters": dict(pretrained.hparams)}
    with pytest.raises(ValueError, match="gelu_tanh"):
        LOCAPretrainModule(**loca).on_load_checkpoint(checkpoint)

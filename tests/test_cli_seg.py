"""The `loca` CLI on segmentation configs, in process: test on a tiny ADE20K tree, fit -> predict with the prediction
writer (indexed PNGs with the dataset palette, overlays, no silent overwrite), the demo config, and --help."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from loca_lightning.callbacks import SegmentationPredictionWriter, indexed_png, mask_palette, overlay_image
from loca_lightning.cli import main
from loca_lightning.data.classes import ADE20K_CLASSES, dataset_classes, label_colormap
from loca_lightning.data.synthetic import SYNTHETIC_PALETTE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HEIGHT, WIDTH = 50, 70
TRAIN_STEMS = [f"ADE_train_{i:08d}" for i in range(1, 5)]
VAL_STEMS = [f"ADE_val_{i:08d}" for i in range(1, 3)]


@pytest.fixture(autouse=True)
def one_thread_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run in a temporary folder (the configs' relative `runs/` land there) with one intra-op thread (a small
    shared CPU runs two threads that wait on each other ~10x slower)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["loca"])  # pytest's own arguments are not the CLI's
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ADEChallengeData2016 with 4 training and 2 validation 70x50 images; stored labels 0 (ignored), 1-3 and 150."""
    root = tmp_path_factory.mktemp("ade")
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for split, stems in (("training", TRAIN_STEMS), ("validation", VAL_STEMS)):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for stem in stems:
            image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            assert cv2.imwrite(str(base / "images" / split / f"{stem}.jpg"), image)
            columns = np.array([0, 1, 2, 3, 150], dtype=np.uint8)[np.arange(WIDTH) * 5 // WIDTH]  # vertical stripes
            Image.fromarray(np.broadcast_to(columns, (HEIGHT, WIDTH)).copy()).save(
                base / "annotations" / split / f"{stem}.png"
            )
    return root


def ade_args(root: Path, *extra: str) -> list[str]:
    """configs/seg_ade.yaml shrunk to a tiny CPU run: the recipe's structure, small sizes (the 70x50 images are
    evaluated and predicted through a test scale, 56x40, and back)."""
    return [
        "--config", str(CONFIGS / "seg_ade.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.precision", "32",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1",
        "--model.init_args.backbone", "vit_test_patch16", "--model.init_args.image_size", "32",
        "--model.init_args.window", "32", "--model.init_args.stride", "16", "--model.init_args.drop_path_rate", "0.0",
        "--model.init_args.test_scale", "[96, 40]",
        "--data.init_args.root", str(root), "--data.init_args.num_workers", "0",
        "--data.init_args.persistent_workers", "false", "--data.init_args.pin_memory", "false",
        "--data.init_args.crop_size", "32", "--data.init_args.base_size", "[70, 50]", "--data.init_args.batch_size", "2",
        *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def lightning_log() -> Iterator[list[str]]:
    """Messages of Lightning's logger (where rank_zero_info writes), whatever its handlers and propagation."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in out


def test_ade_config_tests_end_to_end_with_class_table(ade_root: Path) -> None:
    with lightning_log() as messages:
        main(["test", *ade_args(ade_root, "--trainer.logger", "false")])
    table = next(m for m in messages if "| Class" in m)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Class" not in line]
    assert [row.split("|")[1].strip() for row in rows] == list(ADE20K_CLASSES)  # 150 rows, ADE names in label order
    # Stored 1, 2, 3, 150 are labels 0, 1, 2, 149; stored 0 is ignored, so the other classes have no IoU.
    scored = [row.split("|")[1].strip() for row in rows if row.split("|")[2].strip() != "nan"]
    assert set(scored) >= {"wall", "building", "sky", "flag"}
    assert "mIoU:" in table


def read_indexed(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pixel values [H, W] and palette [256, 3] of an indexed PNG."""
    with Image.open(path) as image:
        assert image.mode == "P", path
        palette = np.frombuffer(bytes(image.getpalette()), dtype=np.uint8).reshape(-1, 3)
        return np.array(image), palette


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # predict's checkpoint callback is not the fit's
def test_fit_then_predict_writes_palette_pngs_and_never_overwrites(
    ade_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt_dir = tmp_path / "ckpt"
    fit_extra = (
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--checkpoint.dirpath",
        str(ckpt_dir),
        "--trainer.logger",
        "false",
    )
    main(["fit", *ade_args(ade_root, *fit_extra)])
    last = ckpt_dir / "last.ckpt"
    assert last.is_file() and len(list(ckpt_dir.glob("best-step2-miou*.ckpt"))) == 1

    images = ade_root / "ADEChallengeData2016" / "images" / "validation"
    out = tmp_path / "predict"

    def predict(*extra: str) -> None:
        main(
            [
                "predict",
                *ade_args(
                    ade_root,
                    "--trainer.logger",
                    "false",
                    "--ckpt_path",
                    str(last),
                    "--data.init_args.predict_paths",
                    str(images),
                    "--prediction_writer.output_dir",
                    str(out),
                    *extra,
                ),
            ]
        )

    predict()
    ade_palette = dataset_classes("ade20k")[1]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.png" for s in VAL_STEMS)
    for stem in VAL_STEMS:
        values, palette = read_indexed(out / f"{stem}.png")
        assert values.shape == (HEIGHT, WIDTH) and values.max() < 150
        assert np.array_equal(palette[:150], ade_palette)

    with pytest.raises(SystemExit) as info:  # the user's own files: one line, exit status 2
        predict("--prediction_writer.overlay", "true")
    assert info.value.code == 2 and re.search(r"ADE_val_00000001\.png.*overwrite", capsys.readouterr().err)
    assert not (out / "overlay").exists()

    predict("--prediction_writer.overlay", "true", "--prediction_writer.overwrite", "true")
    for stem in VAL_STEMS:
        with Image.open(out / "overlay" / f"{stem}.jpg") as overlay:
            assert overlay.size == (2 * WIDTH, HEIGHT)  # image | blend

    # Every target is checked before anything is written: one existing file stops the whole run up front.
    out = tmp_path / "predict2"
    out.mkdir()
    (out / f"{VAL_STEMS[-1]}.png").write_bytes(b"precious")
    with pytest.raises(SystemExit) as info:
        predict()
    assert info.value.code == 2 and VAL_STEMS[-1] in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [f"{VAL_STEMS[-1]}.png"]
    assert (out / f"{VAL_STEMS[-1]}.png").read_bytes() == b"precious"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_demo_config_fit_then_predict(tmp_path: Path) -> None:
    """The demo's documented predict command, on a checkpoint of a 2-step demo run."""
    demo = ["--config", str(CONFIGS / "demo" / "seg.yaml")]
    main(
        [
            "fit",
            *demo,
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--data.init_args.synthetic_length",
            "32",
            "--data.init_args.synthetic_val_length",
            "2",
            "--data.init_args.num_workers",
            "0",
            "--data.init_args.persistent_workers",
            "false",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    checkpoints = sorted(Path("runs/demo/seg").glob("version_*/checkpoints/last.ckpt"))
    assert len(checkpoints) == 1
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, (height, width) in {"wide": (40, 90), "small": (20, 30)}.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    main(
        [
            "predict",
            *demo,
            "--ckpt_path",
            str(checkpoints[0]),
            "--data.predict_paths",
            str(folder),
            "--prediction_writer.output_dir",
            "masks",
            "--data.init_args.num_workers",
            "0",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    for name, size in {"wide": (90, 40), "small": (30, 20)}.items():
        values, palette = read_indexed(Path("masks") / f"{name}.png")
        assert values.shape == size[::-1] and values.max() < 9
        assert np.array_equal(palette[:9], SYNTHETIC_PALETTE)


# ---------------------------------------------------------------------------------------------- evaluation protocol
@pytest.mark.parametrize(
    "config,test_scale,window,stride",
    [
        ("seg_ade.yaml", (2048, 512), 512, 512),  # Segmenter / MMSegmentation ADE20K
        ("seg_context.yaml", (4160, 520), 480, 320),  # Segmenter's code: (8 * 520, 520), short side 520
        ("seg_cityscapes.yaml", (2048, 1024), 768, 512),
        ("seg_voc.yaml", (2048, 512), 512, 512),  # MMSegmentation's pascal_voc12
        ("demo/seg.yaml", None, 64, 32),  # native size
    ],
)
def test_configs_set_the_published_test_protocol(config: str, test_scale, window: int, stride: int, capsys) -> None:
    """Each dataset config's test scale, window and stride, as the CLI parses them."""
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert info.value.code in (0, None)
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    parsed = None if model["test_scale"] is None else tuple(model["test_scale"])
    assert (parsed, model["inference_mode"], model["window"], model["stride"]) == (test_scale, "slide", window, stride)
    assert model["eval_scales"] is None and model["eval_flip"] is False


# ---------------------------------------------------------------------------------------------- writer helpers
def test_indexed_png_round_trip_and_wide_class_range(tmp_path: Path) -> None:
    palette = mask_palette(SYNTHETIC_PALETTE)
    assert np.array_equal(palette[:9], SYNTHETIC_PALETTE) and np.array_equal(palette[9:], label_colormap(256)[9:])
    mask = np.arange(12, dtype=np.uint8).reshape(3, 4) % 9
    indexed_png(mask, palette).save(tmp_path / "m.png")
    values, stored = read_indexed(tmp_path / "m.png")
    assert np.array_equal(values, mask) and np.array_equal(stored[:9], SYNTHETIC_PALETTE)
    wide = np.array([[0, 299]], dtype=np.int16)  # more classes than a palette holds: 16-bit indices
    indexed_png(wide, palette).save(tmp_path / "w.png")
    with Image.open(tmp_path / "w.png") as image:
        assert image.mode.startswith("I") and np.array_equal(np.array(image), wide)


def test_overlay_is_image_beside_blend() -> None:
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 1, 2], [2, 1, 0]])
    palette = mask_palette(SYNTHETIC_PALETTE)
    assert np.array_equal(overlay_image(image, mask, palette, alpha=1.0), np.concatenate([image, palette[mask]], 1))
    assert np.array_equal(overlay_image(image, mask, palette, alpha=0.0), np.concatenate([image, image], 1))
    half = overlay_image(image, mask, palette, alpha=0.5)[:, 3:].astype(int)
    assert np.abs(half - (100 + palette[mask].astype(int)) / 2).max() <= 0.5


@pytest.mark.parametrize("name", ["/abs/x", "../x", "a/../../x"])
def test_writer_refuses_names_outside_its_folder(name: str) -> None:
    with pytest.raises(ValueError, match="relative path inside the output folder"):
        SegmentationPredictionWriter("out").targets(name)


# ---------------------------------------------------------------------------------------------- unreadable images
@pytest.fixture
def demo_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint of the demo's segmentation model (untrained: prediction only needs the architecture)."""
    import lightning as L

    from loca_lightning.segmentation.module import SegmentationFinetuneModule

    model = SegmentationFinetuneModule(
        num_classes=9, backbone="vit_pico_patch8", image_size=64, window=64, stride=32, test_scale=None
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "demo.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # as `loca fit` saves it: LightningCLI reads the class path
    checkpoint["hyper_parameters"].update(
        _class_path="loca_lightning.SegmentationFinetuneModule",
        _instantiator="lightning.pytorch.cli.instantiate_module",
    )
    torch.save(checkpoint, path)
    return path


def _folder_with_one_corrupt_png(folder: Path, count: int = 20) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"img{i:02d}" for i in range(count)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "img07.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not a PNG")
    return names


def test_predict_writes_every_readable_image_and_reports_the_unreadable_one(
    tmp_path: Path, demo_checkpoint: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    names = _folder_with_one_corrupt_png(tmp_path / "images")
    out = tmp_path / "masks"
    args = [
        "predict",
        "--config",
        str(CONFIGS / "demo" / "seg.yaml"),
        "--ckpt_path",
        str(demo_checkpoint),
        "--data.init_args.predict_paths",
        str(tmp_path / "images"),
        "--prediction_writer.output_dir",
        str(out),
        "--data.init_args.num_workers",
        "0",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    with (
        caplog.at_level(logging.WARNING, logger="loca_lightning.callbacks.prediction"),
        pytest.raises(SystemExit) as info,
    ):
        main(args)
    assert info.value.code == 3  # non-zero: not every image was segmented
    assert sorted(p.stem for p in out.iterdir()) == [n for n in names if n != "img07"]  # all 19 others
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "img07.png" in skipped[0] and "not a decodable image" in skipped[0]
    assert f"wrote 19 masks to {out}; skipped 1 unreadable image" in capsys.readouterr().out
    assert not Path("checkpoints").exists()  # no logger: a predict run saves no config, creates no folder

    # On request the job stops at the first unreadable image instead.
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(
            [
                *args,
                "--prediction_writer.output_dir",
                str(tmp_path / "strict"),
                "--prediction_writer.skip_unreadable",
                "false",
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "img07.png" in err[0] and "not a decodable image" in err[0]


# ---------------------------------------------------------------------------------------------- finetune a finetuned model
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_a_finetuned_checkpoint_is_pretrained_for_another_dataset(ade_root: Path, tmp_path: Path) -> None:
    """ADE20K-finetuned weights start a finetuning on the demo's scenes (9 classes, another size) through the CLI with
    the configs' default ``pretrained_weights: teacher``: the new backbone is the finetuned one, its decoder new."""
    from loca_lightning.backbones import resize_pos_embed
    from loca_lightning.cli import LOCACLI

    ckpt_dir = tmp_path / "ade"
    one_step = ("--trainer.max_steps", "1", "--trainer.logger", "false", "--checkpoint.dirpath", str(ckpt_dir))
    main(["fit", *ade_args(ade_root, *one_step)])
    finetuned = ckpt_dir / "last.ckpt"
    state = torch.load(finetuned, weights_only=True)["state_dict"]
    demo = [
        "--config", str(CONFIGS / "demo" / "seg.yaml"), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.init_args.backbone", "vit_test_patch16", "--model.init_args.pretrained", str(finetuned),
        "--data.init_args.num_workers", "0", "--data.init_args.persistent_workers", "false",
    ]  # fmt: skip
    model = LOCACLI(args=demo, run=False).model
    assert model.hparams.pretrained_weights == "teacher"
    for key, value in model.backbone.state_dict().items():
        source = state[f"backbone.{key}"]
        if key == "pos_embed":  # 2x2 grid of the 32-pixel ADE crops -> 4x4 of the demo's 64-pixel crops
            source = resize_pos_embed(source, (2, 2), (4, 4))
        assert torch.equal(value, source), key
    assert model.decoder.head.weight.shape[0] == 9 != state["decoder.head.weight"].shape[0]
    main(["fit", *demo, "--trainer.max_steps", "1", "--checkpoint.dirpath", str(tmp_path / "demo")])
    assert (tmp_path / "demo" / "last.ckpt").is_file()

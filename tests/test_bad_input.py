"""Bad input that tests elsewhere do not cover: unusual image formats (converted, known pixel values), unreadable
files (skipped and counted), a pretraining batch that disagrees with the model, and segmentation config errors.

Covered elsewhere: corrupt / zero-byte / truncated files and the 50-failure limit (test_pretrain_data.py), missing
masks, mask shape and label errors, corrupt segmentation images, missing dataset folders, images smaller than the
crop (test_seg_data.py), keep ratios and reference_size vs patch size (test_pretrain_module.py), class count vs the
dataset and a checkpoint of another architecture (test_seg_module.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from _fake_loca import FakeLOCADataModule
from PIL import Image

from loca_lightning.data.images import read_image
from loca_lightning.data.pretrain import LOCAPretrainDataModule
from loca_lightning.data.segmentation import SegmentationDataModule
from loca_lightning.pretrain.module import LOCAPretrainModule
from loca_lightning.pretrain.views import LOCAViews
from loca_lightning.segmentation.module import SegmentationFinetuneModule

VIEWS = dict(reference_size=32, query_size=32, focal_size=16, num_focal=2, patch_size=8)
SHAPE = (24, 40)  # H, W


def _formats(root: Path) -> dict[str, tuple[int, int, int]]:
    """Write one image per unusual format, each a single colour; return name -> expected RGB."""
    root.mkdir(parents=True, exist_ok=True)
    h, w = SHAPE
    Image.fromarray(np.full((h, w), 77, np.uint8), mode="L").save(root / "gray.png")
    cv2.imwrite(str(root / "deep16.png"), np.full((h, w, 3), [0x1000, 0x2000, 0x3000], np.uint16))  # BGR order
    cv2.imwrite(str(root / "gray16.png"), np.full((h, w), 0xAB00, np.uint16))
    Image.fromarray(np.full((h, w, 4), [10, 20, 30, 128], np.uint8), mode="RGBA").save(root / "rgba.png")
    palette = Image.new("P", (w, h), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * (254 * 3))
    palette.save(root / "palette.png")
    Image.new("CMYK", (w, h), (0, 0, 0, 0)).save(root / "cmyk.jpg", quality=100)  # no ink: white
    Image.fromarray(np.full((h, w, 3), [5, 6, 7], np.uint8)).save(root / "plain.tif")
    return {
        "gray.png": (77, 77, 77),
        "deep16.png": (0x30, 0x20, 0x10),
        "gray16.png": (0xAB, 0xAB, 0xAB),
        "rgba.png": (10, 20, 30),
        "palette.png": (200, 100, 50),
        "cmyk.jpg": (255, 255, 255),
        "plain.tif": (5, 6, 7),
    }


def test_unusual_formats_decode_to_rgb_uint8_with_their_colours(tmp_path: Path) -> None:
    for name, rgb in _formats(tmp_path).items():
        image = read_image(tmp_path / name)
        assert image.shape == (*SHAPE, 3) and image.dtype == np.uint8, name
        np.testing.assert_allclose(image.reshape(-1, 3).mean(0), rgb, atol=2, err_msg=name)  # JPEG: near


def test_pretraining_folder_with_unusual_and_unreadable_files_never_crashes(tmp_path: Path, caplog) -> None:
    root = tmp_path / "train"
    expected = _formats(root)
    (root / "dangling.png").symlink_to(tmp_path / "gone.png")  # listed, but the read fails
    (root / "folder.jpg").mkdir()  # a directory with an image name is not listed
    dm = LOCAPretrainDataModule(
        source="folder", root=str(root), views=LOCAViews(**VIEWS), batch_size=2, num_workers=0, pin_memory=False
    )
    dm.setup("fit")
    names = [Path(p).name for p in dm.dataset.source]
    assert sorted(names) == sorted([*expected, "dangling.png"])
    with caplog.at_level(logging.WARNING, logger="loca_lightning.data.pretrain"):
        items = [dm.dataset[i] for i in range(len(dm.dataset))]
    skipped = [item["num_skipped"] for item in items]
    assert sum(skipped) == 1 and skipped[names.index("dangling.png")] == 1
    assert "dangling.png" in caplog.text
    assert all(item["reference"].dtype == np.uint8 and item["reference"].shape == (3, 32, 32) for item in items)
    batch = next(iter(dm.train_dataloader()))  # and they collate like any other image
    assert batch["reference"].shape == (2, 3, 32, 32) and batch["reference"].dtype == torch.uint8


def test_pretraining_batch_of_the_wrong_size_names_the_keys_to_change() -> None:
    model = LOCAPretrainModule(
        backbone="vit_test_patch16", reference_size=32, num_prototypes=16, projection_hidden_dim=32, projection_dim=8
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=1,
    )
    with pytest.raises(ValueError, match="64px references but model.reference_size is 32.*data.views.reference_size"):
        trainer.fit(model, FakeLOCADataModule(size=64))


class _OutOfRangeTargets(FakeLOCADataModule):
    def train_dataloader(self):
        for batch in super().train_dataloader():
            batch["target_focal"][0, 0, 0] = 99  # a 2x2 reference grid has cells 0-3
            yield batch


def test_pretraining_targets_out_of_range_name_the_key_on_the_first_batch() -> None:
    # Ranges are checked once, on the first batch (the losses skip their per-step check, a host sync).
    model = LOCAPretrainModule(
        backbone="vit_test_patch16", reference_size=32, num_prototypes=16, projection_hidden_dim=32, projection_dim=8
    )
    assert model.check_target_ranges is False
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=1,
    )
    with pytest.raises(ValueError, match=r"batch\['target_focal'\] holds values outside -1.*\[0, 3\].*max 99"):
        trainer.fit(model, _OutOfRangeTargets(size=32, focal=16))


def test_pretraining_views_not_divisible_by_the_patch_size() -> None:
    with pytest.raises(ValueError, match="reference_size"):
        LOCAViews(**{**VIEWS, "reference_size": 30})


# ---------------------------------------------------------------------------------------------- segmentation
def _folder(root: Path, images: int = 0) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("sky\nroad\n")
    for i in range(images):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "masks" / f"{i}.png")
    return root


def test_segmentation_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    with pytest.raises(ValueError, match=r"no image files found in .*images"):
        SegmentationDataModule(layout="folder", root=str(root), num_workers=0).setup("fit")


def test_segmentation_mask_of_rgb_colours_names_the_file(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", images=2)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "masks" / "1.png")  # colour-coded, not indices
    dm = SegmentationDataModule(layout="folder", root=str(root), num_workers=0, crop_size=16, base_size=(16, 16))
    dm.setup("validate")
    with pytest.raises(Exception, match=r"1\.png.*single-channel"):
        dm.val_dataset[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=60, window=60, stride=60), "image_size=60 is not a multiple of the patch size 16"),
        (dict(num_classes=0), "num_classes must be >= 1"),
    ],
)
def test_segmentation_config_values_that_cannot_work(kwargs: dict, message: str) -> None:
    defaults = dict(num_classes=3, backbone="vit_test_patch16", image_size=64, window=64, stride=64)
    with pytest.raises(ValueError, match=message):
        SegmentationFinetuneModule(**{**defaults, **kwargs})


def test_segmentation_data_config_values_that_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="crop_size must be >= 1"):
        SegmentationDataModule(layout="synthetic", crop_size=0)


def test_pretraining_checkpoint_of_another_architecture_names_the_keys(tmp_path: Path) -> None:
    small = dict(reference_size=32, num_prototypes=16, projection_hidden_dim=32, projection_dim=8)
    model = LOCAPretrainModule(backbone="vit_test_patch16", **small)
    path = tmp_path / "test.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    # (load_from_checkpoint writes the overrides into the checkpoint's hyperparameters before the module sees
    # them, so the "other hyperparameters" warning is for resumes: tests/test_resume.py)
    with pytest.raises(RuntimeError, match=r"size mismatch for student\.backbone\.patch_embed\.proj\.weight"):
        LOCAPretrainModule.load_from_checkpoint(path, backbone="vit_test_patch8", weights_only=False)

"""Segmentation data: layouts and their label handling, pipelines, collate and SegmentationDataModule."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from loca_lightning.data.classes import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    PASCAL_CONTEXT_CLASSES,
    VOC_CLASSES,
    label_colormap,
)
from loca_lightning.data.images import ImageReadError, read_image
from loca_lightning.data.seg_datasets import SegmentationDataset, fraction_subset, pad_collate
from loca_lightning.data.seg_layouts import SegSample, reduce_zero_label
from loca_lightning.data.segmentation import SegmentationDataModule
from loca_lightning.data.synthetic import SYNTHETIC_CLASSES
from loca_lightning.data.transforms import cat_max_ratio_crop_box, photometric_distortion, rescale_size, train_pipeline

H, W = 30, 40


def stripes(values: list[int], height: int = H, width: int = W) -> np.ndarray:
    """[height, width] uint8 mask of vertical stripes, one per value, left to right."""
    cols = np.arange(width) * len(values) // width
    return np.broadcast_to(np.asarray(values, dtype=np.uint8)[cols], (height, width)).copy()


def write_image(path: Path, seed: int, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)


def write_mask(path: Path, mask: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask)
    if palette:  # a VOC-style palette PNG: pixels store indices, the file maps them to colours
        image.putpalette(label_colormap(256).tobytes())
    image.save(path)


def module(**kwargs) -> SegmentationDataModule:
    kwargs = {"num_workers": 0, "pin_memory": False, **kwargs}
    return SegmentationDataModule(**kwargs)


def eval_item(dm: SegmentationDataModule, split: str = "val", index: int = 0) -> dict:
    dataset = {"val": dm.val_dataset, "test": dm.test_dataset}[split]
    return dataset[index]


# ----------------------------------------------------------------------------- classes


def test_class_lists_have_the_official_sizes():
    assert (len(ADE20K_CLASSES), len(CITYSCAPES_CLASSES), len(PASCAL_CONTEXT_CLASSES), len(VOC_CLASSES)) == (
        150,
        19,
        59,
        21,
    )
    assert ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[-1] == "flag"
    assert VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"
    # The VOC colour map: person (15) is (192, 128, 128), aeroplane (1) is (128, 0, 0).
    assert label_colormap(21)[15].tolist() == [192, 128, 128] and label_colormap(2)[1].tolist() == [128, 0, 0]


# ----------------------------------------------------------------------------- layouts


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    base = tmp_path / "ADEChallengeData2016"
    for split, count in (("training", 3), ("validation", 2)):
        for i in range(count):
            stem = f"ADE_{split[:5]}_{i:08d}"
            write_image(base / "images" / split / f"{stem}.jpg", seed=i)
            write_mask(base / "annotations" / split / f"{stem}.png", stripes([0, 1, 150, 5]))
    return tmp_path


@pytest.mark.parametrize("inside", [False, True])
def test_ade20k_reduce_zero_label(ade_root: Path, inside: bool):
    root = ade_root / "ADEChallengeData2016" if inside else ade_root
    dm = module(layout="ade20k", root=str(root))
    assert dm.num_classes == 150 and dm.class_names[0] == "wall" and dm.palette.shape == (150, 3)
    dm.setup("validate")
    item = eval_item(dm)
    np.testing.assert_array_equal(item["mask"].numpy(), stripes([255, 0, 149, 4]).astype(np.int64))
    assert item["mask"].dtype == torch.int64 and item["image"].dtype == torch.uint8
    assert item["image"].shape == (3, H, W) and item["name"] == "ADE_valid_00000000"
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), read_image(item["image_path"]))


def test_reduce_zero_label_keeps_ignore():
    np.testing.assert_array_equal(reduce_zero_label(np.array([0, 1, 2, 254, 255])), [255, 0, 1, 253, 255])


def test_cityscapes_train_ids_and_label_id_conversion(tmp_path: Path):
    city = "aachen"
    for split, i in (("train", 0), ("val", 1)):
        base = f"{city}_{i:06d}_000019"
        write_image(tmp_path / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", seed=i)
    gt = tmp_path / "gtFine"
    write_mask(gt / "train" / city / f"{city}_000000_000019_gtFine_labelTrainIds.png", stripes([0, 18, 255, 13]))
    # val has only label ids: road 7 -> 0, car 26 -> 13, unlabeled 0 -> 255, bicycle 33 -> 18, ego vehicle 1 -> 255
    write_mask(gt / "val" / city / f"{city}_000001_000019_gtFine_labelIds.png", stripes([7, 26, 0, 33, 1]))
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    dm = module(layout="cityscapes", root=str(tmp_path), crop_size=16, base_size=(40, 30), batch_size=1)
    assert dm.num_classes == 19 and dm.class_names[13] == "car"
    dm.setup("fit")
    np.testing.assert_array_equal(eval_item(dm)["mask"].numpy(), stripes([0, 13, 255, 18, 255]))
    assert eval_item(dm)["name"] == f"{city}_000001_000019"
    train_values = set(np.unique(dm.train_dataset[0]["mask"].numpy()).tolist())
    assert train_values <= {0, 18, 255, 13}
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before  # nothing written


def test_pascal_context_reduce_zero_label(tmp_path: Path):
    base = tmp_path / "VOC2010"
    stems = {"train": ["2008_000001", "2008_000002"], "val": ["2008_000003"]}
    for split, names in stems.items():
        for i, stem in enumerate(names):
            write_image(base / "JPEGImages" / f"{stem}.jpg", seed=i)
            write_mask(base / "SegmentationClassContext" / f"{stem}.png", stripes([0, 1, 59, 20]))
        (base / "ImageSets" / "SegmentationContext").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text("\n".join(names) + "\n")
    write_image(base / "JPEGImages" / "2008_999999.jpg", seed=9)  # VOC images without context labels are fine
    dm = module(layout="pascal_context", root=str(tmp_path))
    assert dm.num_classes == 59 and dm.class_names[0] == "aeroplane"
    dm.setup("test")
    assert len(dm.test_dataset) == 1  # test_split defaults to val_split
    np.testing.assert_array_equal(eval_item(dm, "test")["mask"].numpy(), stripes([255, 0, 58, 19]))


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    base = tmp_path / "VOC2012"
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for i, stem in enumerate(["2007_000001", "2007_000002", "2007_000003", "2011_000009"]):
        write_image(base / "JPEGImages" / f"{stem}.jpg", seed=i)
    for stem in ["2007_000001", "2007_000002", "2007_000003"]:
        write_mask(base / "SegmentationClass" / f"{stem}.png", stripes([0, 15, 255, 20]), palette=True)
    # SBD masks (grayscale): one for an image outside VOC's segmentation set, one that VOC's own mask overrides
    write_mask(base / "SegmentationClassAug" / "2011_000009.png", stripes([3, 4]))
    write_mask(base / "SegmentationClassAug" / "2007_000001.png", stripes([7]))
    (sets / "train.txt").write_text("2007_000001\n2007_000002\n")
    (sets / "val.txt").write_text("2007_000003\n")
    (sets / "trainaug.txt").write_text("2007_000001\n2007_000002\n2011_000009\n")
    return tmp_path


def test_voc_palette_indices_and_boundary_ignore(voc_root: Path):
    mask_file = voc_root / "VOC2012" / "SegmentationClass" / "2007_000003.png"
    assert Image.open(mask_file).mode == "P"
    dm = module(layout="voc2012", root=str(voc_root / "VOC2012"))
    assert dm.num_classes == 21 and dm.palette[15].tolist() == [192, 128, 128]
    dm.setup("validate")
    np.testing.assert_array_equal(eval_item(dm)["mask"].numpy(), stripes([0, 15, 255, 20]))


def test_voc_sbd_trainaug(voc_root: Path):
    dm = module(layout="voc2012", root=str(voc_root), use_sbd=True, crop_size=16, base_size=(40, 30))
    dm.setup("fit")
    masks = {s.name: s.mask.parent.name for s in dm.train_dataset.samples}
    assert masks == {
        "2007_000001": "SegmentationClass",
        "2007_000002": "SegmentationClass",
        "2011_000009": "SegmentationClassAug",
    }
    assert len(dm.val_dataset) == 1  # val never uses SBD
    plain = module(layout="voc2012", root=str(voc_root))
    plain.setup("fit")
    assert [s.name for s in plain.train_dataset.samples] == ["2007_000001", "2007_000002"]


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    for i, stem in enumerate(["a", "b", "c", "d"]):
        write_image(tmp_path / "images" / f"{stem}.{'jpg' if i % 2 else 'png'}", seed=i)
        write_mask(tmp_path / "masks" / f"{stem}.png", stripes([0, 1, 2, 255]))
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    return tmp_path


def test_folder_pairs_by_stem(folder_root: Path):
    dm = module(layout="folder", root=str(folder_root), crop_size=16, base_size=(40, 30))
    assert dm.class_names == ("sky", "road", "car") and dm.num_classes == 3
    dm.setup("fit")
    assert [s.name for s in dm.val_dataset.samples] == ["a", "b", "c", "d"]  # no split files: every split is all
    assert all(s.image.stem == s.mask.stem for s in dm.train_dataset.samples)
    np.testing.assert_array_equal(eval_item(dm, index=1)["mask"].numpy(), stripes([0, 1, 2, 255]))
    (folder_root / "splits").mkdir()
    (folder_root / "splits" / "train.txt").write_text("a\nc\n")
    (folder_root / "splits" / "val.txt").write_text("d\n")
    dm = module(layout="folder", root=str(folder_root))
    dm.setup("fit")
    assert [s.name for s in dm.train_dataset.samples] == ["a", "c"] and [s.name for s in dm.val_dataset.samples] == [
        "d"
    ]


def test_folder_explicit_dirs_and_reduce_zero_label(folder_root: Path):
    dm = module(
        layout="folder",
        image_dir=str(folder_root / "images"),
        mask_dir=str(folder_root / "masks"),
        class_names_file=str(folder_root / "classes.txt"),
        reduce_zero_label=True,
    )
    dm.setup("validate")
    np.testing.assert_array_equal(eval_item(dm)["mask"].numpy(), stripes([255, 0, 1, 255]))


def test_folder_errors_name_the_file(folder_root: Path):
    (folder_root / "masks" / "d.png").unlink()
    with pytest.raises(ValueError, match=r"image\(s\) without a mask.*images/d\.jpg"):
        module(layout="folder", root=str(folder_root)).setup("fit")
    write_mask(folder_root / "masks" / "d.png", stripes([0, 1]))
    write_mask(folder_root / "masks" / "e.png", stripes([0, 1]))
    with pytest.raises(ValueError, match=r"mask\(s\) without an image.*e\.png"):
        module(layout="folder", root=str(folder_root)).setup("fit")
    (folder_root / "masks" / "e.png").unlink()
    write_mask(folder_root / "masks" / "c.png", stripes([0, 1], height=H, width=W + 1))
    with pytest.raises(ValueError, match=r"c\.png.*30x41.*30x40"):
        module(layout="folder", root=str(folder_root)).setup("fit")
    write_mask(folder_root / "masks" / "c.png", stripes([0, 7, 9]))
    dm = module(layout="folder", root=str(folder_root))
    dm.setup("validate")  # label values are checked when the item is loaded
    with pytest.raises(ValueError, match=r"c\.png.*\[7, 9\].*outside \[0, 3\)"):
        eval_item(dm, index=2)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        module(layout="folder", root=str(folder_root), image_dir=str(folder_root / "nowhere")).setup("fit")
    with pytest.raises(ValueError, match="class_names_file"):
        module(layout="folder", image_dir=str(folder_root / "images"), mask_dir=str(folder_root / "masks"))


def test_corrupt_image_fails_loudly(folder_root: Path):
    (folder_root / "images" / "a.png").write_bytes(b"this is not a png")
    with pytest.raises(ImageReadError, match=r"a\.png"):
        module(layout="folder", root=str(folder_root)).setup("fit")


def test_missing_dataset_folder(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        module(layout="ade20k", root=str(tmp_path)).setup("fit")


def test_synthetic_layout():
    dm = module(
        synthetic_length=6,
        synthetic_val_length=3,
        synthetic_image_size=32,
        crop_size=24,
        base_size=(32, 32),
        batch_size=3,
    )
    assert dm.class_names == tuple(SYNTHETIC_CLASSES) and dm.num_classes == len(SYNTHETIC_CLASSES)
    dm.setup(None)
    assert len(dm.train_dataset) == 6 and len(dm.val_dataset) == 3
    first, again = dm.val_dataset[0], dm.val_dataset[0]
    assert first["image"].shape == (3, 32, 32) and torch.equal(first["image"], again["image"])
    other = module(synthetic_image_size=32, seed=1)
    other.setup("validate")
    assert not torch.equal(first["image"], other.val_dataset[0]["image"])  # the seed changes the scenes
    test = module(synthetic_image_size=32, test_split="test")
    test.setup("test")
    assert not torch.equal(first["image"], test.test_dataset[0]["image"])  # val and test scenes differ
    assert set(torch.unique(first["mask"]).tolist()) <= set(range(len(SYNTHETIC_CLASSES)))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 3, 24, 24) and batch["mask"].shape == (3, 24, 24)


# ----------------------------------------------------------------------------- batches


def test_train_batch_is_crop_sized(ade_root: Path):
    dm = module(layout="ade20k", root=str(ade_root), crop_size=16, base_size=(40, 30), batch_size=2)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.uint8
        assert batch["mask"].shape == (2, 16, 16) and batch["mask"].dtype == torch.int64
        assert set(torch.unique(batch["mask"]).tolist()) <= {255, 0, 149, 4}
        assert len(batch["name"]) == 2


def test_small_images_are_padded_bottom_right(folder_root: Path):
    dm = module(layout="folder", root=str(folder_root), crop_size=48, base_size=(W, H), ratio_range=(1.0, 1.0))
    dm.setup("fit")
    for i in range(len(dm.train_dataset)):
        item = dm.train_dataset[i]
        assert item["image"].shape == (3, 48, 48)
        assert (item["mask"][H:] == 255).all() and (item["mask"][:, W:] == 255).all()
        assert (item["image"][:, H:] == 0).all() and (item["image"][:, :, W:] == 0).all()
        native = stripes([0, 1, 2, 255]).astype(np.int64)
        assert np.array_equal(item["mask"][:H, :W].numpy(), native) or np.array_equal(
            item["mask"][:H, :W].numpy(), native[:, ::-1]
        )


def test_eval_items_keep_native_size_and_pad_collate(folder_root: Path):
    dm = module(layout="folder", root=str(folder_root), eval_batch_size=2)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, H, W) and batch["sizes"].tolist() == [[H, W], [H, W]]
    small = {
        "image": torch.full((3, 2, 3), 7, dtype=torch.uint8),
        "mask": torch.ones(2, 3, dtype=torch.int64),
        "name": "s",
        "image_path": "s",
    }
    large = {
        "image": torch.full((3, 4, 2), 9, dtype=torch.uint8),
        "mask": torch.zeros(4, 2, dtype=torch.int64),
        "name": "l",
        "image_path": "l",
    }
    batch = pad_collate([small, large])
    assert batch["image"].shape == (2, 3, 4, 3) and batch["sizes"].tolist() == [[2, 3], [4, 2]]
    assert (batch["image"][0, :, :2, :3] == 7).all() and (batch["image"][0, :, 2:] == 0).all()
    assert (
        (batch["mask"][0, 2:] == 255).all()
        and (batch["mask"][1, :, 2:] == 255).all()
        and (batch["mask"][1, :, :2] == 0).all()
    )
    assert batch["name"] == ["s", "l"]


def test_predict_paths(folder_root: Path, tmp_path: Path):
    listing = tmp_path / "list.txt"
    listing.write_text("images/b.jpg\nimages/a.png\n")
    for paths, names in (
        (str(folder_root / "images"), ["a", "b", "c", "d"]),
        (str(listing), ["b", "a"]),
        ([str(folder_root / "images" / "c.png")], ["c"]),
    ):
        dm = module(layout="folder", root=str(folder_root), predict_paths=paths, eval_batch_size=2)
        dm.setup("predict")
        batches = list(dm.predict_dataloader())
        assert [n for b in batches for n in b["name"]] == names
        assert batches[0]["image"].shape[-2:] == (H, W) and "mask" not in batches[0]
        assert dm.predict_dataset[0]["size"].tolist() == [H, W]
    with pytest.raises(ValueError, match="predict_paths"):
        module(layout="folder", root=str(folder_root)).setup("predict")


def test_workers_draw_different_augmentations(folder_root: Path):
    sample = SegSample(folder_root / "images" / "a.png", folder_root / "masks" / "a.png", "a")
    dataset = SegmentationDataset([sample] * 2, 3, train_pipeline(16, (40, 30)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2)
    first, second = (b["image"] for b in loader)  # one item per worker, both from the same file
    assert not torch.equal(first, second)


# ----------------------------------------------------------------------------- transforms


def test_rescale_size_mmseg_semantics():
    assert rescale_size(512, 683, 1.0, (2048, 512)) == (512, 683)  # short side hits 512
    assert rescale_size(512, 683, 0.5, (2048, 512)) == (256, 342)
    assert rescale_size(1024, 2048, 1.0, (2048, 1024)) == (1024, 2048)
    assert rescale_size(100, 1000, 1.0, (2048, 512)) == (205, 2048)  # long side hits 2048 first


def test_crop_rejects_a_dominated_crop_when_an_alternative_exists():
    # 10x40 mask: columns 0-9 are class 0, then alternating classes 1 and 2. Offsets 0-2 give crops
    # where class 0 covers >= 80%; every other offset is balanced enough.
    mask = np.zeros((10, 40), dtype=np.uint8)
    mask[:, 10:] = np.where(np.arange(30) % 2, 1, 2)
    rejected = 0
    for seed in range(200):
        first = cat_max_ratio_crop_box(mask, (10, 10), 1.0, np.random.default_rng(seed))  # no check: the first draw
        top, left, bottom, right = cat_max_ratio_crop_box(mask, (10, 10), 0.75, np.random.default_rng(seed))
        _, counts = np.unique(mask[top:bottom, left:right], return_counts=True)
        assert len(counts) > 1 and counts.max() / counts.sum() < 0.75
        if first[1] <= 2:
            rejected += 1
            assert (top, left, bottom, right) != first
    assert rejected > 0
    # Only one class anywhere: every draw fails, the last one is kept, in bounds.
    top, left, bottom, right = cat_max_ratio_crop_box(
        np.ones((20, 20), np.uint8), (8, 8), 0.75, np.random.default_rng(0)
    )
    assert 0 <= top and bottom - top == 8 and right - left == 8 and bottom <= 20 and right <= 20


def test_crop_ignores_ignore_pixels():
    # Offset 0 of a 4x10 crop: class 0 has 24 pixels, class 1 has 4, ignore has 12. Among labelled pixels
    # class 0 covers 86% (rejected); were 255 a class, the top class would cover 60% (accepted).
    mask = np.zeros((4, 20), dtype=np.uint8)
    mask[:, 6:9] = 255
    mask[:, 9] = 1
    mask[:, 10:] = np.where(np.arange(10) % 2, 1, 2)
    seed = next(s for s in range(1000) if cat_max_ratio_crop_box(mask, (4, 10), 1.0, np.random.default_rng(s))[1] == 0)
    assert cat_max_ratio_crop_box(mask, (4, 10), 0.75, np.random.default_rng(seed))[1] != 0
    assert cat_max_ratio_crop_box(mask, (4, 10), 0.75, np.random.default_rng(seed), ignore_index=-1)[1] == 0


def test_photometric_distortion_known_values():
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    assert np.array_equal(photometric_distortion(image), image)
    assert (photometric_distortion(image, brightness=10.7) == 110).all()
    assert (photometric_distortion(image, contrast=2.0) == 200).all()
    assert (photometric_distortion(image, brightness=30, contrast=2.0, contrast_first=False) == 255).all()
    red = np.zeros((1, 1, 3), dtype=np.uint8)
    red[..., 0] = 200
    assert photometric_distortion(red, hue=60).tolist() == [[[0, 200, 0]]]  # 120 degrees: red -> green
    assert photometric_distortion(red, saturation=0.0).tolist() == [[[200, 200, 200]]]


# ----------------------------------------------------------------------------- low-label subsets


def test_label_fraction_selects_a_deterministic_subset(folder_root: Path):
    subset = fraction_subset(100, 0.1, seed=3)
    assert len(subset) == 10 and np.array_equal(subset, fraction_subset(100, 0.1, seed=3))
    assert set(fraction_subset(100, 0.05, seed=3)) <= set(subset)  # nested
    assert any(not np.array_equal(subset, fraction_subset(100, 0.1, seed=s)) for s in range(4, 8))
    assert len(fraction_subset(3, 0.01, seed=0)) == 1
    names = []
    for _ in range(2):
        dm = module(layout="folder", root=str(folder_root), label_fraction=0.5, crop_size=16, base_size=(40, 30))
        dm.setup("fit")
        names.append([dm.train_dataset[i]["name"] for i in range(len(dm.train_dataset))])
        assert len(dm.val_dataset) == 4  # evaluation keeps everything
    assert names[0] == names[1] and len(names[0]) == 2 and set(names[0]) <= {"a", "b", "c", "d"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="root"):
        module(layout="ade20k")
    with pytest.raises(ValueError, match="label_fraction"):
        module(label_fraction=0.0)
    with pytest.raises(ValueError, match="reduce_zero_label"):
        module(layout="voc2012", root="/x", reduce_zero_label=True)


def test_predict_names_stay_unique_when_stems_collide(tmp_path: Path):
    write_image(tmp_path / "x" / "a.png", seed=0)
    write_image(tmp_path / "y" / "a.jpg", seed=1, size=(12, 20))
    dm = module(layout="synthetic", predict_paths=str(tmp_path), eval_batch_size=2)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["name"] == ["x__a", "y__a"] and batch["sizes"].tolist() == [[H, W], [12, 20]]

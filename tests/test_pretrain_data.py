"""LOCA pretraining data: folder / list / synthetic sources, bad files, batches, seeding and epochs."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, DistributedSampler

from loca_lightning.data.pretrain import LOCAPretrainDataModule, LOCAPretrainDataset, PathTable
from loca_lightning.data.synthetic import SyntheticScenes
from loca_lightning.pretrain.views import LOCAViews

VIEWS = dict(reference_size=32, query_size=32, focal_size=16, num_focal=2, patch_size=8)
LOGGER = "loca_lightning.data.pretrain"


def write_image(path: Path, seed: int, shape=(40, 56)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """Nested ImageNet-like folders with jpg/png/webp and three broken files (sorted order in comments)."""
    root = tmp_path / "train"
    write_image(root / "n01" / "a.jpg", 0)  # 0
    (root / "n01" / "b_corrupt.jpg").write_bytes(b"this is not an image at all" * 10)  # 1
    (root / "n01" / "c_empty.png").write_bytes(b"")  # 2
    write_image(root / "n01" / "d.png", 1)  # 3
    write_image(root / "n02" / "deep" / "e.webp", 2)  # 4
    write_image(root / "n02" / "f.jpg", 3)  # 5
    jpeg = cv2.imencode(".jpg", np.full((40, 56, 3), 128, np.uint8))[1].tobytes()
    (root / "n02" / "g_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # 6
    write_image(root / "n03" / "h.JPEG", 4)  # 7
    (root / "n03" / "notes.txt").write_text("not an image")  # not listed
    return root


def datamodule(**kwargs) -> LOCAPretrainDataModule:
    defaults = dict(views=LOCAViews(**VIEWS), batch_size=2, num_workers=0, pin_memory=False)
    return LOCAPretrainDataModule(**{**defaults, **kwargs})


def test_folder_source_skips_bad_files_with_a_warning_and_counts_them(image_tree, caplog):
    dm = datamodule(source="folder", root=str(image_tree))
    dm.setup("fit")
    dataset = dm.dataset
    assert len(dataset) == 8 and {Path(p).suffix for p in dataset.source} == {".jpg", ".png", ".webp", ".JPEG"}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        skipped = [dataset[i]["num_skipped"] for i in range(len(dataset))]
    # index 1 (corrupt) -> 2 (empty) -> 3 (good): two skipped; 2 -> 3: one; 6 (truncated) -> 7: one
    assert skipped == [0, 2, 1, 0, 0, 0, 1, 0]
    messages = " ".join(record.getMessage() for record in caplog.records)
    for name in ("b_corrupt.jpg", "c_empty.png", "g_truncated.jpg"):
        assert name in messages
    assert "0 bytes" in messages and "truncated" in messages
    # through the loader: every batch arrives, the skips add up
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        batches = list(dm.train_dataloader())
    assert len(batches) == 4 and sum(int(b["num_skipped"].sum()) for b in batches) == 4
    assert all(b["reference"].shape == (2, 3, 32, 32) for b in batches)


def test_path_table_round_trips_paths():
    paths = ["a/b.jpg", "/abs/ü/çé.png", "", "x" * 300]
    table = PathTable(paths)
    assert len(table) == 4 and list(table) == paths and table[1] == paths[1]
    with pytest.raises(IndexError):
        table[4]


def test_last_bad_file_wraps_to_the_first(tmp_path, caplog):
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "z.jpg").write_bytes(b"garbage")
    dataset = LOCAPretrainDataset(sorted(tmp_path.iterdir()), LOCAViews(**VIEWS))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert dataset[1]["num_skipped"] == 1


def test_everything_broken_raises_after_50_failures(tmp_path, caplog):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
    dataset = LOCAPretrainDataset(sorted(tmp_path.iterdir()), LOCAViews(**VIEWS))
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(RuntimeError, match="50 consecutive"):
        dataset[0]
    assert len(caplog.records) == 50


def test_missing_or_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        datamodule(source="folder", root=str(tmp_path / "does_not_exist")).setup("fit")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        datamodule(source="folder", root=str(tmp_path / "empty")).setup("fit")
    with pytest.raises(ValueError, match="root"):
        datamodule(source="folder")
    with pytest.raises(ValueError, match="list_file"):
        datamodule(source="list")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        datamodule(source="list", list_file=str(tmp_path / "missing.txt")).setup("fit")
    (tmp_path / "blank.txt").write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="blank.txt"):
        datamodule(source="list", list_file=str(tmp_path / "blank.txt")).setup("fit")


def test_list_source_relative_to_the_list_file_or_root(image_tree, tmp_path):
    listing = image_tree / "train.txt"
    listing.write_text("n01/a.jpg\n# a comment\nn02/deep/e.webp\n\nn03/h.JPEG\n")
    dm = datamodule(source="list", list_file=str(listing))
    dm.setup("fit")
    assert [Path(p).name for p in dm.dataset.source] == ["a.jpg", "e.webp", "h.JPEG"]
    assert all(dm.dataset[i]["num_skipped"] == 0 for i in range(3))
    elsewhere = tmp_path / "lists" / "train.txt"
    elsewhere.parent.mkdir()
    elsewhere.write_text("n01/d.png\n")
    dm = datamodule(source="list", list_file=str(elsewhere), root=str(image_tree))
    dm.setup("fit")
    assert list(dm.dataset.source) == [str(image_tree / "n01" / "d.png")]
    assert dm.dataset[0]["num_skipped"] == 0


def test_synthetic_batch_has_the_documented_keys_shapes_and_dtypes():
    dm = datamodule(source="synthetic", synthetic_length=6, synthetic_image_size=48, batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    expected = {
        "reference": ((3, 3, 32, 32), torch.uint8),
        "query_large": ((3, 3, 32, 32), torch.uint8),
        "query_focal": ((3, 2, 3, 16, 16), torch.uint8),
        "target_large": ((3, 16), torch.int64),
        "target_focal": ((3, 2, 4), torch.int64),
        "num_skipped": ((3,), torch.int64),
    }
    assert set(batch) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, key
    assert batch["target_large"].min() >= -1 and batch["target_large"].max() < 16
    assert dm.views.reference_size == 32 and dm.views.patch_size == 8 and dm.views.focal_grid == 2


def test_synthetic_items_are_the_views_of_the_scenes():
    dm = datamodule(source="synthetic", synthetic_length=4, synthetic_image_size=48, synthetic_seed=3, seed=5)
    dm.setup("fit")
    scenes = SyntheticScenes(length=4, image_size=48, seed=3)
    item = dm.dataset[2]
    expected = LOCAViews(**VIEWS)(scenes[2]["image"], np.random.default_rng((5, 0, 2)))
    for key, value in expected.items():
        np.testing.assert_array_equal(item[key], value)


def test_loader_options_and_the_views_argument():
    dm = datamodule(source="synthetic", synthetic_length=8, num_workers=0, persistent_workers=True)
    loader = dm.train_dataloader()
    assert loader.batch_size == 2 and loader.drop_last and not loader.persistent_workers
    assert {k: dm.hparams.views[k] for k in VIEWS} == VIEWS  # saved as plain values (weights_only checkpoints)
    from_mapping = datamodule(views=dict(VIEWS))  # a mapping of LOCAViews' arguments, as a user's own config holds
    assert isinstance(from_mapping.views, LOCAViews) and from_mapping.views.settings == dm.views.settings
    with pytest.raises(TypeError, match="views must be a LOCAViews or a mapping of its arguments, got list"):
        datamodule(views=list(VIEWS))
    default = LOCAPretrainDataModule(num_workers=0).views  # the signature's default, from Python
    assert type(default) is LOCAViews and default.settings == LOCAViews().settings


def first_batch(**kwargs) -> dict[str, torch.Tensor]:
    dm = datamodule(source="synthetic", synthetic_length=8, synthetic_image_size=40, **kwargs)
    return next(iter(dm.train_dataloader()))


def test_fixed_seed_is_deterministic_and_seeds_differ():
    first, again, other = first_batch(seed=1), first_batch(seed=1), first_batch(seed=2)
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["reference"], other["reference"])


def test_batches_do_not_depend_on_the_number_of_workers():
    serial, parallel = first_batch(seed=4, num_workers=0), first_batch(seed=4, num_workers=2)
    for key in serial:
        assert torch.equal(serial[key], parallel[key]), key


def test_epoch_changes_the_draws_and_returns_to_them():
    dm = datamodule(source="synthetic", synthetic_length=4, synthetic_image_size=40)
    dm.setup("fit")
    dataset = dm.dataset
    epoch0 = dataset[1]
    dm.set_epoch(1)
    epoch1 = dataset[1]
    dm.set_epoch(0)
    assert np.array_equal(dataset[1]["reference"], epoch0["reference"])
    assert not np.array_equal(epoch1["reference"], epoch0["reference"])


def test_epoch_fn_survives_lightning_inserting_a_distributed_sampler():
    dm = datamodule(source="synthetic", synthetic_length=8)
    with _replace_dunder_methods(DataLoader, "dataset"):  # what the Trainer does around train_dataloader()
        loader = dm.train_dataloader()
    sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=True)
    rebuilt = _update_dataloader(loader, sampler)
    assert type(rebuilt) is type(loader) and rebuilt.sampler is sampler
    assert rebuilt.epoch_fn == dm._current_epoch and rebuilt.batch_size == 2 and rebuilt.drop_last


class _Recorder(L.LightningModule):
    """Records a fingerprint of every sample it trains on, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[float]] = {}

    def training_step(self, batch, batch_idx):
        sums = batch["reference"].flatten(1).double().sum(1) + 1e-3 * batch["target_large"].double().sum(1)
        self.seen.setdefault(self.current_epoch, []).extend(sums.tolist())
        return (self.weight**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_persistent_workers_follow_the_trainer_epoch():
    dm = datamodule(
        source="synthetic", synthetic_length=4, synthetic_image_size=40, num_workers=2, persistent_workers=True
    )
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    reference = LOCAPretrainDataset(SyntheticScenes(length=4, image_size=40, with_masks=False), LOCAViews(**VIEWS))
    for epoch in range(3):
        reference.set_epoch(epoch)
        expected = sorted(
            float(reference[i]["reference"].astype(np.float64).sum() + 1e-3 * reference[i]["target_large"].sum())
            for i in range(4)
        )
        assert sorted(model.seen[epoch]) == pytest.approx(expected)
    assert len({tuple(sorted(v)) for v in model.seen.values()}) == 3

"""Tar shards as a pretraining source: the writer's round trip, timm's layout, local/file:///http/pipe:/fsspec shards,
bad members and truncated shards, start-up checks, file-system operations at start-up (processes: test_shard_runs)."""

from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import os
import socket
import sys
import tarfile
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from loca_lightning.data.images import read_image
from loca_lightning.data.pretrain import LOCAPretrainDataModule, LOCAPretrainDataset
from loca_lightning.data.shard_writer import shards_main, shards_pattern, write_shards
from loca_lightning.data.shards import index_shard, open_shards
from loca_lightning.pretrain.views import LOCAViews

VIEWS = dict(reference_size=32, query_size=32, focal_size=16, num_focal=2, patch_size=8)
SHARDS_LOGGER = "loca_lightning.data.shards"


def write_jpegs(folder: Path, count: int, shape=(40, 56)) -> list[Path]:
    """``count`` random JPEGs in two sub-folders (sorted order = creation order)."""
    paths = []
    for i in range(count):
        path = folder / f"n{i % 2:02d}" / f"img{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = np.random.default_rng(i).integers(0, 256, (*shape, 3), dtype=np.uint8)
        assert cv2.imwrite(str(path), image)
        paths.append(path)
    return sorted(paths)


@pytest.fixture(autouse=True)
def _shard_cache(tmp_path: Path, monkeypatch) -> None:
    """Indexes and fetched shards go to the test's folder, not ~/.cache."""
    monkeypatch.setenv("LOCA_SHARD_CACHE", str(tmp_path / "shard_cache"))


@pytest.fixture
def shard_set(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    """25 images and their shards of 10, 10 and 5."""
    paths = write_jpegs(tmp_path / "images", 25)
    return paths, write_shards(paths, tmp_path / "shards", 10, root=tmp_path / "images")


def test_writer_round_trip_is_deterministic_and_never_overwrites(shard_set, tmp_path: Path, capsys) -> None:
    paths, shards = shard_set
    assert [s.name for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    samples = open_shards(shards_pattern(shards))
    assert list(samples.counts) == [10, 10, 5]
    for i, path in enumerate(paths):  # the same images come back, in order
        assert np.array_equal(samples.read(i), read_image(path)), i
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        assert names[:2] == ["000000000.jpg", "000000000.json"]
        assert json.load(tar.extractfile("000000000.json")) == {"path": "n00/img0000.jpg"}
        assert tar.extractfile("000000000.jpg").read() == paths[0].read_bytes()  # stored byte for byte
    shards_main([str(tmp_path / "images"), str(tmp_path / "again"), "--shard-size", "10"])
    printed = capsys.readouterr().out
    assert "loca fit --config CONFIG --data.init_args.shards=" in printed and "train-{000000..000002}.tar" in printed
    for mine, again in zip(shards, sorted((tmp_path / "again").glob("*.tar"))):
        assert mine.read_bytes() == again.read_bytes()  # deterministic
    listing = tmp_path / "images" / "list.txt"  # a path list gives the same shards as the folder it lists
    listing.write_text("".join(f"{p.relative_to(tmp_path / 'images')}\n" for p in paths))
    shards_main([str(listing), str(tmp_path / "from_list"), "--shard-size", "10"])
    assert [p.read_bytes() for p in sorted((tmp_path / "from_list").glob("*.tar"))] == [s.read_bytes() for s in shards]
    before = shards[0].read_bytes()
    with pytest.raises(SystemExit):
        shards_main([str(tmp_path / "images"), str(tmp_path / "shards")])
    assert "never overwrites" in capsys.readouterr().err and shards[0].read_bytes() == before


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_timm_imagenet_wds_layout_is_read_as_it_is(tmp_path: Path, caplog) -> None:
    """timm's imagenet-1k-wds: `<synset>_<n>.jpg/.cls/.json` members, counts in `_info.json` under splits/train."""
    images = write_jpegs(tmp_path / "images", 5)
    lengths = [3, 2]
    for shard, members in enumerate([images[:3], images[3:]]):
        with tarfile.open(tmp_path / f"imagenet1k-train-{shard:04d}.tar", "w") as tar:
            for i, path in enumerate(members):
                key = f"n0144076{shard}_{i}"
                _add(tar, f"{key}.cls", b"7")  # before the image: members of a sample come in any order
                _add(tar, f"{key}.jpg", path.read_bytes())
                _add(tar, f"{key}.json", b'{"label": 7}')
    info = {"name": "imagenet-1k", "splits": {"train": {"name": "train", "num_samples": 5, "shard_lengths": lengths}}}
    info["splits"]["train"]["filenames"] = ["imagenet1k-train-0000.tar", "imagenet1k-train-0001.tar"]
    (tmp_path / "_info.json").write_text(json.dumps(info))
    samples = open_shards(str(tmp_path / "imagenet1k-train-{0000..0001}.tar"))
    assert list(samples.counts) == lengths
    for i, path in enumerate(images):
        assert np.array_equal(samples.read(i), read_image(path))
    (tmp_path / "_info.json").unlink()
    with caplog.at_level(logging.WARNING, logger=SHARDS_LOGGER):
        assert list(open_shards(str(tmp_path / "imagenet1k-train-{0000..0001}.tar")).counts) == lengths
    assert "counted 5 samples in 2 shards in" in caplog.text  # without counts, it says what counting cost


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(shard_set):
    """``http://127.0.0.1:<port>`` serving the shard folder (an http.server: no byte ranges)."""
    folder = shard_set[1][0].parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_file_http_and_pipe_shards_give_the_local_images(shard_set, http_root, tmp_path: Path) -> None:
    paths, shards = shard_set
    folder = shards[0].parent
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"pipe:cat {s}\n" for s in shards))
    for spec in (
        f"file://{folder}/train-{{000000..000002}}.tar",
        f"{http_root}/train-{{000000..000002}}.tar",
        str(listing),
    ):
        cache = tmp_path / "cache" / str(abs(hash(spec)))
        samples = open_shards(spec, str(cache))
        assert len(samples) == 25
        for i in (0, 9, 10, 24):
            assert np.array_equal(samples.read(i), read_image(paths[i])), (spec, i)
        remote = spec.startswith("http") or spec.endswith(".txt")
        assert sorted(p.name.split("-", 1)[1] for p in cache.glob("*.tar")) == (
            [s.name for s in shards] if remote else []
        )  # remote shards are cached whole, local ones read in place


def test_unreachable_missing_or_truncated_shards_stop_at_start_up_naming_them(shard_set, tmp_path: Path) -> None:
    folder = shard_set[1][0].parent
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ValueError, match=rf"http://127.0.0.1:{port}/train-000000.tar \(cannot be reached"):
        open_shards(f"http://127.0.0.1:{port}/train-{{000000..000001}}.tar")
    with pytest.raises(ValueError, match=r"train-000003.tar \(cannot be reached"):
        open_shards(str(folder / "train-{000000..000003}.tar"))
    with open(folder / "train-000001.tar", "r+b") as handle:
        handle.truncate(5000)
    with pytest.raises(ValueError, match=r"1 of 3 shards are unusable: .*train-000001.tar \(5000 bytes.*truncated"):
        open_shards(str(folder / "train-{000000..000002}.tar"))
    with open(folder / "train-000001.tar", "r+b") as handle:  # cut at a block boundary, inside a member's data
        handle.truncate(4608)
    with pytest.raises(ValueError, match=r"train-000001.tar \(no end-of-archive blocks: truncated"):
        open_shards(str(folder / "train-{000000..000002}.tar"))


def _dataset(spec: str) -> LOCAPretrainDataset:
    return LOCAPretrainDataset(open_shards(spec), LOCAViews(**VIEWS), seed=0)


def test_corrupt_member_is_replaced_by_the_next_sample_and_counted(shard_set, caplog) -> None:
    paths, shards = shard_set
    offsets, _ = index_shard(str(shards[0]))
    with open(shards[0], "r+b") as handle:  # sample 3's JPEG bytes become garbage, the tar stays valid
        handle.seek(int(offsets[3]))
        handle.write(b"not a jpeg" * 20)
    dataset = _dataset(shards_pattern(shards))
    reference = _dataset(shards_pattern(shards))
    with caplog.at_level(logging.WARNING):
        item = dataset[3]
    assert item["num_skipped"] == 1 and "train-000000.tar[sample 3]" in caplog.text
    assert np.array_equal(dataset.source.read(4), read_image(paths[4]))  # replaced by sample 4, drawn as item 3
    assert reference[4]["num_skipped"] == 0


def test_shard_truncated_after_start_up_keeps_the_length_and_replaces_its_missing_samples(shard_set, caplog) -> None:
    paths, shards = shard_set
    dataset = _dataset(shards_pattern(shards))  # counts and checks happen here
    offsets, _ = index_shard(str(shards[1]))
    with open(shards[1], "r+b") as handle:  # cut inside sample 4's image, at a tar block boundary
        handle.truncate(int(offsets[4]) // 512 * 512 + 512)
    assert len(dataset) == 25
    with caplog.at_level(logging.WARNING):
        items = [dataset[i] for i in range(10, 20)]
    assert [item["num_skipped"] for item in items] == [0] * 4 + [1] * 6
    assert caplog.text.count("train-000001.tar holds 4 of its 10 samples") == 1  # one line naming the shard
    # the missing samples are the next shard's first, the same whichever process or worker draws them
    assert np.array_equal(dataset.source.read(dataset.source.next_candidate(15)), read_image(paths[20]))


_SCANDIR, _STAT = os.scandir, os.stat


class _FsOps:
    """Counts file-system operations of this process: opens, directory listings and their entries, stats."""

    active: _FsOps | None = None
    hooked = False

    def __init__(self, monkeypatch) -> None:
        self.counts = {"open": 0, "listdir": 0, "entries": 0, "stat": 0}
        if not _FsOps.hooked:  # an audit hook cannot be removed: install one, switched by `active`
            sys.addaudithook(_FsOps._hook)
            _FsOps.hooked = True
        scandir, stat = _SCANDIR, _STAT

        counts = self.counts

        class CountingScandir:  # os.walk uses it as a context manager
            def __init__(self, *args, **kwargs) -> None:
                self.inner = scandir(*args, **kwargs)

            def __iter__(self):
                return self

            def __next__(self):
                entry = next(self.inner)
                counts["entries"] += 1
                return entry

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                self.inner.close()

        def counting_stat(*args, **kwargs):
            self.counts["stat"] += 1
            return stat(*args, **kwargs)

        monkeypatch.setattr(os, "scandir", CountingScandir)
        monkeypatch.setattr(os, "stat", counting_stat)

    @staticmethod
    def _hook(event: str, args: tuple) -> None:
        ops = _FsOps.active
        if ops is not None:
            if event == "open":
                ops.counts["open"] += 1
            elif event in ("os.scandir", "os.listdir"):
                ops.counts["listdir"] += 1

    def __enter__(self) -> dict[str, int]:
        _FsOps.active = self
        return self.counts

    def __exit__(self, *exc) -> None:
        _FsOps.active = None


def _start_up_ops(monkeypatch, **kwargs) -> tuple[dict[str, int], dict[str, int]]:
    """File-system operations of setup(), then of the first batch of 4 (in this process)."""
    dm = LOCAPretrainDataModule(views=LOCAViews(**VIEWS), batch_size=4, num_workers=0, pin_memory=False, **kwargs)
    with _FsOps(monkeypatch) as setup:
        dm.setup("fit")
    with _FsOps(monkeypatch) as first_batch:
        next(iter(dm.train_dataloader()))
    return dict(setup), dict(first_batch)


def test_start_up_file_system_operations_grow_with_shards_not_images(tmp_path: Path, monkeypatch) -> None:
    ops = {}
    for n in (40, 160):
        images = write_jpegs(tmp_path / f"images{n}", n, shape=(24, 24))
        shards = write_shards(images, tmp_path / f"shards{n}", n // 4)  # 4 shards either way
        ops["folder", n] = _start_up_ops(monkeypatch, source="folder", root=str(tmp_path / f"images{n}"))
        ops["shards", n] = _start_up_ops(monkeypatch, source="shards", shards=shards_pattern(shards))
    print(ops)
    assert ops["shards", 40][0] == ops["shards", 160][0]  # setup: nothing grows with the images
    # a stat and a read of the last 1 KB a shard, and _info.json
    assert ops["shards", 40][0] == {"open": 4 + 1, "listdir": 0, "entries": 0, "stat": 4}
    for n in (
        40,
        160,
    ):  # first batch, each shard it touches: its index mapped (np.load opens it twice), the shard opened
        assert ops["shards", n][1]["open"] <= 3 * 4 and ops["shards", n][1]["stat"] <= 3 * 4
        assert ops["folder", n][1]["open"] == 4  # one file an image
    assert ops["folder", 40][0]["entries"] == 40 + 2 and ops["folder", 160][0]["entries"] == 160 + 2  # listing all


def test_shard_benchmark_at_tiny_sizes() -> None:
    import shard_bench  # benchmarks/ is on pytest's pythonpath

    result = {
        "per_worker": shard_bench.bench_per_worker(images=4, batch_size=2, repeats=1, shard_size=2),
        "start_up": shard_bench.bench_start_up(images=40, folders=4, shard_size=10, batch_size=2),
    }
    assert set(result["per_worker"]["samples_per_s"]) >= {"folder", "shards (ours)"}
    assert all(r["views"] > 0 for r in result["per_worker"]["samples_per_s"].values())
    assert len(shard_bench.format_shard_rows(result)) == len(result["per_worker"]["samples_per_s"]) + 1


def test_fsspec_urls_are_checked_at_start_up_and_fetched_whole(shard_set, tmp_path: Path) -> None:
    """fsspec's in-memory file system stands in for s3:// or gs:// (not reachable here)."""
    import fsspec

    paths, shards = shard_set
    memory = fsspec.filesystem("memory")
    for path in [*shards, shards[0].parent / "_info.json"]:
        memory.pipe(f"/loca_test_shards/{path.name}", path.read_bytes())
    try:
        samples = open_shards("memory://loca_test_shards/train-{000000..000002}.tar", str(tmp_path / "cache"))
        assert list(samples.counts) == [10, 10, 5]  # from _info.json, read through fsspec
        assert np.array_equal(samples.read(24), read_image(paths[24]))
        with pytest.raises(ValueError, match=r"memory://loca_test_shards/train-000003.tar \(cannot be reached"):
            open_shards("memory://loca_test_shards/train-{000000..000003}.tar", str(tmp_path / "cache"))
    finally:
        memory.rm("/loca_test_shards", recursive=True)


def test_shards_argument_selects_the_source_unless_another_input_is_set(shard_set, tmp_path: Path) -> None:
    pattern = shards_pattern(shard_set[1])
    for source in ("synthetic", "folder", "list", "shards"):  # a config's source without its own input gives way
        dm = LOCAPretrainDataModule(source=source, shards=pattern, views=LOCAViews(**VIEWS))
        assert dm.hparams.source == "shards"
    with pytest.raises(ValueError, match="shards and the folder source's input are both set"):
        LOCAPretrainDataModule(source="folder", root=str(tmp_path), shards=pattern, views=LOCAViews(**VIEWS))
    assert [key for key, _ in LOCAPretrainDataModule.missing_arguments(source="shards")] == ["shards"]
    (tmp_path / "empty.txt").write_text("# no shards\n")
    with pytest.raises(ValueError, match="empty.txt' names no shards"):
        open_shards(str(tmp_path / "empty.txt"))

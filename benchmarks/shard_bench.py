"""Shard part of ``make bench``: per-worker LOCA samples/s from a folder, from tar shards (ours, wids, webdataset) and
from an ``http://127.0.0.1`` server, and the time to the first batch with a cold page cache, folder vs shards.

    python benchmarks/run.py --parts shards                   # inside `make bench`
    python benchmarks/shard_bench.py                          # this part alone, printed as JSON

One worker = this process with one torch thread, items drawn in a shuffled order (what the sampler gives; webdataset,
an iterable reader, reads its shards in order) and collated into batches. wids and webdataset are measured when
installed (``pip install webdataset wids``); they are not dependencies of the package.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np
import torch
from machine import OtherLoad
from pipeline import RELEASED_VIEWS, write_jpegs
from torch.utils.data import default_collate

from loca_lightning.data.images import decode_image
from loca_lightning.data.pretrain import LOCAPretrainDataModule
from loca_lightning.data.shard_writer import shards_pattern, write_shards
from loca_lightning.data.shards import index_shard, open_shards
from loca_lightning.pretrain.views import LOCAViews


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=folder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _pass_s(make_bytes: Callable[[], Iterable[bytes]], stage: str, views: LOCAViews, batch: int) -> tuple[float, float]:
    """Wall and CPU seconds of one pass: the encoded images only (``read``), decoded too (``decode``), or decoded,
    LOCA views and batches (``views``). CPU time is this process's (the http server thread included)."""
    rng = np.random.default_rng(0)
    start, cpu, pending = time.perf_counter(), time.process_time(), []
    for data in make_bytes():
        if stage == "read":
            continue
        image = decode_image(np.frombuffer(data, np.uint8), "bench")
        if stage == "views":
            pending.append(views(image, rng))
            if len(pending) == batch:
                default_collate(pending)
                pending = []
    return time.perf_counter() - start, time.process_time() - cpu


def _wids_dataset(shards: list[Path], counts: list[int]):
    import wids

    spec = [{"url": str(s), "nsamples": int(c)} for s, c in zip(shards, counts)]
    # localname=identity: read local shards in place (wids' default copies every shard into /tmp/_wids_cache first)
    return wids.ShardListDataset(spec, localname=lambda url: url, transformations=[])


STAGES = ("read", "decode", "views")


def bench_per_worker(images: int = 96, batch_size: int = 32, repeats: int = 3, shard_size: int = 24) -> dict:
    """Samples/s of one worker per reader: reading the encoded images, + decoding, + LOCA's released views and
    batching. Readers take turns within each repeat (a shared machine's load drifts); medians are reported."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict = {"images": images, "shard_size": shard_size, "batch_size": batch_size}
    try:
        with tempfile.TemporaryDirectory(prefix="loca_shard_bench_") as tmp:
            tmp = Path(tmp)
            paths = write_jpegs(tmp / "images", images)
            shards = write_shards(paths, tmp / "shards", shard_size)
            order = np.random.default_rng(1).permutation(images).tolist()
            views = LOCAViews(**RELEASED_VIEWS)
            server, base = _serve(tmp / "shards")
            ours = open_shards(shards_pattern(shards), str(tmp / "cache"))
            readers: dict[str, Callable[[], Iterable[bytes]]] = {
                "folder": lambda: (paths[i].read_bytes() for i in order),
                "shards (ours)": lambda: (ours.read_bytes(i) for i in order),
            }
            try:
                wids_data = _wids_dataset(shards, list(ours.counts))
                readers["shards (wids)"] = lambda: (wids_data[i][".jpg"].getvalue() for i in order)
            except ImportError:
                pass
            try:
                import webdataset as wds

                urls = [str(s) for s in shards]
                readers["shards (webdataset, in order)"] = lambda: (
                    s["jpg"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)
                )
            except ImportError:
                pass
            fetches = iter(range(10**6))

            def http_reader() -> Iterable[bytes]:  # every pass starts with an empty cache: it fetches its shards
                pattern = f"{base}/{shards_pattern(shards).rsplit('/', 1)[1]}"
                remote = open_shards(pattern, str(tmp / f"http_cache{next(fetches)}"))
                return (remote.read_bytes(i) for i in order)

            readers["http (ours), shards fetched whole in the pass"] = http_reader
            times: dict = {(name, stage): [] for name in readers for stage in STAGES}
            load = OtherLoad().start()
            for _ in range(repeats):
                for name, make in readers.items():
                    for stage in STAGES:
                        times[name, stage].append(_pass_s(make, stage, views, batch_size))
            out["others_cores"] = load.stop()
            server.shutdown()
            server.server_close()
    finally:
        torch.set_num_threads(threads)
    out["samples_per_s"] = {
        name: {stage: images / statistics.median(t[0] for t in times[name, stage]) for stage in STAGES}
        for name in readers
    }
    out["samples_per_cpu_s"] = {  # robust to other processes on a shared machine
        name: {stage: images / statistics.median(t[1] for t in times[name, stage]) for stage in STAGES}
        for name in readers
    }
    return out


def _drop_page_cache(folder: Path) -> None:
    """Evict ``folder``'s files from the page cache (POSIX_FADV_DONTNEED; the directory entries stay cached)."""
    for dirpath, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _first_batch_s(views: LOCAViews, batch_size: int, cache: Path, **source) -> float:
    start = time.perf_counter()
    dm = LOCAPretrainDataModule(
        views=views, batch_size=batch_size, num_workers=0, pin_memory=False, shard_cache=str(cache), **source
    )
    next(iter(dm.train_dataloader()))
    return time.perf_counter() - start


def bench_start_up(images: int = 20000, folders: int = 100, shard_size: int = 1000, batch_size: int = 32) -> dict:
    """Seconds from building the DataModule to its first batch, page cache dropped first: folder vs shards."""
    views = LOCAViews(**{**RELEASED_VIEWS, "reference_size": 64, "query_size": 64, "focal_size": 32})
    out: dict = {"images": images, "folders": folders, "shards": -(-images // shard_size)}
    with tempfile.TemporaryDirectory(prefix="loca_startup_bench_") as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        paths = []
        for i in range(images):  # small JPEGs: what grows is the number of files, not the bytes
            path = tmp / "images" / f"n{i % folders:05d}" / f"{i:08d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), rng.integers(0, 256, (72, 72, 3), dtype=np.uint8))
            paths.append(path)
        start = time.perf_counter()
        shards = write_shards(sorted(paths), tmp / "shards", shard_size)
        out["write_shards_s"] = time.perf_counter() - start
        pattern = shards_pattern(shards)
        for name, source in (
            ("folder", dict(source="folder", root=str(tmp / "images"))),
            ("shards", dict(source="shards", shards=pattern)),
        ):
            _drop_page_cache(tmp)
            out[f"{name}_first_batch_s"] = _first_batch_s(views, batch_size, tmp / "cache", **source)
        for index in (tmp / "shards").glob("*.idx.npy"):  # as timm's shards: headers read (once per machine)
            index.unlink()
        _drop_page_cache(tmp)
        out["shards_without_index_first_batch_s"] = _first_batch_s(
            views, batch_size, tmp / "cache_without_index", source="shards", shards=pattern
        )
        _drop_page_cache(tmp)
        start = time.perf_counter()
        counted = sum(len(index_shard(str(s))[0]) for s in shards)
        out["count_without_info_s"] = time.perf_counter() - start
        assert counted == images
    return out


def bench_shards(quick: bool = False, repeats: int = 3) -> dict:
    """The shard part of ``make bench``."""
    return {
        "per_worker": bench_per_worker(images=48 if quick else 96, repeats=repeats),
        "start_up": bench_start_up(images=4000 if quick else 20000),
    }


def format_shard_rows(result: dict) -> list[str]:
    """Rows of run.py's table (part | setting | throughput | detail | peak RSS | others)."""
    per, start = result["per_worker"], result["start_up"]
    rows = []
    others = "n/a" if per.get("others_cores") is None else f"{per['others_cores']:.2f}"
    for name, rates in per["samples_per_s"].items():
        cpu = per["samples_per_cpu_s"][name]
        rows.append(
            f"| shards | 1 worker, {name}, released views, batch {per['batch_size']} | {rates['views']:.0f} samples/s"
            f" ({cpu['views']:.0f} per CPU-s) | per CPU-s: read only {cpu['read']:.0f}, + decode {cpu['decode']:.0f}"
            f" | n/a | {others} |"
        )
    rows.append(
        f"| shards | first batch, cold page cache, {start['images']} images | folder {start['folder_first_batch_s']:.2f}"
        f" s, {start['shards']} shards {start['shards_first_batch_s']:.2f} s | without .idx.npy "
        f"{start['shards_without_index_first_batch_s']:.2f} s; counting without _info.json "
        f"{start['count_without_info_s']:.2f} s | n/a | n/a |"
    )
    return rows


if __name__ == "__main__":
    print(json.dumps(bench_shards(), indent=1))

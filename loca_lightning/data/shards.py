"""WebDataset tar shards as a map-style image source: sample ``i`` of a shard set is one image, read by offset.

A shard set is given as a list, a brace pattern (``train-{000000..001023}.tar``) or a text file of URLs. Samples are
the WebDataset ones (members grouped by key, the name up to the first dot of the file name); each sample's image is its
first ``jpg``/``jpeg``/``png``/``webp`` member, other members (``.cls``, ``.json``) are ignored. Sample counts come from
an ``_info.json`` beside the shards (timm's ``shard_lengths``; ``loca shards`` writes one) or, without it, from
reading every shard's headers once at start-up.

Being map-style keeps the loader's sampler: batches are a function of (seed, epoch, position), a resume is exact, and
under DDP every rank takes the same number of steps whatever the shards' sizes. A shard's member offsets are indexed
with the standard library's ``tarfile`` the first time a process reads from it (headers only: start-up does not grow
with the number of images); its images are then read with one ``pread`` each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np

from loca_lightning.data import shard_io
from loca_lightning.data.images import decode_image

log = logging.getLogger(__name__)

SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INFO_FILES = ("_info.json", "info.json")
OPEN_SHARDS = 64  # file descriptors a process keeps open (least recently used closed first)


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from a list, a brace pattern, or a ``.txt`` file of URLs/paths (one a line, ``#`` comments)."""
    if isinstance(spec, str):
        if spec.endswith(".txt") and shard_io.is_local(spec):
            listing = Path(shard_io.local_path(spec))
            if not listing.is_file():
                raise FileNotFoundError(f"shard list {spec!r} does not exist")
            lines = [s.strip() for s in listing.read_text().splitlines()]
            base = listing.parent
            urls = [
                s if "://" in s or s.startswith("pipe:") or os.path.isabs(s) else str(base / s)
                for s in lines
                if s and not s.startswith("#")
            ]
            if not urls:
                raise ValueError(f"shard list {spec!r} names no shards")
            return urls
        spec = [spec]
    urls = [url for item in spec for url in braceexpand.braceexpand(item)]
    if not urls:
        raise ValueError("data.init_args.shards names no shards")
    return urls


def _info_lengths(urls: list[str]) -> list[int] | None:
    """Per-shard sample counts from an ``_info.json`` in the shards' folder, if they share one and it lists them all."""
    if urls[0].startswith("pipe:"):
        return None
    folder = shard_io.shard_dir(urls[0])
    if any(shard_io.shard_dir(url) != folder for url in urls):
        return None
    for name in INFO_FILES:
        data = shard_io.read_small(f"{folder}/{name}")
        if data is None:
            continue
        try:
            info = json.loads(data)
        except ValueError as error:
            raise ValueError(f"{folder}/{name} is not valid JSON: {error}") from error
        counts: dict[str, int] = {}
        splits = info.get("splits", {}).values() if isinstance(info.get("splits"), dict) else [info]
        for split in splits:
            counts.update(zip(split.get("filenames", []), split.get("shard_lengths", [])))
        names = [os.path.basename(shard_io.local_path(u) if shard_io.is_local(u) else u) for u in urls]
        if all(n in counts for n in names):
            return [int(counts[n]) for n in names]
        log.warning("%s/%s does not list every shard; counting the samples instead", folder, name)
    return None


def sample_counts(urls: list[str], cache_dir: str) -> list[int]:
    """Samples per shard: from ``_info.json``, else counted (remote shards are fetched to do it), with its time."""
    counts = _info_lengths(urls)
    if counts is not None:
        return counts
    start = time.perf_counter()
    counts = []
    for url in urls:  # through the machine's index cache: the first reads of these shards will not read them again
        path = shard_io.fetch(url, cache_dir)
        counts.append(len(load_index(path, url, cache_dir)[0]))
    log.warning(
        "counted %d samples in %d shards in %.1f s (no _info.json with shard_lengths beside %s; `loca shards` writes one)",
        sum(counts),
        len(urls),
        time.perf_counter() - start,
        urls[0],
    )
    return counts


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: (key, extension), the key ending at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def index_shard(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(data offset, size) of each sample's image in the tar file ``path``, in sample order; (-1, 0) for a sample
    without an image member. Members that end past the file's end (a truncated shard) are left out."""
    file_size = os.path.getsize(path)
    offsets, sizes, last_key = [], [], None
    with tarfile.open(path, mode="r:") as tar:  # uncompressed: headers are read, data is seeked over
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _sample_key(member.name)
            if key != last_key:
                offsets.append(-1)
                sizes.append(0)
                last_key = key
            whole = member.offset_data + member.size <= file_size
            if offsets[-1] < 0 and whole and ext.rsplit(".", 1)[-1].lower() in SHARD_IMAGE_EXTENSIONS:
                offsets[-1], sizes[-1] = member.offset_data, member.size
            if not whole:
                offsets.pop(), sizes.pop()
                break
    return np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)


def index_path(shard: str) -> str:
    """The member index ``loca shards`` writes beside a shard: ``NAME.tar`` -> ``NAME.idx.npy``."""
    return shard[: -len(".tar")] + ".idx.npy" if shard.endswith(".tar") else shard + ".idx.npy"


def save_index(path: str, offsets: np.ndarray, sizes: np.ndarray) -> None:
    """Store a shard's index (int64 ``[samples, 2]``: offset, size) atomically."""
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "wb") as handle:
        np.save(handle, np.stack([offsets, sizes], axis=1).astype(np.int64))
    os.replace(partial, path)


def load_index(path: str, url: str, cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """A shard's (offsets, sizes): from the index ``loca shards`` wrote beside it, else from this machine's cache of
    indexes (keyed by URL, size and mtime: a changed file is indexed again), else read from its headers and cached.

    Reading the headers costs a small read per member; every worker of every rank would do it for every shard it
    touches, so it is done once per machine.
    """
    stat = os.stat(path)
    beside = index_path(path)
    # Memory-mapped, and only views of it are kept: the page cache holds one copy for all the workers and ranks of a
    # machine (16 bytes a sample: 224 MB for ImageNet-21k, which per-process copies would multiply by ~100).
    if os.path.exists(beside) and os.stat(beside).st_mtime_ns >= stat.st_mtime_ns:
        table = np.load(beside, mmap_mode="r")
    else:
        key = hashlib.sha256(f"{url}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
        cached = os.path.join(cache_dir, "index", f"{key}.npy")
        if not os.path.exists(cached):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            save_index(cached, *index_shard(path))
        table = np.load(cached, mmap_mode="r")
    whole = int(np.cumprod(table[:, 0] + table[:, 1] <= stat.st_size).sum())  # a truncated shard: up to its end
    return table[:whole, 0], table[:whole, 1]


class ShardSamples:
    """Images of a shard set by global sample index; what each process opens and indexes, it keeps to itself.

    ``counts`` are the expected samples per shard (they fix the dataset's length and so every rank's step count).
    A shard that turns out to hold fewer (truncated, unreadable) is named once per process and its missing samples
    fail to read: the dataset replaces them deterministically (:meth:`next_candidate`).
    """

    def __init__(self, urls: Sequence[str], counts: Sequence[int], cache_dir: str) -> None:
        if len(urls) != len(counts):
            raise ValueError(f"{len(urls)} shards but {len(counts)} sample counts")
        self.urls = list(urls)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.cache_dir = cache_dir
        self._state: dict[str, Any] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers start with nothing open
        return {**self.__dict__, "_state": {}}

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, sample within the shard) of global sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])

    def name(self, index: int) -> str:
        """``URL[sample k]``: how warnings name a sample."""
        shard, k = self.locate(index)
        return f"{self.urls[shard]}[sample {k}]"

    def _shard(self, shard: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(open fd, offsets, sizes) of a shard, fetched and indexed on first use in this process."""
        state = self._state
        if state.get("pid") != os.getpid():  # a forked worker must not use its parent's descriptors' LRU
            state.clear()
            state.update(pid=os.getpid(), open=OrderedDict(), index={})
        opened: OrderedDict = state["open"]
        if shard in opened:
            opened.move_to_end(shard)
            return opened[shard]
        url, path = self.urls[shard], None
        if shard not in state["index"]:
            try:
                path = shard_io.fetch(url, self.cache_dir)
                offsets, sizes = load_index(path, url, self.cache_dir)
            except (OSError, tarfile.TarError) as error:
                log.error("shard %s cannot be read (%s): its %d samples are replaced", url, error, self.counts[shard])
                offsets, sizes = np.zeros(0, np.int64), np.zeros(0, np.int64)
            if len(offsets) < self.counts[shard]:
                log.error(
                    "shard %s holds %d of its %d samples (truncated?): the missing ones are replaced",
                    url,
                    len(offsets),
                    self.counts[shard],
                )
            state["index"][shard] = offsets, sizes
        offsets, sizes = state["index"][shard]
        if len(offsets) == 0:
            return -1, offsets, sizes
        if len(opened) >= OPEN_SHARDS:
            os.close(opened.popitem(last=False)[1][0])
        opened[shard] = (os.open(path or shard_io.fetch(url, self.cache_dir), os.O_RDONLY), offsets, sizes)
        return opened[shard]

    def missing(self, index: int) -> bool:
        """True when sample ``index`` is past what its shard holds (known only once this process indexed it)."""
        shard, k = self.locate(index)
        index_ = self._state.get("index", {}).get(shard)
        return index_ is not None and k >= len(index_[0])

    def read(self, index: int) -> np.ndarray:
        """The image of sample ``index``, RGB uint8 ``[H, W, 3]``; raises when it is missing or cannot be decoded."""
        return decode_image(np.frombuffer(self.read_bytes(index), dtype=np.uint8), self.name(index))

    def read_bytes(self, index: int) -> bytes:
        """The encoded image of sample ``index`` as stored in its shard; raises OSError when it is missing."""
        shard, k = self.locate(index)
        fd, offsets, sizes = self._shard(shard)
        if k >= len(offsets):
            raise OSError(f"shard {self.urls[shard]} has no sample {k} (it holds {len(offsets)})")
        if offsets[k] < 0:
            raise ValueError(f"sample {k} of {self.urls[shard]} has no {'/'.join(SHARD_IMAGE_EXTENSIONS)} member")
        data = os.pread(fd, int(sizes[k]), int(offsets[k]))
        if len(data) != sizes[k]:
            raise OSError(f"shard {self.urls[shard]} ends inside sample {k}")
        return data

    def next_candidate(self, index: int) -> int:
        """The sample tried after ``index`` failed: the next one, or the next shard's first when ``index``'s shard
        ends before it (all the following ones of that shard are missing too). A function of the files only."""
        if self.missing(index):
            shard, _ = self.locate(index)
            return int(self.starts[shard + 1]) % len(self)
        return (index + 1) % len(self)


def open_shards(spec: str | Sequence[str], cache_dir: str | None = None) -> ShardSamples:
    """Expand, check (every shard reachable and whole, else one error naming them) and count a shard set."""
    urls = expand_shards(spec)
    cache_dir = cache_dir or shard_io.default_cache_dir()
    shard_io.check_shards(urls)
    counts = sample_counts(urls, cache_dir)
    samples = ShardSamples(urls, counts, cache_dir)
    if len(samples) == 0:
        raise ValueError(f"the shards {urls[0]} ... hold no samples")
    return samples

"""Where tar shards live: local paths, ``file://``, ``http(s)://``, ``pipe:COMMAND`` and, through fsspec, object stores.

Shards are read by member offset (map-style), so a remote shard is fetched whole into a local cache once per machine
(``python -m http.server`` and many object-store gateways serve no byte ranges) and read from there. Workers and
ranks on one machine share the cache: a file lock makes one of them fetch while the others wait, and a fetched shard
is renamed into place only when complete, so a killed fetch never leaves half a shard behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

TAR_BLOCK = 512  # every tar file is a whole number of 512-byte blocks: a shard of another size is truncated
HTTP_TIMEOUT_S = 60


def default_cache_dir() -> str:
    """``$LOCA_SHARD_CACHE``, else ``~/.cache/loca/shards``: where remote shards are fetched to."""
    return os.environ.get("LOCA_SHARD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loca", "shards")


def is_local(url: str) -> bool:
    """A path or a ``file://`` URL: read in place, never copied."""
    return "://" not in url and not url.startswith("pipe:") or url.startswith("file://")


def local_path(url: str) -> str:
    """The file-system path of a local shard (``file://`` stripped)."""
    return urlparse(url).path if url.startswith("file://") else url


def cached_path(url: str, cache_dir: str) -> str:
    """Where a remote shard is cached: a hash of its URL (two sets may share file names) plus its file name."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = os.path.basename(urlparse(url[5:] if url.startswith("pipe:") else url).path) or "shard.tar"
    return os.path.join(cache_dir, f"{digest}-{name}")


def open_stream(url: str):
    """A readable binary stream of ``url`` (remote or local); the caller closes it."""
    if is_local(url):
        return open(local_path(url), "rb")
    if url.startswith("pipe:"):  # the command writes the shard to its stdout, as in WebDataset's pipe: URLs
        process = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)
        return _PipeStream(process, url)
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
    import fsspec  # s3://, gs://, ... with the matching fsspec backend installed (s3fs, gcsfs); untested here

    return fsspec.open(url, "rb").open()


class _PipeStream:
    """A ``pipe:`` command's stdout; closing it checks the command's exit status."""

    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.process, self.url = process, url

    def read(self, size: int = -1) -> bytes:
        return self.process.stdout.read(size)

    def close(self) -> None:
        self.process.stdout.close()
        if self.process.wait() != 0:
            raise OSError(f"shard command {self.url!r} exited with status {self.process.returncode}")

    def __enter__(self) -> _PipeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch(url: str, cache_dir: str) -> str:
    """The local path of shard ``url``: itself when local, else its cached copy, fetched whole if not there yet."""
    if is_local(url):
        return local_path(url)
    target = cached_path(url, cache_dir)
    if os.path.exists(target):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker or rank of this machine may be fetching it
        if not os.path.exists(target):
            handle, partial = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".partial", dir=cache_dir)
            try:
                with os.fdopen(handle, "wb") as out, open_stream(url) as stream:
                    shutil.copyfileobj(stream, out, 1 << 20)
                os.replace(partial, target)
            except BaseException:
                os.unlink(partial)
                raise
    return target


def read_small(url: str) -> bytes | None:
    """The bytes of a small file (an ``_info.json``) beside the shards, or None when there is none."""
    try:
        with open_stream(url) as stream:
            return stream.read()
    except (FileNotFoundError, urllib.error.HTTPError):
        return None


def shard_size(url: str) -> int | None:
    """The size in bytes of shard ``url`` (None for ``pipe:``, which cannot tell without running its command).

    Raises OSError with the URL and the reason when the shard cannot be reached.
    """
    if is_local(url):
        return os.stat(local_path(url)).st_size
    if url.startswith("pipe:"):
        return None
    if urlparse(url).scheme not in ("http", "https"):
        import fsspec

        try:
            filesystem, path = fsspec.core.url_to_fs(url)
            return int(filesystem.size(path))
        except Exception as error:  # fsspec backends raise their own types (and ImportError without the backend)
            raise OSError(f"{type(error).__name__}: {error}") from error
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
    except (urllib.error.URLError, OSError) as error:
        raise OSError(f"{getattr(error, 'reason', error)}") from error
    return int(length) if length is not None else None


def check_shards(urls: list[str], threads: int = 16) -> None:
    """Stop with one message naming every shard that cannot be reached or whose size is not whole tar blocks.

    One stat and one read of the last 1 KB (local), a HEAD request (http) or an fsspec ``size`` per shard, in
    parallel: start-up grows
    with the number of shards.
    """

    def problem(url: str) -> str | None:
        try:
            size = shard_size(url)
        except OSError as error:
            return f"{url} (cannot be reached: {getattr(error, 'strerror', None) or error})"
        if size is not None and (size == 0 or size % TAR_BLOCK):
            return f"{url} ({size} bytes, not a whole number of {TAR_BLOCK}-byte tar blocks: truncated)"
        if is_local(url) and not _ends_like_a_tar(local_path(url), size):
            return f"{url} (no end-of-archive blocks: truncated)"
        return None

    with ThreadPoolExecutor(min(threads, max(1, len(urls)))) as pool:
        bad = [p for p in pool.map(problem, urls) if p is not None]
    if bad:
        listed = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"{len(bad)} of {len(urls)} shards are unusable: {listed}. Fix or replace them, or leave them out of "
            "data.init_args.shards (the run stops rather than train on a different set of samples)"
        )


def _ends_like_a_tar(path: str, size: int) -> bool:
    """A complete tar file ends with two zero blocks (tarfile and GNU tar pad further); a cut one ends in data."""
    if size < 2 * TAR_BLOCK:
        return False
    with open(path, "rb") as handle:
        return not any(os.pread(handle.fileno(), 2 * TAR_BLOCK, size - 2 * TAR_BLOCK))


def shard_dir(url: str) -> str:
    """The folder (or URL prefix) of a shard, where an ``_info.json`` would be."""
    if is_local(url):
        return str(Path(local_path(url)).parent)
    return url.rsplit("/", 1)[0]

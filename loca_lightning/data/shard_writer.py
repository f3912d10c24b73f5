"""``loca shards SRC OUT``: pack a folder tree or a path list of images into WebDataset tar shards.

The image files are stored byte for byte (no decoding: a bad file stays bad and is skipped at training time), in the
sorted order of the folder listing or the order of the list, under keys ``000000000`` ... with a ``.json`` member that
records the original relative path. The tar headers carry no time, owner or permissions of the machine, so the same
input always gives the same bytes. Beside the shards goes an ``_info.json`` in timm's format (``shard_lengths``): the
reader takes sample counts from it without opening the shards. OUT is written as ``OUT.partial`` and renamed when
complete; an existing OUT is never touched. Each shard gets its member index (``NAME.idx.npy``, 16 bytes a sample):
a reader then needs one small read per shard instead of one per member.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from loca_lightning.data.images import check_nonempty, list_images, read_path_list
from loca_lightning.data.shards import index_path, index_shard, save_index


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o444, 0, 0, "", ""
    return info, io.BytesIO(data)


def shard_name(prefix: str, index: int) -> str:
    """The file name of shard ``index``."""
    return f"{prefix}-{index:06d}.tar"


def write_shards(
    paths: Sequence[Path],
    out: str | os.PathLike,
    shard_size: int = 1000,
    prefix: str = "train",
    root: Path | None = None,
) -> list[Path]:
    """Write ``paths`` as shards of ``shard_size`` images (the last may be smaller) plus ``_info.json`` into the new
    folder ``out``; return the shard paths. ``root`` makes the recorded original paths relative."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: loca shards never overwrites; choose a new OUT or remove it")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # what a killed earlier run left: never read as a shard set, safe to start again
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    names, lengths = [], []
    for shard, start in enumerate(range(0, len(paths), shard_size)):
        names.append(shard_name(prefix, shard))
        chunk = paths[start : start + shard_size]
        lengths.append(len(chunk))
        with tarfile.open(partial / names[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, path in enumerate(chunk, start):
                key = f"{i:09d}"
                ext = path.suffix.lower().lstrip(".") or "jpg"
                original = str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else str(path)
                tar.addfile(*_member(f"{key}.{ext}", path.read_bytes()))
                tar.addfile(*_member(f"{key}.json", json.dumps({"path": original}).encode()))
        save_index(index_path(str(partial / names[-1])), *index_shard(str(partial / names[-1])))
    info = {
        "name": out.name,
        "splits": {
            prefix: {"name": prefix, "num_samples": len(paths), "filenames": names, "shard_lengths": lengths},
        },
    }
    (partial / "_info.json").write_text(json.dumps(info, indent=1) + "\n")
    partial.rename(out)
    return [out / name for name in names]


def shards_pattern(shards: Sequence[Path]) -> str:
    """A brace pattern naming ``shards`` (as written by :func:`write_shards`)."""
    first, last = shards[0], shards[-1]
    if len(shards) == 1:
        return str(first)
    prefix = first.name.rsplit("-", 1)[0]
    return str(first.parent / f"{prefix}-{{{first.stem[-6:]}..{last.stem[-6:]}}}.tar")


def shards_main(argv: Sequence[str]) -> None:
    """``loca shards SRC OUT [--shard-size N] [--prefix NAME]``."""
    parser = argparse.ArgumentParser(
        prog="loca shards",
        description="Pack the images of a folder tree or a path list (a .txt file) into WebDataset tar shards with an "
        "_info.json of sample counts. Deterministic; never overwrites OUT.",
    )
    parser.add_argument("src", help="a folder of images (searched recursively) or a text file of image paths")
    parser.add_argument("out", help="the new folder to write the shards into (must not exist)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--prefix", default="train", help="shard file names: PREFIX-000000.tar ... (default train)")
    args = parser.parse_args(list(argv))
    src = Path(args.src)
    try:
        if src.is_dir():
            paths, root = list_images(src), src
        else:
            paths, root = read_path_list(src), src.parent
        check_nonempty(paths, str(src))
        shards = write_shards(paths, args.out, args.shard_size, args.prefix, root)
    except (OSError, ValueError) as error:
        print(f"loca shards: error: {error}", file=sys.stderr)
        sys.exit(2)
    pattern = shards_pattern([s.absolute() for s in shards])
    print(f"wrote {len(paths)} images in {len(shards)} shards to {args.out}; train from them with a pretraining config")
    print("(CONFIG: e.g. pretrain.yaml of the repository's configs folder):")
    print(f"  loca fit --config CONFIG --data.init_args.shards={shlex.quote(pattern)}")

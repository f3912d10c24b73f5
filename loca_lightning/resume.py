"""Which checkpoint a resume uses: ``--ckpt_path last`` (and a requeued SLURM job) takes the run's newest *good*
checkpoint by global step, in the run's own folder; a fresh start is never silent.

- candidates: every ``*.ckpt`` in the run's checkpoint folder (``last.ckpt``, ``hpc_ckpt_<n>.ckpt``, periodic ones;
  files, or folders of shards with Lightning's ``meta.pt``), never the atomic writer's temporary files
  (``.<name>.<random>.tmp``) nor ``nonfinite-step<n>.ckpt`` (a state that leads into a non-finite loss);
- "newest" is the highest ``global_step`` stored inside, not the name or the time (ties: the later file);
- a candidate that does not load (truncated by a full disk or a node lost mid-write) is named and passed over;
- with a versioned logger (TensorBoard, CSV; the shipped configs), the run is the highest ``version_<n>`` that holds
  a checkpoint, and the resumed run logs into that same folder instead of opening a new version.

Each file is opened with ``torch.load(mmap=True, weights_only=True)``: the zip index and the pickled metadata are
read, the tensors are not, so checking every candidate costs little even for large checkpoints.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from loca_lightning.weights_files import CheckpointFileError, read_weights_file

_VERSION = re.compile(r"version_(\d+)")


class ResumeError(Exception):
    """Nothing to resume, or an explicit checkpoint that does not load: the message is the one line to print."""


@dataclass(frozen=True)
class Candidate:
    """A checkpoint that loads, with the global step stored inside it."""

    path: str
    global_step: int


def checkpoint_step(path: str | os.PathLike) -> int:
    """The ``global_step`` stored in a checkpoint file or sharded checkpoint folder; raises when it does not load."""
    path = Path(path)
    if path.is_dir():  # Lightning's sharded checkpoints (FSDP, ModelParallelStrategy): metadata in meta.pt
        path = path / "meta.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(checkpoint, dict) or "global_step" not in checkpoint:
        raise ValueError("not a Lightning checkpoint (no global_step)")
    return int(checkpoint["global_step"])


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def _say(message: str) -> None:
    if rank_zero_only.rank == 0:
        print(f"loca: {message}", file=sys.stderr, flush=True)


def newest_good_checkpoint(folder: str | os.PathLike) -> Candidate | None:
    """The checkpoint in ``folder`` with the highest global step that loads; each one that does not is named."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    good: list[tuple[int, float, str]] = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name.startswith(".") or not name.endswith(".ckpt") or name.startswith("nonfinite-"):
            continue
        try:
            good.append((checkpoint_step(entry), entry.stat().st_mtime, str(entry)))
        except Exception as error:  # any failure to read it: truncated zip, empty file, missing meta.pt, ...
            _say(f"skipping checkpoint {entry}: it does not load ({_describe(error)})")
    if not good:
        return None
    step, _, path = max(good)
    return Candidate(path, step)


def versioned_logger(trainer: L.Trainer) -> Any | None:
    """The trainer's only logger when it keeps runs in ``<save_dir>/<name>/version_<n>`` folders, else None."""
    if len(trainer.loggers) != 1:
        return None
    logger = trainer.loggers[0]
    if not all(hasattr(logger, attr) for attr in ("_version", "save_dir", "name")) or logger.save_dir is None:
        return None
    return logger


def _version_folder(version: Any) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def resolve_last(trainer: L.Trainer) -> tuple[Candidate | None, str]:
    """The run ``--ckpt_path last`` continues: its newest good checkpoint (None when there is none) and the folder
    searched. With a versioned logger whose version is unset, the logger is pointed at that run's version folder."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    logger = versioned_logger(trainer)
    if dirpath is not None or logger is None:
        folder = dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
        return newest_good_checkpoint(folder), folder
    root = os.path.join(logger.save_dir, str(logger.name))
    if logger._version is not None:  # the config names the version: that run
        folder = os.path.join(root, _version_folder(logger._version), "checkpoints")
        return newest_good_checkpoint(folder), folder
    versions = []
    if os.path.isdir(root):
        versions = sorted((int(m.group(1)) for m in map(_VERSION.fullmatch, os.listdir(root)) if m), reverse=True)
    for version in versions:  # the newest run that has a checkpoint
        folder = os.path.join(root, f"version_{version}", "checkpoints")
        found = newest_good_checkpoint(folder)
        if found is not None:
            # Continue logging in that run's folder (the logger creates its folder lazily, so nothing is written yet);
            # ModelCheckpoint derives its folder from the same version.
            logger._version = version
            return found, folder
    return None, os.path.join(root, "version_<n>", "checkpoints")


def is_slurm_requeue() -> bool:
    """True in a SLURM job that was requeued (``SLURM_RESTART_COUNT`` >= 1): it resumes without ``--ckpt_path``."""
    try:
        return bool(os.environ.get("SLURM_JOB_ID")) and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def resolve_ckpt_path(trainer: L.Trainer, ckpt_path: Any) -> Any:
    """The checkpoint ``loca fit`` resumes from: ``"last"`` -> the run's newest good checkpoint (:class:`ResumeError`
    when there is none); None in a requeued SLURM job -> the same, or a fresh start said in one line; an explicit file
    must load (:class:`ResumeError` naming it). Anything else (``"hpc"``, ``"best"``, a remote path) is Lightning's."""
    if ckpt_path == "last" or (ckpt_path is None and is_slurm_requeue()):
        found, folder = resolve_last(trainer)
        if found is None:
            if ckpt_path is None:
                _say(f"requeued SLURM job: no checkpoint in {folder}; starting from step 0")
                return None
            raise ResumeError(f"--ckpt_path last: no checkpoint to resume in {folder}")
        _say(f"resuming from {found.path} (global step {found.global_step})")
        return found.path
    check_ckpt_path(ckpt_path)
    return ckpt_path


def check_ckpt_path(ckpt_path: Any) -> None:
    """Raise :class:`ResumeError` naming ``ckpt_path`` when it is a local path that does not exist or a checkpoint that
    does not load; Lightning's own names (``last``, ``best``, ``hpc``, ``registry...``) and URLs pass."""
    if not isinstance(ckpt_path, (str, os.PathLike)) or "://" in str(ckpt_path):
        return
    if str(ckpt_path) in ("last", "best", "hpc") or str(ckpt_path).startswith("registry"):
        return
    if not os.path.exists(ckpt_path):
        raise ResumeError(f"--ckpt_path {str(ckpt_path)!r} does not exist")
    try:
        checkpoint_step(ckpt_path)
    except Exception as error:
        raise ResumeError(
            f"--ckpt_path {ckpt_path}: the checkpoint does not load ({_what_it_is(ckpt_path, error)})"
        ) from None


def _what_it_is(path: str | os.PathLike, error: BaseException) -> str:
    """What a file that does not load as a checkpoint is (a text file, an image, ...), else the error in short."""
    if os.path.isfile(path):
        try:
            read_weights_file(path)
        except CheckpointFileError as described:
            return str(described)
        except Exception:
            pass
    return _describe(error)

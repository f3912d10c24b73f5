"""A run's own Lightning checkpoints: atomic writes and hyperparameter diffs on load (random-number state:
``loca_lightning.rng``). Reading weight files is :mod:`loca_lightning.weights_files`; fitting their weights to a model
is :mod:`loca_lightning.backbones.loading`."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the target folder, then renames it over the target.

    A crash or a full disk mid-write leaves the previous file (e.g. ``last.ckpt``) whole: ``os.replace`` within one
    folder is atomic on POSIX filesystems. Remote paths (``s3://``...) fall back to Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically (local filesystems)."""
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(path)
        get_filesystem(str(target)).makedirs(str(target.parent), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def hparam_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between a checkpoint's hyperparameters and the current ones: ``key: (old, new)``.

    A key present on one side only is reported with ``"<absent>"`` on the other.
    """
    missing = "<absent>"
    out = {}
    for key in sorted(set(saved) | set(current), key=str):
        old, new = saved.get(key, missing), current.get(key, missing)
        try:
            same = bool(old == new)
        except Exception:  # tensors or arrays: compare their text
            same = repr(old) == repr(new)
        if not same:
            out[key] = (old, new)
    return out


def warn_hparam_changes(checkpoint: Mapping[str, Any], current: Mapping[str, Any], what: str) -> dict[str, tuple]:
    """Warn (once, listing ``key: old -> new``) when ``checkpoint`` was trained with other hyperparameters."""
    saved = checkpoint.get("hyper_parameters")
    if not isinstance(saved, Mapping):
        return {}
    diff = hparam_differences(saved, current)
    if diff:
        lines = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in diff.items())
        message = f"loading a {what} checkpoint trained with other hyperparameters: {lines}"
        warnings.warn(message, UserWarning, stacklevel=2)
    return diff


def detach_weights_source(checkpoint: dict[str, Any], key: str) -> None:
    """Move the hyperparameter ``key`` (the file a run's weights started from) to ``checkpoint[key + "_source"]``.

    The checkpoint holds the weights: restoring it (``load_from_checkpoint``, ``--ckpt_path``) must neither need nor
    re-read that file, which may be gone. Its path is kept for the record.
    """
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and hparams.get(key):
        checkpoint[f"{key}_source"], hparams[key] = hparams[key], None


def warn_loaded_hparam_changes(checkpoint: Mapping[str, Any], current: Mapping[str, Any], key: str, what: str) -> None:
    """:func:`warn_hparam_changes` for a checkpoint saved with :func:`detach_weights_source` (``key`` compared as it
    was, and not at all when ``current[key]`` is None: the weights are then the checkpoint's own)."""
    saved, current = dict(checkpoint.get("hyper_parameters") or {}), dict(current)
    if checkpoint.get(f"{key}_source"):
        saved[key] = checkpoint[f"{key}_source"]
    if current.get(key) is None:
        saved.pop(key, None), current.pop(key, None)
    warn_hparam_changes({"hyper_parameters": saved}, current, what)

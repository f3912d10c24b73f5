"""Weight files: reading them safely, saying what a file is when it is not one, and what a checkpoint holds (the
backbone's state dict, the activation it was trained with).

Files are loaded with ``torch.load(..., weights_only=True)``: weights are data, not code. When that fails, the file is
examined without running anything it holds (magic bytes, the zip directory, the pickle's opcodes) so that the error
names the actual problem: another format (an image, HDF5, msgpack, numpy, text), an empty or truncated file, a zip
that is no PyTorch checkpoint, or a checkpoint that stores Python objects next to its tensors. Only the last case can
be loaded anyway, and only by full unpickling (``trust=True``), which is suggested when the file holds tensors.

Fitting the weights to a model is :mod:`loca_lightning.backbones.loading`; a run's own Lightning checkpoints (atomic
writes, hyperparameter diffs on resume) are :mod:`loca_lightning.checkpointing`.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

# Magic bytes of formats people hand to a weights loader by mistake.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras / TensorFlow weights?)"),
    (b"\x93NUMPY", "a numpy .npy array"),
    (b"\x1f\x8b", "a gzip-compressed file (unpack it first)"),
    (b"%PDF", "a PDF document"),
)
_LIGHTNING_KEY = "pytorch-lightning_version"  # in every Lightning checkpoint
LIGHTNING_KEYS = (_LIGHTNING_KEY, "state_dict")


class CheckpointFileError(ValueError):
    """A file that cannot be read as a weights/checkpoint file; the message names the file and what it is instead."""


class UntrustedCheckpointError(CheckpointFileError):
    """A checkpoint that stores Python objects only full unpickling (``trust=True``) restores."""


def read_weights_file(path: str | os.PathLike, trust: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` (``.safetensors`` through safetensors); full unpickling with
    ``trust=True`` where the file needs it. Errors name the file and what it is."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointFileError(
            f"{str(path)!r} is a folder, not a checkpoint file: a sharded (distributed) checkpoint? Consolidate it "
            f"into one file first: python -m lightning.pytorch.utilities.consolidate_checkpoint '{path}'"
        )
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    kind = sniff(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if kind not in ("zip", "pickle"):
        raise CheckpointFileError(f"{str(path)!r} is not a PyTorch checkpoint: it is {kind}")
    if kind == "zip":
        _check_zip(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        scan = _scan(path, kind)
        if not scan.complete:
            raise CheckpointFileError(
                f"{str(path)!r} is a truncated or damaged checkpoint: its pickled data ends before its end marker "
                f"({path.stat().st_size} bytes; was the copy or download cut short?)"
            ) from error
        if not isinstance(error, pickle.UnpicklingError):
            raise CheckpointFileError(f"{str(path)!r} is a damaged checkpoint: {error}") from error
        if trust and scan.tensors:
            return torch.load(path, map_location="cpu", weights_only=False)
        raise _untrusted(path, scan, error) from error


def sniff(path: str | os.PathLike) -> str:
    """``"zip"`` (torch.save's format), ``"pickle"`` (torch's legacy format), ``"safetensors"``, or a description of
    what else the file is (``"a PNG image"``, ``"empty (0 bytes)"``, ...), from its first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head:
        return "empty (0 bytes)"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    if 0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF):
        return "msgpack data (a flax / JAX checkpoint?)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"of an unknown format (first bytes {head[:16].hex(' ')})"
    if "\x00" not in text:
        return f"a text file (it starts with {text.splitlines()[0][:40]!r})"
    return f"of an unknown format (first bytes {head[:16].hex(' ')})"


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as error:
        raise CheckpointFileError(
            f"{str(path)!r} is a truncated or damaged checkpoint: its zip directory (at the end of the file) is missing "
            f"or unreadable ({path.stat().st_size} bytes; was the copy or download cut short?)"
        ) from error
    if not any(name.endswith("data.pkl") for name in names):
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        what = "a numpy .npz archive" if names and all(n.endswith(".npy") for n in names) else "a zip archive"
        raise CheckpointFileError(f"{str(path)!r} is not a PyTorch checkpoint: it is {what} (holding {shown})")


class _Scan:
    """What a pickle references, read opcode by opcode (nothing is executed)."""

    def __init__(self) -> None:
        self.globals: set[str] = set()
        self.strings: set[str] = set()
        self.tensors = False
        self.complete = True


def _scan(path: Path, kind: str) -> _Scan:
    scan = _Scan()
    if kind == "zip":
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            _scan_pickle(io.BytesIO(archive.read(name)), scan)
        scan.tensors = scan.tensors or any(n.split("/")[-2:-1] == ["data"] for n in archive.namelist())
        return scan
    with open(path, "rb") as handle:  # legacy format: magic number, protocol, system info, then the object
        for _ in range(4):
            if not _scan_pickle(handle, scan):
                break
    return scan


def _scan_pickle(stream: IO[bytes], scan: _Scan) -> bool:
    recent: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name in ("GLOBAL", "INST"):  # "module name"; protocol 2 spells Python 3's builtins __builtin__
                scan.globals.add(str(arg).replace("__builtin__ ", "builtins ").replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(recent) >= 2:
                scan.globals.add(f"{recent[-2]}.{recent[-1]}")
            elif opcode.name in ("BINPERSID", "PERSID"):
                scan.tensors = True  # storages are persistent ids in torch's pickles
            if isinstance(arg, str):
                recent = recent[-1:] + [arg]
                if len(scan.strings) < 10_000:
                    scan.strings.add(arg)
    except ValueError:  # "pickle exhausted before seeing STOP", or not a pickle at all
        scan.complete = False
        return False
    scan.tensors = scan.tensors or any(g.startswith("torch._utils._rebuild") for g in scan.globals)
    return True


def _untrusted(path: Path, scan: _Scan, error: Exception) -> CheckpointFileError:
    named = set(re.findall(r"GLOBAL ([\w.]+)", str(error)))  # what torch refused, sometimes without its module
    refused = sorted({g for g in scan.globals if any(g == n or g.endswith("." + n) for n in named)} or named) or sorted(
        g for g in scan.globals if not g.startswith(("torch.", "collections.", "builtins.", "_codecs."))
    )
    objects = ", ".join(refused[:5]) or "objects torch does not allow"
    if not scan.tensors:
        return CheckpointFileError(
            f"{str(path)!r} is not a checkpoint: it is a pickle of Python objects ({objects}) without any tensor"
        )
    what = "a Lightning checkpoint" if _LIGHTNING_KEY in scan.strings else "a weights file (not a Lightning checkpoint)"
    return UntrustedCheckpointError(
        f"{str(path)!r} is {what} that stores Python objects next to its tensors ({objects}); "
        "torch.load(weights_only=True) refuses them because unpickling them can run code stored in the file. Only if "
        "you made this file yourself: pass trust=True (loca export: --trust; config: model.init_args.trust_checkpoint: true)."
    )


def is_lightning_checkpoint(checkpoint: Any) -> bool:
    """Whether a loaded object looks like a Lightning checkpoint (its version key and a state dict)."""
    return isinstance(checkpoint, Mapping) and all(key in checkpoint for key in LIGHTNING_KEYS)


# Where the backbone lives inside a LOCAPretrainModule / SegmentationFinetuneModule state dict.
BACKBONE_PREFIXES: dict[str, tuple[str, ...]] = {
    "teacher": ("teacher.backbone.", "teacher_backbone."),
    "student": ("student.backbone.", "student_backbone."),
}
FINETUNED_PREFIX = "backbone."  # a finetuned model's only backbone: what either choice means in its checkpoint


def load_weights_file(path: str | os.PathLike, trust: bool = False) -> Mapping[str, Any]:
    """Load a checkpoint or state-dict file safely (``weights_only=True``); ``trust=True`` allows full unpickling.

    A file that is not one (an image, a truncated download, another framework's format) raises
    :class:`CheckpointFileError` naming what it is.
    """
    checkpoint = read_weights_file(path, trust=trust)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFileError(
            f"{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint or state dict (a mapping of names to tensors)"
        )
    return checkpoint


def extract_backbone_state_dict(
    checkpoint: Mapping[str, Any], which: str = "teacher", key: str = "which"
) -> dict[str, Tensor]:
    """The backbone's state dict from a LOCA checkpoint (its ``which`` backbone), a finetuned checkpoint (its only
    backbone, whichever ``which``), a ``{"state_dict"|"model": ...}`` wrapper, or a plain timm-format state dict
    (returned as is). ``key`` names the setting that chose ``which``, for the messages."""
    if which not in BACKBONE_PREFIXES:
        raise ValueError(f"{key} must be one of {sorted(BACKBONE_PREFIXES)}, got {which!r}")
    state = checkpoint
    for wrapper in ("state_dict", "model", "module"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    for prefix in (*BACKBONE_PREFIXES[which], FINETUNED_PREFIX):
        found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if found and (prefix != FINETUNED_PREFIX or which == "student" or not _has(state, "student")):
            return found
    if which == "teacher" and _has(state, "student"):
        raise KeyError(f"the checkpoint has no teacher weights, only a student's: set {key} to 'student'")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _has(state: Mapping[str, Any], which: str) -> bool:
    """Whether ``state`` holds a backbone under one of ``which``'s prefixes."""
    return any(str(k).startswith(BACKBONE_PREFIXES[which]) for k in state)


def _activation_name(act_layer: Any) -> str:
    """A comparable name: unset (``None``) and ``"gelu"`` are both the exact GELU of timm's default."""
    if act_layer is None:
        return "gelu"
    return act_layer if isinstance(act_layer, str) else getattr(act_layer, "__name__", str(act_layer))


def recorded_activation(path: str | os.PathLike, checkpoint: Mapping[str, Any]) -> tuple[bool, str | None]:
    """``(recorded, act_layer)``: the MLP activation a weights file was made with, where it says so.

    A loca-lightning checkpoint records it in ``hyper_parameters.backbone_kwargs.act_layer`` (absent: timm's exact
    GELU); a timm state dict written by ``loca export`` in its sibling ``<file>.json`` (``timm_kwargs.act_layer``).
    Any other file records nothing: ``(False, None)``.
    """
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, Mapping):
        return True, dict(hparams.get("backbone_kwargs") or {}).get("act_layer")
    sidecar = Path(path).with_name(Path(path).name + ".json")
    if sidecar.is_file():
        import json

        try:
            config = json.loads(sidecar.read_text())
        except ValueError as error:
            raise ValueError(f"{str(sidecar)!r} is not valid JSON ({error})") from error
        if isinstance(config, Mapping) and isinstance(config.get("timm_kwargs"), Mapping):
            return True, config["timm_kwargs"].get("act_layer")
    return False, None


def check_activation(
    act_layer: Any, path: str | os.PathLike, checkpoint: Mapping[str, Any], key: str, adopt: bool = True
) -> Any:
    """The activation to build with: the user's ``act_layer`` when set, else (``adopt``) the one ``checkpoint`` records.

    Raises ValueError naming both and the config ``key`` when they differ: the user set another one, or (``adopt=False``,
    the model is built already) left it unset while the checkpoint records another one.
    """
    recorded, theirs = recorded_activation(path, checkpoint)
    if not recorded or (act_layer is None and adopt):
        return theirs if recorded else act_layer
    if _activation_name(act_layer) != _activation_name(theirs):
        mine = repr(_activation_name(act_layer)) if act_layer is not None else "unset (exact GELU)"
        raise ValueError(
            f"{str(path)!r} was trained with act_layer {_activation_name(theirs)!r} but {key} is {mine}: "
            f"set {key}: {_activation_name(theirs)}"
        )
    return act_layer

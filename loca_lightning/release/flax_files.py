"""Reading flax's msgpack checkpoint files (what scenic's ``save_checkpoint`` writes) with plain ``msgpack``, no JAX.

Flax's format: one msgpack object, nested maps with string keys; an array is msgpack extension type 1 whose payload is
itself msgpack of ``(shape, dtype name, C-order bytes)``; type 3 is a numpy scalar in the same form, type 2 a complex
``(real, imag)``; an array above flax's chunk size is a map ``{"__msgpack_chunked_array__": True, "shape": {"0": ...},
"chunks": {"0": flat array, ...}}``. Lists and tuples of a state dict are maps with keys ``"0", "1", ...``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

_ARRAY, _COMPLEX, _SCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
_STEP_FILE = re.compile(r"checkpoint_(\d+)")
# Files an Orbax checkpoint folder holds (flax >= 0.7 saves through Orbax unless told otherwise).
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "commit_success.txt", "_sharding")


def _orbax_error(folder: Path) -> ReleaseFormatError:
    restore = f"ocp.PyTreeCheckpointer().restore({str(folder.resolve())!r})"
    return ReleaseFormatError(
        f"{str(folder)!r} is an Orbax checkpoint folder; loca import-release reads flax's msgpack checkpoint files. "
        'Convert it where JAX is installed: python -c "import flax, orbax.checkpoint as ocp; '
        f"open('checkpoint.msgpack', 'wb').write(flax.serialization.msgpack_serialize({restore}))\""
    )


class ReleaseFormatError(ValueError):
    """A file or tree that is not a readable LOCA release checkpoint; the message is one line naming the file."""


def _is_orbax_folder(folder: Path) -> bool:
    return any((folder / name).exists() for name in _ORBAX_MARKERS)


def resolve_checkpoint_file(source: str | os.PathLike) -> Path:
    """The msgpack file to read: ``source`` itself, or in a folder the flax ``checkpoint_<step>`` file of the newest
    step. An Orbax checkpoint (folder) is refused with the command that converts it."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    if path.is_file():
        return path
    if _is_orbax_folder(path):
        raise _orbax_error(path)
    steps = {}
    for child in path.iterdir():
        match = _STEP_FILE.fullmatch(child.name)
        if match:
            steps[int(match.group(1))] = child
    if not steps:
        raise ReleaseFormatError(f"{str(path)!r} holds no flax checkpoint file (named checkpoint_<step>)")
    newest = steps[max(steps)]
    if newest.is_dir():
        raise _orbax_error(newest)
    return newest


def _array_from_payload(payload: bytes) -> np.ndarray:
    import msgpack

    shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else str(dtype_name)
    if name == "bfloat16":  # numpy has no bfloat16: its bits are the top half of a float32
        bits = np.frombuffer(buffer, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(buffer, dtype=np.dtype(name)).reshape(shape)


class _CorruptLeaf(Exception):
    """An extension payload that does not decode (kept apart from msgpack's own ValueErrors)."""


def _ext_hook(code: int, payload: bytes) -> Any:
    import msgpack

    try:
        if code == _ARRAY:
            return _array_from_payload(payload)
        if code == _SCALAR:
            return _array_from_payload(payload)[()]
        if code == _COMPLEX:
            real, imag = msgpack.unpackb(payload)
            return complex(real, imag)
    except Exception as error:
        raise _CorruptLeaf(f"{type(error).__name__}: {error}") from None
    raise _CorruptLeaf(f"unknown msgpack extension type {code} (flax writes 1, 2 and 3)")


def _unchunk(tree: Any) -> Any:
    """Replace flax's chunked-array maps by the arrays they hold (recursively)."""
    if not isinstance(tree, dict):
        return tree
    if tree.get(_CHUNKED) is True:
        shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
        chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
        return np.concatenate([np.asarray(c).reshape(-1) for c in chunks]).reshape(shape)
    return {key: _unchunk(value) for key, value in tree.items()}


def read_flax_msgpack(path: str | os.PathLike) -> Any:
    """The state dict stored in a flax msgpack file: nested dicts with numpy array leaves."""
    try:
        import msgpack
    except ImportError as error:  # a declared dependency; a clear message if an environment lacks it
        raise ReleaseFormatError(
            "reading release checkpoints needs the 'msgpack' package: pip install msgpack"
        ) from error
    path = Path(path)
    data = path.read_bytes()
    if not data:
        raise ReleaseFormatError(f"{str(path)!r} is empty")
    if data[:4] == b"PK\x03\x04":
        raise ReleaseFormatError(
            f"{str(path)!r} is a zip file (a PyTorch checkpoint?), not a flax msgpack checkpoint; "
            "for loca-lightning checkpoints use `loca export`"
        )
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except _CorruptLeaf as error:
        raise ReleaseFormatError(f"{str(path)!r} holds an array that does not decode ({error})") from None
    except msgpack.ExtraData:
        raise ReleaseFormatError(f"{str(path)!r} is not a flax msgpack checkpoint (not one msgpack object)") from None
    except (msgpack.FormatError, msgpack.StackError, UnicodeDecodeError) as error:
        raise ReleaseFormatError(f"{str(path)!r} is not a flax msgpack checkpoint ({type(error).__name__})") from None
    except ValueError as error:  # msgpack says "incomplete input" when the data ends inside an object
        if "incomplete" in str(error):
            raise ReleaseFormatError(
                f"{str(path)!r} is truncated: its {len(data)} bytes end inside the msgpack data (copy it again)"
            ) from None
        raise ReleaseFormatError(f"{str(path)!r} is not a flax msgpack checkpoint ({error})") from None
    try:
        return _unchunk(tree)
    except (KeyError, ValueError, TypeError) as error:
        raise ReleaseFormatError(f"{str(path)!r} holds a corrupt chunked array ({error})") from None

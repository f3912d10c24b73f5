"""Robust reading of image and mask files, and listing of image folders.

Images are decoded with OpenCV (fast) and fall back to Pillow for what OpenCV cannot read. Every
image comes back as RGB uint8 ``[H, W, 3]`` whatever it was on disk (grayscale, RGBA, CMYK, 16-bit,
palette). Masks are read with Pillow so that palette PNGs give their indices, not their colours.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@functools.cache
def _opencv():
    """OpenCV, imported when an image is first decoded (listing files, e.g. ``loca shards --help``, needs none)."""
    import cv2

    # OpenCV's own threads fight with DataLoader workers; decoding is parallel across workers instead.
    cv2.setNumThreads(0)
    return cv2


class ImageReadError(RuntimeError):
    """An image or mask file that cannot be decoded; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")


def _to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Convert a decoded OpenCV array (gray, BGR, BGRA; 8 or 16 bit) to RGB uint8 [H, W, 3]."""
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {array.dtype}")
    cv2 = _opencv()
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    if array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` to RGB uint8 ``[H, W, 3]``; raise ImageReadError if it cannot be read."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise ImageReadError(path, f"{type(error).__name__}: {error}") from error
    return decode_image(data, path)


def decode_image(data: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Decode the bytes ``data`` of an image file to RGB uint8 ``[H, W, 3]``; errors name ``path``."""
    if data.size == 0:
        raise ImageReadError(path, "the file is empty (0 bytes)")
    cv2 = _opencv()
    # IMREAD_UNCHANGED keeps 16-bit depth so that we scale it ourselves; IMREAD_COLOR would clip.
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if decoded is not None and decoded.size > 0:
        if _is_truncated_jpeg(data):
            raise ImageReadError(path, "truncated JPEG (no end-of-image marker)")
        try:
            return _to_rgb_uint8(decoded)
        except (ValueError, cv2.error):  # e.g. float TIFFs, odd channel counts: let Pillow try below
            pass
    try:  # formats or variants OpenCV does not decode (e.g. some CMYK or exotic files)
        with Image.open(io.BytesIO(data.tobytes())) as image:
            image.load()
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except Exception as error:  # Pillow raises many types for bad data
        raise ImageReadError(path, f"not a decodable image ({type(error).__name__}: {error})") from error


def _is_truncated_jpeg(data: np.ndarray) -> bool:
    """True for a JPEG byte stream without its end-of-image marker (OpenCV decodes those silently)."""
    if data.size < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    tail = data[-64:].tobytes()
    return b"\xff\xd9" not in tail


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a label mask as an integer array ``[H, W]`` of its stored values (palette indices, not colours)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGB", "RGBA"):
                raise ImageReadError(path, f"a label mask must be single-channel (L, P or I), got mode {image.mode}")
            array = np.asarray(image)
    except ImageReadError:
        raise
    except Exception as error:
        raise ImageReadError(path, f"not a decodable mask ({type(error).__name__}: {error})") from error
    if array.ndim != 2:
        raise ImageReadError(path, f"a label mask must be 2-D, got shape {array.shape}")
    return array.astype(np.int64, copy=False) if array.dtype != np.uint8 else array


def list_images(root: str | os.PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """All image files under ``root`` (recursively, symlinks followed), sorted for determinism."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {str(root)!r} is not a directory")
    suffixes = {e.lower() for e in extensions}
    files = []
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        files.extend(Path(dirpath) / name for name in filenames if Path(name).suffix.lower() in suffixes)
    files.sort()
    return files


def read_path_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Path]:
    """Paths from a text file, one per line (blank lines and ``#`` comments skipped), relative to ``root``."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"path list {str(list_file)!r} does not exist")
    base = Path(root) if root is not None else list_file.parent
    paths: list[Path] = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line)
            paths.append(path if path.is_absolute() else base / path)
    return paths


def check_nonempty(paths: Sequence[Path], source: str) -> None:
    """Raise a clear error when a dataset source yields no files."""
    if len(paths) == 0:
        raise ValueError(f"no image files found in {source} (looked for {', '.join(IMAGE_EXTENSIONS)})")

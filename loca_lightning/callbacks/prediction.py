"""Writing ``loca predict`` results: one indexed-colour PNG per image (pixel values = class indices) and, on request,
an overlay of the image and its coloured prediction. Nothing is ever overwritten unless asked.

:class:`SegmentationPredictionWriter` consumes the ``predict_step`` outputs of
:class:`~loca_lightning.segmentation.module.SegmentationFinetuneModule`: ``{"masks": [H,W] class indices, "name",
"image_path"}``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from loca_lightning.data.classes import label_colormap
from loca_lightning.data.images import ImageReadError
from loca_lightning.visualize import blend, colorize

log = logging.getLogger(__name__)

_PALETTE_ENTRIES = 256  # an indexed PNG holds at most 256 colours


def mask_palette(palette: np.ndarray | Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """A full 256-entry palette ``uint8 [256, 3]``: the given class colours first, the VOC colour map after them."""
    full = label_colormap(_PALETTE_ENTRIES)  # [256, 3], deterministic
    if palette is None:
        return full
    given = np.asarray(palette)
    if given.ndim != 2 or given.shape[1] != 3:
        raise ValueError(f"palette must be [num_classes, 3] RGB rows, got shape {given.shape}")
    if given.min(initial=0) < 0 or given.max(initial=0) > 255:
        raise ValueError("palette colours must lie in [0, 255]")
    count = min(len(given), _PALETTE_ENTRIES)
    full[:count] = given[:count].astype(np.uint8)
    return full


def indexed_png(mask: np.ndarray, palette: np.ndarray) -> Image.Image:
    """Class indices ``[H, W]`` -> a mode "P" image whose pixel values are the indices, coloured by ``palette``.

    More than 256 classes do not fit a palette: those masks become 16-bit greyscale PNGs of the same indices.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W] class indices, got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 65535):
        raise ValueError(f"mask values must lie in [0, 65535], got [{mask.min()}, {mask.max()}]")
    if mask.size == 0 or mask.max() < _PALETTE_ENTRIES:
        image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))  # mode "L"
        image.putpalette(palette.astype(np.uint8).tobytes())  # an "L" image with a palette becomes "P", values kept
        return image
    return Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint16))


def overlay_image(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image and its blend with the coloured mask, side by side: RGB uint8 ``[H, 2W, 3]``."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} must have the same size")
    colours = colorize(np.minimum(mask, len(palette) - 1), palette, ignore_index=-1)  # every index has a colour
    return np.concatenate([image, blend(image, colours, alpha)], axis=1)


def _safe_name(name: str) -> str:
    """A relative output name; absolute paths and ``..`` would write outside the output folder."""
    parts = PurePosixPath(str(name).replace(os.sep, "/")).parts
    if not parts or str(name).startswith(("/", os.sep)) or ".." in parts:
        raise ValueError(f"prediction name {name!r} must be a relative path inside the output folder")
    return "/".join(parts)


class SegmentationPredictionWriter(BasePredictionWriter):
    """Write each predicted mask as ``<output_dir>/<name>.png`` (indexed colours, values = class indices), and with
    ``overlay=True`` also ``<output_dir>/overlay/<name>.jpg`` (image | blend). Existing files are an error unless
    ``overwrite=True``; all target paths are checked before anything is written. Inert outside ``predict``.

    Images that cannot be decoded (batches list them under ``"unreadable"``) are skipped with one warning line each,
    naming the file and the reason; at the end the writer prints how many masks it wrote and how many images it
    skipped (``num_written``, ``num_skipped``, summed over processes). ``skip_unreadable=False`` stops at the first.
    """

    def __init__(
        self,
        output_dir: str = "runs/predict",
        overlay: bool = False,
        overwrite: bool = False,
        alpha: float = 0.5,
        skip_unreadable: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.output_dir = Path(output_dir)
        self.overlay = overlay
        self.overwrite = overwrite
        self.alpha = alpha
        self.skip_unreadable = skip_unreadable
        self.palette = mask_palette()
        self._written: set[Path] = set()
        self.num_written = self.num_skipped = 0

    def targets(self, name: str) -> list[Path]:
        """The files written for the image called ``name``."""
        name = _safe_name(name)
        paths = [self.output_dir / f"{name}.png"]
        if self.overlay:
            paths.append(self.output_dir / "overlay" / f"{name}.jpg")
        return paths

    def _refuse_existing(self, paths: Sequence[Path]) -> None:
        if self.overwrite:
            return
        for path in paths:
            if path.exists():
                raise FileExistsError(
                    f"prediction file {str(path)!r} already exists; pass overwrite=True "
                    "(CLI: --prediction_writer.overwrite true) or choose another output_dir "
                    "(--prediction_writer.output_dir)"
                )

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Choose the palette and check every target path of the predict datasets before any file is written."""
        self._written = set()
        self.num_written = self.num_skipped = 0
        self._written_here = self._skipped_here = 0  # this process's counts
        palette = getattr(getattr(trainer, "datamodule", None), "palette", None)
        self.palette = mask_palette(palette)
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        paths: list[Path] = []
        for loader in loaders:
            names = getattr(getattr(loader, "dataset", None), "names", None)
            for name in names or ():  # datasets without names are checked file by file as they are written
                paths.extend(self.targets(name))
        duplicates = sorted(str(p) for p, n in Counter(paths).items() if n > 1)
        if duplicates:
            raise ValueError(f"several predict images would write the same file(s): {duplicates[:5]}")
        self._refuse_existing(paths)
        # Every rank has checked before any rank writes.
        trainer.strategy.barrier("prediction_writer_checked")

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Write the masks (and overlays) of one predicted batch; report the images it could not read."""
        for item in batch.get("unreadable", ()) if isinstance(batch, dict) else ():
            if not self.skip_unreadable:
                raise ImageReadError(item["image_path"], item["reason"])
            log.warning("skipped unreadable image %s: %s", item["image_path"], item["reason"])
            self._skipped_here += 1
        if not isinstance(prediction, dict) or not {"masks", "name"} <= set(prediction):
            raise ValueError(
                "SegmentationPredictionWriter needs predict_step to return {'masks': [...], 'name': [...], "
                f"'image_path': [...]}}, got {type(prediction).__name__}"
            )
        for index, (mask, name) in enumerate(zip(prediction["masks"], prediction["name"])):
            mask_np = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)  # [H, W]
            paths = self.targets(name)
            if any(p in self._written for p in paths):
                raise ValueError(f"two predict images are both named {name!r}; their files would collide")
            self._refuse_existing(paths)
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            self._save(indexed_png(mask_np, self.palette), paths[0], "PNG")
            if self.overlay:
                image = self._image_for(batch, prediction, index, mask_np.shape)
                paths[1].parent.mkdir(parents=True, exist_ok=True)
                blended = overlay_image(image, mask_np, self.palette, self.alpha)
                self._save(Image.fromarray(blended), paths[1], "JPEG", quality=92)
            self._written.update(paths)
            self._written_here += 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sum the counts over processes and print them (rank 0)."""
        local = torch.tensor([self._written_here, self._skipped_here], device=pl_module.device)
        written, skipped = (int(v) for v in trainer.strategy.reduce(local, reduce_op="sum"))
        self.num_written, self.num_skipped = written, skipped
        if trainer.is_global_zero:
            masks = f"{written} mask{'s' if written != 1 else ''}"
            images = f"{skipped} unreadable image{'s' if skipped != 1 else ''}"
            note = f"; skipped {images} (listed above)" if skipped else ""
            print(f"loca predict: wrote {masks} to {self.output_dir}{note}", flush=True)

    def _save(self, image: Image.Image, path: Path, fmt: str, **options: Any) -> None:
        # "x" mode fails if the file appeared since the check (another process), so even a race cannot overwrite.
        with open(path, "wb" if self.overwrite else "xb") as handle:
            image.save(handle, format=fmt, **options)

    @staticmethod
    def _image_for(batch: Any, prediction: dict, index: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]`` of the predicted image: from the uint8 batch, else read from its file."""
        images = batch.get("image") if isinstance(batch, dict) else None
        if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
            height, width = size
            return images[index, :, :height, :width].permute(1, 2, 0).cpu().numpy()  # padded batch: own pixels only
        path = prediction.get("image_path", [None] * (index + 1))[index]
        if path is None:
            raise ValueError("overlay=True needs uint8 images in the batch or 'image_path' in the predictions")
        with Image.open(path) as file:
            image = file.convert("RGB")
        if image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(image)

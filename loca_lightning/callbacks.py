"""Lightning callbacks of the project: the segmentation prediction writer, TensorBoard image loggers, an online probe.

``SegmentationPredictionWriter`` turns the ``predict_step`` outputs of
:class:`~loca_lightning.segmentation.module.SegmentationFinetuneModule` (``{"masks": [H,W] uint8 class indices,
"name", "image_path"}``) into files: one indexed-colour PNG per image whose pixel values are the class indices, and
optionally an overlay of the image and the coloured prediction. Nothing is ever overwritten unless asked.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from loca_lightning.data.classes import label_colormap
from loca_lightning.segmentation.metrics import SegmentationMetric
from loca_lightning.visualize import (
    blend,
    colorize,
    diagonal_cells,
    draw_band,
    draw_positions,
    heatmap_overlay,
    last_block_attention,
    mark_cell,
    patch_labels,
    pca_rgb,
    tile,
    to_uint8_image,
    upscale,
)

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
    colours = palette[np.minimum(mask, len(palette) - 1)].astype(np.float32)  # [H, W, 3]
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.concatenate([image, np.clip(blend + 0.5, 0, 255).astype(np.uint8)], axis=1)


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
    """

    def __init__(
        self, output_dir: str = "runs/predict", overlay: bool = False, overwrite: bool = False, alpha: float = 0.5
    ) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.output_dir = Path(output_dir)
        self.overlay = overlay
        self.overwrite = overwrite
        self.alpha = alpha
        self.palette = mask_palette()
        self._written: set[Path] = set()

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
        """Write the masks (and overlays) of one predicted batch."""
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


# ---------------------------------------------------------------------------------------------- seeing what it learned
class _OwnRNG:
    """Run a callback's random work on its own torch/numpy/python RNG streams, leaving the training streams untouched.

    On entry the training states are saved and the callback's states loaded; on exit the callback's states are kept
    for next time and the training states restored, so training draws exactly the numbers it would without us.
    """

    def __init__(self, seed: int) -> None:
        # Fresh generators, not torch.manual_seed: that would also (lazily) reseed CUDA, which training uses.
        self.state = {
            "torch": torch.Generator().manual_seed(seed).get_state(),
            "numpy": np.random.RandomState(seed % 2**32).get_state(),
            "python": random.Random(seed).getstate(),
        }

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Swap the callback's RNG states in for the duration of the block."""
        saved = _rng_state()
        _set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = {k: v for k, v in _rng_state().items() if k != "cuda"}  # CPU streams are ours; CUDA is not
            _set_rng_state(saved)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no gradients and saved/restored RNG for a side forward; every submodule's mode is restored after."""
    modes = {m: m.training for m in module.modules()}
    devices = [module_device(module)] if module_device(module).type == "cuda" else []
    try:
        module.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def module_device(module: torch.nn.Module) -> torch.device:
    """Device of a module's first parameter (CPU for a module without parameters)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _tensorboard(trainer: L.Trainer) -> Any | None:
    """The SummaryWriter of the trainer's TensorBoard logger, or None (other loggers: image logging is skipped)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _due(trainer: L.Trainer, every_n_steps: int, done: list[int]) -> bool:
    # global_step has already counted this batch's optimizer step; a pure integer test, no device work. ``done``
    # (steps already logged) stops a repeat on the other micro-batches of an accumulated step.
    step = trainer.global_step
    return step > 0 and step % every_n_steps == 0 and trainer.is_global_zero and (not done or done[-1] != step)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


class LOCAImageLogger(L.Callback):
    """Every ``every_n_steps`` optimizer steps, log to TensorBoard for ``num_images`` references of the batch: the
    masked band, true (green) vs predicted (red) positions of ``num_queries`` queries, PCA of teacher and student patch
    features, and last-block attention from ``num_attention_queries`` positions. Nothing runs between logging steps.
    """

    def __init__(
        self, every_n_steps: int = 500, num_images: int = 2, num_queries: int = 6, num_attention_queries: int = 3,
        scale: int = 2,
    ) -> None:
        _check_positive(every_n_steps=every_n_steps, num_images=num_images, num_queries=num_queries,
                        num_attention_queries=num_attention_queries, scale=scale)
        self.every_n_steps, self.num_images, self.num_queries = every_n_steps, num_images, num_queries
        self.num_attention_queries, self.scale = num_attention_queries, scale
        self.logged_steps: list[int] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not _due(trainer, self.every_n_steps, self.logged_steps):
            return
        writer = _tensorboard(trainer)
        step = getattr(pl_module, "last_step", None)
        if writer is None or not step:
            return
        for tag, image in self.render(pl_module, batch).items():
            writer.add_image(tag, image, trainer.global_step, dataformats="HWC")
        self.logged_steps.append(trainer.global_step)

    def render(self, pl_module: L.LightningModule, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The logged images (tag -> RGB uint8 ``[H, W, 3]``) for this batch and the module's last step."""
        step = pl_module.last_step
        grid = pl_module.reference_grid
        count = min(self.num_images, batch["reference"].shape[0])
        references = [to_uint8_image(batch["reference"][i]) for i in range(count)]
        keep = step["reference_keep"][:count].cpu().numpy()  # [n, Kr]
        logits = step["location_logits"][:count].float()  # [n, Q, R]
        target = step["target"][:count]  # [n, Q]
        bands, queries = [], []
        for i, image in enumerate(references):
            bands.append(draw_band(image, keep[i], grid))
            valid = torch.nonzero(target[i] >= 0).flatten()  # labelled queries; evenly spaced picks among them
            spaced = torch.linspace(0, len(valid) - 1, min(self.num_queries, len(valid))).long()
            picks = valid[spaced] if len(valid) else valid
            pred = logits[i, picks].argmax(-1).cpu().numpy()
            queries.append(draw_positions(image, target[i, picks].cpu().numpy(), pred, grid))
        images = {
            "loca/reference_band": tile([upscale(b, self.scale) for b in bands], count),
            "loca/query_positions": tile([upscale(q, self.scale) for q in queries], count),
        }
        reference = pl_module.normalize(batch["reference"][:count])  # [n, 3, R, R]
        networks = {"student": pl_module.student.backbone}
        if getattr(pl_module, "teacher", None) is not None:
            networks = {"teacher": pl_module.teacher.backbone, **networks}
        size = references[0].shape[:2]
        for name, backbone in networks.items():
            with _frozen(backbone):
                tokens = backbone(reference).float()  # [n, N, D]
                spread = diagonal_cells(grid, self.num_attention_queries)  # [P]
                attention = last_block_attention(backbone, reference, spread)  # [n, P, N]
            images[f"loca/pca_{name}"] = tile(
                [upscale(pca_rgb(tokens[i], (grid, grid), size), self.scale) for i in range(count)], count
            )
            maps = []
            for i, image in enumerate(references):
                for p, index in enumerate(spread.tolist()):
                    heat = heatmap_overlay(image, attention[i, p].reshape(grid, grid).cpu().numpy())
                    maps.append(upscale(mark_cell(heat, index, grid), self.scale))
            images[f"loca/attention_{name}"] = tile(maps, len(spread))
        return images


class SegmentationImageLogger(L.Callback):
    """Every ``every_n_steps`` optimizer steps, log image | ground truth | prediction overlays (dataset palette) of
    ``num_images`` training images to TensorBoard; nothing runs between logging steps."""

    def __init__(self, every_n_steps: int = 500, num_images: int = 4, alpha: float = 0.6, scale: int = 1) -> None:
        _check_positive(every_n_steps=every_n_steps, num_images=num_images, scale=scale)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.every_n_steps, self.num_images, self.alpha, self.scale = every_n_steps, num_images, alpha, scale
        self.logged_steps: list[int] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not _due(trainer, self.every_n_steps, self.logged_steps):
            return
        writer = _tensorboard(trainer)
        if writer is None:
            return
        palette = getattr(getattr(trainer, "datamodule", None), "palette", None)
        image = self.render(pl_module, batch, mask_palette(palette))
        writer.add_image("seg/image_truth_prediction", image, trainer.global_step, dataformats="HWC")
        self.logged_steps.append(trainer.global_step)

    def render(self, pl_module: L.LightningModule, batch: dict[str, Any], palette: np.ndarray) -> np.ndarray:
        """Rows of image | truth overlay | prediction overlay, RGB uint8."""
        count = min(self.num_images, batch["image"].shape[0])
        images = batch["image"][:count]
        with _frozen(pl_module):
            pred = pl_module(pl_module.normalize(images)).argmax(1).cpu().numpy()  # [n, H, W]
        ignore = getattr(pl_module.hparams, "ignore_index", 255)
        rows = []
        for i in range(count):
            image = to_uint8_image(images[i])
            truth = colorize(batch["mask"][i].cpu().numpy(), palette, ignore)
            predicted = colorize(pred[i], palette, ignore)
            rows += [image, blend(image, truth, self.alpha), blend(image, predicted, self.alpha)]
        return tile([upscale(r, self.scale) for r in rows], 3)


PROBE_DATA_DEFAULTS: dict[str, Any] = dict(
    layout="synthetic", synthetic_image_size=64, synthetic_length=512, synthetic_val_length=32, crop_size=64,
    base_size=(64, 64), ratio_range=(0.5, 2.0), batch_size=16, eval_batch_size=8, num_workers=0,
    persistent_workers=False, pin_memory=False,
)


def probe_datamodule(data: dict[str, Any] | None = None) -> L.LightningDataModule:
    """A SegmentationDataModule from :data:`PROBE_DATA_DEFAULTS` updated with ``data``; unknown keys are an error."""
    from loca_lightning.data.segmentation import SegmentationDataModule

    try:
        return SegmentationDataModule(**{**PROBE_DATA_DEFAULTS, **(data or {})})
    except TypeError as error:
        raise ValueError(f"OnlineDenseProbe data: {error} (keys are SegmentationDataModule arguments)") from error


class OnlineDenseProbe(L.Callback):
    """A linear per-patch classifier trained on the side on detached teacher (else student) patch tokens.

    Every ``train_every_n_steps`` it takes one labelled batch of ``datamodule``'s train split (labels reduced to
    the patch grid by majority) and makes ``probe_steps`` optimizer steps; every ``every_n_steps`` it logs
    ``probe/mIoU`` on the held-out split (``val_batches`` batches, logits upsampled to pixels). Its data, RNG and
    optimizer are its own, so the pretraining result is unchanged. Data: ``datamodule`` (from Python), or ``data``,
    keyword arguments of a SegmentationDataModule over :data:`PROBE_DATA_DEFAULTS` (the synthetic scenes, 64 px).
    From a LightningCLI config use ``data``: LightningCLI gives every DataModule it builds the top-level data's
    hyperparameters, so a nested ``class_path`` DataModule would be misconfigured.
    """

    def __init__(
        self,
        data: dict[str, Any] | None = None,
        datamodule: L.LightningDataModule | None = None,
        every_n_steps: int = 200,
        train_every_n_steps: int = 1,
        probe_steps: int = 1,
        val_batches: int = 4,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        _check_positive(every_n_steps=every_n_steps, train_every_n_steps=train_every_n_steps,
                        probe_steps=probe_steps, val_batches=val_batches)
        if data is not None and datamodule is not None:
            raise ValueError("give OnlineDenseProbe either data (SegmentationDataModule arguments) or datamodule")
        self.datamodule = datamodule if datamodule is not None else probe_datamodule(data)
        self.every_n_steps, self.train_every_n_steps, self.probe_steps = every_n_steps, train_every_n_steps, probe_steps
        self.val_batches, self.lr, self.seed = val_batches, lr, seed
        self.probe: torch.nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[tuple[int, float]] = []
        self._rng: _OwnRNG | None = None
        self._train_iter: Iterator[Any] | None = None
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._rng = _OwnRNG(self.seed)
        with self._rng.active():
            self.datamodule.setup("fit")
            num_classes = self.datamodule.num_classes
            self.ignore_index = getattr(self.datamodule, "ignore_index", 255)
            dim = self._backbone(pl_module).embed_dim
            self.probe = torch.nn.Linear(dim, num_classes).to(module_device(pl_module))  # [D] -> [C] per patch
            self.optimizer = torch.optim.AdamW(self.probe.parameters(), lr=self.lr, weight_decay=0.0)

    @staticmethod
    def _backbone(pl_module: L.LightningModule) -> torch.nn.Module:
        teacher = getattr(pl_module, "teacher", None)
        if teacher is not None:
            return teacher.backbone
        student = getattr(pl_module, "student", None)
        return student.backbone if student is not None else pl_module.backbone

    def _features(self, pl_module: L.LightningModule, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Detached patch tokens ``[B, N, D]`` (fp32) of uint8 images, and their grid."""
        backbone = self._backbone(pl_module)
        images = images.to(module_device(pl_module))
        with _frozen(backbone):
            tokens = backbone(pl_module.normalize(images)).float()  # [B, N, D]
        return tokens, backbone.grid_size(images.shape[-2:])

    def _next_train_batch(self) -> dict[str, Any]:
        if self._train_iter is None:
            self._train_iter = iter(self.datamodule.train_dataloader())
        try:
            return next(self._train_iter)
        except StopIteration:
            self._train_iter = iter(self.datamodule.train_dataloader())
            return next(self._train_iter)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.probe is None or step == 0 or step == self._last_step:
            return
        self._last_step = step
        with self._rng.active():
            if step % self.train_every_n_steps == 0:
                self.train_probe(pl_module)
            if step % self.every_n_steps == 0:
                miou = self.evaluate(pl_module)
                self.history.append((step, miou))
                pl_module.log("probe/mIoU", miou, on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True)

    def train_probe(self, pl_module: L.LightningModule) -> None:
        """``probe_steps`` cross-entropy steps of the probe on one labelled batch at the patch grid."""
        batch = self._next_train_batch()
        tokens, grid = self._features(pl_module, batch["image"])
        patch = self._backbone(pl_module).patch_size
        labels = patch_labels(batch["mask"].to(tokens.device), patch, self.probe.out_features, self.ignore_index)
        self.probe.train()
        for _ in range(self.probe_steps):
            with torch.enable_grad():
                logits = self.probe(tokens)  # [B, N, C]
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=self.ignore_index)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.optimizer.step()

    @torch.no_grad()
    def evaluate(self, pl_module: L.LightningModule) -> float:
        """Probe mIoU on the first ``val_batches`` held-out batches (each image at its own size)."""
        # Every rank holds the same probe and data: no cross-process reduction (and no collective to wait on).
        metric = SegmentationMetric(self.probe.out_features, self.ignore_index, sync_on_compute=False)
        metric = metric.to(module_device(pl_module))
        patch = self._backbone(pl_module).patch_size
        for index, batch in enumerate(self.datamodule.val_dataloader()):
            if index >= self.val_batches:
                break
            sizes = batch.get("sizes")
            for i in range(batch["image"].shape[0]):
                height, width = (int(v) for v in sizes[i]) if sizes is not None else batch["image"].shape[-2:]
                crop_h, crop_w = height - height % patch, width - width % patch  # whole patches only
                image = batch["image"][i : i + 1, :, :crop_h, :crop_w]
                mask = batch["mask"][i : i + 1, :crop_h, :crop_w].to(metric.area_union.device)
                tokens, (gh, gw) = self._features(pl_module, image)
                logits = self.probe(tokens).transpose(1, 2).reshape(1, -1, gh, gw)  # [1, C, gh, gw]
                logits = F.interpolate(logits, size=(crop_h, crop_w), mode="bilinear", align_corners=False)
                metric.update(logits.argmax(1), mask)
        return float(metric.compute()["mIoU"])

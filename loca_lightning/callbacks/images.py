"""TensorBoard image loggers: what LOCA pretraining sees and predicts, and segmentation predictions during finetuning.

Both log every ``every_n_steps`` optimizer steps on rank zero through the same batch-end hook
(:class:`PeriodicImageLogger`) and do nothing in between; without a TensorBoard logger they do nothing at all.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from loca_lightning.callbacks.common import check_positive, frozen
from loca_lightning.callbacks.prediction import mask_palette
from loca_lightning.visualize import (
    blend,
    colorize,
    diagonal_cells,
    draw_band,
    draw_positions,
    heatmap_overlay,
    last_block_attention,
    mark_cell,
    pca_rgb,
    tile,
    to_uint8_image,
    upscale,
)


class PeriodicImageLogger(L.Callback):
    """Calls :meth:`images` every ``every_n_steps`` optimizer steps (rank zero, TensorBoard only) and logs what it
    returns (tag -> RGB uint8 ``[H, W, 3]``). ``logged_steps`` lists the steps logged so far."""

    def __init__(self, every_n_steps: int) -> None:
        check_positive(every_n_steps=every_n_steps)
        self.every_n_steps = every_n_steps
        self.logged_steps: list[int] = []

    def images(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> dict[str, np.ndarray]:
        """The images to log for this batch; empty to log nothing."""
        raise NotImplementedError

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step has already counted this batch's optimizer step: a pure integer test, no device work. The last
        # logged step stops a repeat on the other micro-batches of an accumulated step.
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        if self.logged_steps and self.logged_steps[-1] == step:
            return
        writer = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if writer is None:
            return
        images = self.images(trainer, pl_module, batch)
        for tag, image in images.items():
            writer.add_image(tag, image, step, dataformats="HWC")
        if images:
            self.logged_steps.append(step)


class LOCAImageLogger(PeriodicImageLogger):
    """Every ``every_n_steps`` optimizer steps, log to TensorBoard for ``num_images`` references of the batch: the
    masked band, true (green) vs predicted (red) positions of ``num_queries`` queries, PCA of teacher and student patch
    features, and last-block attention from ``num_attention_queries`` positions. Nothing runs between logging steps.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_images: int = 2,
        num_queries: int = 6,
        num_attention_queries: int = 3,
        scale: int = 2,
    ) -> None:
        super().__init__(every_n_steps)
        check_positive(
            num_images=num_images, num_queries=num_queries, num_attention_queries=num_attention_queries, scale=scale
        )
        self.num_images, self.num_queries = num_images, num_queries
        self.num_attention_queries, self.scale = num_attention_queries, scale

    def images(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> dict[str, np.ndarray]:
        return self.render(pl_module, batch) if getattr(pl_module, "last_step", None) else {}

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
            with frozen(backbone):
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


class SegmentationImageLogger(PeriodicImageLogger):
    """Every ``every_n_steps`` optimizer steps, log image | ground truth | prediction overlays (dataset palette) of
    ``num_images`` training images to TensorBoard; nothing runs between logging steps."""

    def __init__(self, every_n_steps: int = 500, num_images: int = 4, alpha: float = 0.6, scale: int = 1) -> None:
        super().__init__(every_n_steps)
        check_positive(num_images=num_images, scale=scale)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.num_images, self.alpha, self.scale = num_images, alpha, scale

    def images(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> dict[str, np.ndarray]:
        palette = mask_palette(getattr(getattr(trainer, "datamodule", None), "palette", None))
        return {"seg/image_truth_prediction": self.render(pl_module, batch, palette)}

    def render(self, pl_module: L.LightningModule, batch: dict[str, Any], palette: np.ndarray) -> np.ndarray:
        """Rows of image | truth overlay | prediction overlay, RGB uint8."""
        count = min(self.num_images, batch["image"].shape[0])
        images = batch["image"][:count]
        with frozen(pl_module):
            pred = pl_module(pl_module.normalize(images)).argmax(1).cpu().numpy()  # [n, H, W]
        ignore = getattr(pl_module.hparams, "ignore_index", 255)
        rows = []
        for i in range(count):
            image = to_uint8_image(images[i])
            truth = colorize(batch["mask"][i].cpu().numpy(), palette, ignore)
            predicted = colorize(pred[i], palette, ignore)
            rows += [image, blend(image, truth, self.alpha), blend(image, predicted, self.alpha)]
        return tile([upscale(r, self.scale) for r in rows], 3)

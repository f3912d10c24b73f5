"""An online dense probe: a linear per-patch classifier trained on the side of pretraining, to watch features improve."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from loca_lightning.callbacks.common import check_positive, frozen, module_device
from loca_lightning.data.seg_datasets import unpadded
from loca_lightning.rng import OwnRNG
from loca_lightning.segmentation.metrics import SegmentationMetric
from loca_lightning.visualize import patch_labels

# Loader settings of the probe's own data (small batches, no worker processes); the dataset itself is the user's.
PROBE_LOADER_DEFAULTS: dict[str, Any] = dict(
    batch_size=16, eval_batch_size=8, num_workers=0, persistent_workers=False, pin_memory=False
)


def probe_datamodule(data: dict[str, Any]) -> L.LightningDataModule:
    """A SegmentationDataModule from ``data`` over :data:`PROBE_LOADER_DEFAULTS`; unknown keys are an error."""
    from loca_lightning.data.segmentation import SegmentationDataModule

    try:
        return SegmentationDataModule(**{**PROBE_LOADER_DEFAULTS, **data})
    except TypeError as error:
        raise ValueError(f"OnlineDenseProbe data: {error} (keys are SegmentationDataModule arguments)") from error


class OnlineDenseProbe(L.Callback):
    """A linear per-patch classifier trained on the side on detached teacher (else student) patch tokens.

    Every ``train_every_n_steps`` it takes one labelled batch of ``datamodule``'s train split (labels reduced to
    the patch grid by majority) and makes ``probe_steps`` optimizer steps; every ``every_n_steps`` it logs
    ``probe/mIoU`` on the held-out split (``val_batches`` batches, logits upsampled to pixels). Its data, RNG and
    optimizer are its own, so the pretraining result is unchanged. Data, required: ``datamodule`` (from Python), or
    ``data``, keyword arguments of a SegmentationDataModule (e.g. ``{layout: ade20k, root: ...}``; loader settings
    default to :data:`PROBE_LOADER_DEFAULTS`). From a LightningCLI config use ``data``: LightningCLI gives every
    DataModule it builds the top-level data's hyperparameters, so a nested ``class_path`` DataModule would be
    misconfigured.
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
        check_positive(
            every_n_steps=every_n_steps,
            train_every_n_steps=train_every_n_steps,
            probe_steps=probe_steps,
            val_batches=val_batches,
        )
        if (data is None) == (datamodule is None):
            raise ValueError(
                "OnlineDenseProbe needs its labelled data: give either data (SegmentationDataModule arguments, e.g. "
                "{'layout': 'ade20k', 'root': ...}) or datamodule"
            )
        self.datamodule = datamodule if datamodule is not None else probe_datamodule(data)
        self.every_n_steps, self.train_every_n_steps, self.probe_steps = every_n_steps, train_every_n_steps, probe_steps
        self.val_batches, self.lr, self.seed = val_batches, lr, seed
        self.probe: torch.nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[tuple[int, float]] = []
        self._rng: OwnRNG | None = None
        self._train_iter: Iterator[Any] | None = None
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._rng = OwnRNG(self.seed)
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
        with frozen(backbone):
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
                self._log(trainer, step, miou)

    @staticmethod
    def _log(trainer: L.Trainer, step: int, miou: float) -> None:
        # Straight to the loggers: through pl_module.log an on-step value reaches them only on Lightning's own logging
        # steps (every trainer.log_every_n_steps), so a probe every 256 steps with logging every 5 wrote nothing.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"probe/mIoU": miou}, step=step)

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
            for image, mask in unpadded(batch):
                height, width = image.shape[-2:]
                crop_h, crop_w = height - height % patch, width - width % patch  # whole patches only
                image = image[..., :crop_h, :crop_w]
                mask = mask[..., :crop_h, :crop_w].to(metric.area_union.device)
                tokens, (gh, gw) = self._features(pl_module, image)
                logits = self.probe(tokens).transpose(1, 2).reshape(1, -1, gh, gw)  # [1, C, gh, gw]
                logits = F.interpolate(logits, size=(crop_h, crop_w), mode="bilinear", align_corners=False)
                metric.update(logits.argmax(1), mask)
        return float(metric.compute()["mIoU"])

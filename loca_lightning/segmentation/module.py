"""SegmentationFinetuneModule: a ViT backbone (from LOCA, timm weights or scratch) plus a Segmenter decoder.

Its defaults are the recipe of configs/seg_ade.yaml: Segmenter's ADE20K protocol (SGD lr 1e-3 momentum 0.9 without
weight decay, polynomial decay 0.9 per step to 0.01x, cross-entropy with 255 ignored, test scale (2048, 512), windows
512 at stride 512); the other configs say where they differ. Evaluation and prediction follow Segmenter's test
protocol when ``test_scale`` is set (the image resized keeping its aspect ratio to the test scale, sliding windows,
logits resized back to the original size; see ``segmentation.inference``), or run at each image's native size when it
is None; either way the metric compares predictions at the original size with the original labels and accumulates
MMSegmentation-style mIoU over the whole dataset, synced across processes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from loca_lightning.backbones import build_backbone
from loca_lightning.backbones.vit import release_init_vit_
from loca_lightning.checkpointing import detach_weights_source, warn_loaded_hparam_changes
from loca_lightning.data.seg_datasets import unpadded
from loca_lightning.lr_schedules import GroupScaledLambdaLR, poly
from loca_lightning.normalize import Normalize
from loca_lightning.param_groups import finetune_param_groups
from loca_lightning.rng import RNG_KEY, capture_rng_state, restore_rng_state
from loca_lightning.segmentation.decoders import build_decoder
from loca_lightning.segmentation.inference import SegmentationInference
from loca_lightning.segmentation.metrics import SegmentationMetric, format_class_table
from loca_lightning.segmentation.pretrained import pretrained_backbone
from loca_lightning.weights_files import check_activation

log = logging.getLogger(__name__)

# Segmenter's optimizer, the one configs/seg_ade.yaml spells out: what ``optimizer=None`` builds.
DEFAULT_OPTIMIZER: dict[str, Any] = {
    "class_path": "torch.optim.SGD",
    "init_args": {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0},
}


class SegmentationFinetuneModule(L.LightningModule):
    """Semantic segmentation with a ViT encoder and a linear or mask-transformer decoder.

    Batches: ``image`` uint8 ``[B,3,H,W]`` (normalised here, on the device) and ``mask`` int64 ``[B,H,W]``
    (255 = ignore). Evaluation batches may carry ``sizes`` ``[B,2]`` when images were padded to batch them.

    ``test_scale`` (long, short), e.g. ADE20K's ``(2048, 512)``: evaluation and prediction resize each image keeping
    its aspect ratio to that scale (then, in slide mode, up to the window if its short side is still below it), and
    resize the scores back to the original size (Segmenter's protocol); ``None``: native size. ``eval_scales`` are
    ratios of the test scale (of the native size when None).

    ``pretrained``: a LOCA checkpoint (``pretrained_weights`` picks its teacher or student), a finetuned segmentation
    checkpoint (its backbone, e.g. to finetune on another dataset) or timm-format ViT weights, loaded strictly.
    ``optimizer``: a callable taking the parameter groups (LightningCLI: a ``class_path``); None builds
    :data:`DEFAULT_OPTIMIZER`. Its weight decay applies to matrices only (:meth:`configure_optimizers`).

    Without ``pretrained``, ``init`` picks the random initialisation: ``"timm"`` (truncated normal 0.02) or
    ``"release"`` (LOCA's own starting point, as in :class:`~loca_lightning.LOCAPretrainModule`), so that a
    "pretrained vs random" comparison can start both from the same distribution.
    """

    def __init__(
        self,
        *,
        num_classes: int = 150,
        backbone: str = "vit_base_patch16",
        backbone_kwargs: dict[str, Any] | None = None,
        image_size: int = 512,
        drop_path_rate: float = 0.1,
        pretrained: str | None = None,
        pretrained_weights: Literal["teacher", "student"] = "teacher",
        trust_checkpoint: bool = False,
        init: Literal["timm", "release"] = "timm",
        freeze_backbone: bool = False,
        decoder: str | nn.Module = "linear",
        decoder_kwargs: dict[str, Any] | None = None,
        ignore_index: int = 255,
        class_names: list[str] | None = None,
        optimizer: Callable[[Iterable], torch.optim.Optimizer] | None = None,
        layer_decay: float | None = None,
        poly_power: float = 0.9,
        min_lr_ratio: float = 0.01,
        warmup_steps: int = 0,
        inference_mode: Literal["whole", "slide"] = "slide",
        window: int = 512,
        stride: int = 512,
        eval_scales: list[float] | None = None,
        eval_flip: bool = False,
        inference_batch_size: int = 8,
        test_scale: tuple[int, int] | None = (2048, 512),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "decoder"] if isinstance(decoder, nn.Module) else ["optimizer"])
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}")
        if init not in ("timm", "release"):
            raise ValueError(f"init must be 'timm' or 'release', got {init!r}")
        self.backbone = self.create_backbone()
        patch = self.backbone.patch_size
        for key, value in (("image_size", image_size), ("window", window)):
            if value % patch:
                raise ValueError(f"{key}={value} is not a multiple of the patch size {patch} of {backbone}")
        self.backbone.requires_grad_(not freeze_backbone)
        self.decoder = (
            decoder
            if isinstance(decoder, nn.Module)
            else build_decoder(decoder, self.backbone.embed_dim, num_classes, **(decoder_kwargs or {}))
        )
        self.normalize = Normalize()
        self.inference = SegmentationInference(
            mode=inference_mode,
            window=window if inference_mode == "slide" else None,
            stride=stride if inference_mode == "slide" else None,
            scales=tuple(eval_scales or (1.0,)),
            flip=eval_flip,
            batch_size=inference_batch_size,
            test_scale=test_scale,
        )
        self.optimizer_factory = optimizer
        self.val_metric = SegmentationMetric(num_classes, ignore_index)
        self.test_metric = SegmentationMetric(num_classes, ignore_index)

    def create_backbone(self) -> nn.Module:
        """The encoder the hyperparameters describe: loaded from ``pretrained`` (:func:`pretrained_backbone`, which may
        adopt the file's MLP activation into ``backbone_kwargs``) or randomly initialised as ``init`` says."""
        hp = self.hparams
        build = dict(img_size=hp.image_size, drop_path_rate=hp.drop_path_rate)
        if hp.pretrained:
            own = dict(hp.backbone_kwargs or {})
            backbone, kwargs = pretrained_backbone(
                hp.backbone, own, hp.pretrained, hp.pretrained_weights, hp.trust_checkpoint, **build
            )
            if kwargs != own:
                self.hparams["backbone_kwargs"] = kwargs  # saved checkpoints rebuild the same network
            return backbone
        backbone = build_backbone(hp.backbone, **build, **(hp.backbone_kwargs or {}))
        if hp.init == "release":  # the initialisation LOCA pretraining starts from (a fair "random init" baseline)
            release_init_vit_(backbone)
        return backbone

    # ------------------------------------------------------------------ model
    def forward(self, images: Tensor) -> Tensor:
        """Normalised images ``[B,3,H,W]`` -> logits ``[B,C,H,W]``; sides not multiple of the patch are padded."""
        height, width = images.shape[-2:]
        patch = self.backbone.patch_size
        pad_h, pad_w = (-height) % patch, (-width) % patch
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        tokens = self.backbone(images)  # [B, N, D]
        logits = self.decoder(tokens, grid)  # [B, C, gh, gw]
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]

    def predict_logits(self, image: Tensor) -> Tensor:
        """Full-image scores ``[B,C,H,W]`` at the image's own size for uint8 or normalised images, with the configured
        inference (test scale, mode, scales, flip); uint8 images are resized before they are normalised, as in
        MMSegmentation's test pipeline."""
        return self.inference(self, image, self.hparams.num_classes, normalize=self.normalize)

    # ------------------------------------------------------------------ setup checks
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.hparams.num_classes:
            raise ValueError(
                f"model.num_classes={self.hparams.num_classes} but the data has {data_classes} classes "
                f"(layout {getattr(datamodule, 'hparams', {}).get('layout', '?')}): make them equal"
            )
        names = self.hparams.class_names or getattr(datamodule, "class_names", None)
        if names is not None and len(names) == self.hparams.num_classes:
            self.class_names = list(names)
        else:
            self.class_names = [str(i) for i in range(self.hparams.num_classes)]

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, masks = self.normalize(batch["image"]), batch["mask"]
        logits = self(images)
        loss = F.cross_entropy(logits.float(), masks, ignore_index=self.hparams.ignore_index)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=images.shape[0])
        return loss

    def _evaluate(self, batch: dict[str, Any], metric: SegmentationMetric) -> None:
        for image, mask in unpadded(batch):  # each image on its own pixels only
            metric.update(self.predict_logits(image).argmax(1), mask)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metric)

    def on_validation_epoch_end(self) -> None:
        result = self.val_metric.compute()
        self.log_dict({f"val/{k}": result[k] for k in ("mIoU", "mAcc", "aAcc")}, sync_dist=False)
        self.val_metric.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metric)

    def on_test_epoch_end(self) -> None:
        result = self.test_metric.compute()
        self.log_dict({f"test/{k}": result[k] for k in ("mIoU", "mAcc", "aAcc")}, sync_dist=False)
        self.last_test_result = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in result.items()}
        rank_zero_info("\n" + format_class_table(result, getattr(self, "class_names", None)))
        self.test_metric.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Class-index masks (uint8/int16 on CPU) at each image's original size, with names and paths."""
        masks = []
        for image, _ in unpadded(batch):
            pred = self.predict_logits(image).argmax(1)[0]
            masks.append(pred.to(torch.uint8 if self.hparams.num_classes <= 256 else torch.int16).cpu())
        return {"masks": masks, "name": batch["name"], "image_path": batch["image_path"]}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer (``optimizer``, else :data:`DEFAULT_OPTIMIZER`) with its weight decay on the backbone's and
        decoder's matrices only (:func:`finetune_param_groups`), layer-wise lr decay when ``layer_decay`` is set, and
        the polynomial schedule stepped per optimizer step."""
        hp = self.hparams
        groups = finetune_param_groups(self, ("backbone", "decoder"), hp.layer_decay, len(self.backbone.blocks))
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups)
        else:
            optimizer = torch.optim.SGD(groups, **DEFAULT_OPTIMIZER["init_args"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = functools.partial(
            poly, total_steps=total, power=hp.poly_power, min_ratio=hp.min_lr_ratio, warmup_steps=hp.warmup_steps
        )
        scheduler = GroupScaledLambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        detach_weights_source(checkpoint, "pretrained")  # the weights are the checkpoint's own
        checkpoint[RNG_KEY] = capture_rng_state()  # drop path draws from the global RNG: exact resume needs it

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the random state; warn (``key: old -> new``) when the checkpoint had other hyperparameters; refuse
        one trained with another MLP activation (the weights would load and compute something else)."""
        mine = dict(self.hparams.backbone_kwargs or {}).get("act_layer")
        check_activation(mine, "the checkpoint", checkpoint, "model.init_args.backbone_kwargs.act_layer", adopt=False)
        warn_loaded_hparam_changes(checkpoint, self.hparams, "pretrained", "segmentation")
        if RNG_KEY in checkpoint:
            restore_rng_state(checkpoint[RNG_KEY])

    def on_train_epoch_start(self) -> None:
        if self.hparams.freeze_backbone:  # a frozen encoder is a fixed feature extractor: no drop path in it
            self.backbone.eval()

"""LOCAPretrainModule: LOCA pretraining (location prediction + patch clustering with an EMA teacher) as a LightningModule.

The method reads top to bottom in :meth:`LOCAPretrainModule.training_step`. Around it, each concern has a file of its
own: geometry ``views.py``, masks ``masks.py``, heads ``heads.py``, losses ``losses.py``, initialisation ``init.py``,
lr schedules ``loca_lightning/lr_schedules.py``, the EMA ``loca_lightning/ema.py``, parameter groups
``loca_lightning/param_groups.py``, the recipe's optimizer ``optimization.py``, compile and FSDP2 ``performance.py``, the non-finite guard
``loca_lightning/nonfinite.py``, random state ``loca_lightning/rng.py``, export ``loca_lightning/export.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from loca_lightning.backbones import build_backbone
from loca_lightning.backbones.loading import load_module_weights
from loca_lightning.checkpointing import detach_weights_source, warn_loaded_hparam_changes
from loca_lightning.ema import ema_momentum, ema_update
from loca_lightning.nonfinite import NonFiniteGuard, Policy
from loca_lightning.normalize import Normalize
from loca_lightning.param_groups import param_groups
from loca_lightning.pretrain import losses, masks, micro_batches, performance
from loca_lightning.pretrain.checks import check_batch, check_hparams, migrate_checkpoint
from loca_lightning.pretrain.masks import ReferenceMask
from loca_lightning.pretrain.networks import QKV_BIASES, LOCATeacher, build_student
from loca_lightning.pretrain.optimization import warmup_cosine_optimization
from loca_lightning.rng import RNG_KEY, capture_rng_state, restore_rng_state
from loca_lightning.weights_files import check_activation

log = logging.getLogger(__name__)


class LOCAPretrainModule(L.LightningModule):
    """LOCA pretraining of a ViT (Caron, Houlsby, Schmid, 2022), faithful to the released recipe by default.

    Batches (:class:`~loca_lightning.data.pretrain.LOCAPretrainDataModule`): ``reference [B,3,R,R]``, ``query_large
    [B,3,S,S]``, ``query_focal [B,F,3,f,f]`` (uint8 or normalised), ``target_large [B,Nl]``, ``target_focal [B,F,Nf]``
    (int64, -1 = no label). ``query_keep`` large-query tokens (70 of 196 as released) enter the encoder;
    ``int(reference_keep_ratio * N)`` reference tokens (a band by default) are the location head's keys.
    ``shared_drop_path``: the teacher's reference pass and the student's large-query pass skip the same blocks for
    the same image, as released. ``compile``: ``"blocks"`` or ``"all"`` (also heads and losses; ``true`` = "all"),
    in place. ``prototype_precision="bfloat16"``: the release's TPU numerics for the prototype layer (heads.py).
    ``init_weights``: a module checkpoint (``loca import-release`` writes one) loaded strictly into student, teacher
    and heads (with ``backbone_kwargs.act_layer`` as the checkpoint's; the heads follow the backbone's activation).
    ``micro_batch_size``: run each batch in chunks of this many images, with the whole batch's Sinkhorn targets,
    me-max mean and loss normalisers: the gradient of the whole batch in one pass, in the activation memory of one
    chunk (``micro_batches.py``; use it instead of ``accumulate_grad_batches``, which LOCA does not train like a
    bigger batch under).
    Subclasses may override ``select_reference_keep``, ``select_query_keep``, ``drop_path_scales``,
    ``encode_reference`` (with ``micro_batch_size``: ``teacher_reference``), ``encode_queries`` and
    ``compute_losses``.
    """

    compile_options: dict[str, Any] = {}  # passed to every torch.compile call

    def __init__(
        self,
        *,
        backbone: str = "vit_base_patch16",
        backbone_kwargs: dict[str, Any] | None = None,
        drop_path_rate: float = 0.1,
        shared_drop_path: bool = True,
        reference_size: int = 224,
        reference_mask: ReferenceMask = "consecutive",
        reference_keep_ratio: float = 0.2,
        query_keep: int = 70,
        apply_cluster_loss: bool = True,
        location_weight: float = 1.0,
        cluster_weight: float = 1.0,
        me_max_weight: float = 1.0,
        num_prototypes: int = 4096,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 256,
        prototype_precision: Literal["float32", "bfloat16"] = "float32",
        teacher_temperature: float = 0.05,
        student_temperature: float = 0.1,
        sinkhorn_iters: int = 3,
        momentum_base: float = 0.996,
        momentum_final: float = 1.0,
        teacher_train_mode: bool = True,
        base_lr: float = 1e-3,
        lr_reference_batch: int = 1024,
        weight_decay: float = 0.1,
        warmup_epochs: float = 15.0,
        final_lr_ratio: float = 0.01,
        optimizer: Callable[[Iterable], torch.optim.Optimizer] = torch.optim.AdamW,
        on_nonfinite: Policy = "stop",
        compile: bool | Literal["blocks", "all"] = False,
        init: Literal["release", "timm"] = "release",
        init_weights: str | None = None,
        micro_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        check_hparams(self.hparams)
        vit = build_backbone(backbone, drop_path_rate=drop_path_rate, **(backbone_kwargs or {}))
        if reference_size % vit.patch_size:
            raise ValueError(f"reference_size {reference_size} is not a multiple of the patch size {vit.patch_size}")
        self.patch_size = vit.patch_size
        self.reference_grid = reference_size // vit.patch_size
        self.num_positions = self.reference_grid**2
        self.reference_keep = masks.reference_keep_count(reference_keep_ratio, self.num_positions)
        projection = (projection_hidden_dim, projection_dim, num_prototypes) if apply_cluster_loss else None
        act_layer = (backbone_kwargs or {}).get("act_layer")  # the heads' MLPs use the backbone's activation
        self.student = build_student(
            vit, self.num_positions, projection, prototype_precision, init == "release", act_layer=act_layer
        )
        self.teacher = LOCATeacher(self.student) if apply_cluster_loss else None
        if init_weights is not None:  # e.g. `loca import-release`'s checkpoint: student, teacher and heads, strictly
            load_module_weights(self, init_weights, act_layer=act_layer)
        # The loss functions the step calls; compile "all" swaps in compiled versions (performance.py).
        self.location_loss, self.clustering_loss = losses.location_loss, losses.clustering_loss
        self.me_max_loss, self.sinkhorn = losses.me_max_loss, losses.sinkhorn_knopp
        self.optimizer_factory = optimizer
        self.normalize = Normalize()
        self.mask_generator = masks.MaskGenerator()
        self.nonfinite = NonFiniteGuard(on_nonfinite)
        self.total_steps = 1  # set by configure_optimizers (the EMA and lr schedules span it)
        self.momentum = momentum_base  # of the latest EMA update, logged
        self.is_compiled = self.is_sharded = False
        # Targets from LOCAViews are in range by construction: the losses' range check (a host sync) runs on the
        # first batch only, unless this is set True (custom data).
        self.check_target_ranges = False
        self._checked_batch = False
        self.last_step: dict[str, Any] = {}  # detached tensors of the latest step, read by image callbacks
        self.micro_batch_gradients = False  # a micro-batched step left its first chunks' gradients (micro_batches.py)
        self.register_buffer("skipped_images", torch.zeros((), dtype=torch.long), persistent=True)

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        """One LOCA step. The teacher encodes the whole reference (no gradient) and turns its tokens into balanced
        cluster targets (Sinkhorn); a band of its tokens are the location head's keys. The student encodes the large
        query (``query_keep`` tokens) and the focal queries; for every query token, the location head predicts which
        reference cell it shows (cross-entropy against the box geometry's target), and the projection head predicts
        the teacher's cluster assignment of that cell (cross-entropy), plus mean-entropy maximisation."""
        if not self._checked_batch or self.check_target_ranges:
            check_batch(batch, self.hparams.reference_size, self.num_positions)
            self._checked_batch = True
        target_large, target_focal = batch["target_large"], batch["target_focal"]  # [B, Nl], [B, F, Nf]
        batch_size = target_large.shape[0]

        reference_keep = self.select_reference_keep(batch_size)  # [B, Kr]
        large_keep = self.select_query_keep(batch_size, target_large.shape[1])  # [B, Kq]
        drop_path = self.drop_path_scales(batch_size)  # [depth, 2, B]: the same blocks skipped in both passes
        target = self.query_targets(target_large, target_focal, large_keep)  # [B, Q]
        if micro_batches.splits(self.hparams.micro_batch_size, batch_size):  # the same step, chunk by chunk
            out = micro_batches.training_step(self, batch, reference_keep, large_keep, drop_path, target)
        else:
            reference = self.normalize(batch["reference"])  # [B, 3, R, R]
            reference_keys, reference_targets = self.encode_reference(reference, reference_keep, drop_path)
            query_large, query_focal = self.normalize(batch["query_large"]), self.normalize(batch["query_focal"])
            query_tokens = self.encode_queries(query_large, query_focal, large_keep, drop_path)  # [B, Q, D]
            out = self.compute_losses(query_tokens, reference_keys, reference_targets, target)

        self.last_step = {
            "reference_keep": reference_keep.detach(),
            "location_logits": out["location_logits"].detach(),
            "target": target.detach(),
            "num_large": large_keep.shape[1],
        }
        self._log_step(out, batch, batch_size)
        return self.nonfinite(out, self)

    def select_reference_keep(self, batch_size: int) -> Tensor:
        """Indices ``[B, Kr]`` of reference tokens visible to the location head."""
        generator, mode = self.mask_generator.get(self.device, self.global_rank), self.hparams.reference_mask
        return masks.band_keep_index(batch_size, self.num_positions, self.reference_keep, mode, self.device, generator)

    def select_query_keep(self, batch_size: int, num_tokens: int) -> Tensor:
        """Indices ``[B, Kq]`` of large-query tokens fed to the encoder (the rest are dropped before it)."""
        generator = self.mask_generator.get(self.device, self.global_rank)
        keep = masks.query_keep_count(self.hparams.query_keep, num_tokens)
        return masks.random_keep_index(batch_size, num_tokens, keep, self.device, generator)

    def drop_path_scales(self, batch_size: int) -> Tensor | None:
        """Drop-path multipliers ``[depth, 2, B]`` shared by the reference and large-query passes (None: each pass
        draws its own, as with ``shared_drop_path: false``)."""
        if not self.hparams.shared_drop_path:
            return None
        return self.student.backbone.sample_drop_path(batch_size)

    def encode_reference(
        self, reference: Tensor, reference_keep: Tensor, drop_path: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Reference keys for the location head ``[B, Kr, D]`` and Sinkhorn targets ``[B, R, K]`` (or None)."""
        if self.teacher is None:  # location-only variant: the student encodes only the kept band
            return self.student.backbone(reference, keep_index=reference_keep, drop_path=drop_path), None
        keys, logits = self.teacher_reference(reference, reference_keep, drop_path)
        return keys, self.sinkhorn(logits, self.hparams.teacher_temperature, self.hparams.sinkhorn_iters)

    @torch.no_grad()
    def teacher_reference(
        self, reference: Tensor, reference_keep: Tensor, drop_path: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The teacher's pass over the whole reference: the location head's keys ``[B, Kr, D]`` and the prototype
        cosines ``[B, R, K]`` that Sinkhorn balances (over the whole batch: with ``micro_batch_size``, after the last
        chunk). No gradient."""
        tokens = self.teacher.backbone(reference, drop_path=drop_path)  # [B, R, D], all tokens
        logits = self.teacher.projection(tokens)  # [B, R, K] cosines
        keys = tokens.gather(1, reference_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # [B, Kr, D]
        return keys, logits

    def encode_queries(
        self,
        query_large: Tensor,
        query_focal: Tensor,
        large_keep: Tensor,
        drop_path: Tensor | None = None,
        focal_drop: Tensor | None = None,
    ) -> Tensor:
        """Student tokens of all queries of each image, concatenated: ``[B, Kq + F*Nf, D]``. ``focal_drop [depth, 2,
        B*F]``: the focal queries' drop-path multipliers (drawn here when None)."""
        use_pos = self.hparams.apply_cluster_loss  # the location-only variant gives queries no positions
        backbone = self.student.backbone
        large = backbone(query_large, keep_index=large_keep, use_pos_embed=use_pos, drop_path=drop_path)  # [B, Kq, D]
        batch, num_focal = query_focal.shape[:2]
        if focal_drop is None:
            focal_drop = self.drop_path_scales(batch * num_focal)  # focal queries skip blocks of their own
        focal = backbone(query_focal.flatten(0, 1), use_pos_embed=use_pos, drop_path=focal_drop)  # [B*F, Nf, D]
        return torch.cat([large, focal.reshape(batch, -1, focal.shape[-1])], dim=1)

    @staticmethod
    def query_targets(target_large: Tensor, target_focal: Tensor, large_keep: Tensor) -> Tensor:
        """Targets ``[B, Kq + F*Nf]`` of the query tokens in :meth:`encode_queries`' order: the kept large-query
        tokens' (``target_large`` [B, Nl] at ``large_keep``), then every focal token's (``target_focal`` [B, F, Nf])."""
        return torch.cat([target_large.gather(1, large_keep), target_focal.flatten(1)], dim=1)

    def compute_losses(
        self,
        query_tokens: Tensor,
        reference_keys: Tensor,
        reference_targets: Tensor | None,
        target: Tensor,
        whole_batch: micro_batches.BatchTotals | None = None,
    ) -> dict[str, Tensor]:
        """The loss terms, their weighted sum ``loss``, and the location logits ``[B, Q, R]``. With ``whole_batch``
        (a micro-batch's call), every term is this micro-batch's share of the whole batch's: shares add up to it."""
        hp, check = self.hparams, self.check_target_ranges
        num_valid = None if whole_batch is None else whole_batch.num_valid
        logits = self.student.location_head(query_tokens, reference_keys)  # [B, Q, R]
        loss_location, accuracy = self.location_loss(logits, target, check_range=check, num_valid=num_valid)
        out = {"location_logits": logits, "loss_location": loss_location, "acc_location": accuracy}
        loss = hp.location_weight * loss_location
        if reference_targets is not None:
            student = self.student.projection(query_tokens)  # [B, Q, K] cosines
            cluster = self.clustering_loss(
                student, reference_targets, target, hp.student_temperature, check_range=check, num_valid=num_valid
            )
            if whole_batch is None:
                me_max = self.me_max_loss(student, hp.student_temperature)
            else:
                mean, num_tokens = whole_batch.mean_prediction, whole_batch.num_tokens
                me_max = losses.me_max_share(student, mean, num_tokens, hp.student_temperature)
            loss = loss + hp.cluster_weight * cluster + hp.me_max_weight * me_max
            # exp(-me_max) is the perplexity of the mean assignment, without a second softmax pass
            out.update(loss_cluster=cluster, loss_me_max=me_max, prototype_perplexity=torch.exp(-me_max.detach()))
        out["loss"] = loss
        return out

    def _log_step(self, out: dict[str, Tensor], batch: dict[str, Tensor], batch_size: int) -> None:
        logits, target, num_large = out["location_logits"], self.last_step["target"], self.last_step["num_large"]
        metrics = {f"train/{k}": v for k, v in out.items() if k.startswith(("loss", "acc", "prototype"))}
        metrics["train/acc_location_large"] = losses.location_accuracy(logits[:, :num_large], target[:, :num_large])
        metrics["train/acc_location_focal"] = losses.location_accuracy(logits[:, num_large:], target[:, num_large:])
        if "num_skipped" in batch:
            self.skipped_images += batch["num_skipped"].sum()
            metrics["train/skipped_images"] = self.skipped_images.float()
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("loss", out["loss"].detach(), prog_bar=True, logger=False, batch_size=batch_size)

    # ------------------------------------------------------------------ teacher
    def on_train_epoch_start(self) -> None:
        if self.teacher is not None and not self.hparams.teacher_train_mode:
            self.teacher.eval()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then the teacher's EMA update, inside the step: no callback (a checkpoint in
        ``on_train_batch_end``) sees a student that moved without its teacher."""
        step = self.global_step  # index of this step: the counter moves on after the hook returns
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.teacher is not None and not self.nonfinite.skipping:
            self.momentum = self.momentum_at(step)
            if self.is_sharded:
                performance.reshard([self.teacher, self.student])
            with torch.no_grad():
                ema_update(*self.teacher.ema_pairs(self.student), self.momentum)

    def on_after_backward(self) -> None:
        self.nonfinite.after_backward(self)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        """Lightning zeroes gradients between ``training_step`` and its backward; a micro-batched step has by then
        accumulated all chunks but the last (it zeroed them before its first)."""
        if not micro_batches.holds_gradients(self):
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            micro_batches.check_trainer(self.hparams.micro_batch_size, self.trainer)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.teacher is not None:
            self.log("train/momentum", self.momentum, on_step=True, on_epoch=False)

    def momentum_at(self, step: int) -> float:
        """Teacher momentum after optimizer step ``step`` (cosine from momentum_base to momentum_final)."""
        return ema_momentum(step, self.total_steps, self.hparams.momentum_base, self.hparams.momentum_final)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups(self.student, hp.weight_decay, decay_suffixes=QKV_BIASES)
        config, self.total_steps = warmup_cosine_optimization(
            self.trainer,
            groups,
            self.optimizer_factory,
            hp.base_lr,
            hp.lr_reference_batch,
            hp.warmup_epochs,
            hp.final_lr_ratio,
        )
        return config

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        performance.clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_model(self) -> None:
        """Compile in place when asked; under ``ModelParallelStrategy`` shard student and teacher with FSDP2."""
        if not self.is_compiled:
            performance.compile_in_place(self, self.hparams.compile, self.compile_options)
            self.is_compiled = True
        if self.device_mesh is not None and not self.is_sharded:
            performance.shard_fsdp2(self, self.device_mesh)
            self.is_sharded = True

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store every random stream the next steps draw from (exact resume). The checkpoint holds the weights: it
        names ``init_weights`` only as the run's source, so that loading it never needs (nor re-reads) that file."""
        checkpoint[RNG_KEY] = capture_rng_state({"mask": self.mask_generator.state()})
        detach_weights_source(checkpoint, "init_weights")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the random state; warn about changed hyperparameters; refuse another MLP activation."""
        mine = dict(self.hparams.backbone_kwargs or {}).get("act_layer")
        check_activation(mine, "the checkpoint", checkpoint, "model.init_args.backbone_kwargs.act_layer", adopt=False)
        if migrate_checkpoint(checkpoint, self.student, self.hparams.weight_decay):
            log.warning(
                "checkpoint written before query_keep (it has query_keep_ratio): read as query_keep; q/k/v biases are "
                "now weight-decayed as in the release"
            )
        warn_loaded_hparam_changes(checkpoint, self.hparams, "init_weights", "LOCA pretraining")
        if RNG_KEY in checkpoint:
            self.mask_generator.load_state(restore_rng_state(checkpoint[RNG_KEY]).get("mask"))

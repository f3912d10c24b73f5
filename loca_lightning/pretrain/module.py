"""LOCAPretrainModule: LOCA pretraining (location prediction + patch clustering with an EMA teacher) as a LightningModule.

The method reads top to bottom in :meth:`LOCAPretrainModule.training_step`; geometry lives in ``views.py``, the
heads in ``heads.py``, the losses in ``losses.py``, schedules in ``optim.py``. Subclasses can override the small
hooks (``encode_reference``, ``encode_queries``, ``select_reference_keep``, ``select_query_keep``, ``compute_losses``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from loca_lightning.backbones import build_backbone
from loca_lightning.backbones.checkpoints import load_module_weights
from loca_lightning.backbones.vit import ViT, release_init_vit_
from loca_lightning.checkpointing import RNG_KEY, capture_rng_state, restore_rng_state, warn_hparam_changes
from loca_lightning.normalize import Normalize
from loca_lightning.optim import LambdaLR, ema_momentum, ema_update, param_groups, warmup_cosine
from loca_lightning.pretrain.heads import LocationHead, ProjectionHead, check_prototype_precision
from loca_lightning.pretrain.losses import (
    clustering_loss,
    location_loss,
    me_max_loss,
    sinkhorn_knopp,
)

log = logging.getLogger(__name__)


def band_keep_index(
    batch: int, num_tokens: int, keep: int, mode: str, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """Reference tokens kept as keys of the location head ``[B, keep]``, drawn per sample.

    consecutive: a band of ``keep`` tokens in raster order at a random offset; unstructured: a random subset;
    first: the first ``keep`` tokens.
    """
    if mode == "consecutive":
        offset = torch.randint(0, num_tokens - keep + 1, (batch, 1), device=device, generator=generator)
        return offset + torch.arange(keep, device=device)
    if mode == "unstructured":
        return random_keep_index(batch, num_tokens, keep, device, generator)
    if mode == "first":
        return torch.arange(keep, device=device).expand(batch, -1)
    raise ValueError(f"reference_mask must be 'consecutive', 'unstructured' or 'first', got {mode!r}")


def random_keep_index(
    batch: int, num_tokens: int, keep: int, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """A uniformly random subset of ``keep`` of ``num_tokens`` token positions per sample, sorted: ``[B, keep]``."""
    return torch.rand(batch, num_tokens, device=device, generator=generator).argsort(dim=1)[:, :keep].sort(dim=1).values


def masked_accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Fraction of labelled tokens (target != -1) whose argmax is the target (local batch, detached)."""
    valid = target >= 0
    hits = (logits.detach().argmax(-1) == target) & valid
    return hits.sum() / valid.sum().clamp_min(1)


@torch.no_grad()
def release_init_(backbone: ViT, location_head: LocationHead, projection: ProjectionHead | None) -> None:
    """Initialise student backbone and heads, in place, as the released JAX code (scenic, flax) does.

    Backbone: ``release_init_vit_`` (positional table std 1/sqrt(D), Xavier-uniform attention and MLP kernels,
    LeCun-normal patch embedding). Location head: Xavier-uniform attention and MLP kernels, LeCun-normal position
    predictor. Projection MLP: LeCun normal. timm's truncated normal(0.02) everywhere is 3-5x smaller at small
    widths (Xavier std 0.10 at D=96).
    """
    dim = backbone.embed_dim
    release_init_vit_(backbone)
    attn, mlp = location_head.attn, location_head.mlp
    for weight in (attn.q.weight, attn.kv.weight[:dim], attn.kv.weight[dim:], attn.proj.weight):
        nn.init.xavier_uniform_(weight)  # key and value are two [D, D] kernels packed in kv
    for layer in (attn.q, attn.kv, attn.proj):
        nn.init.zeros_(layer.bias)
    for layer in (mlp.fc1, mlp.fc2):
        nn.init.xavier_uniform_(layer.weight)
        nn.init.normal_(layer.bias, std=1e-6)
    linears = [location_head.position_predictor]
    if projection is not None:
        linears += [m for m in projection.mlp if isinstance(m, nn.Linear)]
    for layer in linears:  # flax's default kernel init (LeCun normal), zero bias
        nn.init.trunc_normal_(layer.weight, std=layer.in_features**-0.5)
        nn.init.zeros_(layer.bias)


def teacher_targets(
    projection: ProjectionHead, tokens: Tensor, reference_keep: Tensor, temperature: float, sinkhorn_iters: int
) -> tuple[Tensor, Tensor]:
    """Teacher keys ``[B, Kr, D]`` (the kept reference tokens) and Sinkhorn targets ``[B, R, K]`` from its tokens."""
    logits = projection(tokens)  # [B, R, K]
    targets = sinkhorn_knopp(logits.flatten(0, 1), temperature, sinkhorn_iters).view_as(logits)
    keys = torch.gather(tokens, 1, reference_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return keys, targets


def location_terms(
    head: LocationHead, query_tokens: Tensor, reference_keys: Tensor, target: Tensor, check_range: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Location logits ``[B, Q, R]``, loss and accuracy."""
    logits = head(query_tokens, reference_keys)
    loss, accuracy = location_loss(logits, target, check_range=check_range)
    return logits, loss, accuracy


def clustering_terms(
    projection: ProjectionHead,
    query_tokens: Tensor,
    reference_targets: Tensor,
    target: Tensor,
    temperature: float,
    check_range: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Clustering loss, me-max loss and prototype perplexity of the student's query tokens."""
    student_logits = projection(query_tokens)  # [B, Q, K] cosines
    cluster = clustering_loss(student_logits, reference_targets, target, temperature, check_range=check_range)
    me_max = me_max_loss(student_logits, temperature)
    # exp(-me_max) is mean_assignment_perplexity(student_logits, temperature), without a second softmax pass
    return cluster, me_max, torch.exp(-me_max.detach())


class LOCAStudent(nn.Module):
    """The trained network: backbone, location head and (when clustering is on) projection head."""

    def __init__(self, backbone: ViT, location_head: LocationHead, projection: ProjectionHead | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.location_head = location_head
        self.projection = projection


class LOCATeacher(nn.Module):
    """EMA copy of the student's backbone and projection head (the parts the teacher runs)."""

    def __init__(self, student: LOCAStudent) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(student.backbone)
        self.projection = copy.deepcopy(student.projection)
        for param in self.parameters():
            param.requires_grad_(False)

    def ema_pairs(self, student: LOCAStudent) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher tensors, student tensors) in matching order: parameters and floating buffers."""
        teacher, source = [], []
        for mine, theirs in ((self.backbone, student.backbone), (self.projection, student.projection)):
            teacher += list(mine.parameters())
            source += list(theirs.parameters())
        return teacher, source


class LOCAPretrainModule(L.LightningModule):
    """LOCA pretraining of a ViT (Caron, Houlsby, Schmid, 2022), faithful to the released recipe by default.

    Batches are dicts from :class:`~loca_lightning.data.pretrain.LOCAPretrainDataModule`: ``reference [B,3,R,R]``,
    ``query_large [B,3,S,S]``, ``query_focal [B,F,3,f,f]`` (uint8 or normalised float), ``target_large [B,Nl]``,
    ``target_focal [B,F,Nf]`` (int64, -1 = no label).

    Initialisation: ``init="release"`` (default) initialises backbone and heads as the released flax code does
    (:func:`release_init_`); ``"timm"`` keeps timm's truncated normal(0.02). Target ranges are checked on the
    first batch; set ``check_target_ranges = True`` on the instance to check every step (one host sync per step).
    ``init_weights``: a module checkpoint (``loca import-release`` writes one) whose student, teacher and heads are
    loaded strictly after that, e.g. to continue from the released weights (with ``backbone_kwargs.act_layer`` as
    the checkpoint's).

    ``compile``: ``"blocks"`` compiles each transformer block of student and teacher in place (state-dict keys
    unchanged); ``"all"`` also compiles the heads with their losses and the teacher's Sinkhorn targets (the work
    outside the backbone, memory-bound on [tokens, prototypes] tensors); ``true`` means ``"all"``. On an H100 (ViT-B/16,
    batch 128, bf16) the step ran at 673 images/s eager, 884 with "blocks", 1022 with "all" (benchmarks/README.md).
    ``compile_options`` (a class attribute) is passed to every ``torch.compile`` call.

    ``prototype_precision``: ``"float32"`` (default) computes the prototype cosines in float32; ``"bfloat16"`` rounds
    their inputs to bfloat16 with float32 sums and result, as the released code's float32 dot products ran on TPUs
    (:class:`~loca_lightning.pretrain.heads.ProjectionHead`); one bf16 kernel instead of a float32 one on a GPU.
    """

    compile_options: dict[str, Any] = {}

    def __init__(
        self,
        *,
        backbone: str = "vit_base_patch16",
        backbone_kwargs: dict[str, Any] | None = None,
        drop_path_rate: float = 0.1,
        reference_size: int = 224,
        reference_mask: Literal["consecutive", "unstructured", "first"] = "consecutive",
        reference_keep_ratio: float = 0.2,
        query_keep_ratio: float = 70 / 196,
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
        on_nonfinite: Literal["stop", "skip"] = "stop",
        compile: bool | Literal["blocks", "all"] = False,
        init: Literal["release", "timm"] = "release",
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        for name, value in (("reference_keep_ratio", reference_keep_ratio), ("query_keep_ratio", query_keep_ratio)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        for name, value in (("teacher_temperature", teacher_temperature), ("student_temperature", student_temperature)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 <= momentum_base <= momentum_final <= 1.0:
            raise ValueError(f"need 0 <= momentum_base <= momentum_final <= 1, got {momentum_base}, {momentum_final}")
        if reference_mask not in ("consecutive", "unstructured", "first"):
            raise ValueError(f"reference_mask must be 'consecutive', 'unstructured' or 'first', got {reference_mask!r}")
        if compile not in (False, True, "blocks", "all"):
            raise ValueError(f"compile must be false, true, 'blocks' or 'all', got {compile!r}")
        check_prototype_precision(prototype_precision)  # here too: the location-only variant has no projection

        vit = build_backbone(backbone, drop_path_rate=drop_path_rate, **(backbone_kwargs or {}))
        if reference_size % vit.patch_size:
            raise ValueError(f"reference_size {reference_size} is not a multiple of the patch size {vit.patch_size}")
        self.reference_grid = reference_size // vit.patch_size
        self.num_positions = self.reference_grid**2
        self.reference_keep = max(1, round(reference_keep_ratio * self.num_positions))
        heads = vit.blocks[0].attn.num_heads
        act_layer = (backbone_kwargs or {}).get("act_layer")  # the heads' MLPs use the backbone's activation
        location_head = LocationHead(
            vit.embed_dim, heads, self.num_positions, mlp_ratio=vit.timm_config["mlp_ratio"], act_layer=act_layer
        )
        projection = (
            ProjectionHead(
                vit.embed_dim,
                projection_hidden_dim,
                projection_dim,
                num_prototypes,
                prototype_precision=prototype_precision,
                act_layer=act_layer,
            )
            if apply_cluster_loss
            else None
        )
        if init == "release":
            release_init_(vit, location_head, projection)
        elif init != "timm":
            raise ValueError(f"init must be 'release' or 'timm', got {init!r}")
        self.student = LOCAStudent(vit, location_head, projection)
        self.teacher = LOCATeacher(self.student) if apply_cluster_loss else None
        if init_weights is not None:  # e.g. `loca import-release`'s checkpoint: student, teacher and heads, strictly
            load_module_weights(self, init_weights, act_layer=act_layer)
        self.optimizer_factory = optimizer
        self.normalize = Normalize()
        self.total_steps = 1
        self._checked_batch = False
        # LOCAViews computes targets from box geometry, in range by construction: the losses skip their per-step range
        # check (a host sync) after the first batch was checked here. Set True to check every step (custom data).
        self.check_target_ranges = False
        self.last_step: dict[str, Any] = {}  # detached tensors of the latest training step, read by image callbacks
        self.register_buffer("skipped_images", torch.zeros((), dtype=torch.long), persistent=True)
        self._mask_generator: torch.Generator | None = None
        self._mask_generator_state: Tensor | None = None  # from a checkpoint, applied on first use
        # the functions the step calls for the work outside the backbones; compiled versions with compile: all
        self._fns: dict[str, Callable] = dict(
            teacher_targets=teacher_targets, location=location_terms, clustering=clustering_terms
        )

    # ------------------------------------------------------------------ random state (exact resume)
    def mask_generator(self) -> torch.Generator:
        """The generator of the token masks, on the module's device; its state travels in checkpoints.

        Seeded on first use from the global RNG (so ``seed_everything`` fixes it) plus the global rank (so
        processes draw different masks); a resumed run continues its sequence instead of restarting it.
        """
        generator = self._mask_generator
        if generator is None or generator.device != self.device:
            generator = torch.Generator(device=self.device)
            if self._mask_generator_state is not None:
                generator.set_state(self._mask_generator_state)
                self._mask_generator_state = None
            elif self._mask_generator is not None:  # moved to another device: keep the sequence
                generator.set_state(self._mask_generator.get_state())
            else:
                generator.manual_seed(int(torch.randint(0, 2**62, ())) + self.global_rank)
            self._mask_generator = generator
        return generator

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the random state (global torch RNG for drop path, the mask generator) for exact resume."""
        checkpoint[RNG_KEY] = capture_rng_state({"mask": self._mask_generator})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the random state saved by :meth:`on_save_checkpoint`; warn about changed hyperparameters."""
        warn_hparam_changes(checkpoint, dict(self.hparams), "LOCA pretraining")
        if RNG_KEY in checkpoint:
            generators = restore_rng_state(checkpoint[RNG_KEY])
            self._mask_generator, self._mask_generator_state = None, generators.get("mask")

    def configure_model(self) -> None:
        """Compile the transformer blocks in place when asked (state-dict keys stay unchanged); under
        ``ModelParallelStrategy`` shard student and teacher with FSDP2: one unit per transformer block, one per
        backbone, head and projection.

        Student and teacher are sharded alike, so the EMA update pairs local shards (a foreach lerp on DTensors).
        """
        backbones = [self.student.backbone] + ([self.teacher.backbone] if self.teacher is not None else [])
        if self.hparams.compile and not getattr(self, "_compiled", False):
            for backbone in backbones:
                for block in backbone.blocks:
                    block.compile(**self.compile_options)
            if self.hparams.compile in (True, "all"):
                self._fns = {name: torch.compile(fn, **self.compile_options) for name, fn in self._fns.items()}
            self._compiled = True
        mesh = self.device_mesh
        if mesh is not None and not getattr(self, "_sharded", False):
            from torch.distributed.fsdp import fully_shard

            names = mesh.mesh_dim_names or ()
            data_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
            for backbone in backbones:
                for block in backbone.blocks:
                    fully_shard(block, mesh=data_mesh)
            # The step calls backbones and heads directly (never student.forward), so each is a root unit of its own.
            roots = [backbone for backbone in backbones] + [self.student.location_head]
            roots += [m.projection for m in (self.student, self.teacher) if m is not None and m.projection is not None]
            for root in roots:
                fully_shard(root, mesh=data_mesh)
            self._sharded = True

    # ------------------------------------------------------------------ hooks a subclass may override
    def select_reference_keep(self, batch_size: int) -> Tensor:
        """Indices ``[B, Kr]`` of reference tokens visible to the location head."""
        return band_keep_index(
            batch_size,
            self.num_positions,
            self.reference_keep,
            self.hparams.reference_mask,
            self.device,
            self.mask_generator(),
        )

    def select_query_keep(self, batch_size: int, num_tokens: int) -> Tensor:
        """Indices ``[B, Kq]`` of large-query tokens fed to the encoder (the rest are dropped before it)."""
        keep = max(1, round(self.hparams.query_keep_ratio * num_tokens))
        return random_keep_index(batch_size, num_tokens, keep, self.device, self.mask_generator())

    def encode_reference(self, reference: Tensor, reference_keep: Tensor) -> tuple[Tensor, Tensor | None]:
        """Reference keys for the location head ``[B, Kr, D]`` and Sinkhorn targets ``[B, R, K]`` (or None)."""
        if self.teacher is None:  # location-only variant: the student encodes only the kept band
            return self.student.backbone(reference, keep_index=reference_keep), None
        with torch.no_grad():
            tokens = self.teacher.backbone(reference)  # [B, R, D], all tokens
            keys, targets = self._fns["teacher_targets"](
                self.teacher.projection,
                tokens,
                reference_keep,
                self.hparams.teacher_temperature,
                self.hparams.sinkhorn_iters,
            )
        return keys, targets

    def encode_queries(self, query_large: Tensor, query_focal: Tensor, large_keep: Tensor) -> Tensor:
        """Student tokens of all queries of each image, concatenated: ``[B, Kq + F*Nf, D]``."""
        use_pos = self.hparams.apply_cluster_loss  # the location-only variant gives queries no positions
        large = self.student.backbone(query_large, keep_index=large_keep, use_pos_embed=use_pos)  # [B, Kq, D]
        batch, num_focal = query_focal.shape[:2]
        focal = self.student.backbone(query_focal.flatten(0, 1), use_pos_embed=use_pos)  # [B*F, Nf, D], one call
        return torch.cat([large, focal.reshape(batch, -1, focal.shape[-1])], dim=1)

    def compute_losses(
        self, query_tokens: Tensor, reference_keys: Tensor, reference_targets: Tensor | None, target: Tensor
    ) -> dict[str, Tensor]:
        """All loss terms and the location logits; ``loss`` is their weighted sum."""
        hp = self.hparams
        logits, loc, acc = self._fns["location"](
            self.student.location_head, query_tokens, reference_keys, target, self.check_target_ranges
        )  # logits [B, Q, R]
        out = {"location_logits": logits, "loss_location": loc, "acc_location": acc}
        loss = hp.location_weight * loc
        if reference_targets is not None:
            cluster, me_max, perplexity = self._fns["clustering"](
                self.student.projection,
                query_tokens,
                reference_targets,
                target,
                hp.student_temperature,
                self.check_target_ranges,
            )
            loss = loss + hp.cluster_weight * cluster + hp.me_max_weight * me_max
            out.update(loss_cluster=cluster, loss_me_max=me_max, prototype_perplexity=perplexity)
        out["loss"] = loss
        return out

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        if not self._checked_batch:
            self._check_batch(batch)
        reference = self.normalize(batch["reference"])  # [B, 3, R, R]
        query_large = self.normalize(batch["query_large"])  # [B, 3, S, S]
        query_focal = self.normalize(batch["query_focal"])  # [B, F, 3, f, f]
        target_large, target_focal = batch["target_large"], batch["target_focal"]  # [B, Nl], [B, F, Nf]
        batch_size = reference.shape[0]

        reference_keep = self.select_reference_keep(batch_size)  # [B, Kr]
        reference_keys, reference_targets = self.encode_reference(reference, reference_keep)
        large_keep = self.select_query_keep(batch_size, target_large.shape[1])  # [B, Kq]
        query_tokens = self.encode_queries(query_large, query_focal, large_keep)
        target = torch.cat([torch.gather(target_large, 1, large_keep), target_focal.flatten(1)], dim=1)  # [B, Q]
        out = self.compute_losses(query_tokens, reference_keys, reference_targets, target)

        num_large = large_keep.shape[1]
        logits = out["location_logits"]
        # Detached references for callbacks (image logging): no copy, no extra compute, no host sync.
        self.last_step = {
            "reference_keep": reference_keep.detach(),
            "location_logits": logits.detach(),
            "target": target.detach(),
            "num_large": num_large,
        }
        metrics = {
            "train/loss": out["loss"],
            "train/loss_location": out["loss_location"],
            "train/acc_location": out["acc_location"],
            "train/acc_location_large": masked_accuracy(logits[:, :num_large], target[:, :num_large]),
            "train/acc_location_focal": masked_accuracy(logits[:, num_large:], target[:, num_large:]),
        }
        for key in ("loss_cluster", "loss_me_max", "prototype_perplexity"):
            if key in out:
                metrics[f"train/{key}"] = out[key]
        if "num_skipped" in batch:
            self.skipped_images += batch["num_skipped"].sum()
            metrics["train/skipped_images"] = self.skipped_images.float()
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("loss", out["loss"].detach(), prog_bar=True, logger=False, batch_size=batch_size)
        return self._guard_nonfinite(out)

    def _guard_nonfinite(self, out: dict[str, Tensor]) -> Tensor | None:
        """Stop (default) or skip the step when the loss is not finite; named components make the cause visible.

        The decision is taken over all processes (any rank non-finite), so ranks skip or stop together. Before
        stopping, the last good state (weights before this step) is saved as ``nonfinite-step{N}.ckpt`` next to
        the run's checkpoints.
        """
        loss = out["loss"]
        nonfinite = not bool(torch.isfinite(loss.detach()).all())  # one host sync per step: never train on NaN
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            nonfinite = trainer.strategy.reduce_boolean_decision(nonfinite, all=False)
        if not nonfinite:
            return loss
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in out.items() if k.startswith("loss"))
        message = f"non-finite loss at step {self.global_step}: {parts}"
        if self.hparams.on_nonfinite == "skip":
            log.warning("%s; skipping this step", message)
            return None
        saved = self._save_last_good_state() if trainer is not None else None
        hint = f"; the last good state is in {saved}" if saved else ""
        raise FloatingPointError(message + hint + " (set on_nonfinite: skip to skip such steps)")

    def _save_last_good_state(self) -> str | None:
        """Save ``nonfinite-step{N}.ckpt`` (collective: every rank calls it) where the run keeps its checkpoints."""
        trainer = self.trainer
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or trainer.default_root_dir
        path = os.path.join(folder, f"nonfinite-step{self.global_step}.ckpt")
        try:
            trainer.save_checkpoint(path)
        except Exception as error:  # the FloatingPointError is the news; a failed rescue must not hide it
            log.error("could not save the last good state to %s: %s", path, error)
            return None
        return path

    def _check_batch(self, batch: dict[str, Tensor]) -> None:
        """Check once that the data matches the model (sizes, keys); errors name the keys to change."""
        missing = [
            k for k in ("reference", "query_large", "query_focal", "target_large", "target_focal") if k not in batch
        ]
        if missing:
            raise KeyError(f"LOCA batches need the keys {missing}; got {sorted(batch)}")
        size = batch["reference"].shape[-1]
        if size != self.hparams.reference_size:
            raise ValueError(
                f"data gives {size}px references but model.reference_size is {self.hparams.reference_size}: "
                "make data.views.reference_size and model.reference_size equal"
            )
        num = self.num_positions  # targets index reference cells; checked on the first batch only
        for key in ("target_large", "target_focal"):
            bad = (batch[key] < -1) | (batch[key] >= num)
            if bool(bad.any()):
                raise ValueError(
                    f"batch[{key!r}] holds values outside -1 (no label) and [0, {num - 1}] (the reference grid "
                    f"{self.reference_grid}x{self.reference_grid}): min {int(batch[key].min())}, max {int(batch[key].max())}"
                )
        self._checked_batch = True

    # ------------------------------------------------------------------ teacher
    def on_train_epoch_start(self) -> None:
        if self.teacher is not None and not self.hparams.teacher_train_mode:
            self.teacher.eval()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then the teacher's EMA update: inside the step, so that no callback (a checkpoint in
        ``on_train_batch_end``) can see a student that moved without its teacher. Only real steps get here, not
        accumulation-only batches."""
        step = self.global_step  # index of this step: the counter moves on after the hook returns
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.teacher is not None:
            self._last_momentum = self.momentum_at(step)
            if getattr(self, "_sharded", False):  # root units keep gathered weights after forward: shard them again
                from torch.distributed.fsdp import FSDPModule

                for module in (*self.teacher.modules(), *self.student.modules()):
                    if isinstance(module, FSDPModule):
                        module.reshard()
            with torch.no_grad():
                ema_update(*self.teacher.ema_pairs(self.student), self._last_momentum)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the momentum of the EMA update made in :meth:`optimizer_step`."""
        momentum = getattr(self, "_last_momentum", None)
        if momentum is not None:
            self.log("train/momentum", momentum, on_step=True, on_epoch=False)

    def momentum_at(self, step: int) -> float:
        """Teacher momentum used after optimizer step ``step`` (cosine from momentum_base to momentum_final)."""
        return ema_momentum(step, self.total_steps, self.hparams.momentum_base, self.hparams.momentum_final)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        self.total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        global_batch = self.global_batch_size()
        peak_lr = hp.base_lr * global_batch / hp.lr_reference_batch
        steps_per_epoch = self.steps_per_epoch()
        warmup_steps = int(round(hp.warmup_epochs * steps_per_epoch))
        groups = param_groups(self.student, hp.weight_decay)
        for group in groups:
            group.pop("names")
            group["lr"] = peak_lr
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:  # the factory's own lr/wd defaults must not override the recipe
            group["lr"] = peak_lr
        total, final = self.total_steps, hp.final_lr_ratio
        scheduler = LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup_steps, final))
        log.info(
            "LOCA optimisation: global batch %d, peak lr %.3g, %d steps (%d warmup)",
            global_batch,
            peak_lr,
            total,
            warmup_steps,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def global_batch_size(self) -> int:
        """Per-device batch x devices x nodes x gradient accumulation."""
        trainer = self.trainer
        per_device = None
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "batch_size"):
            per_device = int(datamodule.batch_size)
        if per_device is None:
            loader = trainer.train_dataloader
            per_device = getattr(loader, "batch_size", None)
            if per_device is None:
                raise ValueError("cannot tell the per-device batch size: give the DataModule a batch_size attribute")
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    def steps_per_epoch(self) -> float:
        """Optimizer steps in one epoch (for warmup given in epochs)."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        if batches == float("inf") or batches is None:
            return float(self.total_steps) / max(1, trainer.max_epochs or 1)
        return math.ceil(batches / trainer.accumulate_grad_batches)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm; under classic FSDP through the root module, whose norm spans all shards (Lightning's
        FSDP precision plugin refuses ``gradient_clip_algorithm='norm'``)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.model
        if (
            gradient_clip_val
            and isinstance(root, FullyShardedDataParallel)
            and gradient_clip_algorithm in (None, "norm")
        ):
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step()

    # ------------------------------------------------------------------ export
    def export_backbone(self, which: Literal["teacher", "student"] = "teacher") -> ViT:
        """A standalone copy (eval mode, on CPU) of the teacher's or the student's backbone."""
        if which == "teacher":
            if self.teacher is None:
                raise ValueError("this run has no teacher (apply_cluster_loss: false); export which='student'")
            source = self.teacher.backbone
        elif which == "student":
            source = self.student.backbone
        else:
            raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
        backbone = copy.deepcopy(source).cpu().eval()
        for param in backbone.parameters():
            param.requires_grad_(True)
        return backbone

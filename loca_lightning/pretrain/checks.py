"""Checks of LOCAPretrainModule's arguments and of the first batch: errors that name the key to change."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from torch import Tensor, nn

from loca_lightning.nonfinite import POLICIES as NONFINITE_POLICIES
from loca_lightning.param_groups import param_groups
from loca_lightning.pretrain.heads import check_prototype_precision
from loca_lightning.pretrain.masks import REFERENCE_MASKS
from loca_lightning.pretrain.micro_batches import check_micro_batch_size
from loca_lightning.pretrain.networks import QKV_BIASES
from loca_lightning.pretrain.performance import check_compile_scope

BATCH_KEYS = ("reference", "query_large", "query_focal", "target_large", "target_focal")


def check_hparams(hp: Mapping[str, Any]) -> None:
    """Raise ValueError for values outside their range (before anything is built)."""
    if not 0.0 < hp["reference_keep_ratio"] <= 1.0:
        raise ValueError(f"reference_keep_ratio must be in (0, 1], got {hp['reference_keep_ratio']}")
    if hp["query_keep"] < 1:
        raise ValueError(f"query_keep must be >= 1 (large-query tokens fed to the encoder), got {hp['query_keep']}")
    for name in ("teacher_temperature", "student_temperature"):
        if hp[name] <= 0:
            raise ValueError(f"{name} must be positive, got {hp[name]}")
    if not 0.0 <= hp["momentum_base"] <= hp["momentum_final"] <= 1.0:
        raise ValueError(
            f"need 0 <= momentum_base <= momentum_final <= 1, got {hp['momentum_base']}, {hp['momentum_final']}"
        )
    choices = {
        "reference_mask": REFERENCE_MASKS,
        "init": ("release", "timm"),
        "on_nonfinite": NONFINITE_POLICIES,
    }
    for name, allowed in choices.items():
        if hp[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {hp[name]!r}")
    check_compile_scope(hp["compile"])
    check_micro_batch_size(hp.get("micro_batch_size"))
    check_prototype_precision(hp["prototype_precision"])  # here too: the location-only variant has no projection


def check_batch(batch: Mapping[str, Tensor], reference_size: int, num_positions: int) -> None:
    """The data matches the model: keys, reference size, targets in -1 (no label) .. num_positions - 1."""
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"LOCA batches need the keys {missing}; got {sorted(batch)}")
    size = batch["reference"].shape[-1]
    if size != reference_size:
        raise ValueError(
            f"data gives {size}px references but model.reference_size is {reference_size}: "
            "make data.views.reference_size and model.reference_size equal"
        )
    for key in ("target_large", "target_focal"):
        values = batch[key]
        if bool(((values < -1) | (values >= num_positions)).any()):
            grid = int(round(num_positions**0.5))
            raise ValueError(
                f"batch[{key!r}] holds values outside -1 (no label) and [0, {num_positions - 1}] (the reference grid "
                f"{grid}x{grid}): min {int(values.min())}, max {int(values.max())}"
            )


def migrate_checkpoint(checkpoint: MutableMapping[str, Any], student: nn.Module, weight_decay: float) -> bool:
    """Bring a checkpoint written before ``query_keep`` and the q/k/v-bias weight decay (its hparams name
    ``query_keep_ratio``; the package version was 0.1.0 then as now) up to date,
    in place; True if it was old. ``query_keep_ratio`` becomes the same count (the large query had as many tokens as
    the reference positions in every recipe of that version); the optimizer state is regrouped so that training
    resumes, now decaying the q/k/v biases as the release does."""
    saved = checkpoint.get("hyper_parameters", {})
    if "query_keep_ratio" not in saved:
        return False
    positions = (saved["reference_size"] // student.backbone.patch_size) ** 2
    saved.setdefault("query_keep", max(1, round(saved.pop("query_keep_ratio") * positions)))
    saved.pop("query_keep_ratio", None)
    for state in checkpoint.get("optimizer_states", []):
        old = [n for group in param_groups(student, weight_decay) for n in group["names"]]
        groups = param_groups(student, weight_decay, decay_suffixes=QKV_BIASES)
        index = {name: i for i, name in enumerate(old)}
        new = [n for group in groups for n in group["names"]]
        state["state"] = {i: state["state"][index[n]] for i, n in enumerate(new) if index[n] in state["state"]}
        start = 0
        for saved_group, group in zip(state["param_groups"], groups):
            saved_group["params"] = list(range(start, start + len(group["names"])))
            start += len(group["names"])
    return True

"""Exact gradient accumulation for LOCA: one batch run in chunks (micro-batches) that share the whole batch's
batch-wide terms, so that the gradient is the one of the whole batch in one pass, to float rounding.

Lightning's ``accumulate_grad_batches`` is not that for LOCA: each micro-batch there has Sinkhorn targets, a me-max
mean and loss normalisers of its own (measured: docs/scaling.md). With ``micro_batch_size: m`` the DataLoader gives
the whole per-device batch of W images (``accumulate_grad_batches`` stays 1, and the lr follows W) and the step is:

1. masks and drop-path multipliers for all W images, drawn as the one-pass step draws them;
2. without gradient, chunk by chunk: the teacher's pass (its keys ``[W, Kr, D]`` and prototype cosines
   ``[W, R, K]`` are kept) and the student's query pass, whose predictions are summed into the batch's mean;
3. Sinkhorn over all W references (and every process), as in one pass;
4. with gradient, chunk by chunk: the student's query pass again and each loss as this chunk's share of the batch's:
   cross-entropies over the batch's count of labelled tokens, me-max linearised at the batch's mean prediction
   (:func:`~loca_lightning.pretrain.losses.me_max_share`: exact for a function of a sum). Each chunk but the last is
   backpropagated here; Lightning backpropagates the last, clips and steps as usual.

Cost against one pass over the same W images: one more forward pass of the student's queries (the released views:
70 kept large-query tokens + 9 x 36 focal tokens = 394 per image, against 196 teacher + 3 x 394 student token-passes:
about +29% compute); memory: one chunk's activations, plus the teacher's keys and targets for all W images, which one
pass holds too (``[W, R, K]`` float32: 3.3 GB for W = 1024 and 4096 prototypes, and Sinkhorn's temporaries of that
size). Measured: docs/scaling.md, Exact micro-batches.

Processes: under DDP, the chunks' backward passes run inside the wrapped forward, where DDP's reducer is not yet
waiting for gradients (as under ``no_sync``): they accumulate locally, and the last chunk's backward all-reduces the
sum. Under FSDP2 (``ModelParallelStrategy``) every chunk's backward reduce-scatters into the sharded gradients. The
classic ``FSDPStrategy`` is refused: it does not run on a CPU, so it could not be tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from loca_lightning.pretrain import losses


@dataclass
class BatchTotals:
    """What every micro-batch needs of the whole batch: the labelled query tokens over the global batch (the
    cross-entropies' normaliser) and, with the clustering loss, the mean student prediction ``[K]`` and the token count
    over the global batch (me-max)."""

    num_valid: Tensor
    mean_prediction: Tensor | None = None
    num_tokens: Tensor | None = None


def splits(micro_batch_size: int | None, batch_size: int) -> bool:
    """Whether a batch of ``batch_size`` runs in chunks."""
    return micro_batch_size is not None and batch_size > micro_batch_size


def chunks(batch_size: int, micro_batch_size: int) -> list[slice]:
    """Consecutive slices of at most ``micro_batch_size`` images covering the batch."""
    return [slice(i, min(i + micro_batch_size, batch_size)) for i in range(0, batch_size, micro_batch_size)]


def check_micro_batch_size(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"micro_batch_size must be a positive number of images or null, got {value!r}")


def check_trainer(micro_batch_size: int | None, trainer: Any) -> None:
    """Refuse what a micro-batched step cannot be combined with (called when fitting starts)."""
    if micro_batch_size is None:
        return
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"model.init_args.micro_batch_size ({micro_batch_size}) and trainer.accumulate_grad_batches "
            f"({trainer.accumulate_grad_batches}) both split the batch: set data.init_args.batch_size to the whole "
            "per-device batch and trainer.accumulate_grad_batches to 1"
        )
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(trainer.strategy, FSDPStrategy):
        raise ValueError(
            "model.init_args.micro_batch_size is not supported under the classic FSDPStrategy (untested: backward "
            "passes would run inside its wrapped forward): use ModelParallelStrategy (FSDP2), DDP or one device"
        )


def holds_gradients(module: Any) -> bool:
    """True (once) after a micro-batched ``training_step`` left the gradients of its first chunks in place: Lightning's
    zero_grad, which comes between the step and the last chunk's backward, must then not run."""
    held, module.micro_batch_gradients = module.micro_batch_gradients, False
    return held


def training_step(
    module: Any,
    batch: dict[str, Tensor],
    reference_keep: Tensor,
    large_keep: Tensor,
    drop_path: Tensor | None,
    target: Tensor,
) -> dict[str, Tensor]:
    """The terms of ``module.compute_losses`` for the whole batch, computed chunk by chunk (see the module docstring).
    ``loss`` has the whole batch's value; its gradient is the last chunk's (the others' are already in ``.grad``)."""
    hp = module.hparams
    size = target.shape[0]
    parts = chunks(size, hp.micro_batch_size)
    num_focal = batch["query_focal"].shape[1]
    # The student's passes run twice: their drop-path multipliers are drawn once, here.
    if hp.shared_drop_path:  # the large query's are the reference's; the focal ones follow, as in encode_queries
        student_drop, focal_drop = drop_path, module.drop_path_scales(size * num_focal)
    else:  # each pass draws its own; the student's are fixed for both of its passes
        student_drop = module.student.backbone.sample_drop_path(size)
        focal_drop = module.student.backbone.sample_drop_path(size * num_focal)

    def rows(scales: Tensor | None, part: slice, per_image: int = 1) -> Tensor | None:
        return None if scales is None else scales[:, :, part.start * per_image : part.stop * per_image]

    def queries(part: slice) -> Tensor:
        large, focal = module.normalize(batch["query_large"][part]), module.normalize(batch["query_focal"][part])
        return module.encode_queries(
            large, focal, large_keep[part], rows(student_drop, part), rows(focal_drop, part, num_focal)
        )

    totals = BatchTotals(num_valid=losses.count_valid(target))
    keys = targets = None
    if module.teacher is not None:
        with torch.no_grad():
            prediction = losses.PredictionSum(hp.student_temperature)
            logits = None
            for part in parts:
                reference = module.normalize(batch["reference"][part])
                part_keys, part_logits = module.teacher_reference(
                    reference, reference_keep[part], rows(drop_path, part)
                )
                if logits is None:
                    keys = part_keys.new_empty((size, *part_keys.shape[1:]))
                    logits = part_logits.new_empty((size, *part_logits.shape[1:]))
                keys[part], logits[part] = part_keys, part_logits
                prediction.add(module.student.projection(queries(part)))
            targets = module.sinkhorn(logits, hp.teacher_temperature, hp.sinkhorn_iters)  # over the whole batch
            del logits
            totals.mean_prediction, totals.num_tokens = prediction.mean()

    _zero_grad(module)
    sums: dict[str, Tensor] = {}
    location_logits = []
    for i, part in enumerate(parts):
        if module.teacher is None:  # location-only variant: the student's reference pass trains too
            reference = module.normalize(batch["reference"][part])
            part_keys, part_targets = module.encode_reference(reference, reference_keep[part], rows(drop_path, part))
        else:
            part_keys, part_targets = keys[part], targets[part]
        out = module.compute_losses(queries(part), part_keys, part_targets, target[part], totals)
        location_logits.append(out.pop("location_logits").detach())
        out.pop("prototype_perplexity", None)
        if i < len(parts) - 1:
            _backward(module, out["loss"])
            module.micro_batch_gradients = True
        else:
            last_loss = out["loss"]
        for key, value in out.items():
            sums[key] = value.detach() if key not in sums else sums[key] + value.detach()
    terms = dict(sums)
    # the whole batch's value; the gradient of the last chunk, which Lightning backpropagates
    terms["loss"] = last_loss + (sums["loss"] - last_loss.detach())
    if "loss_me_max" in terms:
        terms["prototype_perplexity"] = torch.exp(-terms["loss_me_max"])
    terms["location_logits"] = torch.cat(location_logits)
    return terms


def _zero_grad(module: Any) -> None:
    """Zero the gradients the optimizers step on, as Lightning's own zero_grad would (it comes too late for this
    step). Not ``module.zero_grad()`` under a trainer: FSDP2 root units keep their gathered parameters registered after
    a forward pass, so the module's parameters are then not the sharded ones that hold the gradients."""
    trainer = module._trainer
    optimizers = trainer.optimizers if trainer is not None else []
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    if not optimizers:
        module.zero_grad(set_to_none=True)


def _backward(module: Any, loss: Tensor) -> None:
    """``loss.backward()``, scaled by the run's gradient scaler if it has one (fp16), as Lightning scales the last."""
    trainer = module._trainer
    scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
    (loss if scaler is None else scaler.scale(loss)).backward()

"""LOCA's losses: location cross-entropy, Sinkhorn-balanced clustering targets, clustering cross-entropy and
mean-entropy maximisation (me-max). Pure functions, float32 inside, process-group aware.

Distributed semantics: every function returns the value for the GLOBAL batch, identical on all ranks. Sums
that carry a gradient are all-reduced with an autograd-aware sum whose backward all-reduces the incoming
gradients too, so a rank's local inputs receive ``world_size`` times their share of the global gradient;
DDP's gradient averaging over ``world_size`` ranks then yields exactly the gradient of one process on the
whole batch. Normalisers (valid counts) are all-reduced without gradient. Without an initialised process
group everything is local.

Micro-batches of one batch (the module's ``micro_batch_size``): ``location_loss`` and ``clustering_loss`` take the
whole batch's valid count as ``num_valid``, and :func:`me_max_share` replaces :func:`me_max_loss` given the whole
batch's mean prediction (:class:`PredictionSum`); the micro-batches' values then add up to the whole batch's losses and
their gradients to its gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "location_accuracy",
    "location_loss",
    "sinkhorn_knopp",
    "clustering_loss",
    "me_max_loss",
    "me_max_share",
    "PredictionSum",
    "count_valid",
    "mean_assignment_perplexity",
]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the sum of the ranks' incoming gradients (the adjoint of a sum that
    every rank computes)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _global_sum_with_grad(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    # torch.distributed.nn.functional.all_reduce does the same but is deprecated in recent torch.
    return _AllReduceSum.apply(tensor, group) if _distributed() else tensor


@torch.no_grad()
def _global_sum_no_grad(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    out = tensor.detach().clone()
    if _distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _check_targets(
    target: Tensor, batch_shape: tuple[int, ...], num_classes: int, name: str, check_range: bool = True
) -> None:
    """Shape, dtype and (with ``check_range``) range check of integer targets (-1 = no label); the range check
    reads a value back from the device, i.e. waits for all queued work (a host sync)."""
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(batch_shape):
        raise ValueError(f"{name} must have shape {tuple(batch_shape)} (the logits' [B, Q]), got {tuple(target.shape)}")
    if check_range and target.numel() and bool(((target < -1) | (target >= num_classes)).any()):
        raise ValueError(
            f"{name} values must be -1 (no label) or in [0, {num_classes - 1}], got "
            f"min {int(target.min())}, max {int(target.max())}"
        )


def _check_temperature(temperature: float, name: str = "temperature") -> None:
    if not temperature > 0:
        raise ValueError(f"{name} must be positive, got {temperature}")


def location_loss(
    logits: Tensor,
    target: Tensor,
    group: dist.ProcessGroup | None = None,
    check_range: bool = True,
    num_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax cross-entropy of position ``logits [B, Q, R]`` against ``target [B, Q]`` (-1 = no label), averaged
    over the valid tokens of the global batch. Returns ``(loss, accuracy)``; accuracy is detached and global.
    ``check_range=False`` skips the target range check (a host sync) for callers that validated targets.
    ``num_valid``: the global count of valid tokens of a larger batch this is a micro-batch of (:func:`count_valid`);
    loss and accuracy are then this micro-batch's shares of that batch's."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, Q, R], got shape {tuple(logits.shape)}")
    _check_targets(target, logits.shape[:2], logits.shape[-1], "target", check_range)
    target = target.long()
    with torch.autocast(device_type=logits.device.type, enabled=False):
        valid = target != -1  # [B, Q]
        # Invalid rows are zeroed BEFORE the softmax: masking only the result would still send 0 * NaN = NaN
        # into the gradient of a garbage row.
        safe_logits = torch.where(valid[..., None], logits.float(), 0.0)  # [B, Q, R]
        nll = F.cross_entropy(safe_logits.flatten(0, 1), target.clamp_min(0).flatten(), reduction="none")
        nll = torch.where(valid.flatten(), nll, 0.0)  # [B*Q]
        if num_valid is None:
            num_valid = count_valid(target, group)
        loss = _global_sum_with_grad(nll.sum(), group) / num_valid.clamp_min(1.0)
        correct = location_accuracy(safe_logits, target) * valid.sum(dtype=torch.float32)
        accuracy = _global_sum_no_grad(correct, group) / num_valid.clamp_min(1.0)
    return loss, accuracy


@torch.no_grad()
def location_accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Fraction of labelled tokens (target != -1) whose argmax is the target: local batch, detached, float32."""
    valid = target != -1
    correct = ((logits.argmax(-1) == target) & valid).sum(dtype=torch.float32)
    return correct / valid.sum(dtype=torch.float32).clamp_min(1.0)


@torch.no_grad()
def count_valid(target: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Labelled tokens (target != -1) over the global batch: the location and clustering losses' normaliser."""
    return _global_sum_no_grad((target != -1).sum(dtype=torch.float32), group)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor, temperature: float = 0.05, num_iters: int = 3, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Balanced soft assignments of tokens to prototypes: ``softmax(teacher_logits [N, K] / temperature)``, then
    ``num_iters`` times: divide each column by its mass over the global batch, then each row by its sum.

    Leading dimensions other than the last are all treated as tokens (``[B, R, K]`` works and keeps its shape).
    Rows of the result sum to 1. No gradient.
    """
    if teacher_logits.dim() < 2:
        raise ValueError(f"teacher_logits must be [N, K] (or [..., K]), got shape {tuple(teacher_logits.shape)}")
    _check_temperature(temperature)
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")
    tiny = torch.finfo(torch.float32).tiny  # an all-zero (underflowed) column or row stays zero, not NaN
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        shape = teacher_logits.shape
        q = torch.softmax(teacher_logits.detach().float().reshape(-1, shape[-1]) / temperature, dim=-1)  # [N, K]
        for _ in range(num_iters):
            column_mass = _global_sum_no_grad(q.sum(dim=0, keepdim=True), group)  # [1, K]
            q = q / column_mass.clamp_min(tiny)
            q = q / q.sum(dim=1, keepdim=True).clamp_min(tiny)
        return q.reshape(shape)


def clustering_loss(
    student_logits: Tensor,
    teacher_targets: Tensor,
    target: Tensor,
    temperature: float = 0.1,
    group: dist.ProcessGroup | None = None,
    check_range: bool = True,
    num_valid: Tensor | None = None,
) -> Tensor:
    """Cross-entropy between the teacher distribution of each query token's target reference cell (of its own
    image) and ``softmax(student_logits / temperature)``, averaged over the valid tokens of the global batch.

    Shapes: ``student_logits [B, Q, K]``, ``teacher_targets [B, R, K]`` (e.g. Sinkhorn output), ``target [B, Q]``
    (-1 = no label). The teacher side gets no gradient. ``check_range=False`` skips the target range check (a
    host sync) for callers that validated targets. ``num_valid`` as in :func:`location_loss`.
    """
    if student_logits.dim() != 3 or teacher_targets.dim() != 3:
        raise ValueError(
            f"student_logits and teacher_targets must be [B, Q, K] and [B, R, K], got shapes "
            f"{tuple(student_logits.shape)} and {tuple(teacher_targets.shape)}"
        )
    b, _, k = student_logits.shape
    if teacher_targets.shape[0] != b or teacher_targets.shape[-1] != k:
        raise ValueError(
            f"teacher_targets must be [B={b}, R, K={k}] to match student_logits, got {tuple(teacher_targets.shape)}"
        )
    _check_temperature(temperature)
    _check_targets(target, student_logits.shape[:2], teacher_targets.shape[1], "target", check_range)
    target = target.long()
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        valid = target != -1  # [B, Q]
        safe_logits = torch.where(valid[..., None], student_logits.float(), 0.0)  # [B, Q, K]
        log_p = F.log_softmax(safe_logits / temperature, dim=-1)
        index = target.clamp_min(0)[..., None].expand(-1, -1, k)  # [B, Q, K]
        # gather along dim 1 of the SAME image b: a query never reads another image's targets.
        q_targets = teacher_targets.detach().float().gather(1, index)  # [B, Q, K]
        ce = torch.where(valid, -(q_targets * log_p).sum(dim=-1), 0.0)  # [B, Q]
        if num_valid is None:
            num_valid = count_valid(target, group)
        return _global_sum_with_grad(ce.sum(), group) / num_valid.clamp_min(1.0)


def _prediction_sum(student_logits: Tensor, temperature: float) -> tuple[Tensor, int]:
    """``softmax(student_logits [..., K] / temperature)`` summed over this process's tokens ``[K]`` (float32), and
    their number."""
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits must be [B, Q, K] (or [..., K]), got shape {tuple(student_logits.shape)}")
    _check_temperature(temperature)
    probs = torch.softmax(student_logits.float() / temperature, dim=-1)  # [..., K]
    return probs.reshape(-1, probs.shape[-1]).sum(dim=0), probs.numel() // probs.shape[-1]


def _global_mean_probs(student_logits: Tensor, temperature: float, group) -> Tensor:
    """Mean of ``softmax(student_logits / temperature)`` over all tokens of the global batch, ``[K]``."""
    local_sum, num_tokens = _prediction_sum(student_logits, temperature)
    count = _global_sum_no_grad(local_sum.new_tensor(float(num_tokens)), group)
    return _global_sum_with_grad(local_sum, group) / count.clamp_min(1.0)


def me_max_loss(student_logits: Tensor, temperature: float = 0.1, group: dist.ProcessGroup | None = None) -> Tensor:
    """Mean-entropy maximisation: ``sum_k p_k log p_k`` (<= 0, minimised) with ``p`` the mean prediction
    ``softmax(student_logits [B, Q, K] / temperature)`` over ALL query tokens (valid or not) of the global batch."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        p = _global_mean_probs(student_logits, temperature, group)  # [K]
        # clamp inside the log only: p_k = 0 contributes 0 with a finite gradient
        return (p * p.clamp_min(1e-30).log()).sum()


class PredictionSum:
    """The mean prediction of a batch seen in micro-batches: :meth:`add` each micro-batch's ``student_logits``
    (no gradient), then :meth:`mean` (``[K]``, over all tokens of the global batch) and :attr:`num_tokens` feed
    :func:`me_max_share`."""

    def __init__(self, temperature: float) -> None:
        _check_temperature(temperature)
        self.temperature = temperature
        self.total: Tensor | None = None  # [K], local
        self.count = 0  # local tokens

    @torch.no_grad()
    def add(self, student_logits: Tensor) -> None:
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            part, count = _prediction_sum(student_logits, self.temperature)  # [K]
        self.total = part if self.total is None else self.total + part
        self.count += count

    def mean(self, group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
        """``(p [K], num_tokens)`` over the global batch (one all-reduce each)."""
        if self.total is None:
            raise ValueError("PredictionSum.mean() before any add()")
        num_tokens = _global_sum_no_grad(self.total.new_tensor(float(self.count)), group).clamp_min(1.0)
        return _global_sum_no_grad(self.total, group) / num_tokens, num_tokens


def me_max_share(
    student_logits: Tensor,
    batch_mean: Tensor,
    num_tokens: Tensor,
    temperature: float = 0.1,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """One micro-batch's share of :func:`me_max_loss` on a larger batch whose mean prediction ``batch_mean [K]`` and
    global token count ``num_tokens`` are known (:class:`PredictionSum`, from a pass without gradient).

    me-max is ``f(p) = sum_k p_k log p_k`` of the batch mean ``p``, and ``p`` is a sum over micro-batches of their
    parts ``p_j``. The share is ``f'(p) . p_j - sum(p_j)`` with ``f'(p)`` held constant: summed over the micro-batches
    its value is ``f'(p) . p - sum(p) = f(p)`` and its gradient ``f'(p) . dp``, the whole batch's exactly."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        p = batch_mean.detach().float()
        slope = p.clamp_min(1e-30).log() + (p > 1e-30).float()  # d/dp of p * log(clamp(p)), as me_max_loss
        part = _global_sum_with_grad(_prediction_sum(student_logits, temperature)[0], group) / num_tokens  # p_j [K]
        return (slope * part).sum() - part.detach().sum()


@torch.no_grad()
def mean_assignment_perplexity(
    student_logits: Tensor, temperature: float = 0.1, group: dist.ProcessGroup | None = None
) -> Tensor:
    """``exp(entropy(p))`` of the global mean prediction ``p`` (1 = collapsed to one prototype, K = uniform);
    detached, for logging."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        p = _global_mean_probs(student_logits.detach(), temperature, group)
        return torch.exp(-(p * p.clamp_min(1e-30).log()).sum())

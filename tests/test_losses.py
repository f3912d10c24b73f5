"""Tests of LOCA's losses: known answers, -1 masking, pairing, bf16 autocast, and 2-process gloo == 1 process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist import run_distributed
from torch import nn

from loca_lightning.pretrain.losses import (
    clustering_loss,
    location_loss,
    me_max_loss,
    mean_assignment_perplexity,
    sinkhorn_knopp,
)

# ----------------------------------------------------------------------------------------------------------------
# location loss


def test_location_loss_equals_cross_entropy_with_ignore_index() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, generator=gen, requires_grad=True)
    target = torch.randint(-1, 5, (3, 7), generator=gen)
    loss, _ = location_loss(logits, target)
    expected = F.cross_entropy(logits.reshape(-1, 5), target.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, expected)
    grad = torch.autograd.grad(loss, logits)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(expected, logits)[0])


def test_location_accuracy_known_answer() -> None:
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]])  # argmax 0,1,2,0
    target = torch.tensor([[0, 2, -1, 0]])  # right, wrong, ignored, right
    loss, accuracy = location_loss(logits, target)
    assert accuracy.item() == pytest.approx(2 / 3)
    assert not accuracy.requires_grad
    log_z = math.log(math.exp(5) + 2)
    assert loss.item() == pytest.approx(((log_z - 5) + log_z + (log_z - 5)) / 3, rel=1e-6)


def test_no_valid_token_gives_zero_loss_and_zero_grad() -> None:
    logits = torch.randn(2, 3, 4, requires_grad=True)
    student = torch.randn(2, 3, 6, requires_grad=True)
    target = torch.full((2, 3), -1)
    loss, accuracy = location_loss(logits, target)
    loss = loss + clustering_loss(student, torch.rand(2, 4, 6), target)
    loss.backward()
    assert loss.item() == 0.0 and accuracy.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits)) and torch.equal(student.grad, torch.zeros_like(student))


def test_invalid_targets_never_reach_loss_or_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    b, q, r, k = 2, 6, 5, 7
    target = torch.tensor([[0, -1, 4, -1, 2, -1], [-1, 3, -1, 1, -1, 0]])
    invalid = target == -1
    loc_clean = torch.randn(b, q, r, generator=gen)
    stu_clean = torch.randn(b, q, k, generator=gen)
    teacher = sinkhorn_knopp(torch.randn(b, r, k, generator=gen))

    def losses_and_grads(loc: torch.Tensor, stu: torch.Tensor) -> list[torch.Tensor]:
        loc, stu = loc.clone().requires_grad_(), stu.clone().requires_grad_()
        loss_loc, acc = location_loss(loc, target)
        loss_clu = clustering_loss(stu, teacher, target)
        (loss_loc + loss_clu).backward()
        return [loss_loc.detach(), acc, loss_clu.detach(), loc.grad, stu.grad]

    clean = losses_and_grads(loc_clean, stu_clean)
    poisons = [float("nan"), 1e30, -1e30, float("inf"), float("-inf")]
    for poison in poisons:
        loc, stu = loc_clean.clone(), stu_clean.clone()
        loc[invalid] = poison
        # half the student entries of invalid rows poisoned, the others huge
        stu[invalid] = torch.where(torch.rand(stu[invalid].shape, generator=gen) < 0.5, poison, 1e20)
        poisoned = losses_and_grads(loc, stu)
        for a, c in zip(poisoned, clean):
            assert torch.isfinite(a).all(), poison
            assert torch.equal(a, c), poison
    assert torch.equal(clean[3][invalid], torch.zeros_like(clean[3][invalid]))
    assert torch.equal(clean[4][invalid], torch.zeros_like(clean[4][invalid]))


# ----------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp


def test_sinkhorn_hand_case() -> None:
    # softmax rows [0.8, 0.2], [0.4, 0.6]; column masses 1.2, 0.8 -> [[2/3, 1/4], [1/3, 3/4]];
    # row sums 11/12, 13/12 -> [[8/11, 3/11], [4/13, 9/13]].
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6]], dtype=torch.float64)
    out = sinkhorn_knopp(probs.log(), temperature=1.0, num_iters=1)
    expected = torch.tensor([[8 / 11, 3 / 11], [4 / 13, 9 / 13]])
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=0)
    # temperature divides the logits before the softmax
    torch.testing.assert_close(sinkhorn_knopp(0.05 * probs.log(), temperature=0.05, num_iters=1), out)
    torch.testing.assert_close(sinkhorn_knopp(probs.log(), temperature=1.0, num_iters=0), probs.float())


def test_sinkhorn_rows_sum_to_one_and_columns_balance() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.rand(24, 6, generator=gen) * 2 - 1  # cosines
    out = sinkhorn_knopp(logits, temperature=0.5, num_iters=3)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(24))
    assert (out >= 0).all()
    balanced = sinkhorn_knopp(logits, temperature=0.5, num_iters=200)
    torch.testing.assert_close(balanced.sum(dim=1), torch.ones(24))
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((6,), 24 / 6), atol=1e-4, rtol=0)
    # more iterations balance better
    spread = [sinkhorn_knopp(logits, 0.5, n).sum(dim=0).std().item() for n in (0, 1, 3, 10)]
    assert spread == sorted(spread, reverse=True) and spread[-1] < spread[0] / 10


def test_sinkhorn_leading_dims_are_tokens_and_no_grad() -> None:
    logits = torch.randn(3, 5, 4, requires_grad=True)
    out = sinkhorn_knopp(logits, temperature=0.1)
    assert out.shape == (3, 5, 4) and not out.requires_grad
    torch.testing.assert_close(out.reshape(15, 4), sinkhorn_knopp(logits.reshape(15, 4), temperature=0.1))


def test_sinkhorn_survives_underflow() -> None:
    # prototype 2 never wins by a margin of 1000/0.05: its column underflows to 0 and must stay 0, not NaN
    logits = torch.tensor([[0.0, 0.0, -1000.0], [1.0, 0.0, -1000.0]])
    out = sinkhorn_knopp(logits, temperature=0.05)
    assert torch.isfinite(out).all() and torch.equal(out[:, 2], torch.zeros(2))
    torch.testing.assert_close(out.sum(dim=1), torch.ones(2))


# ----------------------------------------------------------------------------------------------------------------
# clustering loss and me-max


def test_clustering_loss_known_answer() -> None:
    # student softmax equals the teacher target [0.25, 0.75]: the cross-entropy is that distribution's entropy
    student = 0.1 * torch.tensor([[[0.0, math.log(3.0)], [9.0, 9.0]]])
    teacher = torch.tensor([[[0.5, 0.5], [0.25, 0.75]]])
    loss = clustering_loss(student, teacher, torch.tensor([[1, -1]]), temperature=0.1)
    assert loss.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-6)


def test_clustering_loss_matches_per_token_loop_and_pairs_each_query_with_its_own_image() -> None:
    gen = torch.Generator().manual_seed(3)
    b, q, r, k = 3, 5, 4, 6
    student = torch.randn(b, q, k, generator=gen)
    teacher = sinkhorn_knopp(torch.randn(b, r, k, generator=gen), temperature=0.1)
    target = torch.randint(-1, r, (b, q), generator=gen)
    target[0, 0] = 2
    terms = [
        -(teacher[i, target[i, j]] * F.log_softmax(student[i, j] / 0.1, dim=-1)).sum()
        for i in range(b)
        for j in range(q)
        if target[i, j] >= 0
    ]
    loss = clustering_loss(student, teacher, target)
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    # handing image 0 another image's targets changes the loss; permuting whole images does not
    assert not torch.allclose(clustering_loss(student, teacher[[1, 0, 2]], target), loss)
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(clustering_loss(student[perm], teacher[perm], target[perm]), loss)


def test_me_max_known_answers() -> None:
    k = 16
    assert me_max_loss(torch.zeros(2, 3, k)).item() == pytest.approx(-math.log(k))
    assert mean_assignment_perplexity(torch.zeros(2, 3, k)).item() == pytest.approx(k)
    # softmax rows [0.2, 0.8] and [0.6, 0.4] (temperature 1) -> p = [0.4, 0.6]
    logits = torch.tensor([[[0.0, math.log(4.0)], [math.log(1.5), 0.0]]])
    value = 0.4 * math.log(0.4) + 0.6 * math.log(0.6)
    assert me_max_loss(logits, temperature=1.0).item() == pytest.approx(value, rel=1e-6)
    assert mean_assignment_perplexity(logits, temperature=1.0).item() == pytest.approx(math.exp(-value), rel=1e-6)
    # collapse onto one prototype: value 0, perplexity 1
    collapsed = torch.zeros(1, 4, k)
    collapsed[..., 3] = 100.0
    assert me_max_loss(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    assert mean_assignment_perplexity(collapsed).item() == pytest.approx(1.0, abs=1e-6)


def test_me_max_counts_every_token_and_has_finite_gradient_at_zero_mass() -> None:
    logits = torch.zeros(1, 2, 3)
    logits[0, 0, 0] = logits[0, 1, 0] = 1e4  # p = [1, 0, 0] exactly in float32
    logits.requires_grad_()
    loss = me_max_loss(logits, temperature=1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_losses_under_bf16_autocast_return_float32() -> None:
    gen = torch.Generator().manual_seed(4)
    layer = nn.Linear(8, 6)
    x = torch.randn(2, 5, 8, generator=gen)
    target = torch.tensor([[0, 5, -1, 2, 1], [-1, -1, 3, 4, 0]])
    teacher_logits = torch.randn(2, 6, 6, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        teacher = sinkhorn_knopp(teacher_logits.bfloat16())
        outputs = [
            *location_loss(logits, target),
            teacher,
            clustering_loss(logits, teacher.bfloat16(), target),
            me_max_loss(logits),
            mean_assignment_perplexity(logits),
        ]
    for out in outputs:
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # float32 inside: the same bf16 inputs give the float32 computation's answer
    torch.testing.assert_close(outputs[0], location_loss(logits.float(), target)[0])
    torch.testing.assert_close(outputs[4], me_max_loss(logits.float()))


def test_bad_inputs_raise_value_errors() -> None:
    logits, target = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"target must have shape \(2, 3\)"):
        location_loss(logits, target[:, :2])
    with pytest.raises(ValueError, match="integer"):
        location_loss(logits, target.float())
    with pytest.raises(ValueError, match=r"-1 \(no label\) or in \[0, 3\]"):
        location_loss(logits, torch.full((2, 3), 4))
    with pytest.raises(ValueError, match="-1"):
        clustering_loss(logits, torch.rand(2, 5, 4), torch.full((2, 3), -2))
    with pytest.raises(ValueError, match="teacher_targets"):
        clustering_loss(logits, torch.rand(3, 5, 4), target)
    with pytest.raises(ValueError, match="temperature"):
        me_max_loss(logits, temperature=0.0)
    with pytest.raises(ValueError, match="num_iters"):
        sinkhorn_knopp(logits, num_iters=-1)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        sinkhorn_knopp(torch.randn(4))


# ----------------------------------------------------------------------------------------------------------------
# 2 processes == 1 process on the whole batch

B, Q, R, K, D = 4, 6, 5, 8, 4
SPLITS = {"even": [0, 2, 4], "uneven": [0, 3, 4]}  # image boundaries of rank 0 and rank 1
PARAMS = ("loc.weight", "loc.bias", "proj.weight", "proj.bias")


def _global_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    target = torch.tensor(
        [
            [0, 1, 2, 3, 4, -1],
            [4, 4, 0, -1, 2, 1],
            [-1, -1, 3, -1, -1, -1],  # rank 1 holds 1 valid token against rank 0's 10
            [-1, -1, -1, -1, -1, -1],
        ]
    )
    return {
        "features": torch.randn(B, Q, D, generator=gen),
        "teacher_logits": torch.rand(B, R, K, generator=gen) * 2 - 1,
        "target": target,
    }


def _loca_step(features: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, group=None) -> dict:
    """Location + clustering + me-max on a shared toy model; returns the losses and every gradient."""
    torch.manual_seed(6)  # same layers in every process
    model = nn.ModuleDict({"loc": nn.Linear(D, R), "proj": nn.Linear(D, K)})
    features = features.clone().requires_grad_()
    teacher = sinkhorn_knopp(teacher_logits, temperature=0.05, group=group)
    loc_loss, accuracy = location_loss(model["loc"](features), target, group=group)
    student = model["proj"](features)
    clu_loss = clustering_loss(student, teacher, target, group=group)
    me_loss = me_max_loss(student, group=group)
    (loc_loss + clu_loss + me_loss).backward()
    out = {
        "location": loc_loss.detach(),
        "accuracy": accuracy,
        "clustering": clu_loss.detach(),
        "me_max": me_loss.detach(),
        "perplexity": mean_assignment_perplexity(student, group=group),
        "sinkhorn": teacher,
        "features.grad": features.grad,
    }
    out.update({name: param.grad for name, param in model.named_parameters()})
    return out


def _worker(rank: int, world_size: int) -> dict:
    batch = _global_batch()
    results = {}
    for split_name, bounds in SPLITS.items():
        part = slice(bounds[rank], bounds[rank + 1])
        group = dist.new_group([0, 1]) if split_name == "uneven" else None  # explicit group argument too
        out = _loca_step(batch["features"][part], batch["teacher_logits"][part], batch["target"][part], group=group)
        for name in PARAMS:  # what DDP does to parameter gradients
            dist.all_reduce(out[name])
            out[name] /= world_size
        results[split_name] = out
    return results


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_whole_batch() -> None:
    ranks = run_distributed(_worker, 2)
    batch = _global_batch()
    single = _loca_step(batch["features"], batch["teacher_logits"], batch["target"])
    # the test only means something if per-rank normalisation would be wrong
    naive = _loca_step(batch["features"][:2], batch["teacher_logits"][:2], batch["target"][:2])
    assert not torch.allclose(naive["location"], single["location"])
    for split_name, bounds in SPLITS.items():
        outs = [r[split_name] for r in ranks]
        for name in ("location", "accuracy", "clustering", "me_max", "perplexity"):
            assert torch.equal(outs[0][name], outs[1][name]), (split_name, name)
            torch.testing.assert_close(outs[0][name], single[name], atol=1e-6, rtol=1e-5, msg=f"{split_name} {name}")
        for name in PARAMS:
            torch.testing.assert_close(outs[0][name], single[name], atol=1e-6, rtol=1e-5, msg=f"{split_name} {name}")
        torch.testing.assert_close(torch.cat([o["sinkhorn"] for o in outs]), single["sinkhorn"], atol=1e-6, rtol=1e-5)
        # per-rank inputs get world_size times their share; DDP's averaging of parameters undoes the factor
        for rank, out in enumerate(outs):
            part = slice(bounds[rank], bounds[rank + 1])
            torch.testing.assert_close(out["features.grad"], 2 * single["features.grad"][part], atol=1e-6, rtol=1e-5)

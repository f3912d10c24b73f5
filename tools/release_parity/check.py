"""Check: float64 numpy re-derivations of what the release's step computed (softmax cross-entropy with weights,
Sinkhorn), and :func:`close`, which records each comparison and stops the run when one disagrees."""

from __future__ import annotations

import numpy as np


def np_log_softmax(x):
    """Log-softmax over the last axis."""
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_softmax(x):
    """Softmax over the last axis."""
    return np.exp(np_log_softmax(x))


def np_weighted_ce(logits, target_probs, weights):
    """The release's ``weighted_softmax_cross_entropy``: per-row CE times weight, over the sum of weights + 1e-8."""
    per_row = -(target_probs * np_log_softmax(logits)).sum(-1) * weights
    return per_row.sum() / (weights.sum() + 1e-8)


def np_sinkhorn(x, iters=3):
    """The release's Sinkhorn: ``iters`` times column sums over the batch, then row sums, no epsilon."""
    for _ in range(iters):
        x = x / x.sum(0, keepdims=True)
        x = x / x.sum(-1, keepdims=True)
    return x


def close(name, a, b, atol, rtol=0.0, checks=None):
    """Record in ``checks`` whether ``a`` and ``b`` agree (largest absolute error) and stop the run when they do not."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    ok = bool(np.allclose(a, b, atol=atol, rtol=rtol))
    if checks is not None:
        checks[name] = {"max_abs_err": err, "ok": ok}
    if not ok:
        raise AssertionError(f"self-check {name}: max abs error {err:.3g} (atol {atol}, rtol {rtol})")

"""Record: turn one observed release step (:meth:`~tools.release_parity.capture.Release.instrumented_step`) and the
states around it into the named arrays of the fixture files, re-deriving every loss, the Sinkhorn targets, the
clipped gradient, the AdamW update and the EMA with :mod:`tools.release_parity.check` on the way.
Names, shapes and token order: tests/data/release_parity/README.md.
"""

from __future__ import annotations

import numpy as np

from tools.release_parity.capture import N_WARM_STEPS, SIZES, cap_key
from tools.release_parity.check import close, np_sinkhorn, np_softmax, np_weighted_ce


def flat(tree, prefix: str) -> dict:
    """{prefix/a/b/c: float32 array} from a nested dict of arrays."""
    out = {}

    def walk(node, path):
        if hasattr(node, "items"):
            for k, v in node.items():
                walk(v, path + [str(k)])
        else:
            out["/".join(path)] = np.asarray(node)

    walk(tree, [prefix])
    return out


def grad_leaf(tree, flat_key: str):
    """The leaf of ``tree`` named by a flat key (its first part, the prefix, skipped)."""
    node = tree
    for part in flat_key.split("/")[1:]:
        node = node[part]
    return np.asarray(node)


def eval_outputs(release, model, state_host, batch, cluster: bool) -> dict:
    """Eval-mode (``train=False``) reference features and logits under the teacher and student trees, and the 3x3 positional table."""
    jax = release.jax
    apply = jax.jit(lambda p, x: model.flax_model.apply({"params": p}, x, train=False))
    out = {}
    for who, tree in (("teacher", state_host.ema_params), ("student", state_host.params)):
        loc, proj, feats, idx = apply(tree, batch["reference"])
        assert idx is None
        out[f"eval/{who}_ref_features"] = np.asarray(feats)
        out[f"eval/{who}_ref_loc_logits"] = np.asarray(loc)
        if cluster:
            out[f"eval/{who}_ref_proj_logits"] = np.asarray(proj)
        table = tree["ToTokenSequence_0"]["posembed_input"]
        d = table.shape[-1]
        out[f"eval/{who}_posemb_3x3"] = np.asarray(
            jax.image.resize(table, (1, release.focal_grid, release.focal_grid, d), "bilinear")
        )
    return out


def state_arrays(s) -> dict:
    """A train state as flat arrays: params, ema_params, AdamW moments and counts, hyperparameters, step and key."""
    opt = s.opt_state
    adam = opt.inner_state[0]
    out = {}
    out.update(flat(s.params, "params"))
    out.update(flat(s.ema_params, "ema_params"))
    out.update(flat(adam.mu, "opt_mu"))
    out.update(flat(adam.nu, "opt_nu"))
    out["opt/count"] = np.asarray(opt.count, np.int32)
    out["opt/adam_count"] = np.asarray(adam.count, np.int32)
    for k, v in opt.hyperparams.items():
        out[f"opt/hyperparams/{k}"] = np.asarray(v, np.float32)
    out["global_step"] = np.asarray(s.global_step, np.int32)
    out["rng"] = np.asarray(s.rng)
    return out


def record_run(release, config, before, after, metrics_plain, metrics, cap, batch, cluster):
    """The arrays and metadata of one observed step (masks, forward outputs, losses, gradients, update), each re-derived and checked."""
    B, T0, T1, n_pos = release.B, SIZES["query_max_seqlen"], release.focal_grid**2, release.n_pos
    F = SIZES["n_focal"]
    checks: dict = {}
    a: dict = {}

    ref = dict(zip(cap_key(cap, "top", "reference")[2], cap_key(cap, "top", "reference")[1], strict=True))
    q0 = dict(zip(cap_key(cap, "top", "query0")[2], cap_key(cap, "top", "query0")[1], strict=True))
    foc = dict(zip(cap_key(cap, "top", "focal")[2], cap_key(cap, "top", "focal")[1], strict=True))
    band = ref["idx"].astype(np.int32)
    kept = q0["idx"].astype(np.int32)
    assert "idx" not in foc
    a["mask/reference_band"] = band
    a["mask/query0_kept"] = kept
    # The band is consecutive, the kept large-query tokens are distinct.
    assert band.shape == (int(0.2 * n_pos),) and np.all(np.diff(band) == 1), band
    assert kept.shape == (T0,) and len(set(kept.tolist())) == T0, kept

    # Drop path.
    dp = {}
    for key, vals in cap.items():
        if key[0] == "droppath":
            _, pass_, path = key
            keep, consistent, rate = vals
            if not bool(consistent):
                raise AssertionError(f"drop path {pass_}/{path}: output is not input * mask / keep_prob")
            a[f"droppath/{pass_}/{path}"] = keep.astype(bool)
            a[f"droppath_rate/{pass_}/{path}"] = np.float32(rate)
            dp[(pass_, path)] = keep.astype(bool)
    paths = sorted({p for _, p in dp})
    expected_paths = sorted(
        [f"encoderblock_{i}/StochasticDepth_{j}" for i in range(SIZES["num_layers"]) for j in (0, 1)]
        + [f"cross_attention_block/StochasticDepth_{j}" for j in (0, 1)]
    )
    assert paths == expected_paths, paths
    for p in paths:
        assert dp[("reference", p)].shape == (B,) and dp[("query0", p)].shape == (B,)
        assert dp[("focal", p)].shape == (F * B,)
    same_ref_q0 = all(np.array_equal(dp[("reference", p)], dp[("query0", p)]) for p in paths)
    dropped = {f"{pass_}/{p}": int((~m).sum()) for (pass_, p), m in sorted(dp.items()) if (~m).any()}

    # Forward outputs.
    a["step/ref_features"] = cap_key(cap, "encoder_norm", "reference")[0]
    a["step/ref_kv"] = ref["repr"]
    a["step/query0_features"] = q0["repr"]
    a["step/focal_features"] = foc["repr"]
    assert np.array_equal(cap_key(cap, "encoder_norm", "query0")[0], q0["repr"])
    assert np.array_equal(cap_key(cap, "encoder_norm", "focal")[0], foc["repr"])
    if cluster:  # 'late': all 16 tokens are encoded, the band is cut after encoder_norm
        assert np.array_equal(a["step/ref_features"][:, band], ref["repr"])
    else:  # 'early': the band is cut before the encoder
        assert np.array_equal(a["step/ref_features"], ref["repr"])
    a["step/query0_loc_logits"] = q0["loc"]
    a["step/focal_loc_logits"] = foc["loc"]
    assert q0["loc"].shape == (B, T0, n_pos) and foc["loc"].shape == (F * B, T1, n_pos)

    # Targets as the step builds them.
    q0_t = np.take(batch["query0_mask"].reshape(B, -1), kept, axis=1)
    foc_t = np.concatenate([batch[f"query{i}_mask"] for i in range(1, F + 1)]).reshape(F * B, -1)
    targets = np.concatenate([q0_t.reshape(-1), foc_t.reshape(-1)]).astype(np.int32)
    weights = targets != -1
    a["step/loc_targets"] = targets
    a["step/loc_weights"] = weights
    assert weights[: B * T0].any() and (~weights[: B * T0]).any(), "want labelled and unlabelled kept query0 tokens"
    assert (~weights[B * T0 :]).any() and weights[B * T0 :].any()

    loc_logits = np.concatenate([q0["loc"].reshape(-1, n_pos), foc["loc"].reshape(-1, n_pos)]).astype(np.float64)
    onehot = np.eye(n_pos)[np.where(weights, targets, 0)] * weights[:, None]
    location = float(cap[("loss", "location")][0])
    close("location_loss", np_weighted_ce(loc_logits, onehot, weights), location, atol=2e-6, checks=checks)

    losses = {
        "location": location,
        "total": float(metrics["total_loss"][0]),
        "feature": float(metrics["feature_loss"][0]),
    }
    if cluster:
        K = SIZES["head_output_dim"]
        a["step/ref_proj_logits"] = ref["proj"]
        a["step/query0_proj_logits"] = q0["proj"]
        a["step/focal_proj_logits"] = foc["proj"]
        assert ref["proj"].shape == (B * n_pos, K)
        assert q0["proj"].shape == (B * T0, K) and foc["proj"].shape == (F * B * T1, K)
        s_in, s_out = cap[("sinkhorn",)]
        a["step/sinkhorn_in"], a["step/sinkhorn_out"] = s_in, s_out
        close(
            "sinkhorn_in",
            np_softmax(ref["proj"].astype(np.float64) / config.sharpening),
            s_in,
            atol=1e-6,
            checks=checks,
        )
        close("sinkhorn_out", np_sinkhorn(s_in.astype(np.float64)), s_out, atol=1e-6, rtol=1e-4, checks=checks)
        student = np.concatenate([q0["proj"], foc["proj"]]).astype(np.float64) / config.model.temperature
        tgt = s_out.astype(np.float64).reshape(B, n_pos, K)
        rows = np.concatenate(
            [
                tgt[np.repeat(np.arange(B), T0), np.where(weights[: B * T0], targets[: B * T0], 0)],
                tgt[np.tile(np.repeat(np.arange(B), T1), F), np.where(weights[B * T0 :], targets[B * T0 :], 0)],
            ]
        )
        clustering = float(cap[("loss", "clustering")][0])
        close("clustering_loss", np_weighted_ce(student, rows, weights), clustering, atol=2e-6, checks=checks)
        p = np_softmax(student).mean(0)
        memax = float((p * np.log(p)).sum())
        close("memax", memax, losses["feature"] - clustering, atol=2e-6, checks=checks)
        losses.update(clustering=clustering, memax=memax)
        close("feature_loss", losses["feature"], clustering + memax, atol=2e-6, checks=checks)
    else:
        assert "proj" not in ref and ("sinkhorn",) not in cap and ("loss", "clustering") not in cap
        assert losses["feature"] == 0.0
    close("total_loss", losses["total"], location + (losses["feature"] if cluster else 0.0), atol=2e-6, checks=checks)
    close("total_loss_plain_step", float(metrics_plain["total_loss"][0]), losses["total"], atol=1e-6, checks=checks)
    for k, v in losses.items():
        a[f"loss/{k}"] = np.float32(v)

    # Gradients, clipping, AdamW, EMA.
    grad, clipped, norm = cap[("grad",)]
    a.update(flat(grad, "grad"))
    a.update(flat(clipped, "grad_clipped"))
    a["grad_global_norm"] = np.float32(norm)
    g64 = {k: v.astype(np.float64) for k, v in flat(grad, "g").items()}
    close("grad_global_norm", np.sqrt(sum((v**2).sum() for v in g64.values())), norm, atol=0, rtol=1e-5, checks=checks)
    if float(norm) < config.max_grad_norm:
        raise AssertionError(f"gradient norm {float(norm)} < max_grad_norm: clipping would not be exercised")
    scale = np.float32(config.max_grad_norm) / np.float32(norm)
    for k, v in flat(clipped, "g").items():
        close("grad_clipped", v, (grad_leaf(grad, k) * scale), atol=0, rtol=1e-6, checks=None)
    checks["grad_clipped"] = {"ok": True}

    momentum, step_seen = cap[("momentum",)]
    lr = np.float32(after.opt_state.hyperparams["learning_rate"])
    lr_fn, mom_fn = release.schedules(config)
    step = int(before.global_step)
    assert int(step_seen) == step == int(before.opt_state.count) == N_WARM_STEPS
    close("lr_schedule", float(release.jax.jit(lr_fn)(np.int32(step))), lr, atol=0, rtol=1e-7, checks=checks)
    close(
        "momentum_schedule", float(release.jax.jit(mom_fn)(np.int32(step))), momentum, atol=0, rtol=1e-7, checks=checks
    )
    hp = {k: float(v) for k, v in after.opt_state.hyperparams.items()}
    b1, b2, eps, wd = hp["b1"], hp["b2"], hp["eps"], hp["weight_decay"]
    count = int(before.opt_state.inner_state[0].count) + 1
    mu0 = flat(before.opt_state.inner_state[0].mu, "p")
    nu0 = flat(before.opt_state.inner_state[0].nu, "p")
    p0 = flat(before.params, "p")
    p1 = flat(after.params, "p")
    e0 = flat(before.ema_params, "p")
    e1 = flat(after.ema_params, "p")
    gc = flat(clipped, "p")
    worst_p = worst_e = 0.0
    for k in p0:
        g = gc[k].astype(np.float64)
        mu = b1 * mu0[k] + (1 - b1) * g
        nu = b2 * nu0[k] + (1 - b2) * g * g
        upd = (mu / (1 - b1**count)) / (np.sqrt(nu / (1 - b2**count)) + eps)
        if p0[k].ndim != 1:
            upd = upd + wd * p0[k]
        expect = p0[k] - float(lr) * upd
        worst_p = max(worst_p, float(np.max(np.abs(expect - p1[k]))))
        ema = float(momentum) * e0[k] + (1 - float(momentum)) * p1[k]
        worst_e = max(worst_e, float(np.max(np.abs(ema - e1[k]))))
    close("adamw_update", worst_p, 0.0, atol=1e-6, checks=checks)
    close("ema_update", worst_e, 0.0, atol=1e-6, checks=checks)
    a.update(flat(after.params, "params_after"))
    a.update(flat(after.ema_params, "ema_params_after"))
    a["lr"] = lr
    a["momentum"] = np.float32(momentum)
    a["weight_decay"] = np.float32(wd)
    a["max_grad_norm"] = np.float32(config.max_grad_norm)
    a["adam_b1"], a["adam_b2"], a["adam_eps"] = np.float32(b1), np.float32(b2), np.float32(eps)
    a["step_index"] = np.int32(step)

    run_meta = {
        "losses": losses,
        "lr": float(lr),
        "momentum": float(momentum),
        "grad_global_norm": float(norm),
        "droppath_reference_equals_query0": same_ref_q0,
        "droppath_dropped_samples": dropped,
        "masks": {"reference_band": band.tolist(), "query0_kept": kept.tolist()},
        "checks": checks,
        "config": {
            "temperature": config.model.temperature,
            "sharpening": config.sharpening,
            "weight_decay": config.weight_decay,
            "max_grad_norm": config.max_grad_norm,
            "reference_seqlen": config.reference_seqlen,
            "reference_seqlen_selection": config.reference_seqlen_selection,
            "query_max_seqlen": config.query_max_seqlen,
            "n_ref_positions": config.n_ref_positions,
            "number_of_focal_queries": config.dataset_configs.number_of_focal_queries,
            "stochastic_depth": config.model.stochastic_depth,
            "lr_configs": config.lr_configs.to_dict(),
            "momentum_rate": config.momentum_rate.to_dict(),
        },
    }
    return a, run_meta

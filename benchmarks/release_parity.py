"""Reference files from the authors' JAX LOCA code, for parity tests that run without JAX.

This is a harness, not a port: it imports the released code (google-research/scenic,
scenic/projects/loca) unmodified from the checkout given with --scenic, builds the released config
(configs/loca_imnet1k_base16.get_config()) with only sizes and the short schedule changed, sets up the
train state exactly as the release's ``trainer.train`` does (``vit.ViTLOCAModel``, scenic's
``initialize_model``, EMA copy, ``optax.inject_hyperparams(optax.adamw)`` with the ``ndim != 1`` decay mask,
``utils.TrainState``) and runs ONE real ``trainer.loca_train_step`` under ``jax.pmap(axis_name='batch')`` on
one CPU device, as ``trainer.train`` does. It records what goes in, what the step computed and what comes
out, and writes the pre-step state with the release's own ``utils.save_checkpoint``. Nothing from the
release is copied here; what gets committed are the small data files it writes.

Environment (JAX and TensorFlow do not belong in ours) and the exact command:

    python3.11 -m venv /tmp/jaxenv
    /tmp/jaxenv/bin/pip install "jax[cpu]" flax optax ml_collections clu absl-py immutabledict \
        tensorflow-cpu tensorflow_datasets tensorboard
    # scenic: a checkout of https://github.com/google-research/scenic (only its .py files are needed);
    # the committed files came from commit 4a38d475ee89cb821078c0e2bf2065ee030e1535
    /tmp/jaxenv/bin/python benchmarks/release_parity.py --scenic /tmp/scenic_src --out tests/data/release_parity

Versions used for the committed files: jax/jaxlib 0.10.2, flax 0.12.8, optax 0.2.8, numpy 2.4.6, CPU.
Deterministic: fixed seeds, XLA on one CPU thread (the script sets XLA_FLAGS and JAX_PLATFORMS itself),
npz members written with a fixed zip timestamp; a rerun reproduces every file bit for bit (the README
lists their sha256). It costs about 7 CPU-minutes (ten small XLA compilations on one thread; 22 minutes
of wall time on a busy 2-core machine).

What it does
============
Sizes (``SIZES`` below): ViT with 2 blocks, width D=20, 2 heads (head dim 10), MLP 80, patch 16,
posembs (4, 4); reference 64x64 px -> 16 reference cells (N_POS = 16), reference band of
int(0.2 * 16) = 3 CONSECUTIVE tokens; large query ("query0") 64x64 px, 6 of its 16 tokens kept
('unstructured': a random permutation's first 6, in that order, NOT sorted); 2 focal queries of 48x48 px
(3x3 = 9 tokens, all kept; their positional table is the 4x4 table resized by jax.image.resize(...,
'bilinear'), which antialiases when shrinking); projection head 20 -> 48 -> 48 -> 12 (L2-normalised) ->
40 prototypes (K = 40); temperature 0.1, sharpening 0.05; batch B = 4 images; weight decay 0.1; gradient
clip 1.0. Widths were cut from the brief's 64 so that all files stay a few MB; they were chosen all
different (20, 10, 80, 16, 48, 12, 40) so that a transposed kernel cannot pass a test.
The release's learning rate is base 1e-3 (the release scales 1e-3 by batch/1024; here it is set to 1e-3),
linear warmup 5 steps, cosine to alpha = 0.01 over a 20-step run; EMA momentum cosine 0.996 -> 1 over
20 steps: the release's factors strings, only the step counts changed.

Two objectives, each with stochastic depth 0 and 0.5 (four runs, one batch):
  full           apply_cluster_loss=True: teacher (= ema_params) encodes the reference in train mode with
                 drop_moment 'late' (all 16 tokens through the encoder, the band of 3 cut after
                 encoder_norm); queries get positional embeddings; location + clustering + me-max losses.
  location_only  apply_cluster_loss=False: no projection head in the model; the STUDENT (params) encodes the
                 reference with drop_moment 'early' (the band of 3 tokens cut before the encoder, so gradients
                 flow through the reference too); queries get NO positional embeddings; location loss only.

State before the recorded step: release init (PRNGKey(42) split as scenic's main + trainer.train do) ->
every parameter leaf += 0.05 * N(0, 1) (numpy seed 1; LayerNorm scales become 1 +- 0.05, biases +- 0.05)
-> ema_params = params + 0.02 * N(0, 1) (seed 2) -> SIX real release steps (deterministic config, drop path
0, random batches from seed 3, learning rates 0, 2e-4, ..., 1e-3) so that AdamW's mu/nu are real and its
bias correction is not the first-step one. The recorded step is therefore step 6 (global_step 6, opt_state
count 6); its learning rate is on the cosine part of the schedule (~0.989e-3, exact value in the files).
The drop-path-0.5 run of an objective starts from the same state (same checkpoint) as the drop-path-0 run;
stochastic depth changes no parameter.

How things were captured (the release's source is never edited; wrappers only observe):
  * ``loss_fn`` is an argument of ``loca_train_step``: a pass-through wrapper reports each call's value
    (1st call: location loss, 2nd call: clustering loss).
  * ``momentum_parameter_scheduler`` is an argument too: a pass-through wrapper reports the momentum used.
  * ``trainer.optimizers`` (jax.example_libraries.optimizers) is swapped, only while the step is traced,
    for a namespace whose ``clip_grads`` calls the real one and reports its input (the pmean'ed gradient),
    its output and the global L2 norm; ``utils.sinkhorn`` likewise reports its input and output.
  * ``flax.linen.intercept_methods`` around the step reports the outputs of each ``ViT4LOCA.__call__``
    (one per pass: reference, query0, focal, in that order), of ``encoder_norm`` and of every
    ``StochasticDepth`` (the per-sample keep mask, read off its output: a dropped sample's output is exactly
    zero, a kept one is exactly input / keep_prob, which is checked).
  All reports go through ``jax.debug.callback`` (primal values). The same step is also run without any
  observer from the same state: its losses are equal and its new state differs from the observed run's by
  at most a few float32 ulps (XLA fuses the two programs differently; ``meta_json`` records the largest
  difference). Every array of a run file comes from the observed execution, so the recorded gradients are
  exactly the ones that produced params_after.
  The script then re-derives, in float64 numpy, the two losses, the me-max term, Sinkhorn, the clipped
  gradient, the AdamW update and the EMA from the recorded arrays and stops if any disagrees.

Release details the tests must reproduce (read off the code these files came from)
==================================================================================
  * Losses are ``weighted_softmax_cross_entropy``: sum of per-row CE * weight / (sum of weights + 1e-8), per
    device. Unlabelled rows (target -1) have weight 0; in the clustering loss their target row is
    ``take_along_axis`` at index -1, i.e. reference token 15 (harmless, weight 0).
  * me-max averages softmax(student logits / 0.1) over ALL 96 query rows, labelled or not.
  * Sinkhorn: 3 iterations of (divide by column sums over the whole batch, then by row sums), no epsilon.
  * Projection head: Dense-GELU-Dense-GELU-Dense, x / ||x|| (no epsilon), then the prototypes with their
    columns divided by (||column|| + 1e-10) at every forward; the raw kernel is what is stored, decayed and
    updated. GELU is flax's default tanh approximation; LayerNorm epsilon 1e-6.
  * Location head (cross_attention_block): LayerNorm_0 on the queries, LayerNorm_1 on the keys/values,
    multi-head attention (queries never attend to each other), residual, LayerNorm_2 -> MlpBlock ->
    residual; then final_norm and position_predictor. Its StochasticDepth rate is 0 (never configured).
  * In the full objective the teacher's reference pass also runs its location head (all 16 reference tokens
    attending to the band); that output is unused.
  * Clipping is jax.example_libraries.optimizers.clip_grads: where(norm < max, g, g * (max / norm)), applied
    to the gradient of ``params`` only. AdamW (b1 0.9, b2 0.999, eps 1e-8, eps_root 0) decays every leaf
    with ndim != 1: kernels, the 2-D q/k/v biases [heads, D/heads], posembed_input, the patch kernel, the
    prototypes; not the 1-D biases, LayerNorm scales/biases.
  * The learning rate is evaluated by optax at the optimizer's own count (inject_hyperparams), the EMA
    momentum at train_state.global_step; the trainer keeps the two equal. The EMA runs over EVERY leaf,
    the location and projection heads included, also in location_only where the teacher is never used.
  * Token dropping: one band / one kept set per device batch (the same for all images). In location_only
    the reference band and the large query's kept set are both drawn in ToTokenSequence_0 with the same
    'droptok' key (same module path), so they are not independent draws; in full, the band is drawn at the
    model's top level ('late'), a different key.
  * Drop path: a layer's mask has shape [batch, 1, 1] and its key depends only on the dropout key and the
    module path (flax's make_rng), so the reference pass (teacher in full) and the large-query pass get the SAME per-image
    masks. The focal pass draws with the same keys at shape [2B, 1, 1]; with this jax (threefry
    'partitionable' random bits, jax's default since 0.5) its first B rows (focal query 1) then EQUAL the
    reference/query0 masks and only rows B..2B-1 are new draws; older jax gave unrelated masks. A test must
    replay the recorded masks, not rely on either. The teacher runs in train mode (drop path active).

Files (all in --out)
====================
Every ``.npz`` loads with ``numpy.load(path, allow_pickle=False)``; floats are float32, indices int32,
masks bool; strings are 0-d unicode arrays. Parameter trees are flattened with '/' between flax path parts
and a prefix, e.g. ``params/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel`` (flax layouts:
Dense kernel [in, out]; q/k/v kernel [D, heads, D/heads], bias [heads, D/heads]; out kernel
[heads, D/heads, D]; patch conv kernel HWIO [16, 16, 3, D]; posembed_input [1, 4, 4, D]; prototypes
kernel [12, K] stored UN-normalised: the release divides each column by its L2 norm (+1e-10) at every
forward).

inputs.npz: the one batch all four runs use (already "normalised" random pixels, multiples of 1/16).
  reference [B,64,64,3], query0 [B,64,64,3], query1, query2 [B,48,48,3]       NHWC float32
  query0_mask [B,4,4], query1_mask, query2_mask [B,3,3]     int32 position targets in [-1, 15], -1 = no label
      (raster order: token t = row * grid + col). These are the trainer's batch keys (minus the leading
      device axis the pmap takes). Not geometrically consistent (random); query2_mask[2] is all -1.
  prepared/queries [2B,48,48,3], prepared/target_positions [2B,9]: ``utils.prepare_input``'s focal batch,
      QUERY-MAJOR: row q*B + b is focal query q+1 of image b (query1 of all images, then query2).

{full,location_only}_state.npz: the state BEFORE the recorded step (the checkpoint holds the same).
  params/..., ema_params/...                       student and teacher trees
  opt_mu/..., opt_nu/...                           AdamW first/second moments (trees like params)
  opt/count, opt/adam_count                        int32 () both 6 (inject_hyperparams' and scale_by_adam's)
  opt/hyperparams/{learning_rate,weight_decay,b1,b2,eps,eps_root}  float32 () as stored (learning_rate is the
                                                   one of the PREVIOUS step, 1e-3)
  global_step int32 (), rng uint32 [2] (the TrainState's key; the step splits it into new/dropout/droptok)
  eval/{teacher,student}_ref_features [B,16,D]     encoder_norm output of the reference, train=False (no drop
                                                   path, no token drop), teacher = ema_params, student = params
  eval/{teacher,student}_ref_loc_logits [B,16,16]  the same apply's location logits (the reference's own tokens
                                                   as queries attending to all 16 of its tokens)
  eval/{teacher,student}_ref_proj_logits [B*16,K]  (full only) projection-head cosine logits, rows b*16 + t
  eval/{teacher,student}_posemb_3x3 [1,3,3,D]      jax.image.resize(posembed_input, (1,3,3,D), 'bilinear'), the
                                                   call ToTokenSequence makes for the 48 px focal queries
  meta_json                                        sizes, config, versions

{full,location_only}_droppath{0,50}.npz: one recorded step (stochastic_depth 0 or 0.5).
  Token order. T0 = 6 kept large-query tokens, T1 = 9 focal tokens, M = B*T0 + 2B*T1 = 24 + 72 = 96 query
  tokens. Every flat [M, ...] array is: the large-query tokens of ALL images first (row b*6 + j, j-th kept
  token of image b), then the focal tokens query-major (row 24 + (q*B + b)*9 + t).
  mask/reference_band [3] int32   reference token indices kept as keys/values of the location head (one band
                                  for the whole device batch, consecutive, in raster order)
  mask/query0_kept [6] int32      kept large-query token indices, in the order the tokens are kept (the same
                                  6 for every image of the device batch)
  droppath/<pass>/<module path> bool [B] or [2B]   per-sample keep mask (True = the residual branch is kept and
                                  scaled by 1/(1-rate)) of every StochasticDepth layer, for pass in
                                  reference (teacher in full, student in location_only), query0, focal (rows
                                  q*B + b); module paths encoderblock_{0,1}/StochasticDepth_{0 (after
                                  attention), 1 (after MLP)} and cross_attention_block/StochasticDepth_{0,1}.
  droppath_rate/<pass>/<module path> float32 ()   its rate: block i gets i/(L-1) * stochastic_depth, so
                                  encoderblock_0 has 0 and encoderblock_1 has the full 0.5; the release never
                                  passes stochastic_depth to cross_attention_block, whose rate is 0. A rate-0
                                  layer is the identity and draws no random number (mask all True).
  step/ref_features     encoder_norm output of the reference pass: full [B,16,D] (teacher, all tokens,
                        train mode); location_only [B,3,D] (student, the band only)
  step/ref_kv [B,3,D]   what the queries' location head attends to (patches_repr: the band of ref_features)
  step/ref_proj_logits [B*16,K]     (full) teacher cosine logits, rows b*16 + t
  step/sinkhorn_in, step/sinkhorn_out [B*16,K]  (full) softmax(ref_proj_logits / 0.05) and what 3 Sinkhorn
                        iterations made of it (column sums over the batch, then row sums), rows b*16 + t
  step/query0_features [B,6,D], step/focal_features [2B,9,D]   student encoder_norm outputs (kept tokens)
  step/query0_loc_logits [B,6,16], step/focal_loc_logits [2B,9,16]   student location logits
  step/query0_proj_logits [B*6,K], step/focal_proj_logits [2B*9,K]   (full) student cosine logits (NOT yet
                        divided by the temperature), rows as in the token order above
  step/loc_targets [M] int32, step/loc_weights [M] bool   targets after token dropping, weights = target != -1
  loss/location         weighted softmax CE of the 96 location-logit rows (sum over valid / (n_valid + 1e-8))
  loss/clustering       (full) CE of softmax(student logits / 0.1) against the Sinkhorn row of each valid
                        token's target reference cell, same normalisation
  loss/memax            (full) sum_k p_k log p_k, p = mean over ALL 96 rows of softmax(student logits / 0.1);
                        recomputed here from the recorded logits (the release does not expose it alone:
                        loss/feature - loss/clustering equals it to float32 rounding)
  loss/feature          the step's feature_loss metric = clustering + memax (0 in location_only)
  loss/total            the value the step differentiated: location + feature
  grad/..., grad_clipped/...   gradient w.r.t. params before / after optimizers.clip_grads(grad, 1.0)
                        (g * (1 / norm) when norm >= 1); trees like params
  grad_global_norm      float32 (), the L2 norm over all leaves before clipping
  params_after/..., ema_params_after/...   the new state's trees (optax AdamW step, then
                        ema = m * ema + (1 - m) * new_params over EVERY leaf, heads included)
  lr, momentum, weight_decay, max_grad_norm, adam_b1, adam_b2, adam_eps   float32 (): what the step used (lr is
                        read back from the new opt_state's hyperparams, momentum from the scheduler wrapper)
  step_index int32 ()   global_step (= AdamW count) at the step: 6
  meta_json             everything above that is a number or a name, and the checks' results

schedules.npz: the release's schedules as trainer.train builds them (lr_schedules.get_learning_rate_fn(config),
  lr_schedules.compound_lr_scheduler(config.momentum_rate)), evaluated under jit at int32 steps 0..20
  (training uses 0..19; at step 20 the cosine restarts): step [21] int32, lr [21], momentum [21] float32,
  plus the parameters (total_steps 20, warmup_steps 5, base_lr 1e-3, alpha 0.01, momentum_base 0.996).

checkpoint_full, checkpoint_location_only: what ``utils.save_checkpoint(workdir, train_state)`` writes for the
  state before the recorded step (flax legacy msgpack; see below), renamed from checkpoint_6.
checkpoint_full_stripped: the same state dict without the ``opt_state`` key (as model-zoo files may be).
params_full.msgpack: ``flax.serialization.msgpack_serialize`` of the bare params dict.

Checkpoint format. flax 0.12 saves through Orbax by default; the release's model-zoo files are single msgpack
files (flax's legacy path), so this script sets ``flax.config.update('flax_use_orbax_checkpointing', False)``
before calling the release's ``utils.save_checkpoint``. The file is a msgpack map with keys opt_state,
ema_params, params, state (nil), ema_state (nil), global_step, rng, metadata ({'chrono': Chrono().save()}, as
the release's loop stores); arrays are msgpack ext type 1 whose payload is msgpack [shape, dtype name, raw
bytes (C order, little endian)]; global_step is an int32 0-d array, rng a uint32 [2] array, the chrono
values plain msgpack numbers (zeros here). opt_state (optax 0.2.8's InjectStatefulHyperparamsState) =
{count, hyperparams: {b1, b2, eps, eps_root, learning_rate, weight_decay} (0-d float32),
hyperparams_states: {learning_rate: {count}}, inner_state: {'0': {count, mu, nu} (scale_by_adam; mu and nu
are trees like params), '1': {inner_state: {}} (the weight-decay mask), '2': {} (scale by learning rate)}};
all counts int32, 6 here. Plain ``msgpack.unpackb(data, ext_hook=..., strict_map_key=False)`` reads all of
it (tuple indices are the string keys '0', '1', '2').
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
import warnings
import zipfile

import numpy as np

RELEASE_COMMIT = "4a38d475ee89cb821078c0e2bf2065ee030e1535"

SIZES = {
    "hidden_size": 20,
    "num_heads": 2,
    "mlp_dim": 80,
    "num_layers": 2,
    "patch": 16,
    "ref_px": 64,
    "query0_px": 64,
    "focal_px": 48,
    "n_focal": 2,
    "query_max_seqlen": 6,
    "head_hidden_dim": 48,
    "head_bottleneck_dim": 12,
    "head_output_dim": 40,
    "batch": 4,
}
SCHEDULE = {"total_steps": 20, "warmup_steps": 5, "base_lr": 1e-3, "alpha": 0.01}
N_WARM_STEPS = 6  # real release steps before the recorded one
DROP_PATHS = {"droppath0": 0.0, "droppath50": 0.5}
OBJECTIVES = {"full": True, "location_only": False}
PASSES = ("reference", "query0", "focal")
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


RELEASE_FILES = (
    "scenic/projects/loca/vit.py",
    "scenic/projects/loca/trainer.py",
    "scenic/projects/loca/utils.py",
    "scenic/projects/loca/configs/loca_imnet1k_base16.py",
    "scenic/projects/baselines/vit.py",
    "scenic/model_lib/layers/nn_layers.py",
    "scenic/model_lib/layers/attention_layers.py",
    "scenic/model_lib/base_models/model_utils.py",
    "scenic/train_lib/lr_schedules.py",
    "scenic/train_lib/train_utils.py",
)


# ----------------------------------------------------------------------------------------------------------
# Files


def write_npz(path: str, arrays: dict) -> None:
    """np.savez_compressed, but reproducible: fixed member timestamps, sorted members, no pickles."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            a = np.asarray(arrays[name])
            if a.dtype == object:
                raise TypeError(f"{name}: object arrays are not allowed")
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.array(a, order="C"), allow_pickle=False)  # keeps 0-d arrays 0-d
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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


def read_msgpack_plain(path: str):
    """Parse a flax msgpack checkpoint with plain `msgpack` only (what our importer will do)."""
    import msgpack

    def ext_hook(code, data):
        if code == 1:  # flax's ndarray: msgpack (shape, dtype name, raw bytes)
            shape, dtype, buf = msgpack.unpackb(data)
            return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)
        raise ValueError(f"unexpected msgpack ext type {code}")

    with open(path, "rb") as f:
        return msgpack.unpackb(f.read(), ext_hook=ext_hook, raw=False, strict_map_key=False)


def describe_tree(tree, depth=0, max_depth=3) -> list[str]:
    lines = []
    for k, v in tree.items():
        if isinstance(v, dict):
            if depth < max_depth:
                lines.append("  " * depth + f"{k}/")
                lines += describe_tree(v, depth + 1, max_depth)
            else:
                lines.append("  " * depth + f"{k}/ ({len(v)} entries)")
        elif isinstance(v, np.ndarray):
            lines.append("  " * depth + f"{k}: {v.dtype}{list(v.shape)}")
        else:
            lines.append("  " * depth + f"{k}: {v!r}")
    return lines


# ----------------------------------------------------------------------------------------------------------
# numpy re-derivations (float64) used as self-checks


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def np_weighted_ce(logits, target_probs, weights):
    per_row = -(target_probs * np_log_softmax(logits)).sum(-1) * weights
    return per_row.sum() / (weights.sum() + 1e-8)


def np_sinkhorn(x, iters=3):
    for _ in range(iters):
        x = x / x.sum(0, keepdims=True)
        x = x / x.sum(-1, keepdims=True)
    return x


def close(name, a, b, atol, rtol=0.0, checks=None):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    ok = bool(np.allclose(a, b, atol=atol, rtol=rtol))
    if checks is not None:
        checks[name] = {"max_abs_err": err, "ok": ok}
    if not ok:
        raise AssertionError(f"self-check {name}: max abs error {err:.3g} (atol {atol}, rtol {rtol})")


# ----------------------------------------------------------------------------------------------------------


class Generator:
    def __init__(self, scenic_dir: str, commit: str):
        sys.path.insert(0, scenic_dir)
        import flax
        import flax.linen as nn
        import jax
        import jax.numpy as jnp
        import jaxlib
        import msgpack
        import optax
        from flax import jax_utils
        from scenic.model_lib.layers import nn_layers
        from scenic.projects.loca import trainer, utils, vit
        from scenic.projects.loca.configs import loca_imnet1k_base16 as release_config
        from scenic.train_lib import lr_schedules, train_utils

        flax.config.update("flax_use_orbax_checkpointing", False)  # the legacy single-file msgpack format
        self.flax, self.nn, self.jax, self.jnp, self.optax, self.jax_utils = flax, nn, jax, jnp, optax, jax_utils
        self.nn_layers, self.trainer, self.utils, self.vit = nn_layers, trainer, utils, vit
        self.release_config, self.lr_schedules, self.train_utils = release_config, lr_schedules, train_utils
        self.versions = {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
            "msgpack": ".".join(map(str, msgpack.version)),
            "python": sys.version.split()[0],
            "scenic_commit": commit,
            "scenic_sources_sha256": {
                f: sha256(os.path.join(scenic_dir, f))
                for f in RELEASE_FILES
                if os.path.exists(os.path.join(scenic_dir, f))
            },
        }
        self.B = SIZES["batch"]
        self.grid = SIZES["ref_px"] // SIZES["patch"]
        self.focal_grid = SIZES["focal_px"] // SIZES["patch"]
        self.n_pos = self.grid**2

    # ---------------------------------------------------------------- config, model, state as trainer.train

    def config(self, apply_cluster_loss: bool, stochastic_depth: float):
        c = self.release_config.get_config()  # VARIANT B/16, as released; only sizes change below
        m = c.model
        m.hidden_size = SIZES["hidden_size"]
        m.num_heads = SIZES["num_heads"]
        m.mlp_dim = SIZES["mlp_dim"]
        m.num_layers = SIZES["num_layers"]
        m.patches.size = [SIZES["patch"], SIZES["patch"]]
        m.posembs = (self.grid, self.grid)  # ViTLOCAModel reads model.get('posembs', (14, 14))
        m.head_hidden_dim = SIZES["head_hidden_dim"]  # released: not set -> 2048
        m.head_bottleneck_dim = SIZES["head_bottleneck_dim"]  # released: not set -> 256
        m.head_output_dim = SIZES["head_output_dim"]  # released: 4096
        m.stochastic_depth = stochastic_depth  # released: 0.1
        c.n_ref_positions = self.n_pos
        c.reference_seqlen = int(0.2 * c.n_ref_positions)  # the released formula
        c.query_max_seqlen = SIZES["query_max_seqlen"]
        c.apply_cluster_loss = apply_cluster_loss
        c.dataset_configs.number_of_focal_queries = SIZES["n_focal"]
        c.batch_size = self.B
        c.lr_configs.warmup_steps = SCHEDULE["warmup_steps"]
        c.lr_configs.steps_per_cycle = SCHEDULE["total_steps"]
        c.lr_configs.base_learning_rate = SCHEDULE["base_lr"]
        c.lr_configs.alpha = SCHEDULE["alpha"]
        c.momentum_rate.steps_per_cycle = SCHEDULE["total_steps"]
        c.checkpoint = False
        c.xprof = False
        return c

    def model(self, config):
        meta_data = {"input_shape": (-1, SIZES["ref_px"], SIZES["ref_px"], 3), "input_dtype": self.jnp.float32}
        return self.vit.ViTLOCAModel(config, meta_data), meta_data

    def schedules(self, config):
        return (
            self.lr_schedules.get_learning_rate_fn(config),
            self.lr_schedules.compound_lr_scheduler(config.momentum_rate),
        )

    def initial_state(self, config):
        """trainer.train up to the loop, plus the parameter noise of the brief."""
        jax, jnp = self.jax, self.jnp
        model, meta_data = self.model(config)
        rng = jax.random.PRNGKey(config.rng_seed)  # scenic/app.py
        _data_rng, rng = jax.random.split(rng)  # loca/main.py
        rng, init_rng = jax.random.split(rng)  # trainer.train
        params, _, num_params, _ = self.train_utils.initialize_model(
            model_def=model.flax_model,
            input_spec=[(meta_data["input_shape"], meta_data.get("input_dtype", jnp.float32))],
            config=config,
            rngs=init_rng,
        )
        # Move every leaf off its special initial value (zeros, ones, symmetric inits).
        noise = np.random.default_rng(1)
        params = jax.tree_util.tree_map(
            lambda p: (np.asarray(p) + 0.05 * noise.standard_normal(p.shape)).astype(np.float32), params
        )
        ema_noise = np.random.default_rng(2)
        ema_params = jax.tree_util.tree_map(
            lambda p: (np.asarray(p) + 0.02 * ema_noise.standard_normal(p.shape)).astype(np.float32), params
        )
        params = jax.tree_util.tree_map(jnp.asarray, params)
        ema_params = jax.tree_util.tree_map(jnp.asarray, ema_params)
        tx = self.make_tx(config, params)
        opt_state = jax.jit(tx.init, backend="cpu")(params)
        state = self.utils.TrainState(
            global_step=0, opt_state=opt_state, tx=tx, params=params, ema_params=ema_params, rng=rng, metadata={}
        )
        return state, int(num_params)

    def make_tx(self, config, params):
        learning_rate_fn, _ = self.schedules(config)
        mask = self.jax.tree_util.tree_map(lambda x: x.ndim != 1, params)
        return self.optax.inject_hyperparams(self.optax.adamw)(
            learning_rate=learning_rate_fn, weight_decay=config.weight_decay, mask=mask
        )

    def pmapped_step(self, config, model, loss_fn=None, momentum_fn=None):
        _, momentum = self.schedules(config)
        return self.jax.pmap(
            functools.partial(
                self.trainer.loca_train_step,
                flax_model=model.flax_model,
                loss_fn=loss_fn or model.loss_function,
                metrics_fn=model.get_metrics_fn(),
                momentum_parameter_scheduler=momentum_fn or momentum,
                config=config,
            ),
            axis_name="batch",
            donate_argnums=(0, 1),
        )

    # ---------------------------------------------------------------- data

    def random_batch(self, rng: np.random.Generator) -> dict:
        """A trainer batch (without the device axis): random 'normalised' pixels, targets in [-1, 15]."""
        B, g, fg = self.B, self.grid, self.focal_grid

        def image(px):  # multiples of 1/16: exact in float32, and the npz compresses
            return (np.round(rng.standard_normal((B, px, px, 3)) * 16) / 16).astype(np.float32)

        def targets(side):
            t = rng.integers(0, self.n_pos, (B, side, side))
            return np.where(rng.random((B, side, side)) < 0.3, -1, t).astype(np.int32)

        batch = {"reference": image(SIZES["ref_px"]), "query0": image(SIZES["query0_px"]), "query0_mask": targets(g)}
        for i in range(1, SIZES["n_focal"] + 1):
            batch[f"query{i}"] = image(SIZES["focal_px"])
            batch[f"query{i}_mask"] = targets(fg)
        return batch

    @staticmethod
    def device_batch(batch: dict) -> dict:
        return {k: v[None] for k, v in batch.items()}  # one device

    def host_state(self, replicated):
        return self.jax.device_get(self.jax_utils.unreplicate(replicated))

    # ---------------------------------------------------------------- the instrumented step

    def instrumented_step(self, config, model, state_host, batch):
        """Runs the release's step once with observers; returns (new state, captured arrays)."""
        jax, jnp, nn = self.jax, self.jnp, self.nn
        store: dict = {}

        def report(key, *values):
            def cb(*arrays):
                if key in store:
                    raise RuntimeError(f"{key} reported twice")
                store[key] = tuple(jax.tree_util.tree_map(np.array, a) for a in arrays)

            jax.debug.callback(cb, *values)

        loss_names = iter(["location", "clustering"])

        def loss_fn(predictions, targets, weights=None):
            value = model.loss_function(predictions, targets, weights)
            report(("loss", next(loss_names)), value)
            return value

        _, momentum_release = self.schedules(config)

        def momentum_fn(step):
            value = momentum_release(step)
            report(("momentum",), value, step)
            return value

        real_optimizers = self.trainer.optimizers
        real_sinkhorn = self.utils.sinkhorn

        def clip_grads(grad_tree, max_norm):
            clipped = real_optimizers.clip_grads(grad_tree, max_norm)
            report(("grad",), grad_tree, clipped, real_optimizers.l2_norm(grad_tree))
            return clipped

        def sinkhorn(x, *args, **kwargs):
            out = real_sinkhorn(x, *args, **kwargs)
            report(("sinkhorn",), x, out)
            return out

        current = {"n": 0, "pass": None}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            if isinstance(module, self.vit.ViT4LOCA):
                current["pass"] = PASSES[current["n"]]
                current["n"] += 1
                out = next_fun(*args, **kwargs)
                loc, proj, repr_, idx = out
                names = [n for n, v in zip(("loc", "proj", "repr", "idx"), out, strict=True) if v is not None]
                report(("top", current["pass"], tuple(names)), *[v for v in out if v is not None])
                del loc, proj, repr_, idx
                return out
            out = next_fun(*args, **kwargs)
            path = "/".join(module.path)
            if isinstance(module, nn.LayerNorm) and module.name == "encoder_norm":
                report(("encoder_norm", current["pass"]), out)
            elif isinstance(module, self.nn_layers.StochasticDepth):
                x = args[0]
                deterministic = kwargs.get("deterministic", args[1] if len(args) > 1 else module.deterministic)
                axes = tuple(range(1, x.ndim))
                if module.rate == 0.0 or deterministic:
                    keep = jnp.ones(x.shape[:1], bool)
                    consistent = jnp.all(out == x)
                else:
                    keep = jnp.any(out != 0, axis=axes)
                    scaled = x / (1.0 - module.rate)
                    consistent = jnp.all(jnp.where(keep[:, None, None], out == scaled, out == 0)) & jnp.all(
                        jnp.any(x != 0, axis=axes)
                    )
                report(("droppath", current["pass"], path), keep, consistent, jnp.float32(module.rate))
            return out

        step_fn = self.pmapped_step(config, model, loss_fn=loss_fn, momentum_fn=momentum_fn)
        self.trainer.optimizers = types.SimpleNamespace(clip_grads=clip_grads)
        self.utils.sinkhorn = sinkhorn
        try:
            with nn.intercept_methods(interceptor):
                new_state, metrics = step_fn(self.jax_utils.replicate(state_host), self.device_batch(batch))
                jax.block_until_ready((new_state, metrics))
        finally:
            self.trainer.optimizers = real_optimizers
            self.utils.sinkhorn = real_sinkhorn
        jax.effects_barrier()
        if current["n"] != 3:
            raise RuntimeError(f"expected 3 ViT4LOCA passes in the step, saw {current['n']}")
        return self.host_state(new_state), self.jax.device_get(self.jax_utils.unreplicate(metrics)), store

    def plain_step(self, config, model, state_host, batch):
        step_fn = self.pmapped_step(config, model)
        new_state, metrics = step_fn(self.jax_utils.replicate(state_host), self.device_batch(batch))
        return self.host_state(new_state), self.jax.device_get(self.jax_utils.unreplicate(metrics))

    # ---------------------------------------------------------------- recording

    def eval_outputs(self, model, state_host, batch, cluster: bool) -> dict:
        jax = self.jax
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
                jax.image.resize(table, (1, self.focal_grid, self.focal_grid, d), "bilinear")
            )
        return out

    def state_arrays(self, s) -> dict:
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

    def run_objective(self, name: str, cluster: bool, out_dir: str, batch: dict, report: dict):
        jax = self.jax
        config0 = self.config(cluster, 0.0)
        model0, _ = self.model(config0)
        state, num_params = self.initial_state(config0)

        # Six real release steps bring AdamW's moments and the step counter to a realistic place.
        warm = np.random.default_rng(3)
        step_fn = self.pmapped_step(config0, model0)
        replicated = self.jax_utils.replicate(state)
        for _ in range(N_WARM_STEPS):
            replicated, _ = step_fn(replicated, self.device_batch(self.random_batch(warm)))
        before = self.host_state(replicated)
        del replicated
        log(f"{name}: state after {N_WARM_STEPS} warm-up steps")

        # The checkpoint as trainer.train writes it (metadata: the chrono dict the loop adds in place).
        ckpt_state = before.replace(metadata={"chrono": self.train_utils.Chrono().save()})
        with tempfile.TemporaryDirectory() as workdir:
            self.utils.save_checkpoint(workdir, ckpt_state)
            written = sorted(os.listdir(workdir))
            if written != [f"checkpoint_{N_WARM_STEPS}"]:
                raise RuntimeError(f"save_checkpoint wrote {written}, expected one legacy msgpack file")
            ckpt_path = os.path.join(out_dir, f"checkpoint_{name}")
            shutil.copyfile(os.path.join(workdir, written[0]), ckpt_path)
            restored, _ = self.utils.restore_checkpoint(workdir, ckpt_state)
        plain_tree = read_msgpack_plain(ckpt_path)
        before_arrays = self.state_arrays(before)
        for key, value in flat(plain_tree["params"], "params").items():
            if not np.array_equal(value, before_arrays[key]):
                raise AssertionError(f"checkpoint {key} differs from the state")
        for a, b in zip(
            jax.tree_util.tree_leaves(restored.opt_state), jax.tree_util.tree_leaves(before.opt_state), strict=True
        ):
            if not np.array_equal(np.asarray(a), np.asarray(b)):
                raise AssertionError("flax restore_checkpoint does not give back the opt_state")
        report[f"checkpoint_{name}"] = {
            "top_level_keys": list(plain_tree.keys()),
            "opt_state": describe_tree(plain_tree["opt_state"], max_depth=2),
            "params": {k[len("params/") :]: list(v.shape) for k, v in flat(plain_tree["params"], "params").items()},
        }
        if cluster:
            stripped = {k: v for k, v in self.flax.serialization.to_state_dict(ckpt_state).items() if k != "opt_state"}
            with open(os.path.join(out_dir, f"checkpoint_{name}_stripped"), "wb") as f:
                f.write(self.flax.serialization.msgpack_serialize(stripped))
            with open(os.path.join(out_dir, f"params_{name}.msgpack"), "wb") as f:
                f.write(self.flax.serialization.msgpack_serialize(self.flax.core.unfreeze(before.params)))

        meta = {
            "objective": name,
            "apply_cluster_loss": cluster,
            "sizes": SIZES,
            "schedule": SCHEDULE,
            "num_params": num_params,
            "warm_steps_before": N_WARM_STEPS,
            "versions": self.versions,
        }
        state_file = self.state_arrays(before)
        state_file.update(self.eval_outputs(model0, before, batch, cluster))
        state_file["meta_json"] = np.array(json.dumps(meta, sort_keys=True))
        write_npz(os.path.join(out_dir, f"{name}_state.npz"), state_file)

        for dp_name, rate in DROP_PATHS.items():
            config = self.config(cluster, rate)
            model, _ = self.model(config)
            after, metrics_plain = self.plain_step(config, model, before, batch)
            log(f"{name}_{dp_name}: plain step")
            after_i, metrics, cap = self.instrumented_step(config, model, before, batch)
            log(f"{name}_{dp_name}: instrumented step")
            leaves_plain = jax.tree_util.tree_leaves((after.params, after.ema_params, after.opt_state))
            leaves_instr = jax.tree_util.tree_leaves((after_i.params, after_i.ema_params, after_i.opt_state))
            bitwise = all(
                np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves_plain, leaves_instr, strict=True)
            )
            max_diff = max(
                float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                for a, b in zip(leaves_plain, leaves_instr, strict=True)
            )
            # Everything in a run file comes from ONE execution (the instrumented one), so that the recorded
            # gradients are exactly those that made params_after; the plain run agrees to a few float32 ulps.
            arrays, run_meta = self.record_run(config, before, after_i, metrics_plain, metrics, cap, batch, cluster)
            run_meta.update(meta)
            run_meta["stochastic_depth"] = rate
            run_meta["instrumented_vs_plain_step"] = {"bit_identical": bitwise, "max_abs_diff": max_diff}
            arrays["meta_json"] = np.array(json.dumps(run_meta, sort_keys=True))
            write_npz(os.path.join(out_dir, f"{name}_{dp_name}.npz"), arrays)
            report[f"{name}_{dp_name}"] = {
                k: run_meta[k]
                for k in (
                    "losses",
                    "lr",
                    "momentum",
                    "grad_global_norm",
                    "droppath_reference_equals_query0",
                    "droppath_dropped_samples",
                    "instrumented_vs_plain_step",
                    "masks",
                    "checks",
                )
            }

    def record_run(self, config, before, after, metrics_plain, metrics, cap, batch, cluster):
        B, T0, T1, n_pos = self.B, SIZES["query_max_seqlen"], self.focal_grid**2, self.n_pos
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
        close(
            "total_loss", losses["total"], location + (losses["feature"] if cluster else 0.0), atol=2e-6, checks=checks
        )
        close("total_loss_plain_step", float(metrics_plain["total_loss"][0]), losses["total"], atol=1e-6, checks=checks)
        for k, v in losses.items():
            a[f"loss/{k}"] = np.float32(v)

        # Gradients, clipping, AdamW, EMA.
        grad, clipped, norm = cap[("grad",)]
        a.update(flat(grad, "grad"))
        a.update(flat(clipped, "grad_clipped"))
        a["grad_global_norm"] = np.float32(norm)
        g64 = {k: v.astype(np.float64) for k, v in flat(grad, "g").items()}
        close(
            "grad_global_norm", np.sqrt(sum((v**2).sum() for v in g64.values())), norm, atol=0, rtol=1e-5, checks=checks
        )
        if float(norm) < config.max_grad_norm:
            raise AssertionError(f"gradient norm {float(norm)} < max_grad_norm: clipping would not be exercised")
        scale = np.float32(config.max_grad_norm) / np.float32(norm)
        for k, v in flat(clipped, "g").items():
            close("grad_clipped", v, (grad_leaf(grad, k) * scale), atol=0, rtol=1e-6, checks=None)
        checks["grad_clipped"] = {"ok": True}

        momentum, step_seen = cap[("momentum",)]
        lr = np.float32(after.opt_state.hyperparams["learning_rate"])
        lr_fn, mom_fn = self.schedules(config)
        step = int(before.global_step)
        assert int(step_seen) == step == int(before.opt_state.count) == N_WARM_STEPS
        close("lr_schedule", float(self.jax.jit(lr_fn)(np.int32(step))), lr, atol=0, rtol=1e-7, checks=checks)
        close(
            "momentum_schedule", float(self.jax.jit(mom_fn)(np.int32(step))), momentum, atol=0, rtol=1e-7, checks=checks
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

    def schedules_file(self, out_dir):
        config = self.config(True, 0.0)
        lr_fn, mom_fn = self.schedules(config)
        steps = np.arange(SCHEDULE["total_steps"] + 1, dtype=np.int32)
        lr_j, mom_j = self.jax.jit(lr_fn), self.jax.jit(mom_fn)
        write_npz(
            os.path.join(out_dir, "schedules.npz"),
            {
                "step": steps,
                "lr": np.array([lr_j(s) for s in steps], np.float32),
                "momentum": np.array([mom_j(s) for s in steps], np.float32),
                "total_steps": np.int32(SCHEDULE["total_steps"]),
                "warmup_steps": np.int32(SCHEDULE["warmup_steps"]),
                "base_lr": np.float32(SCHEDULE["base_lr"]),
                "alpha": np.float32(SCHEDULE["alpha"]),
                "momentum_base": np.float32(config.momentum_rate.base_learning_rate),
                "meta_json": np.array(
                    json.dumps(
                        {
                            "lr_configs": config.lr_configs.to_dict(),
                            "momentum_rate": config.momentum_rate.to_dict(),
                            "versions": self.versions,
                        },
                        sort_keys=True,
                    )
                ),
            },
        )


def cap_key(cap: dict, kind: str, pass_: str):
    """The captured arrays of one kind for one pass; for 'top' also the output names."""
    for key, vals in cap.items():
        if key[0] == kind and key[1] == pass_:
            if kind == "top":
                return key, vals, key[2]
            return vals
    raise KeyError((kind, pass_))


def grad_leaf(tree, flat_key: str):
    node = tree
    for part in flat_key.split("/")[1:]:
        node = node[part]
    return np.asarray(node)


# ----------------------------------------------------------------------------------------------------------

README_HEAD = """# Reference files from the authors' JAX LOCA release

Written by `benchmarks/release_parity.py` (its docstring documents every array: names, shapes, token
order, which parameter tree each came from). They let our tests check, without JAX, that our network,
losses and update equal the release's (google-research/scenic, `scenic/projects/loca`), and that the
release-checkpoint importer reads the trainer's exact file format.

Regenerate (bit for bit; see the script's docstring for the environment):

    /tmp/jaxenv/bin/python benchmarks/release_parity.py --scenic /tmp/scenic_src --out tests/data/release_parity

"""


def write_readme(out_dir: str, versions: dict, report: dict) -> None:
    lines = [README_HEAD]
    lines.append(
        f"Release: scenic commit `{versions['scenic_commit']}`. Versions: jax {versions['jax']}, "
        f"jaxlib {versions['jaxlib']}, flax {versions['flax']}, optax {versions['optax']}, "
        f"numpy {versions['numpy']}, Python {versions['python']}, CPU, one device.\n"
    )
    lines.append("| file | holds |\n|---|---|")
    holds = {
        "inputs.npz": "the one batch of all four runs: trainer batch keys (reference, query0, query1, query2 and "
        "their `_mask` targets) and `prepared/*` (the focal queries concatenated query-major)",
        "schedules.npz": "the release's learning rate and EMA momentum at steps 0..20 of a 20-step run "
        "(warmup 5, base 1e-3, alpha 0.01; momentum 0.996 -> 1)",
        "full_state.npz": "full objective: params, ema_params, AdamW mu/nu/count before the recorded step; "
        "eval-mode (train=False) reference features/logits under both trees",
        "location_only_state.npz": "the same for the location-only objective (no projection head)",
        "full_droppath0.npz": "full objective, stochastic depth 0: masks, forward outputs, losses, gradients "
        "(raw, clipped), params and ema after the step",
        "full_droppath50.npz": "the same with stochastic depth 0.5 and the per-sample drop-path masks drawn",
        "location_only_droppath0.npz": "location-only objective, stochastic depth 0",
        "location_only_droppath50.npz": "location-only objective, stochastic depth 0.5",
        "checkpoint_full": "`utils.save_checkpoint` of the full objective's state before the step "
        "(flax legacy msgpack, as the model zoo's files)",
        "checkpoint_location_only": "the same for the location-only objective",
        "checkpoint_full_stripped": "checkpoint_full's state dict without `opt_state`",
        "params_full.msgpack": "the bare params tree of checkpoint_full (`flax.serialization.msgpack_serialize`)",
    }
    lines.append("\n".join(f"| `{k}` | {v} |" for k, v in holds.items()))
    lines.append("\nsha256 (bytes):\n")
    lines.append("```")
    for name in sorted(os.listdir(out_dir)):
        if name == "README.md":
            continue
        path = os.path.join(out_dir, name)
        lines.append(f"{sha256(path)}  {name}  ({os.path.getsize(path)})")
    lines.append("```\n")
    ck = report["checkpoint_full"]
    lines.append(
        "Checkpoint layout (read with plain `msgpack`: ext type 1 = ndarray, payload msgpack "
        "[shape, dtype name, raw bytes]):\n"
    )
    lines.append("```")
    lines.append("top-level keys: " + ", ".join(ck["top_level_keys"]))
    lines.append("opt_state:")
    lines += ["  " + s for s in ck["opt_state"]]
    lines.append("```\n")
    lines.append("What the recorded steps saw:\n")
    lines.append(
        "| run | location | clustering | me-max | total | grad norm | lr | momentum | ref band | query0 kept |"
        " drop-path masks ref == query0 |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")

    def num(v):
        return "-" if v is None else f"{v:.6f}"

    for run in ("full_droppath0", "full_droppath50", "location_only_droppath0", "location_only_droppath50"):
        r = report[run]
        lo = r["losses"]
        lines.append(
            f"| {run} | {lo['location']:.6f} | {num(lo.get('clustering'))} | "
            f"{num(lo.get('memax'))} | {lo['total']:.6f} | {r['grad_global_norm']:.4f} | "
            f"{r['lr']:.6g} | {r['momentum']:.6f} | {r['masks']['reference_band']} | {r['masks']['query0_kept']} | "
            f"{r['droppath_reference_equals_query0']} |"
        )
    lines.append(
        "\nSamples whose residual branch the drop-path-0.5 runs dropped (pass/layer: count). The reference and "
        "query0 masks are equal because the release gives both passes the same dropout key and mask shape "
        "[B, 1, 1]; the focal pass uses the same key at shape [2B, 1, 1], and with this jax (partitionable "
        "threefry) its first B rows equal them too. Only encoderblock_1 has a non-zero rate (0.5):\n"
    )
    for run in ("full_droppath50", "location_only_droppath50"):
        dropped = report[run]["droppath_dropped_samples"]
        lines.append(f"- {run}: " + ", ".join(f"{k}: {v}" for k, v in dropped.items()))
    lines.append("")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenic", required=True, help="folder that contains the `scenic` package")
    parser.add_argument("--out", required=True, help="output folder (created; its files are overwritten)")
    parser.add_argument(
        "--scenic-commit",
        default=None,
        help=f"commit of the checkout, recorded in the files (default: git HEAD of --scenic, else {RELEASE_COMMIT})",
    )
    parser.add_argument("--report", default=None, help="also write the run summary (JSON) here")
    args = parser.parse_args()

    if not os.path.isdir(os.path.join(args.scenic, "scenic", "projects", "loca")):
        sys.exit(f"--scenic {args.scenic}: expected a folder containing scenic/projects/loca")
    commit = args.scenic_commit
    if commit is None:
        try:
            commit = subprocess.run(
                ["git", "-C", args.scenic, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = RELEASE_COMMIT

    # One CPU device, one thread: reproducible numbers, and gentle on a shared machine.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    gen = Generator(args.scenic, commit)
    os.makedirs(args.out, exist_ok=True)
    batch = gen.random_batch(np.random.default_rng(0))
    batch["query2_mask"][2] = -1  # one focal query with no label at all
    F = SIZES["n_focal"]
    inputs = dict(batch)
    inputs["prepared/queries"] = np.concatenate([batch[f"query{i}"] for i in range(1, F + 1)])
    inputs["prepared/target_positions"] = np.concatenate([batch[f"query{i}_mask"] for i in range(1, F + 1)]).reshape(
        F * SIZES["batch"], -1
    )
    write_npz(os.path.join(args.out, "inputs.npz"), inputs)
    gen.schedules_file(args.out)

    report: dict = {"versions": gen.versions}
    for name, cluster in OBJECTIVES.items():
        gen.run_objective(name, cluster, args.out, batch, report)
    write_readme(args.out, gen.versions, report)

    # Every npz must load without pickles.
    for fname in sorted(os.listdir(args.out)):
        if fname.endswith(".npz"):
            with np.load(os.path.join(args.out, fname), allow_pickle=False) as z:
                for k in z.files:
                    z[k]
    report["files"] = {f: os.path.getsize(os.path.join(args.out, f)) for f in sorted(os.listdir(args.out))}
    print(json.dumps(report, indent=1, sort_keys=True))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()

"""Capture: run the authors' JAX LOCA step (google-research/scenic, scenic/projects/loca, imported unmodified) at a
tiny size and observe what goes in, what it computes and what comes out, without editing the release's source.

:class:`Release` sets up the train state exactly as the release's ``trainer.train`` does and runs one real
``trainer.loca_train_step`` under ``jax.pmap`` on one CPU device, with pass-through observers (the loss and
momentum functions it takes as arguments, ``clip_grads`` and ``sinkhorn`` swapped while the step is traced,
``flax.linen.intercept_methods`` on the model) that report through ``jax.debug.callback``. What the files hold and
why: tests/data/release_parity/README.md.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
import types

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
    """Print ``msg`` to stderr with the seconds since the start."""
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


def sha256(path: str) -> str:
    """The hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Release:
    """The release's code from a scenic checkout (``scenic_dir``), its config at the tiny sizes, its train state
    and its step (plain, or observed by :meth:`instrumented_step`)."""

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
        """The released config (B/16 recipe) with only the tiny sizes, the objective, the drop-path rate and the short schedule changed."""
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
        """The release's ``ViTLOCAModel`` for ``config`` and its input metadata."""
        meta_data = {"input_shape": (-1, SIZES["ref_px"], SIZES["ref_px"], 3), "input_dtype": self.jnp.float32}
        return self.vit.ViTLOCAModel(config, meta_data), meta_data

    def schedules(self, config):
        """The release's learning-rate and EMA-momentum schedules, built as ``trainer.train`` builds them."""
        return (
            self.lr_schedules.get_learning_rate_fn(config),
            self.lr_schedules.compound_lr_scheduler(config.momentum_rate),
        )

    def initial_state(self, config):
        """trainer.train up to the loop, then every leaf moved off its initial value and six real steps (README)."""
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
        """The release's optimizer: ``optax.inject_hyperparams(optax.adamw)`` decaying every leaf with ``ndim != 1``."""
        learning_rate_fn, _ = self.schedules(config)
        mask = self.jax.tree_util.tree_map(lambda x: x.ndim != 1, params)
        return self.optax.inject_hyperparams(self.optax.adamw)(
            learning_rate=learning_rate_fn, weight_decay=config.weight_decay, mask=mask
        )

    def pmapped_step(self, config, model, loss_fn=None, momentum_fn=None):
        """``trainer.loca_train_step`` under ``jax.pmap`` as ``trainer.train`` runs it (observers may replace the loss and momentum functions)."""
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
        """The batch with the leading device axis ``pmap`` takes (one device)."""
        return {k: v[None] for k, v in batch.items()}  # one device

    def host_state(self, replicated):
        """The one device's copy of a replicated state, on the host."""
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
        """The same step without any observer: (new state, metrics)."""
        step_fn = self.pmapped_step(config, model)
        new_state, metrics = step_fn(self.jax_utils.replicate(state_host), self.device_batch(batch))
        return self.host_state(new_state), self.jax.device_get(self.jax_utils.unreplicate(metrics))


def cap_key(cap: dict, kind: str, pass_: str):
    """The captured arrays of one kind for one pass; for 'top' also the output names."""
    for key, vals in cap.items():
        if key[0] == kind and key[1] == pass_:
            if kind == "top":
                return key, vals, key[2]
            return vals
    raise KeyError((kind, pass_))

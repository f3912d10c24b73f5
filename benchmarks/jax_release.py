"""Time the authors' JAX LOCA training step on this machine, for the ratio goal of `make bench`.

This is a harness, not a port: it imports the released code (google-research/scenic,
scenic/projects/loca) unmodified, builds the released config (configs/loca_imnet1k_base16.py) with only
the model variant and the batch size changed, sets up the train state exactly as the release's
``trainer.train`` does (ViTLOCAModel, scenic's initialize_model, optax AdamW with its decay mask, EMA
params, ``jax.pmap`` of ``trainer.loca_train_step`` with donated buffers) and times that step on
random views with valid position targets. The data pipeline and the loop's logging are not timed.

It needs its own environment (JAX and TensorFlow do not belong in ours) and a copy of scenic:

    python3.11 -m venv /tmp/jaxenv
    /tmp/jaxenv/bin/pip install "jax[cpu]" flax optax ml_collections clu absl-py immutabledict \
        tensorflow-cpu tensorflow_datasets tensorboard
    # scenic: a checkout of https://github.com/google-research/scenic (only its .py files are needed)
    /tmp/jaxenv/bin/python benchmarks/jax_release.py --scenic /path/to/scenic --variant S/16 --batch 8

Prints one JSON line: seconds per step (median), images per second, the versions used.
Compare with `python benchmarks/run.py --parts step` run right after it on the same idle machine.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenic", required=True, help="folder that contains the `scenic` package")
    parser.add_argument("--variant", default="S/16", help="Ti/16, S/16, B/16, ...")
    parser.add_argument("--batch", type=int, default=8, help="images per step (one device)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps after two warm-up steps")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()

    if not os.path.isdir(os.path.join(args.scenic, "scenic", "projects", "loca")):
        sys.exit(f"--scenic {args.scenic}: expected a folder containing scenic/projects/loca")
    sys.path.insert(0, args.scenic)

    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import jax_utils
    from scenic.projects.loca import trainer, utils, vit
    from scenic.projects.loca.configs import loca_imnet1k_base16 as release_config
    from scenic.train_lib import lr_schedules, train_utils

    release_config.VARIANT = args.variant  # read by get_config(); everything else stays as released
    config = release_config.get_config()
    config.batch_size = args.batch
    config.checkpoint = False
    config.xprof = False

    res = 224
    patch = config.model.patches.size[0]
    grid = res // patch
    focal_res, focal_grid = 96, 96 // patch
    n_focal = config.dataset_configs.number_of_focal_queries
    n_pos = config.n_ref_positions
    meta_data = {"input_shape": (-1, res, res, 3), "input_dtype": jnp.float32, "num_train_examples": 1281167}

    # As trainer.train() does, up to the training loop.
    rng = jax.random.PRNGKey(config.rng_seed)
    model = vit.ViTLOCAModel(config, meta_data)
    rng, init_rng = jax.random.split(rng)
    params, _, num_params, _ = train_utils.initialize_model(
        model_def=model.flax_model,
        input_spec=[(meta_data["input_shape"], meta_data["input_dtype"])],
        config=config,
        rngs=init_rng,
    )
    ema_params = copy.deepcopy(params)
    learning_rate_fn = lr_schedules.get_learning_rate_fn(config)
    momentum_fn = lr_schedules.compound_lr_scheduler(config.momentum_rate)
    mask = jax.tree_util.tree_map(lambda x: x.ndim != 1, params)
    tx = optax.inject_hyperparams(optax.adamw)(
        learning_rate=learning_rate_fn, weight_decay=config.weight_decay, mask=mask
    )
    opt_state = jax.jit(tx.init, backend="cpu")(params)
    state = utils.TrainState(
        global_step=0, opt_state=opt_state, tx=tx, params=params, ema_params=ema_params, rng=rng, metadata={}
    )
    state = jax_utils.replicate(state)
    step_fn = jax.pmap(
        functools.partial(
            trainer.loca_train_step,
            flax_model=model.flax_model,
            loss_fn=model.loss_function,
            metrics_fn=model.get_metrics_fn(),
            momentum_parameter_scheduler=momentum_fn,
            config=config,
        ),
        axis_name="batch",
        donate_argnums=(0, 1),
    )

    data_rng = np.random.default_rng(0)

    def views(size: int) -> np.ndarray:
        return data_rng.standard_normal((1, args.batch, size, size, 3), dtype=np.float32)

    def targets(side: int) -> np.ndarray:
        """Position targets with about 70% of query patches labelled, as with the released crops."""
        shape = (1, args.batch, side, side)
        return np.where(data_rng.random(shape) < 0.7, data_rng.integers(0, n_pos, shape), -1).astype(np.int32)

    def make_batch() -> dict:
        batch = {"reference": views(res), "query0": views(res), "query0_mask": targets(grid)}
        for i in range(1, n_focal + 1):
            batch[f"query{i}"], batch[f"query{i}_mask"] = views(focal_res), targets(focal_grid)
        return batch

    batches = [make_batch() for _ in range(args.steps + 2)]
    seconds = []
    for batch in batches:
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state.params, metrics))
        seconds.append(time.perf_counter() - t0)
    t_compile, times = seconds[0], seconds[2:]  # the first step compiles; two warm-up steps are not timed
    loss = float(jax_utils.unreplicate(metrics)["total_loss"][0])
    median = statistics.median(times)

    result = {
        "implementation": "scenic/projects/loca (JAX release), unmodified step",
        "variant": args.variant,
        "batch": args.batch,
        "precision": config.model_dtype_str,
        "params": int(num_params),
        "seconds_per_step_median": median,
        "seconds_per_step_all": times,
        "images_per_second": args.batch / median,
        "first_step_seconds_incl_compile": t_compile,
        "final_total_loss": loss,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Write tests/data/release_parity: reproducible npz files, the release's own checkpoints, the schedules, and the
generated part of the folder's README (versions, sha256, what the recorded steps saw).

Run it in the JAX environment that tests/data/release_parity/README.md describes::

    python -m tools.release_parity --scenic /tmp/scenic_src --out tests/data/release_parity
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from tools.release_parity.capture import (
    DROP_PATHS,
    N_WARM_STEPS,
    OBJECTIVES,
    RELEASE_COMMIT,
    SCHEDULE,
    SIZES,
    Release,
    log,
    sha256,
)
from tools.release_parity.record import eval_outputs, flat, record_run, state_arrays

# The committed README: its hand-written part (above this line) is kept, the part below is generated.
README = Path(__file__).resolve().parents[2] / "tests" / "data" / "release_parity" / "README.md"
GENERATED_MARK = "<!-- Everything below is written by `python -m tools.release_parity`. -->"


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
    """Lines naming the keys, dtypes and shapes of a nested dict, down to ``max_depth``."""
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


def schedules_file(release: Release, out_dir):
    """Write schedules.npz: the release's lr and momentum at steps 0..total_steps."""
    config = release.config(True, 0.0)
    lr_fn, mom_fn = release.schedules(config)
    steps = np.arange(SCHEDULE["total_steps"] + 1, dtype=np.int32)
    lr_j, mom_j = release.jax.jit(lr_fn), release.jax.jit(mom_fn)
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
                        "versions": release.versions,
                    },
                    sort_keys=True,
                )
            ),
        },
    )


def run_objective(release: Release, name: str, cluster: bool, out_dir: str, batch: dict, report: dict):
    """Write one objective's files: warm-up steps, the release's checkpoint, the state file, and one run file per drop-path rate."""
    jax = release.jax
    config0 = release.config(cluster, 0.0)
    model0, _ = release.model(config0)
    state, num_params = release.initial_state(config0)

    # Six real release steps bring AdamW's moments and the step counter to a realistic place.
    warm = np.random.default_rng(3)
    step_fn = release.pmapped_step(config0, model0)
    replicated = release.jax_utils.replicate(state)
    for _ in range(N_WARM_STEPS):
        replicated, _ = step_fn(replicated, release.device_batch(release.random_batch(warm)))
    before = release.host_state(replicated)
    del replicated
    log(f"{name}: state after {N_WARM_STEPS} warm-up steps")

    # The checkpoint as trainer.train writes it (metadata: the chrono dict the loop adds in place).
    ckpt_state = before.replace(metadata={"chrono": release.train_utils.Chrono().save()})
    with tempfile.TemporaryDirectory() as workdir:
        release.utils.save_checkpoint(workdir, ckpt_state)
        written = sorted(os.listdir(workdir))
        if written != [f"checkpoint_{N_WARM_STEPS}"]:
            raise RuntimeError(f"save_checkpoint wrote {written}, expected one legacy msgpack file")
        ckpt_path = os.path.join(out_dir, f"checkpoint_{name}")
        shutil.copyfile(os.path.join(workdir, written[0]), ckpt_path)
        restored, _ = release.utils.restore_checkpoint(workdir, ckpt_state)
    plain_tree = read_msgpack_plain(ckpt_path)
    before_arrays = state_arrays(before)
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
        stripped = {k: v for k, v in release.flax.serialization.to_state_dict(ckpt_state).items() if k != "opt_state"}
        with open(os.path.join(out_dir, f"checkpoint_{name}_stripped"), "wb") as f:
            f.write(release.flax.serialization.msgpack_serialize(stripped))
        with open(os.path.join(out_dir, f"params_{name}.msgpack"), "wb") as f:
            f.write(release.flax.serialization.msgpack_serialize(release.flax.core.unfreeze(before.params)))

    meta = {
        "objective": name,
        "apply_cluster_loss": cluster,
        "sizes": SIZES,
        "schedule": SCHEDULE,
        "num_params": num_params,
        "warm_steps_before": N_WARM_STEPS,
        "versions": release.versions,
    }
    state_file = state_arrays(before)
    state_file.update(eval_outputs(release, model0, before, batch, cluster))
    state_file["meta_json"] = np.array(json.dumps(meta, sort_keys=True))
    write_npz(os.path.join(out_dir, f"{name}_state.npz"), state_file)

    for dp_name, rate in DROP_PATHS.items():
        config = release.config(cluster, rate)
        model, _ = release.model(config)
        after, metrics_plain = release.plain_step(config, model, before, batch)
        log(f"{name}_{dp_name}: plain step")
        after_i, metrics, cap = release.instrumented_step(config, model, before, batch)
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
        arrays, run_meta = record_run(release, config, before, after_i, metrics_plain, metrics, cap, batch, cluster)
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


def write_readme(out_dir: str, versions: dict, report: dict) -> None:
    """Rewrite the part of ``out_dir``/README.md below :data:`GENERATED_MARK`; the hand-written part above it is kept
    (taken from the committed README when ``out_dir`` has none)."""
    current = Path(out_dir) / "README.md"
    current = current if current.is_file() else README
    text = current.read_text()
    if GENERATED_MARK not in text:
        raise SystemExit(f"{current}: no line {GENERATED_MARK!r} to write below")
    lines = [text[: text.index(GENERATED_MARK) + len(GENERATED_MARK)] + "\n"]
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
    """Write every fixture file into ``--out`` from the release checkout ``--scenic``."""
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

    release = Release(args.scenic, commit)
    os.makedirs(args.out, exist_ok=True)
    batch = release.random_batch(np.random.default_rng(0))
    batch["query2_mask"][2] = -1  # one focal query with no label at all
    F = SIZES["n_focal"]
    inputs = dict(batch)
    inputs["prepared/queries"] = np.concatenate([batch[f"query{i}"] for i in range(1, F + 1)])
    inputs["prepared/target_positions"] = np.concatenate([batch[f"query{i}_mask"] for i in range(1, F + 1)]).reshape(
        F * SIZES["batch"], -1
    )
    write_npz(os.path.join(args.out, "inputs.npz"), inputs)
    schedules_file(release, args.out)

    report: dict = {"versions": release.versions}
    for name, cluster in OBJECTIVES.items():
        run_objective(release, name, cluster, args.out, batch, report)
    write_readme(args.out, release.versions, report)

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

"""Parity with the authors' JAX release on identical weights, inputs and random draws, without JAX.

``tests/data/release_parity`` was written by ``python -m tools.release_parity``, which runs the release's own code
(google-research/scenic, scenic/projects/loca, commit in the files' README): a tiny ``ViTLOCAModel`` (2 blocks, width
20, patch 16, 64-pixel reference, 16 positions, 48-pixel focal queries on a 3x3 grid), its checkpoint in the trainer's
format, and ONE real ``loca_train_step`` per objective (full; location-only) and drop-path rate (0; 0.5), with the
token masks and drop-path masks it drew. Here our importer reads the checkpoint, our module runs the same step on the
same inputs with those masks replayed (the release draws one mask per device batch, we draw per sample: the replay
picks a setting in which both agree), and every recorded quantity is compared:

| quantity | tolerance |
|---|---|
| features, logits, Sinkhorn targets | max abs diff <= 1e-5 x their scale |
| losses | <= 1e-5 |
| gradients, updated parameters, EMA | <= 1e-4 relative (updates: of the update itself) |

The drop-path runs replay the release's masks through ``drop_path_scales``, which the step calls once for the
reference and the large query together and once for the focal queries: a step that drew the two passes' masks apart
would consume the focal masks for the large query and fail. The q/k/v biases are decayed as the release's 2-D biases
are: without it the update of those biases differs by lr * weight_decay * bias, far above the tolerance.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import Tensor

from loca_lightning.ema import ema_momentum, ema_update
from loca_lightning.lr_schedules import warmup_cosine
from loca_lightning.pretrain.module import LOCAPretrainModule
from loca_lightning.release.convert import (
    backbone_entries,
    convert_tree,
    location_head_entries,
    projection_entries,
)
from loca_lightning.release.importer import release_module_checkpoint

DATA = Path(__file__).parent / "data" / "release_parity"
RUNS = [("full", "droppath0"), ("full", "droppath50"), ("location_only", "droppath0"), ("location_only", "droppath50")]
KEY_BIASES = {"attn.qkv.bias": (1, 3), "attn.kv.bias": (0, 2)}  # (index, parts) of the key bias in a fused bias


def _npz(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / name, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _tree(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {key[len(prefix) :]: value for key, value in arrays.items() if key.startswith(prefix)}


def _close(ours: Tensor, release: np.ndarray, what: str, rel: float = 1e-5) -> float:
    """Max abs difference, asserted <= rel x the release's scale (max abs value); returned for the record."""
    expected = torch.as_tensor(release, dtype=torch.float32)
    assert tuple(ours.shape) == tuple(expected.shape), f"{what}: shape {tuple(ours.shape)} vs {tuple(expected.shape)}"
    diff = float((ours.detach().float() - expected).abs().max())
    scale = float(expected.abs().max())
    assert diff <= rel * scale, f"{what}: max abs diff {diff:.3g} > {rel} x scale {scale:.3g}"
    return diff


class Replay(LOCAPretrainModule):
    """LOCAPretrainModule whose random draws are the release's (its masks, replayed) and whose step is recorded."""

    def replay(self, run: dict[str, np.ndarray], batch: int, num_focal: int) -> None:
        self.band = torch.as_tensor(run["mask/reference_band"], dtype=torch.long)
        self.kept = torch.as_tensor(run["mask/query0_kept"], dtype=torch.long)  # in the release's order
        self.drop_paths = [self._scales(run, "reference", batch)]
        focal = self._scales(run, "focal", batch * num_focal)  # release rows q*B + b, ours b*F + q
        order = torch.arange(batch * num_focal).reshape(num_focal, batch).t().flatten()
        self.drop_paths.append(None if focal is None else focal[:, :, order])
        self.record: dict[str, Tensor] = {}
        self.student_outputs: list[Tensor] = []

    def _scales(self, run: dict[str, np.ndarray], name: str, size: int) -> Tensor:
        blocks = len(self.student.backbone.blocks)
        scales = torch.ones(blocks, 2, size)
        for i in range(blocks):
            for j in range(2):
                key = f"{name}/encoderblock_{i}/StochasticDepth_{j}"
                keep = torch.as_tensor(run[f"droppath/{key}"])
                scales[i, j] = keep.float() / (1.0 - float(run[f"droppath_rate/{key}"]))
        return scales

    def select_reference_keep(self, batch_size: int) -> Tensor:
        return self.band.expand(batch_size, -1)

    def select_query_keep(self, batch_size: int, num_tokens: int) -> Tensor:
        return self.kept.expand(batch_size, -1)

    def drop_path_scales(self, batch_size: int) -> Tensor | None:
        scales = self.drop_paths.pop(0)  # the release's masks, in the order its passes drew them
        assert scales.shape[-1] == batch_size, "drop-path masks asked for in another order than the release's"
        return scales

    def compute_losses(self, *args):
        out = super().compute_losses(*args)
        self.record.update(out)
        return out


@pytest.fixture(scope="module")
def inputs() -> dict[str, Tensor]:
    data = _npz("inputs.npz")
    nchw = {k: torch.from_numpy(data[k]).permute(0, 3, 1, 2).contiguous() for k in ("reference", "query0")}
    batch = data["reference"].shape[0]
    focal = [torch.from_numpy(data[f"query{q}"]).permute(0, 3, 1, 2) for q in (1, 2)]
    return {
        "reference": nchw["reference"],  # already normalised floats: the module's Normalize passes them through
        "query_large": nchw["query0"],
        "query_focal": torch.stack(focal, dim=1).contiguous(),  # [B, F, 3, 48, 48]
        "target_large": torch.from_numpy(data["query0_mask"]).long().reshape(batch, -1),
        "target_focal": torch.stack([torch.from_numpy(data[f"query{q}_mask"]) for q in (1, 2)], 1).long().flatten(2),
    }


def _imported(objective: str, drop_path_rate: float) -> tuple[Replay, dict]:
    checkpoint, record, arch = release_module_checkpoint(DATA / f"checkpoint_{objective}", allow_custom_size=True)
    hparams = {**checkpoint["hyper_parameters"], "drop_path_rate": drop_path_rate, "query_keep": 6}
    module = Replay(**hparams)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module, {"record": record, "arch": arch}


def _groups(arch, prefix: str, objective: str) -> dict:
    groups = {f"{prefix}.backbone.": backbone_entries(arch)}
    if prefix == "student":
        groups["student.location_head."] = location_head_entries(arch)
    if objective == "full":
        groups[f"{prefix}.projection."] = projection_entries(arch)
    return groups


def _as_torch(tree: dict[str, np.ndarray], arch, prefix: str, objective: str, name: str) -> dict[str, Tensor]:
    """A release-layout tree (params, gradients, Adam moments) in our state-dict layout, by the importer's mapping."""
    converted, _ = convert_tree(tree, _groups(arch, prefix, objective), name, DATA, arch)
    return converted


def _key_slice(name: str, numel: int) -> slice | None:
    for suffix, (index, parts) in KEY_BIASES.items():
        if name.endswith(suffix):
            return slice(index * numel // parts, (index + 1) * numel // parts)
    return None


def _split_key_bias(name: str, tensor: Tensor) -> tuple[Tensor, Tensor | None]:
    """(the tensor without its attention-key bias, the key bias) for fused q/k/v biases; (tensor, None) otherwise.

    A key bias adds the same constant to all of a query's attention logits: its exact gradient is zero, and what
    both codes compute for it is rounding noise, compared here only in size."""
    keys = _key_slice(name, tensor.numel())
    if keys is None:
        return tensor, None
    mask = torch.ones(tensor.numel(), dtype=torch.bool)
    mask[keys] = False
    return tensor.flatten()[mask], tensor.flatten()[keys]


@pytest.mark.parametrize("objective, drop_path", RUNS)
def test_one_step_equals_the_release(objective: str, drop_path: str, inputs: dict[str, Tensor]) -> None:
    run = _npz(f"{objective}_{drop_path}.npz")
    state = _npz(f"{objective}_state.npz")
    batch, num_focal = inputs["query_focal"].shape[:2]
    module, found = _imported(objective, 0.5 if drop_path == "droppath50" else 0.0)
    arch = found["arch"]
    module.replay(run, batch, num_focal)
    hooks = {}
    module.student.backbone.register_forward_hook(
        lambda m, a, kw, out: module.student_outputs.append(out), with_kwargs=True
    )
    if objective == "full":
        module.teacher.backbone.register_forward_hook(lambda m, a, out: hooks.__setitem__("teacher", out))
        module.teacher.projection.register_forward_hook(lambda m, a, out: hooks.__setitem__("teacher_proj", out))
        module.student.projection.register_forward_hook(lambda m, a, out: hooks.__setitem__("student_proj", out))
        sinkhorn = module.sinkhorn
        module.sinkhorn = lambda *a, **k: hooks.setdefault("sinkhorn", sinkhorn(*a, **k))

    # ---- forward: the same tokens, features, logits, targets and losses
    module.train()
    loss = module.training_step(inputs, 0)
    out = module.record
    d = out["location_logits"].shape[-1]
    if objective == "full":
        _close(hooks["teacher"], run["step/ref_features"], "teacher reference features")
        _close(
            hooks["teacher_proj"].reshape(-1, hooks["teacher_proj"].shape[-1]),
            run["step/ref_proj_logits"],
            "teacher prototype logits",
        )
        _close(hooks["sinkhorn"].reshape(-1, hooks["sinkhorn"].shape[-1]), run["step/sinkhorn_out"], "Sinkhorn targets")
        large_outputs = module.student_outputs
    else:  # the student encodes the reference band first
        _close(module.student_outputs[0], run["step/ref_features"], "student reference (band) features")
        large_outputs = module.student_outputs[1:]
    large, focal = large_outputs
    _close(large, run["step/query0_features"], "large-query features")
    order = torch.arange(batch * num_focal).reshape(num_focal, batch).t().flatten()  # ours b*F+q <- release q*B+b
    release_focal_rows = torch.argsort(order)
    _close(focal[release_focal_rows], run["step/focal_features"], "focal features")
    logits = out["location_logits"]  # [B, 6 + F*9, P]
    kept = run["mask/query0_kept"].shape[0]
    _close(logits[:, :kept], run["step/query0_loc_logits"], "large-query location logits")
    focal_logits = logits[:, kept:].reshape(batch * num_focal, -1, d)
    _close(focal_logits[release_focal_rows], run["step/focal_loc_logits"], "focal location logits")
    assert abs(float(out["loss_location"].detach()) - float(run["loss/location"])) <= 1e-5
    if objective == "full":
        proj = hooks["student_proj"]  # [B, 6 + F*9, K]
        k = proj.shape[-1]
        _close(proj[:, :kept].reshape(-1, k), run["step/query0_proj_logits"], "large-query prototype logits")
        focal_proj = proj[:, kept:].reshape(batch * num_focal, -1, k)[release_focal_rows].reshape(-1, k)
        _close(focal_proj, run["step/focal_proj_logits"], "focal prototype logits")
        assert abs(float(out["loss_cluster"].detach()) - float(run["loss/clustering"])) <= 1e-5
        assert abs(float(out["loss_me_max"].detach()) - float(run["loss/memax"])) <= 1e-5
    assert abs(float(loss.detach()) - float(run["loss/total"])) <= 1e-5

    # ---- backward: every parameter's gradient, the global norm, clipping
    loss.backward()
    params = dict(module.student.named_parameters())
    grads = _as_torch(_tree(run, "grad/"), arch, "student", objective, "gradients")
    noise_floor = 1e-6 * max(float(g.abs().max()) for g in grads.values())
    for name, expected in grads.items():
        ours = params[name.removeprefix("student.")].grad
        main, key = _split_key_bias(name, ours)
        expected_main, expected_key = _split_key_bias(name, expected)
        _close(main, expected_main.numpy(), f"gradient of {name}", rel=1e-4)
        if key is not None:
            assert key.abs().max() < noise_floor and expected_key.abs().max() < noise_floor, name
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), float(run["max_grad_norm"]))
    assert abs(float(norm) - float(run["grad_global_norm"])) <= 1e-4 * float(run["grad_global_norm"])
    clipped = _as_torch(_tree(run, "grad_clipped/"), arch, "student", objective, "clipped gradients")
    for name, expected in clipped.items():
        main, _ = _split_key_bias(name, params[name.removeprefix("student.")].grad)
        _close(main, _split_key_bias(name, expected)[0].numpy(), f"clipped gradient of {name}", rel=1e-4)

    # ---- the module's own optimizer (its parameter groups and weight decay), from the release's Adam state
    module._trainer = SimpleNamespace(
        estimated_stepping_batches=20,
        datamodule=SimpleNamespace(batch_size=batch),
        world_size=1,
        accumulate_grad_batches=1,
        num_training_batches=4,
        max_epochs=5,
    )
    optimizer = module.configure_optimizers()["optimizer"]
    module._trainer = None
    mu = _as_torch(_tree(state, "opt_mu/"), arch, "student", objective, "Adam mu")
    nu = _as_torch(_tree(state, "opt_nu/"), arch, "student", objective, "Adam nu")
    count = float(state["opt/adam_count"])
    for group in optimizer.param_groups:
        group["lr"] = float(run["lr"])
    names = {id(p): "student." + n for n, p in params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            optimizer.state[p] = {"step": torch.tensor(count), "exp_avg": mu[n].clone(), "exp_avg_sq": nu[n].clone()}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer.step()
    after = _as_torch(_tree(run, "params_after/"), arch, "student", objective, "params after the step")
    lr = float(run["lr"])
    for name, expected in after.items():
        short = name.removeprefix("student.")
        ours, start = params[short].detach().double(), before[short].double()
        main, key = _split_key_bias(name, ours - expected.double())
        update, key_update = _split_key_bias(name, expected.double() - start)
        # 1e-4 of the update itself, plus the float32 rounding of the stored values (2 ulp): a decay the release does
        # not apply (lr * 0.1 * parameter) is hundreds of times this bound
        bound = 1e-4 * float(update.abs().max()) + 2 * 2**-23 * float(expected.abs().max())
        assert float(main.abs().max()) <= bound, f"update of {name}: {float(main.abs().max()):.3g} > {bound:.3g}"
        if key is not None:  # an Adam step on rounding noise: at most a few lr either way, in both codes
            ours_key = _split_key_bias(name, ours - start)[1]
            assert ours_key.abs().max() <= 3 * lr and key_update.abs().max() <= 3 * lr, name

    # ---- the teacher's EMA (our teacher: backbone and projection head; the release's EMA also covers its unused
    # location head)
    if objective == "full":
        momentum = float(run["momentum"])
        assert momentum == pytest.approx(ema_momentum(int(run["step_index"]), 20), abs=1e-6)
        ema_update(*module.teacher.ema_pairs(module.student), momentum)
        teacher = dict(module.teacher.named_parameters())
        ema = _as_torch(_tree(run, "ema_params_after/"), arch, "teacher", objective, "EMA after the step")
        for name, expected in ema.items():
            _close(teacher[name.removeprefix("teacher.")], expected.numpy(), f"EMA of {name}", rel=1e-4)


@pytest.mark.parametrize("objective", ["full", "location_only"])
def test_imported_networks_compute_the_releases_features(objective: str) -> None:
    state = _npz(f"{objective}_state.npz")
    module, _ = _imported(objective, 0.0)
    module.eval()
    reference = torch.from_numpy(_npz("inputs.npz")["reference"]).permute(0, 3, 1, 2)
    networks = {"student": module.student}
    if objective == "full":
        networks["teacher"] = module.teacher
    for side, network in networks.items():
        with torch.no_grad():
            tokens = network.backbone(reference)  # [B, 16, D]
            _close(tokens, state[f"eval/{side}_ref_features"], f"{side} features")
            # the focal queries' positional table: the 4x4 table shrunk to 3x3 (antialiased, as jax.image.resize)
            table = network.backbone.pos_embed_for((3, 3)).reshape(1, 3, 3, -1)
            _close(table, state[f"eval/{side}_posemb_3x3"], f"{side} 3x3 positional table")
            if objective == "full":
                cosines = network.projection(tokens)
                _close(cosines.reshape(-1, cosines.shape[-1]), state[f"eval/{side}_ref_proj_logits"], f"{side} cosines")
            if side == "student":
                logits = network.location_head(tokens, tokens)
                _close(logits, state[f"eval/{side}_ref_loc_logits"], "location logits")


def test_schedules_equal_the_releases():
    data = _npz("schedules.npz")
    total, warmup = int(data["total_steps"]), int(data["warmup_steps"])
    for step in range(total):  # the steps a run of `total` steps takes
        lr = float(data["base_lr"]) * warmup_cosine(step, total, warmup, float(data["alpha"]))
        assert lr == pytest.approx(float(data["lr"][step]), rel=1e-5, abs=1e-9), step
        momentum = ema_momentum(step, total, float(data["momentum_base"]), 1.0)
        assert momentum == pytest.approx(float(data["momentum"][step]), abs=1e-6), step


def test_every_release_file_form_imports_the_same_weights(tmp_path, capsys) -> None:
    # the trainer's checkpoint, the same without optimizer state, and a bare params tree, all written by flax itself
    full, _, _ = release_module_checkpoint(DATA / "checkpoint_full", allow_custom_size=True)
    stripped, _, _ = release_module_checkpoint(DATA / "checkpoint_full_stripped", allow_custom_size=True)
    bare, record, _ = release_module_checkpoint(DATA / "params_full.msgpack", allow_custom_size=True)
    for key, value in full["state_dict"].items():
        assert torch.equal(stripped["state_dict"][key], value), key
        if key.startswith("student."):  # a bare params tree has no EMA: its teacher is the student
            assert torch.equal(bare["state_dict"][key], value), key
    assert record["teacher"] == "params"
    # the CLI end to end: the timm model it writes computes the release's teacher features
    import json

    import timm

    from loca_lightning.cli import main

    out = tmp_path / "imported"
    main(["import-release", str(DATA / "checkpoint_full"), str(out), "--custom-size"])
    assert "act_layer='gelu_tanh'" in capsys.readouterr().out
    config = json.loads((out / "timm_teacher.pth.json").read_text())
    model = timm.create_model(config["timm_name"], pretrained=False, **config["timm_kwargs"]).eval()
    model.load_state_dict(torch.load(out / "timm_teacher.pth", weights_only=True), strict=True)
    reference = torch.from_numpy(_npz("inputs.npz")["reference"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        _close(model.forward_features(reference), _npz("full_state.npz")["eval/teacher_ref_features"], "timm features")

"""The release's params tree -> our LOCAPretrainModule state dict: recognise the tree, infer the sizes, map every leaf.

Layouts (flax -> torch): conv kernel HWIO ``[p, p, 3, D]`` -> ``[D, 3, p, p]``; positional table ``[1, gh, gw, D]`` ->
``[1, gh*gw, D]`` (raster order, as our tokens); attention q/k/v kernels ``[D, heads, hd]`` -> ``[D, D]`` transposed,
stacked into timm's fused ``qkv`` (q, k, v; heads major, as timm splits them), biases ``[heads, hd]`` flattened; out
kernel ``[heads, hd, D]`` -> ``proj.weight [D, D]``; Dense kernels ``[in, out]`` -> Linear ``[out, in]``; LayerNorm
scale/bias -> weight/bias. Every leaf is used or named in ``ignored``; a missing, extra or mis-shaped leaf is an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from loca_lightning.backbones.loading import describe_differences
from loca_lightning.backbones.registry import VIT_SIZES, list_backbones
from loca_lightning.release.flax_files import ReleaseFormatError

TRAIN_STATE_KEYS = ("opt_state", "ema_params", "params", "state", "ema_state", "global_step", "rng", "metadata")
PARAMS_KEYS = (
    "ToTokenSequence_0",
    "encoderblock_0",
    "...",
    "encoder_norm",
    "cross_attention_block",
    "final_norm",
    "position_predictor",
    "projection_head_for_clustering_prediction",
)
RELEASE_ACTIVATION = "gelu_tanh"  # flax's nn.gelu is the tanh approximation
PROJECTION = "projection_head_for_clustering_prediction"
LOCATION_HEAD = ("cross_attention_block", "final_norm", "position_predictor")
# The ViT sizes of the paper (Ti/S/B/L/H); other registered names are small test sizes.
STANDARD_SIZES = {n: s for n, s in VIT_SIZES.items() if re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch\d+", n)}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": leaf}}`` -> ``{"a/b": leaf}``; an empty dict or None contributes nothing."""
    if tree is None:
        return {}
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return flat


@dataclass(frozen=True)
class ReleaseArchitecture:
    """Sizes of a release model, read off its params tree."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    pos_grid: int  # side of the square positional table
    num_positions: int  # logits of the position predictor (= pos_grid ** 2)
    projection: tuple[int, int, int] | None  # (hidden, bottleneck, prototypes); None: location-only variant

    @property
    def reference_size(self) -> int:
        return self.pos_grid * self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def describe(self) -> str:
        text = (
            f"patch {self.patch_size}, width {self.embed_dim}, depth {self.depth}, {self.num_heads} heads, "
            f"MLP {self.mlp_dim}, {self.pos_grid}x{self.pos_grid} positional table, {self.num_positions} positions"
        )
        if self.projection is None:
            return text + ", no projection head (location-only)"
        hidden, bottleneck, prototypes = self.projection
        return text + f", projection {self.embed_dim}->{hidden}->{hidden}->{bottleneck}, {prototypes} prototypes"

    def as_dict(self) -> dict[str, Any]:
        out = {
            k: getattr(self, k)
            for k in (
                "patch_size",
                "embed_dim",
                "depth",
                "num_heads",
                "mlp_dim",
                "pos_grid",
                "num_positions",
                "reference_size",
            )
        }
        hidden, bottleneck, prototypes = self.projection or (None, None, None)
        out.update(projection_hidden_dim=hidden, projection_dim=bottleneck, num_prototypes=prototypes)
        return out


@dataclass
class ReleaseCheckpoint:
    """A release file's content: flat params trees (``"a/b/kernel" -> array``) and what else it held."""

    path: Path
    kind: str  # "train_state" or "params"
    params: dict[str, Any]
    ema_params: dict[str, Any] | None
    global_step: int | None = None
    ignored: list[dict[str, Any]] = field(default_factory=list)  # {"path", "leaves", "reason"}


def _keys(tree: Mapping) -> str:
    keys = sorted(str(k) for k in tree)
    return ", ".join(keys[:12]) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "")


def parse_release_tree(tree: Any, path: Path) -> ReleaseCheckpoint:
    """Recognise a LOCA TrainState state dict (complete or stripped) or a bare params tree."""
    expected = f"a LOCA TrainState (keys {', '.join(TRAIN_STATE_KEYS)}) or a params tree ({', '.join(PARAMS_KEYS)})"
    if not isinstance(tree, Mapping):
        raise ReleaseFormatError(
            f"{str(path)!r} holds a {type(tree).__name__}, not a LOCA checkpoint: expected {expected}"
        )
    if "ToTokenSequence_0" in tree:
        return ReleaseCheckpoint(path, "params", flatten(tree), None)
    if not isinstance(tree.get("params"), Mapping):
        raise ReleaseFormatError(
            f"{str(path)!r} is not a LOCA checkpoint: expected {expected}; found keys: {_keys(tree)}"
        )
    unknown = sorted(set(tree) - set(TRAIN_STATE_KEYS) - {"model_state"})
    if unknown:
        raise ReleaseFormatError(
            f"{str(path)!r} has top-level keys {unknown} that a LOCA TrainState does not have (expected {expected})"
        )

    def params_tree(value: Any) -> Any:  # a flax variables dict {"params": tree} is accepted too
        return value["params"] if isinstance(value, Mapping) and set(value) == {"params"} else value

    params = flatten(params_tree(tree["params"]))
    ema = flatten(params_tree(tree.get("ema_params"))) or None
    ignored = []
    for key in ("state", "ema_state", "model_state"):
        leaves = flatten(tree.get(key))
        if leaves:  # LOCA has no mutable collections (no batch norm): something we do not know how to map
            raise ReleaseFormatError(
                f"{str(path)!r} has a non-empty {key!r} ({len(leaves)} leaves, e.g. "
                f"{next(iter(leaves))!r}); the LOCA release keeps none"
            )
    reasons = {
        "opt_state": "optimizer moments (a run from the import starts a fresh optimizer)",
        "rng": "the JAX random key",
        "metadata": "training metadata (chrono)",
    }
    for key, reason in reasons.items():
        if key in tree and tree[key] is not None:
            ignored.append({"path": key, "leaves": len(flatten(tree[key])), "reason": reason})
    step = tree.get("global_step")
    try:
        step = None if step is None else int(np.asarray(step))
    except (TypeError, ValueError):
        raise ReleaseFormatError(f"{str(path)!r}: global_step is {step!r}, not a number") from None
    return ReleaseCheckpoint(path, "train_state", params, ema, step, ignored)


def _leaf(flat: Mapping[str, Any], name: str, ndim: int, path: Path) -> np.ndarray:
    if name not in flat:
        top = sorted({k.split("/")[0] for k in flat})
        raise ReleaseFormatError(f"{str(path)!r}: the params tree has no {name!r} (its modules: {', '.join(top)})")
    value = flat[name]
    if not isinstance(value, np.ndarray) or value.ndim != ndim:
        shape = getattr(value, "shape", type(value).__name__)
        raise ReleaseFormatError(f"{str(path)!r}: {name!r} is {shape}, expected a {ndim}-D array")
    return value


def _indices(flat: Mapping[str, Any], prefix: str, path: Path) -> int:
    found = {int(m.group(1)) for k in flat if (m := re.match(re.escape(prefix) + r"(\d+)/", k))}
    if found != set(range(len(found))):
        raise ReleaseFormatError(f"{str(path)!r}: {prefix}<i> are not numbered 0..n-1 (found {sorted(found)})")
    return len(found)


def infer_architecture(flat: Mapping[str, Any], path: Path) -> ReleaseArchitecture:
    """Sizes from the shapes of a few leaves (the mapping checks every other leaf against them)."""
    p, p2, channels, dim = _leaf(flat, "ToTokenSequence_0/embedding/kernel", 4, path).shape
    _, gh, gw, _ = _leaf(flat, "ToTokenSequence_0/posembed_input", 4, path).shape
    if p != p2 or channels != 3 or gh != gw:
        raise ReleaseFormatError(
            f"{str(path)!r}: patch kernel {p}x{p2}x{channels} and positional table {gh}x{gw}: "
            "expected square patches of RGB images and a square table"
        )
    depth = _indices(flat, "encoderblock_", path)
    _, heads, head_dim = _leaf(flat, "encoderblock_0/MultiHeadDotProductAttention_0/query/kernel", 3, path).shape
    mlp_dim = _leaf(flat, "encoderblock_0/MlpBlock_0/Dense_0/kernel", 2, path).shape[1]
    positions = _leaf(flat, "position_predictor/kernel", 2, path).shape[1]
    if heads * head_dim != dim or positions != gh * gw:
        raise ReleaseFormatError(
            f"{str(path)!r}: {heads} heads of {head_dim} for width {dim}, {positions} positions for "
            f"a {gh}x{gw} table: expected heads x head size = width and positions = table size"
        )
    projection = None
    if any(k.startswith(PROJECTION + "/") for k in flat):
        layers = _indices(flat, f"{PROJECTION}/Dense_", path)
        if layers != 3:
            raise ReleaseFormatError(
                f"{str(path)!r}: the projection head has {layers} Dense layers; the release "
                "(and our ProjectionHead) has 3"
            )
        hidden = _leaf(flat, f"{PROJECTION}/Dense_0/kernel", 2, path).shape[1]
        bottleneck, prototypes = _leaf(flat, f"{PROJECTION}/prototypes/kernel", 2, path).shape
        projection = (hidden, bottleneck, prototypes)
    return ReleaseArchitecture(p, dim, depth, heads, mlp_dim, gh, positions, projection)


def backbone_spec(
    arch: ReleaseArchitecture, allow_custom_size: bool = False, path: Path | None = None
) -> tuple[str, dict[str, Any], bool]:
    """``(registered backbone name, overrides, is_custom)`` for the release's ViT; other sizes only when allowed."""
    size = (arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads)
    for name, known in STANDARD_SIZES.items():
        if known == size and arch.mlp_dim == 4 * arch.embed_dim:
            return name, {}, False
    if not allow_custom_size:
        known = "; ".join(
            f"{n} (patch {s[0]}, width {s[1]}, depth {s[2]}, {s[3]} heads, MLP {4 * s[1]})"
            for n, s in STANDARD_SIZES.items()
        )
        raise ReleaseFormatError(
            f"{str(path)!r}: the release's ViT (patch {arch.patch_size}, width {arch.embed_dim}, depth {arch.depth}, "
            f"{arch.num_heads} heads, MLP {arch.mlp_dim}) is not a known size (known: {known}); pass --custom-size "
            "(allow_custom_size=True) to import it as a ViT of these sizes"
        )
    ratio = arch.mlp_dim / arch.embed_dim
    if int(arch.embed_dim * ratio) != arch.mlp_dim:  # timm's Mlp builds int(dim * mlp_ratio) hidden units
        raise ReleaseFormatError(
            f"{str(path)!r}: MLP width {arch.mlp_dim} is not expressible as mlp_ratio x {arch.embed_dim}"
        )
    name = f"vit_base_patch{arch.patch_size}"
    overrides: dict[str, Any] = dict(
        embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=ratio
    )
    if name not in list_backbones():
        name, overrides["patch_size"] = "vit_base_patch16", arch.patch_size
    return name, overrides, True


def module_kwargs(arch: ReleaseArchitecture, backbone: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """LOCAPretrainModule arguments that build the release's model (training settings keep their released defaults)."""
    backbone_kwargs = {**overrides, "act_layer": RELEASE_ACTIVATION}
    if arch.reference_size != 224:  # the registered builders store a table for 224 px
        backbone_kwargs["img_size"] = arch.reference_size
    kwargs: dict[str, Any] = dict(
        backbone=backbone,
        backbone_kwargs=backbone_kwargs,
        reference_size=arch.reference_size,
        apply_cluster_loss=arch.projection is not None,
    )
    if arch.projection is not None:
        hidden, bottleneck, prototypes = arch.projection
        kwargs.update(projection_hidden_dim=hidden, projection_dim=bottleneck, num_prototypes=prototypes)
    return kwargs


# ---------------------------------------------------------------------------------------------------- leaf mapping
@dataclass(frozen=True)
class Entry:
    """One torch tensor made from one or more flax leaves of known shapes."""

    key: str
    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    fn: Callable[..., np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


def _norm(key: str, src: str, dim: int) -> list[Entry]:
    return [
        Entry(f"{key}.weight", (f"{src}/scale",), ((dim,),), _same),
        Entry(f"{key}.bias", (f"{src}/bias",), ((dim,),), _same),
    ]


def _dense(key: str, src: str, d_in: int, d_out: int, bias: bool = True) -> list[Entry]:
    out = [Entry(f"{key}.weight", (f"{src}/kernel",), ((d_in, d_out),), _t)]
    return out + ([Entry(f"{key}.bias", (f"{src}/bias",), ((d_out,),), _same)] if bias else [])


def _heads_in(names: tuple[str, ...], key: str, src: str, arch: ReleaseArchitecture) -> list[Entry]:
    """Flax's per-name [D, H, hd] kernels (concatenated in ``names`` order) -> one torch Linear [n*D, D]."""
    d, h, hd = arch.embed_dim, arch.num_heads, arch.head_dim
    weight = lambda *ks: np.concatenate([k.reshape(d, d).T for k in ks], axis=0)  # noqa: E731
    bias = lambda *bs: np.concatenate([b.reshape(d) for b in bs], axis=0)  # noqa: E731
    return [
        Entry(f"{key}.weight", tuple(f"{src}/{n}/kernel" for n in names), ((d, h, hd),) * len(names), weight),
        Entry(f"{key}.bias", tuple(f"{src}/{n}/bias" for n in names), ((h, hd),) * len(names), bias),
    ]


def _attention_out(key: str, src: str, arch: ReleaseArchitecture) -> list[Entry]:
    d, h, hd = arch.embed_dim, arch.num_heads, arch.head_dim
    return [
        Entry(f"{key}.weight", (f"{src}/out/kernel",), ((h, hd, d),), lambda k: k.reshape(d, d).T),
        Entry(f"{key}.bias", (f"{src}/out/bias",), ((d,),), _same),
    ]


def _mlp(key: str, src: str, arch: ReleaseArchitecture) -> list[Entry]:
    return _dense(f"{key}.fc1", f"{src}/Dense_0", arch.embed_dim, arch.mlp_dim) + _dense(
        f"{key}.fc2", f"{src}/Dense_1", arch.mlp_dim, arch.embed_dim
    )


def backbone_entries(arch: ReleaseArchitecture) -> list[Entry]:
    """timm ViT (no class token) keys from ToTokenSequence_0, encoderblock_i, encoder_norm."""
    d, p, g = arch.embed_dim, arch.patch_size, arch.pos_grid
    entries = [
        Entry(
            "patch_embed.proj.weight",
            ("ToTokenSequence_0/embedding/kernel",),
            ((p, p, 3, d),),
            lambda k: k.transpose(3, 2, 0, 1),
        ),
        Entry("patch_embed.proj.bias", ("ToTokenSequence_0/embedding/bias",), ((d,),), _same),
        Entry("pos_embed", ("ToTokenSequence_0/posembed_input",), ((1, g, g, d),), lambda t: t.reshape(1, g * g, d)),
    ]
    for i in range(arch.depth):
        src, key = f"encoderblock_{i}", f"blocks.{i}"
        attn = f"{src}/MultiHeadDotProductAttention_0"
        entries += _norm(f"{key}.norm1", f"{src}/LayerNorm_0", d)
        entries += _heads_in(("query", "key", "value"), f"{key}.attn.qkv", attn, arch)
        entries += _attention_out(f"{key}.attn.proj", attn, arch)
        entries += _norm(f"{key}.norm2", f"{src}/LayerNorm_1", d)
        entries += _mlp(f"{key}.mlp", f"{src}/MlpBlock_0", arch)
    return entries + _norm("norm", "encoder_norm", d)


def location_head_entries(arch: ReleaseArchitecture) -> list[Entry]:
    """LocationHead keys from cross_attention_block (LayerNorm_0: queries, LayerNorm_1: reference), final_norm and
    position_predictor."""
    d, src = arch.embed_dim, "cross_attention_block"
    attn = f"{src}/MultiHeadDotProductAttention_0"
    return (
        _norm("norm_query", f"{src}/LayerNorm_0", d)
        + _norm("norm_reference", f"{src}/LayerNorm_1", d)
        + _heads_in(("query",), "attn.q", attn, arch)
        + _heads_in(("key", "value"), "attn.kv", attn, arch)
        + _attention_out("attn.proj", attn, arch)
        + _norm("norm_mlp", f"{src}/LayerNorm_2", d)
        + _mlp("mlp", f"{src}/MlpBlock_0", arch)
        + _norm("norm_out", "final_norm", d)
        + _dense("position_predictor", "position_predictor", d, arch.num_positions)
    )


def projection_entries(arch: ReleaseArchitecture) -> list[Entry]:
    """ProjectionHead keys (Linear layers at mlp.0, mlp.2, mlp.4; prototypes [K, bottleneck]) from the release's
    Dense_0..2 and prototypes/kernel [bottleneck, K] (columns are the prototypes)."""
    hidden, bottleneck, prototypes = arch.projection  # type: ignore[misc]
    dims = (arch.embed_dim, hidden, hidden, bottleneck)
    entries = []
    for i in range(3):
        entries += _dense(f"mlp.{2 * i}", f"{PROJECTION}/Dense_{i}", dims[i], dims[i + 1])
    return entries + _dense("prototypes", f"{PROJECTION}/prototypes", bottleneck, prototypes, bias=False)


def convert_tree(
    flat: Mapping[str, Any], groups: Mapping[str, list[Entry]], tree_name: str, path: Path, arch: ReleaseArchitecture
) -> tuple[dict[str, Tensor], set[str]]:
    """Apply the entries of each group (torch prefix -> entries) to ``flat``; return tensors and the leaves used.

    Raises one error listing missing leaves and mis-shaped leaves (extra leaves are the caller's to judge).
    """
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing, mismatched = [], []
    for prefix, entries in groups.items():
        for entry in entries:
            arrays = []
            for source, shape in zip(entry.sources, entry.shapes):
                used.add(source)
                value = flat.get(source)
                if value is None:
                    missing.append(source)
                elif not isinstance(value, np.ndarray) or tuple(value.shape) != shape:
                    mismatched.append(f"{source} {tuple(getattr(value, 'shape', ()))} (expected {shape})")
                else:
                    arrays.append(value)
            if len(arrays) == len(entry.sources):
                array = np.array(entry.fn(*arrays), dtype=np.float32, order="C")  # a writable copy
                out[prefix + entry.key] = torch.from_numpy(array)
    if missing or mismatched:
        parts = describe_differences({"missing leaves": missing, "mis-shaped leaves": mismatched}, shown=8)
        raise ReleaseFormatError(
            f"{str(path)!r}: {tree_name} does not match a LOCA model with {arch.describe()}: " + "; ".join(parts)
        )
    return out, used


def check_no_extra(flat: Mapping[str, Any], used: set[str], tree_name: str, path: Path) -> None:
    """Every leaf of a params tree must have been used."""
    extra = sorted(set(flat) - used)
    if extra:
        (part,) = describe_differences({"has leaves a LOCA model does not have": extra}, shown=8)
        raise ReleaseFormatError(f"{str(path)!r}: {tree_name} {part}")


def check_same_tree(params: Mapping[str, Any], ema: Mapping[str, Any], path: Path) -> None:
    """ema_params (the teacher) must have params' leaves and shapes."""
    shape = lambda v: tuple(getattr(v, "shape", ()))  # noqa: E731
    missing = sorted(set(params) - set(ema))
    extra = sorted(set(ema) - set(params))
    differ = sorted(
        f"{k} {shape(ema[k])} vs {shape(params[k])}"
        for k in set(params) & set(ema)
        if shape(ema[k]) != shape(params[k])
    )
    if missing or extra or differ:
        parts = describe_differences({"missing": missing, "extra": extra, "shapes differ": differ}, shown=8)
        raise ReleaseFormatError(f"{str(path)!r}: ema_params is not the tree of params: " + "; ".join(parts))

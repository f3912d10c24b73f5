"""Release-format test material without JAX: params trees with the exact flax names and layouts of the LOCA release
(scenic/projects/loca/vit.py), files written with plain msgpack as flax's serialization writes them, and a numpy
forward pass of the release's architecture computed from the flax layout (float64), to check imports against.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np


# ------------------------------------------------------------------------------------------------ params trees
def random_params(
    seed: int = 0,
    patch: int = 16,
    dim: int = 64,
    depth: int = 2,
    heads: int = 2,
    mlp: int = 256,
    grid: int = 4,
    projection: tuple[int, int, int] | None = (128, 32, 64),
) -> dict:
    """A params tree of ViT4LOCA with random values everywhere (biases and norms too), float32. The defaults have the
    parity model's depth, heads, patch and 4x4 table (16 positions) at other widths: width 64, MLP 256, projection
    64->128->128->32, 64 prototypes (the parity fixtures' model is width 20, MLP 80, projection 20->48->48->12, 40
    prototypes: tests/data/release_parity/README.md)."""
    rng = np.random.default_rng(seed)
    hd = dim // heads

    def arr(*shape: int, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
        return offset + np.float32(scale) * rng.standard_normal(shape, dtype=np.float32)

    def dense(d_in: int, d_out: int, bias: bool = True) -> dict:
        out = {"kernel": arr(d_in, d_out, scale=d_in**-0.5)}
        if bias:
            out["bias"] = arr(d_out, scale=0.1)
        return out

    def norm() -> dict:
        return {"scale": arr(dim, scale=0.1, offset=1.0), "bias": arr(dim, scale=0.1)}

    def attention() -> dict:
        qkv = {
            n: {"kernel": arr(dim, heads, hd, scale=dim**-0.5), "bias": arr(heads, hd, scale=0.1)}
            for n in ("query", "key", "value")
        }
        return {**qkv, "out": {"kernel": arr(heads, hd, dim, scale=dim**-0.5), "bias": arr(dim, scale=0.1)}}

    def mlp_block() -> dict:
        return {"Dense_0": dense(dim, mlp), "Dense_1": dense(mlp, dim)}

    params = {
        "ToTokenSequence_0": {
            "embedding": {
                "kernel": arr(patch, patch, 3, dim, scale=(3 * patch * patch) ** -0.5),
                "bias": arr(dim, scale=0.1),
            },
            "posembed_input": arr(1, grid, grid, dim, scale=dim**-0.5),
        }
    }
    for i in range(depth):
        params[f"encoderblock_{i}"] = {
            "LayerNorm_0": norm(),
            "MultiHeadDotProductAttention_0": attention(),
            "LayerNorm_1": norm(),
            "MlpBlock_0": mlp_block(),
        }
    params["encoder_norm"] = norm()
    if projection is not None:
        hidden, bottleneck, prototypes = projection
        params["projection_head_for_clustering_prediction"] = {
            "Dense_0": dense(dim, hidden),
            "Dense_1": dense(hidden, hidden),
            "Dense_2": dense(hidden, bottleneck),
            "prototypes": {"kernel": arr(bottleneck, prototypes, scale=0.3)},  # columns of any norm
        }
    params["cross_attention_block"] = {
        "LayerNorm_0": norm(),
        "LayerNorm_1": norm(),
        "MultiHeadDotProductAttention_0": attention(),
        "LayerNorm_2": norm(),
        "MlpBlock_0": mlp_block(),
    }
    params["final_norm"] = norm()
    params["position_predictor"] = dense(dim, grid * grid)
    return params


def map_leaves(fn, tree):
    """``fn`` applied to every array leaf of a nested dict."""
    return {k: map_leaves(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def leaf_paths(tree, prefix: str = "") -> list[str]:
    """``"a/b"`` paths of all leaves of a nested dict."""
    if not isinstance(tree, dict):
        return [prefix]
    return [path for key, value in tree.items() for path in leaf_paths(value, f"{prefix}/{key}" if prefix else key)]


def train_state(params: dict, ema_params: dict | None, step: int = 7, opt_state: bool = True) -> dict:
    """The state dict of the release's TrainState as flax writes it (optax's AdamW state as indexed dicts)."""
    state = {
        "ema_params": ema_params,
        "params": params,
        "state": None,
        "ema_state": None,
        "global_step": step,
        "rng": np.array([0, 42], dtype=np.uint32),
        "metadata": {"chrono": {"accum_train_time": 12.5, "prev_time": np.float64(3.25)}},
    }
    if opt_state:  # inject_hyperparams(adamw): count, hyperparams, inner state (ScaleByAdamState, masked decay, ...)
        zeros = map_leaves(np.zeros_like, params)
        state["opt_state"] = {
            "count": np.int32(step),
            "hyperparams": {"learning_rate": np.float32(1e-3)},
            "inner_state": {"0": {"count": np.int32(step), "mu": zeros, "nu": zeros}, "1": {}},
        }
    return state


# ------------------------------------------------------------------------------------------------ flax's msgpack
def _ext(array: np.ndarray, code: int = 1) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb((array.shape, array.dtype.name, array.tobytes("C")), use_bin_type=True))


def _encode(tree, chunk_bytes: int | None):
    if isinstance(tree, dict):
        return {str(k): _encode(v, chunk_bytes) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        if chunk_bytes is not None and tree.nbytes > chunk_bytes:  # flax's chunked form of arrays above a limit
            per_chunk = max(1, chunk_bytes // tree.dtype.itemsize)
            flat = tree.reshape(-1)
            chunks = [flat[i : i + per_chunk] for i in range(0, flat.size, per_chunk)]
            return {
                "__msgpack_chunked_array__": True,
                "shape": {str(i): n for i, n in enumerate(tree.shape)},
                "chunks": {str(i): _ext(c) for i, c in enumerate(chunks)},
            }
        return _ext(tree)
    if isinstance(tree, np.generic):
        return _ext(np.asarray(tree), 3)
    if isinstance(tree, complex):
        return msgpack.ExtType(2, msgpack.packb((tree.real, tree.imag)))
    return tree


def flax_bytes(tree, chunk_bytes: int | None = None) -> bytes:
    """``tree`` in flax's msgpack format (``flax.serialization.msgpack_serialize``), written with plain msgpack."""
    return msgpack.packb(_encode(tree, chunk_bytes), use_bin_type=True)


def bfloat16_ext(values: np.ndarray) -> msgpack.ExtType:
    """A bfloat16 array as flax writes it (dtype name 'bfloat16', 2 bytes each): the top half of float32 bits."""
    bits = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return msgpack.ExtType(1, msgpack.packb((values.shape, "bfloat16", bits.tobytes()), use_bin_type=True))


# ------------------------------------------------------------------------------------------------ numpy reference
def _ln(x: np.ndarray, p: dict) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """flax's ``nn.gelu`` (``approximate=True``)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _dense(x: np.ndarray, p: dict) -> np.ndarray:
    return x @ p["kernel"] + p.get("bias", 0.0)


def _mha(x_q: np.ndarray, x_kv: np.ndarray, p: dict) -> np.ndarray:
    """flax MultiHeadDotProductAttention: DenseGeneral to [.., heads, hd], softmax(q k / sqrt(hd)), out [heads, hd, D]."""
    q = np.einsum("bnd,dhk->bnhk", x_q, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bnd,dhk->bnhk", x_kv, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("bnd,dhk->bnhk", x_kv, p["value"]["kernel"]) + p["value"]["bias"]
    logits = np.einsum("bqhk,bmhk->bhqm", q / np.sqrt(q.shape[-1]), k)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqm,bmhk->bqhk", weights, v)
    return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def _mlp(x: np.ndarray, p: dict) -> np.ndarray:
    return _dense(gelu_tanh(_dense(x, p["Dense_0"])), p["Dense_1"])


def _f64(tree):
    return map_leaves(lambda a: np.asarray(a, dtype=np.float64), tree)


def backbone_features(params: dict, images: np.ndarray) -> np.ndarray:
    """Encoder output ``[B, N, D]`` (after encoder_norm) for NHWC images whose grid is the positional table's."""
    p = _f64(params)
    tokens = p["ToTokenSequence_0"]
    kernel = tokens["embedding"]["kernel"]  # [p, p, 3, D]
    size = kernel.shape[0]
    b, h, w, c = images.shape
    patches = images.astype(np.float64).reshape(b, h // size, size, w // size, size, c)
    x = np.einsum("bhiwjc,ijcd->bhwd", patches, kernel) + tokens["embedding"]["bias"]  # the stride-p VALID conv
    x = (x + tokens["posembed_input"]).reshape(b, -1, x.shape[-1])  # raster order
    i = 0
    while f"encoderblock_{i}" in p:
        block = p[f"encoderblock_{i}"]
        y = _ln(x, block["LayerNorm_0"])
        x = x + _mha(y, y, block["MultiHeadDotProductAttention_0"])
        x = x + _mlp(_ln(x, block["LayerNorm_1"]), block["MlpBlock_0"])
        i += 1
    return _ln(x, p["encoder_norm"])


def location_logits(params: dict, query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """CrossAttentionEncoderBlock (queries attend to the reference), final_norm, position_predictor: ``[B, Q, P]``."""
    p = _f64(params)
    block = p["cross_attention_block"]
    x = query + _mha(
        _ln(query, block["LayerNorm_0"]), _ln(reference, block["LayerNorm_1"]), block["MultiHeadDotProductAttention_0"]
    )
    x = x + _mlp(_ln(x, block["LayerNorm_2"]), block["MlpBlock_0"])
    return _dense(_ln(x, p["final_norm"]), p["position_predictor"])


def prototype_cosines(params: dict, features: np.ndarray) -> np.ndarray:
    """ProjectionHead: Dense-gelu-Dense-gelu-Dense, L2 normalise, weight-normalised prototypes (unit columns)."""
    p = _f64(params)["projection_head_for_clustering_prediction"]
    x = gelu_tanh(_dense(features, p["Dense_0"]))
    x = gelu_tanh(_dense(x, p["Dense_1"]))
    x = _dense(x, p["Dense_2"])
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    kernel = p["prototypes"]["kernel"]
    return x @ (kernel / (np.linalg.norm(kernel, axis=0, keepdims=True) + 1e-10))

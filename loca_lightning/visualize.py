"""Pure drawing, PCA and attention helpers for the TensorBoard image callbacks (numpy/cv2 in, uint8 HWC out).

Nothing here knows about Lightning: images are ``uint8 [H, W, 3]`` arrays, features and indices are tensors, and
every function returns a new array, so each can be tested alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from loca_lightning.normalize import IMAGENET_MEAN, IMAGENET_STD


def to_uint8_image(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` uint8, or float normalised with ImageNet mean/std -> RGB uint8 ``[H, W, 3]``."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got shape {tuple(image.shape)}")
    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        image = ((image.float() * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def cell_centres(index: np.ndarray, grid: int, image_size: int) -> np.ndarray:
    """Pixel centres ``[n, 2]`` (x, y) of raster-order cells ``index`` of a ``grid x grid`` layout on an image side."""
    index = np.asarray(index, dtype=np.int64)
    cell = image_size / grid
    rows, cols = index // grid, index % grid
    return np.stack([(cols + 0.5) * cell, (rows + 0.5) * cell], axis=-1)


def draw_band(image: np.ndarray, keep: np.ndarray, grid: int, dim: float = 0.35) -> np.ndarray:
    """Darken the reference cells hidden from the location head; kept cells (``keep``, raster indices) are unchanged."""
    height, width = image.shape[:2]
    visible = np.zeros(grid * grid, dtype=bool)
    visible[np.asarray(keep, dtype=np.int64)] = True
    mask = cv2.resize(visible.reshape(grid, grid).astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    factor = np.where(mask[..., None] > 0, 1.0, dim)  # [H, W, 1]
    return (image.astype(np.float32) * factor + 0.5).astype(np.uint8)


def draw_positions(image: np.ndarray, true_index: np.ndarray, pred_index: np.ndarray, grid: int) -> np.ndarray:
    """Queries' true cells (green rings) and predicted cells (red dots) on the reference, joined by a line per query."""
    out = image.copy()
    size = image.shape[0]
    radius = max(2, round(size / grid / 3))
    true_xy = cell_centres(true_index, grid, size).round().astype(int)
    pred_xy = cell_centres(pred_index, grid, size).round().astype(int)
    for (tx, ty), (px, py) in zip(true_xy, pred_xy):
        cv2.line(out, (int(tx), int(ty)), (int(px), int(py)), (255, 255, 0), 1, cv2.LINE_AA)
        cv2.circle(out, (int(tx), int(ty)), radius, (0, 255, 0), 1, cv2.LINE_AA)
        cv2.circle(out, (int(px), int(py)), max(1, radius // 2), (255, 0, 0), -1, cv2.LINE_AA)
    return out


def diagonal_cells(grid: int, count: int) -> Tensor:
    """``count`` raster indices spread evenly along the main diagonal of a ``grid x grid`` layout (query cells for
    attention maps that look at different parts of the image)."""
    if count < 1 or grid < 1:
        raise ValueError(f"grid and count must be >= 1, got grid={grid}, count={count}")
    rc = (torch.arange(1, count + 1) * grid) // (count + 1)  # [count], strictly inside the grid
    return rc * grid + rc


def pca_rgb(features: Tensor, grid: tuple[int, int], size: tuple[int, int] | None = None) -> np.ndarray:
    """First three principal components of patch features ``[N, D]`` as RGB ``[gh, gw, 3]`` (or resized to ``size``).

    Each component is min-max scaled to [0, 255]; signs are fixed so the largest-magnitude loading is positive,
    which makes the colours reproducible.
    """
    gh, gw = grid
    if features.ndim != 2 or features.shape[0] != gh * gw:
        raise ValueError(f"features must be [{gh * gw}, D] for grid {grid}, got shape {tuple(features.shape)}")
    x = features.detach().double().cpu()
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # vh [min(N, D), D]
    comps = vh[:3]
    if comps.shape[0] < 3:
        comps = torch.cat([comps, comps.new_zeros(3 - comps.shape[0], comps.shape[1])])
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True))).clamp_min(0) * 2 - 1  # [3, 1] = +-1
    proj = x @ (comps * signs).T  # [N, 3]
    low, high = proj.min(0).values, proj.max(0).values
    scaled = (proj - low) / (high - low).clamp_min(1e-12)
    rgb = (scaled * 255 + 0.5).clamp(0, 255).to(torch.uint8).reshape(gh, gw, 3).numpy()
    if size is not None:
        rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return rgb


def last_block_attention(backbone: nn.Module, images: Tensor, query_index: Tensor) -> Tensor:
    """Head-mean attention of the last block from tokens ``query_index [P]`` to all tokens: ``[B, P, N]``.

    timm's fused attention returns no weights, so this recomputes q and k from the last block's ``norm1 -> qkv``
    (explicitly, outside the training path). Call under ``torch.no_grad`` with the backbone in eval mode.
    """
    tokens = backbone.embed(images)  # [B, N, D]
    for block in backbone.blocks[:-1]:
        tokens = block(tokens)
    block = backbone.blocks[-1]
    attn = block.attn
    batch, num, dim = tokens.shape
    heads = attn.num_heads
    qkv = attn.qkv(block.norm1(tokens)).reshape(batch, num, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # [B, H, N, d]
    q = q[:, :, query_index.to(q.device)]  # [B, H, P, d]
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(-1)  # [B, H, P, N]
    return weights.mean(1)


def heatmap_overlay(image: np.ndarray, values: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend a ``[h, w]`` map (min-max scaled, bilinearly upsampled to the image) as a JET heatmap over ``image``."""
    values = np.asarray(values, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / max(high - low, 1e-12)
    height, width = image.shape[:2]
    up = cv2.resize(scaled, (width, height), interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap((up * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(blend + 0.5, 0, 255).astype(np.uint8)


def mark_cell(image: np.ndarray, index: int, grid: int, colour: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Outline one raster-order cell of a ``grid x grid`` layout (the query position of an attention map)."""
    out = image.copy()
    cell = image.shape[0] / grid
    row, col = divmod(int(index), grid)
    top_left = (round(col * cell), round(row * cell))
    bottom_right = (round((col + 1) * cell) - 1, round((row + 1) * cell) - 1)
    cv2.rectangle(out, top_left, bottom_right, colour, 1)
    return out


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Class indices ``[H, W]`` -> RGB ``[H, W, 3]`` with ``palette [C, 3]``; ignored and unknown pixels are black."""
    palette = np.asarray(palette, dtype=np.uint8)
    mask = np.asarray(mask).astype(np.int64)
    known = (mask >= 0) & (mask < len(palette)) & (mask != ignore_index)
    out = np.zeros(mask.shape + (3,), dtype=np.uint8)
    out[known] = palette[mask[known]]
    return out


def blend(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colours``, rounded to uint8."""
    if image.shape != colours.shape:
        raise ValueError(f"image {image.shape} and colours {colours.shape} must have the same shape")
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def tile(images: Sequence[np.ndarray], columns: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Lay out equally sized RGB images ``[H, W, 3]`` row by row in ``columns`` columns with ``pad`` px gaps."""
    if not images:
        raise ValueError("tile needs at least one image")
    height, width = images[0].shape[:2]
    if any(im.shape[:2] != (height, width) for im in images):
        raise ValueError(f"all tiles must be {height}x{width}, got {[im.shape[:2] for im in images]}")
    rows = -(-len(images) // columns)
    cols = min(columns, len(images))
    out = np.full((rows * height + (rows - 1) * pad, cols * width + (cols - 1) * pad, 3), fill, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        y, x = r * (height + pad), c * (width + pad)
        out[y : y + height, x : x + width] = im
    return out


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer ``factor`` (tiny demo images stay crisp in TensorBoard)."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image


def patch_labels(mask: Tensor, patch: int, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Majority class of each ``patch x patch`` cell of ``mask [B, H, W]`` -> ``[B, H/p, W/p]``; cells with no
    labelled pixel get ``ignore_index``; ties go to the lowest class index."""
    batch, height, width = mask.shape
    if height % patch or width % patch:
        raise ValueError(f"mask size {height}x{width} is not a multiple of the patch size {patch}")
    gh, gw = height // patch, width // patch
    cells = mask.reshape(batch, gh, patch, gw, patch).permute(0, 1, 3, 2, 4).reshape(batch, gh, gw, -1)
    valid = (cells != ignore_index) & (cells >= 0) & (cells < num_classes)
    onehot = torch.zeros(batch, gh, gw, num_classes + 1, dtype=torch.long, device=mask.device)
    onehot.scatter_add_(-1, torch.where(valid, cells, num_classes).long(), torch.ones_like(cells, dtype=torch.long))
    counts = onehot[..., :num_classes]  # [B, gh, gw, C]
    labels = counts.argmax(-1)
    return torch.where(counts.sum(-1) > 0, labels, torch.full_like(labels, ignore_index))

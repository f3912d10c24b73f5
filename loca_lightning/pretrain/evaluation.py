"""Held-out location accuracy: how often the location head names the reference cell a query patch shows, on fresh
views of images training never drew them from."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from loca_lightning.pretrain.losses import location_accuracy as batch_accuracy
from loca_lightning.pretrain.masks import MaskGenerator


@torch.no_grad()
def location_accuracy(model, views, images: Sequence[np.ndarray], seed: int = 0, batch_size: int = 64) -> float:
    """Accuracy of ``model``'s location head (a LOCAPretrainModule, in eval mode; its mode is restored) on views of
    ``images`` (RGB uint8) made by ``views``: item i's views from ``numpy`` seed ``(seed, i)``, token masks from torch
    seed 0 (a mask generator of its own: the model's, which training draws from, is left where it was), so that
    every model compared sees the same queries, references and masks."""
    was_training, training_masks = model.training, model.mask_generator
    model.eval()
    hits = labelled = 0.0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.mask_generator = MaskGenerator()  # seeded from torch seed 0 at its first draw
            for start in range(0, len(images), batch_size):
                index = range(start, min(len(images), start + batch_size))
                items = [views(images[i], np.random.default_rng((seed, i))) for i in index]
                batch = {k: torch.from_numpy(np.stack([item[k] for item in items])) for k in items[0]}
                size = len(items)
                keys, _ = model.encode_reference(model.normalize(batch["reference"]), model.select_reference_keep(size))
                large_keep = model.select_query_keep(size, batch["target_large"].shape[1])  # [B, Kq]
                queries = (model.normalize(batch["query_large"]), model.normalize(batch["query_focal"]))
                tokens = model.encode_queries(*queries, large_keep)  # [B, Q, D]
                target = model.query_targets(batch["target_large"], batch["target_focal"], large_keep)  # [B, Q]
                logits = model.student.location_head(tokens, keys)  # [B, Q, P]
                count = float((target >= 0).sum())
                hits += float(batch_accuracy(logits, target)) * count
                labelled += count
    finally:
        model.train(was_training)
        model.mask_generator = training_masks
    return hits / max(labelled, 1.0)

"""Data pipeline instruments: LOCA samples/s of one DataLoader worker and of LOCAPretrainDataModule's loader.

Needs the package's data dependencies (OpenCV, albumentations); used by ``run.py`` and ``gpu.py``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from machine import OtherLoad, tree_pss_mb
from torch.utils.data import default_collate

from loca_lightning.data.images import read_image
from loca_lightning.data.pretrain import LOCAPretrainDataModule, LOCAPretrainDataset
from loca_lightning.data.synthetic import SyntheticScenes
from loca_lightning.pretrain.views import LOCAViews

RELEASED_VIEWS = dict(reference_size=224, query_size=224, focal_size=96, num_focal=9, patch_size=16)


def write_jpegs(folder: Path, count: int, size: tuple[int, int] = (375, 500), quality: int = 90) -> list[Path]:
    """Write ``count`` synthetic scenes of ``size`` (H, W) as JPEGs (quality 90, like ImageNet's) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(length=count, image_size=size, with_masks=False, seed=0)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        if not cv2.imwrite(str(path), scenes[i]["image"][:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality]):
            raise OSError(f"could not write {path}")
        paths.append(path)
    return paths


def _time_per_item(fn: Callable[[int], Any], count: int, repeats: int) -> float:
    """Median over ``repeats`` passes of the seconds per call of ``fn(i)``, i in range(count)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        times.append((time.perf_counter() - start) / count)
    return statistics.median(times)


def bench_data_worker(paths: list[Path], views: dict, batch_size: int, repeats: int) -> dict:
    """Samples/s of one DataLoader worker (one thread, as DataLoader sets it): decode, views, targets,
    photometrics and collation of whole batches; plus the per-sample cost of each stage."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = LOCAViews(**views)
        plain = LOCAViews(**views, photometric=False)
        dataset = LOCAPretrainDataset(paths, full)
        n = len(paths) - len(paths) % batch_size
        load = OtherLoad().start()

        def one_pass(_: int) -> None:
            for start in range(0, n, batch_size):
                default_collate([dataset[i] for i in range(start, start + batch_size)])

        per_sample = _time_per_item(one_pass, 1, repeats) / n
        others = load.stop()
        per_cpu_s = n * repeats / load.own_cpu_s if load.own_cpu_s else None
        images = [read_image(p) for p in paths[:batch_size]]
        rng = np.random.default_rng(0)
        items = [dataset[i] for i in range(batch_size)]
        stages = {
            "decode": _time_per_item(lambda i: read_image(paths[i % len(paths)]), n, repeats),
            "crops_resize_targets": _time_per_item(lambda i: plain(images[i % batch_size], rng), n, repeats),
            "views_with_photometrics": _time_per_item(lambda i: full(images[i % batch_size], rng), n, repeats),
            "collate": _time_per_item(lambda i: default_collate(items), max(1, n // batch_size), repeats) / batch_size,
        }
    finally:
        torch.set_num_threads(threads)
    stages["photometrics"] = stages["views_with_photometrics"] - stages["crops_resize_targets"]
    return {
        "samples_per_s": 1.0 / per_sample,
        "samples_per_cpu_s": per_cpu_s,  # what a worker does with a whole core: robust to other processes
        "ms_per_sample": 1e3 * per_sample,
        "stage_ms_per_sample": {k: round(1e3 * v, 3) for k, v in stages.items()},
        "others_cores": others,
    }


def bench_data_loader(folder: Path, paths: list[Path], views: dict, batch_size: int, workers: int, epochs: int) -> dict:
    """Samples/s of LOCAPretrainDataModule's loader with ``workers`` persistent workers, after its first batch."""
    list_file = folder / "bench_list.txt"
    list_file.write_text("\n".join(str(p) for p in paths) + "\n")
    datamodule = LOCAPretrainDataModule(
        source="list",
        list_file=str(list_file),
        views=LOCAViews(**views),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )
    loader = datamodule.train_dataloader()
    iterator = iter(loader)
    next(iterator)  # workers started and warm
    load = OtherLoad().start()
    start, samples = time.perf_counter(), 0
    for batch in iterator:
        samples += batch["reference"].shape[0]
    for _ in range(epochs - 1):
        for batch in loader:
            samples += batch["reference"].shape[0]
    elapsed = time.perf_counter() - start
    others = load.stop()
    memory = tree_pss_mb()  # while the persistent workers are alive: main process + workers, shared pages once
    del iterator, loader
    per_cpu_s = samples / load.own_cpu_s if load.own_cpu_s else None
    return {
        "workers": workers,
        "samples_per_s": samples / elapsed,
        "samples_per_cpu_s": per_cpu_s,
        "pss_with_workers_mb": memory,
        "others_cores": others,
    }


def bench_data(
    images: int = 96,
    batch_size: int = 32,
    repeats: int = 3,
    workers: int = 2,
    epochs: int = 2,
    views: dict | None = None,
    image_size: tuple[int, int] = (375, 500),
) -> dict:
    """The data pipeline part: JPEGs written to a temporary folder, one worker in-process, then ``workers``."""
    views = dict(RELEASED_VIEWS if views is None else views)
    with tempfile.TemporaryDirectory(prefix="loca_bench_") as tmp:
        folder = Path(tmp)
        paths = write_jpegs(folder, images, image_size)
        out = {
            "images": images,
            "image_size": list(image_size),
            "batch_size": batch_size,
            "jpeg_kb": round(float(np.mean([p.stat().st_size for p in paths])) / 1e3, 1),
        }
        out["one_worker"] = bench_data_worker(paths, views, batch_size, repeats)
        if workers > 0:
            out["loader"] = bench_data_loader(folder, paths * 4, views, batch_size, workers, epochs)
    return out

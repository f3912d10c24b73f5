"""loca-lightning: LOCA (Caron, Houlsby, Schmid, arXiv 2212.02400) pretraining and segmentation finetuning of
Vision Transformers as PyTorch Lightning modules.

The public API is re-exported here and resolved on first use, so ``import loca_lightning`` stays light and
``loca_lightning.LOCAPretrainModule`` works as a LightningCLI class path.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LOCAPretrainModule": "loca_lightning.pretrain.module",
    "LOCAPretrainDataModule": "loca_lightning.data.pretrain",
    "LOCAViews": "loca_lightning.pretrain.views",
    "SegmentationFinetuneModule": "loca_lightning.segmentation.module",
    "SegmentationDataModule": "loca_lightning.data.segmentation",
    "SegmentationMetric": "loca_lightning.segmentation.metrics",
    "SyntheticScenes": "loca_lightning.data.synthetic",
    "build_backbone": "loca_lightning.backbones",
    "list_backbones": "loca_lightning.backbones",
    "register_backbone": "loca_lightning.backbones",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loca_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

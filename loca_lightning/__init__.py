"""loca-lightning: LOCA (Caron, Houlsby, Schmid, arXiv 2212.02400) pretraining and segmentation finetuning of
Vision Transformers as PyTorch Lightning modules.

The public API is re-exported here and resolved on first use, so ``import loca_lightning`` stays light and
``loca_lightning.LOCAPretrainModule`` works as a LightningCLI class path.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
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


def lazy_attributes(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` that import each name of ``exports`` (name -> module) on first use."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

"""The project's Lightning callbacks: writing ``loca predict`` masks, TensorBoard image loggers, an online dense probe,
saving a run's config in its own folder, progress lines for logs that are not a terminal.

Configs name them by these paths (``loca_lightning.callbacks.LOCAImageLogger``); each lives in a module of its own,
imported on first use, so that importing the package (as ``loca export`` does through the CLI) loads neither OpenCV
nor the datasets.
"""

from __future__ import annotations

from loca_lightning import lazy_attributes

_EXPORTS = {
    "LOCAImageLogger": "loca_lightning.callbacks.images",
    "PeriodicImageLogger": "loca_lightning.callbacks.images",
    "SegmentationImageLogger": "loca_lightning.callbacks.images",
    "SegmentationPredictionWriter": "loca_lightning.callbacks.prediction",
    "indexed_png": "loca_lightning.callbacks.prediction",
    "mask_palette": "loca_lightning.callbacks.prediction",
    "overlay_image": "loca_lightning.callbacks.prediction",
    "OnlineDenseProbe": "loca_lightning.callbacks.probe",
    "ProgressLines": "loca_lightning.callbacks.progress",
    "SaveRunConfig": "loca_lightning.callbacks.run_config",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

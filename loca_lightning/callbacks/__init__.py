"""The project's Lightning callbacks: writing ``loca predict`` masks, TensorBoard image loggers, an online dense probe,
saving a run's config in its own folder, progress lines for logs that are not a terminal.

Configs name them by these paths (``loca_lightning.callbacks.LOCAImageLogger``); each lives in a module of its own.
"""

from loca_lightning.callbacks.images import LOCAImageLogger, PeriodicImageLogger, SegmentationImageLogger
from loca_lightning.callbacks.prediction import (
    SegmentationPredictionWriter,
    indexed_png,
    mask_palette,
    overlay_image,
)
from loca_lightning.callbacks.probe import OnlineDenseProbe
from loca_lightning.callbacks.progress import ProgressLines
from loca_lightning.callbacks.run_config import SaveRunConfig

__all__ = [
    "LOCAImageLogger",
    "OnlineDenseProbe",
    "PeriodicImageLogger",
    "ProgressLines",
    "SaveRunConfig",
    "SegmentationImageLogger",
    "SegmentationPredictionWriter",
    "indexed_png",
    "mask_palette",
    "overlay_image",
]

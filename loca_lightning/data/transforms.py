"""Albumentations pipelines for semantic segmentation, with MMSegmentation's training recipe.

Training: random rescale relative to a base size (aspect kept), random crop that avoids crops
dominated by one class (``cat_max_ratio``), horizontal flip, photometric distortion, padding to the
crop size (image 0, mask 255, bottom/right). Albumentations supplies flip and padding; the rescale,
the crop rule and mmseg's photometric distortion have no albumentations equivalent, so they are small
transforms here built on pure functions that tests call directly. Masks are always resized with
nearest neighbour. Evaluation does nothing but convert to tensors: labels keep their native size.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import DualTransform, ImageOnlyTransform


def rescale_size(height: int, width: int, ratio: float, base_size: tuple[int, int]) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the (height, width) whose long side <= int(max(base)*ratio), short <= int(min(base)*ratio)."""
    scaled = (int(base_size[0] * ratio), int(base_size[1] * ratio))
    max_long, max_short = max(scaled), min(scaled)
    factor = min(max_long / max(height, width), max_short / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def cat_max_ratio_crop_box(
    mask: np.ndarray,
    crop_size: tuple[int, int],
    cat_max_ratio: float,
    rng: np.random.Generator,
    ignore_index: int = 255,
    max_tries: int = 10,
) -> tuple[int, int, int, int]:
    """A random crop box ``(top, left, bottom, right)`` of ``mask`` [H, W], redrawn up to ``max_tries``
    times while fewer than two labelled classes are in it or one covers >= cat_max_ratio of its labelled pixels.

    As in mmseg, the last redraw is kept unchecked; crops larger than the mask are clipped to it.
    """
    height, width = mask.shape[:2]
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)

    def draw() -> tuple[int, int, int, int]:
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        return top, left, top + crop_h, left + crop_w

    box = draw()
    if cat_max_ratio >= 1.0:
        return box
    for _ in range(max_tries):
        top, left, bottom, right = box
        labels, counts = np.unique(mask[top:bottom, left:right], return_counts=True)
        counts = counts[labels != ignore_index]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        box = draw()
    return box


def _affine_lut(alpha: float, beta: float) -> np.ndarray:
    """uint8 lookup table for clip(x * alpha + beta) truncated to uint8, mmseg's conversion."""
    return np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(
    image: np.ndarray,
    brightness: float | None = None,
    contrast: float | None = None,
    saturation: float | None = None,
    hue: int | None = None,
    contrast_first: bool = True,
) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on RGB uint8 [H, W, 3] with fixed parameters (None = step skipped).

    brightness adds a delta, contrast and saturation multiply (value and HSV saturation), hue shifts
    OpenCV's 0..179 hue circularly; contrast runs before or after the HSV steps.
    """
    out = image
    if brightness is not None:
        out = cv2.LUT(out, _affine_lut(1.0, brightness))
    if contrast is not None and contrast_first:
        out = cv2.LUT(out, _affine_lut(contrast, 0.0))
    if saturation is not None or hue is not None:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)  # [H, W, 3] uint8, hue in 0..179
        if saturation is not None:
            hsv[..., 1] = cv2.LUT(hsv[..., 1], _affine_lut(saturation, 0.0))
        if hue is not None:
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + hue) % 180).astype(np.uint8)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if contrast is not None and not contrast_first:
        out = cv2.LUT(out, _affine_lut(contrast, 0.0))
    return out


class RandomRescale(DualTransform):
    """Rescale by a ratio ~ U(ratio_range) of ``base_size`` keeping the aspect (mmseg RandomResize, keep_ratio)."""

    def __init__(
        self, base_size: tuple[int, int] = (2048, 512), ratio_range: tuple[float, float] = (0.5, 2.0), p: float = 1.0
    ) -> None:
        super().__init__(p=p)
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self.base_size = tuple(base_size)
        self.ratio_range = tuple(ratio_range)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        ratio = float(self.random_generator.uniform(*self.ratio_range))
        height, width = params["shape"][:2]
        return {"size": rescale_size(height, width, ratio, self.base_size)}

    def apply(self, img: np.ndarray, size: tuple[int, int] = (0, 0), **params: Any) -> np.ndarray:
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int] = (0, 0), **params: Any) -> np.ndarray:
        return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("base_size", "ratio_range")


class CatMaxRatioCrop(DualTransform):
    """Random crop of at most ``crop_size`` that rejects crops dominated by one class (see cat_max_ratio_crop_box)."""

    def __init__(
        self, crop_size: tuple[int, int], cat_max_ratio: float = 0.75, ignore_index: int = 255, p: float = 1.0
    ) -> None:
        super().__init__(p=p)
        self.crop_size = tuple(crop_size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        box = cat_max_ratio_crop_box(
            data["mask"], self.crop_size, self.cat_max_ratio, self.random_generator, self.ignore_index
        )
        return {"box": box}

    def apply(self, img: np.ndarray, box: tuple[int, int, int, int] = (0, 0, 0, 0), **params: Any) -> np.ndarray:
        top, left, bottom, right = box
        return img[top:bottom, left:right]

    def apply_to_mask(
        self, mask: np.ndarray, box: tuple[int, int, int, int] = (0, 0, 0, 0), **params: Any
    ) -> np.ndarray:
        return self.apply(mask, box)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("crop_size", "cat_max_ratio", "ignore_index")


class PhotoMetricDistortion(ImageOnlyTransform):
    """mmseg's photometric distortion: brightness, contrast, saturation, hue, each with probability 0.5."""

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
        step_prob: float = 0.5,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta
        self.step_prob = step_prob

    def get_params(self) -> dict[str, Any]:
        rng, coin = self.random_generator, lambda: self.py_random.random() < self.step_prob
        return {
            "brightness": float(rng.uniform(-self.brightness_delta, self.brightness_delta)) if coin() else None,
            "contrast_first": self.py_random.random() < 0.5,
            "contrast": float(rng.uniform(*self.contrast_range)) if coin() else None,
            "saturation": float(rng.uniform(*self.saturation_range)) if coin() else None,
            "hue": int(rng.integers(-self.hue_delta, self.hue_delta + 1)) if coin() else None,
        }

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        keys = ("brightness", "contrast", "saturation", "hue", "contrast_first")
        return photometric_distortion(img, **{k: params[k] for k in keys})

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta", "step_prob")


def train_pipeline(
    crop_size: int | tuple[int, int] = 512,
    base_size: tuple[int, int] = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    ignore_index: int = 255,
    flip_prob: float = 0.5,
    photometric: bool = True,
    seed: int | None = None,
) -> A.Compose:
    """The training pipeline on ``image`` RGB uint8 [H, W, 3] and ``mask`` uint8 [H, W]: output is crop-sized."""
    crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    if min(crop) < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    steps: list[A.BasicTransform] = [
        RandomRescale(base_size, ratio_range),
        CatMaxRatioCrop(crop, cat_max_ratio, ignore_index),
        A.HorizontalFlip(p=flip_prob),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    # Padding last (as mmseg's data preprocessor does), so that flips and colours never touch it.
    steps.append(
        A.PadIfNeeded(
            crop[0], crop[1], position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index
        )
    )
    return A.Compose(steps, seed=seed)


def to_tensors(image: np.ndarray, mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RGB uint8 [H, W, 3] -> uint8 [3, H, W]; mask [H, W] -> int64 [H, W] (None stays None)."""
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # [3, H, W] uint8
    mask_t = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))  # [H, W]
    return image_t, mask_t

"""LOCA's views of one image: crop sampling, crop+resize+flip, photometrics and position targets.

Pure numpy + OpenCV + albumentations (no torch), so that it runs cheaply in DataLoader workers and is
tested alone. Semantics follow the authors' release (google-research/scenic, scenic/projects/loca:
``ops.py`` and ``configs/loca_imnet1k_base16.py``): every view is a crop of the original image (aspect ratio uniform
in [0.75, 1.33], height uniform between the heights the area range implies, the whole image after 100 tries), and a
query patch's target is the reference cell under its centre, by the release's integer rule.

Determinism: given the same ``rng`` state, ``LOCAViews.__call__`` returns identical arrays. Boxes,
flips and every photometric parameter come from that generator; the pixel operations are
albumentations' own functions, called directly (see :class:`Photometrics`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import albucore
import cv2
import numpy as np
from albumentations.augmentations.blur import functional as fblur
from albumentations.augmentations.pixel import functional as fpixel

from loca_lightning import normalize

# OpenCV's own threads fight with DataLoader workers; parallelism comes from the workers instead.
cv2.setNumThreads(0)

IMAGENET_MEAN: np.ndarray = np.array(normalize.IMAGENET_MEAN, dtype=np.float32)
IMAGENET_STD: np.ndarray = np.array(normalize.IMAGENET_STD, dtype=np.float32)

Box = tuple[int, int, int, int]  # (y0, x0, h, w): an integer pixel window of the original image


def _randint(rng: np.random.Generator, n: int) -> int:
    """Uniform integer in [0, n); ``rng.random()`` costs far less than ``rng.integers`` per call."""
    return min(int(rng.random() * n), n - 1)


def _try_crop(
    rng: np.random.Generator, height: int, width: int, min_area: float, max_area: float, aspect: float
) -> Box | None:
    """One attempt of TensorFlow's GenerateRandomCrop (sample_distorted_bounding_box), or None."""
    crop_h = round(math.sqrt(min_area / aspect))  # round() is half-to-even like lrintf
    max_h = round(math.sqrt(max_area / aspect))
    if round(max_h * aspect) > width:  # the widest crop must fit: largest max_h with round(max_h*aspect) <= width
        max_h = int((width + 0.5 - 1e-7) / aspect)
        if round(max_h * aspect) > width:
            max_h -= 1
    max_h = min(max_h, height)
    crop_h = min(crop_h, max_h)
    if crop_h < max_h:
        crop_h += _randint(rng, max_h - crop_h + 1)  # height uniform in the closed range
    crop_w = round(crop_h * aspect)
    area = crop_w * crop_h
    if area < min_area:  # integer rounding fell below the range: one pixel taller
        crop_h += 1
        crop_w = round(crop_h * aspect)
        area = crop_w * crop_h
    if area > max_area:
        crop_h -= 1
        crop_w = round(crop_h * aspect)
        area = crop_w * crop_h
    if not (min_area <= area <= max_area) or not (0 < crop_w <= width) or not (0 < crop_h <= height):
        return None
    # As released: offsets are drawn in [0, H - h), so a crop smaller than the image never touches
    # the bottom or right border (TensorFlow's Uniform(n) is exclusive of n).
    y0 = _randint(rng, height - crop_h) if crop_h < height else 0
    x0 = _randint(rng, width - crop_w) if crop_w < width else 0
    return y0, x0, crop_h, crop_w


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    max_tries: int = 100,
) -> Box:
    """Random crop ``(y0, x0, h, w)`` of an ``height x width`` image with the release's semantics.

    Aspect ``w/h`` uniform in ``ratio``; height uniform over the integers between the heights that the
    min and max area of ``scale`` imply; offset uniform; the whole image after ``max_tries`` failures.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image height and width must be positive, got {height}x{width}")
    min_area = scale[0] * height * width
    max_area = scale[1] * height * width
    for _ in range(max_tries):
        aspect = ratio[0] + (ratio[1] - ratio[0]) * rng.random()
        box = _try_crop(rng, height, width, min_area, max_area, aspect)
        if box is not None:
            return box
    return 0, 0, height, width


def crop_resize(
    image: np.ndarray, box: Box, size: int, flip: bool = False, interpolation: int = cv2.INTER_LINEAR
) -> np.ndarray:
    """Cut the integer window ``box`` of ``image`` [H, W, C], resize it to ``size x size``, mirror it if ``flip``."""
    y0, x0, h, w = box
    view = cv2.resize(image[y0 : y0 + h, x0 : x0 + w], (size, size), interpolation=interpolation)
    if flip:
        view = cv2.flip(view, 1)  # contiguous, and faster than copying a [:, ::-1] view
    return view if view.ndim == 3 else view[:, :, None]  # [size, size, C]; OpenCV drops a single channel


@functools.lru_cache(maxsize=64)
def _patch_centres(out_size: int, patch_size: int) -> np.ndarray:
    """Doubled output coordinate ``2u + 1`` of the pixel the release picks for each patch: [Gq].

    The release resizes a crop's label map to ``out_size`` and then to the patch grid, both with
    half-pixel nearest neighbour, floor((i + 1/2) * in / out); the second picks u = floor((p + 1/2) * P).
    """
    patches = np.arange(out_size // patch_size, dtype=np.int64)
    centre = ((2 * patches + 1) * patch_size) // 2
    centre = 2 * centre + 1
    centre.setflags(write=False)
    return centre


def position_targets(
    query_box: Box, query_size: int, flipped: bool, reference_box: Box, reference_size: int, patch_size: int
) -> np.ndarray:
    """Reference cell (row * G + col) under the centre of each query patch, raster order; -1 outside.

    ``[(query_size / patch_size)^2]`` int64, equal to the release's targets (exact integer version of
    its float32 nearest resizes); a flipped query keeps the true cells of the points it shows, so its
    grid is the unflipped one mirrored left-right.
    """
    boxes = np.asarray([query_box], dtype=np.int64)
    return position_targets_batch(boxes, query_size, np.array([flipped]), reference_box, reference_size, patch_size)[0]


def position_targets_batch(
    query_boxes: np.ndarray,
    query_size: int,
    flipped: np.ndarray,
    reference_box: Box,
    reference_size: int,
    patch_size: int,
) -> np.ndarray:
    """:func:`position_targets` of ``n`` query boxes ``[n, 4]`` of one size at once: ``[n, (query_size / patch_size)^2]``.

    One vectorised computation instead of a Python loop over the focal queries.
    """
    if query_size <= 0 or query_size % patch_size or reference_size <= 0 or reference_size % patch_size:
        raise ValueError(
            f"query_size {query_size} and reference_size {reference_size} must be positive multiples of "
            f"patch_size {patch_size}"
        )
    grid = reference_size // patch_size
    centre = _patch_centres(query_size, patch_size)  # [Gq]
    queries = np.asarray(query_boxes, dtype=np.int64).reshape(-1, 4)  # [n, 4] (y0, x0, h, w)
    reference = np.asarray(reference_box, dtype=np.int64)  # [4]
    start, length = queries[:, :2, None], queries[:, 2:, None]  # [n, 2, 1] per axis (rows, cols)
    # Original pixel under each patch centre, minus the reference start: [n, 2, Gq].
    offset = start + (centre * length) // (2 * query_size) - reference[:2, None]
    ref_length = reference[2:, None]  # [2, 1]
    cells = ((2 * offset + 1) * grid) // (2 * ref_length)  # the reference grid resized to its crop
    cells[(offset < 0) | (offset >= ref_length)] = -1
    rows, cols = cells[:, 0], cells[:, 1]  # [n, Gq] each
    cols = np.where(np.asarray(flipped, dtype=bool).reshape(-1, 1), cols[:, ::-1], cols)
    targets = rows[:, :, None] * grid + cols[:, None, :]  # [n, Gq, Gq]
    targets[(rows[:, :, None] < 0) | (cols[:, None, :] < 0)] = -1
    return targets.reshape(len(queries), len(centre) ** 2)


class Photometrics:
    """The release's photometric chain for one view: the four colour changes in random order (together with
    probability ``jitter_prob``), grayscale, Gaussian blur, solarize; ``__call__(view, rng)`` on HWC uint8.

    Each operation is albumentations' own function, with its parameters drawn from ``rng`` as the matching
    albumentations transform draws them (uniform ranges, a uniform random order). Calling the functions
    directly skips the transforms' per-call machinery (docs/performance-history-2026-11.md).
    Brightness is additive (x + delta * 255), exactly tf.image.random_brightness. The others are the closest
    albumentations ops: contrast pivots on the image's luma mean (release: each channel's own mean),
    saturation blends with the luma image (release: scales HSV saturation), hue shifts OpenCV's 8-bit HSV
    hue (release: float HSV).
    """

    def __init__(
        self,
        brightness: float,
        contrast: float,
        saturation: float,
        hue: float,
        jitter_prob: float,
        grayscale_prob: float,
        blur_prob: float,
        blur_kernel: int,
        solarize_prob: float,
    ) -> None:
        self.jitter = [
            (name, amount)
            for name, amount in (
                ("brightness", brightness),
                ("contrast", contrast),
                ("saturation", saturation),
                ("hue", hue),
            )
            if amount > 0
        ]
        self.jitter_prob, self.grayscale_prob = jitter_prob, grayscale_prob
        self.blur_prob, self.blur_kernel, self.solarize_prob = blur_prob, blur_kernel, solarize_prob

    @staticmethod
    def _jitter(name: str, amount: float, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if name == "brightness":  # RandomBrightnessContrast(brightness_by_max=True): beta * 255 added
            return albucore.multiply_add(view, 1.0, rng.uniform(-amount, amount) * 255.0, inplace=False)
        if name == "contrast":  # ColorJitter(contrast=(1 - c, 1 + c))
            return fpixel.adjust_contrast_torchvision(view, rng.uniform(max(0.0, 1 - amount), 1 + amount))
        if name == "saturation":
            return fpixel.adjust_saturation_torchvision(view, rng.uniform(max(0.0, 1 - amount), 1 + amount))
        return fpixel.adjust_hue_torchvision(view, rng.uniform(-amount, amount))

    def __call__(self, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The view after the chain (a new array when anything applied)."""
        if self.jitter and self.jitter_prob > 0 and rng.random() < self.jitter_prob:
            for index in rng.permutation(len(self.jitter)):
                view = self._jitter(*self.jitter[index], view, rng)
        if self.grayscale_prob > 0 and rng.random() < self.grayscale_prob:
            view = fpixel.to_gray(view, 3, "weighted_average")
        if self.blur_prob > 0 and rng.random() < self.blur_prob:  # GaussianBlur(sigma_limit=(0.1, 2.0))
            kernel = fblur.create_gaussian_kernel_1d(rng.uniform(0.1, 2.0), self.blur_kernel)
            view = fpixel.separable_convolve(view, kernel)
        if self.solarize_prob > 0 and rng.random() < self.solarize_prob:
            view = fpixel.solarize(view, 0.5)  # threshold 0.5 of 255 inverts x >= 128, as the release's x / 255 >= 0.5
        return view


def _check_range(name: str, value: Sequence[float], high: float) -> tuple[float, float]:
    if len(value) != 2 or not 0 < value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be a (min, max) pair with 0 < min <= max <= {high}, got {value!r}")
    return float(value[0]), float(value[1])


def _check_probability(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


class LOCAViews:
    """Reference, large query and focal queries of one RGB uint8 image, with their position targets.

    Defaults are the released ImageNet recipe (ratio upper bound 1.33 as in TensorFlow's default
    ``aspect_ratio_range``); outputs are CHW uint8 (normalised on the accelerator) unless ``normalize``.
    The photometric chains are built once and hold no random state: every draw comes from the ``rng`` of the call.
    """

    def __init__(
        self,
        reference_size: int = 224,
        query_size: int = 224,
        focal_size: int = 96,
        num_focal: int = 9,
        patch_size: int = 16,
        reference_scale: tuple[float, float] = (0.32, 1.0),
        query_scale: tuple[float, float] = (0.32, 1.0),
        focal_scale: tuple[float, float] = (0.05, 0.32),
        ratio: tuple[float, float] = (0.75, 1.33),
        flip_prob: float = 0.5,
        photometric: bool = True,
        color_jitter_prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_prob: float = 0.2,
        solarize_prob: float = 0.2,
        blur_prob: tuple[float, float, float] = (0.0, 0.0, 0.0),
        normalize: bool = False,
        return_boxes: bool = False,
        max_tries: int = 100,
    ) -> None:
        self.settings = {k: v for k, v in locals().items() if k != "self"}  # the arguments, as given
        if patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        for name, size in (("reference_size", reference_size), ("query_size", query_size), ("focal_size", focal_size)):
            if size <= 0 or size % patch_size:
                raise ValueError(f"{name} must be a positive multiple of patch_size {patch_size}, got {size}")
        if num_focal < 0:
            raise ValueError(f"num_focal must be >= 0, got {num_focal}")
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.reference_scale = _check_range("reference_scale", reference_scale, 1.0)
        self.query_scale = _check_range("query_scale", query_scale, 1.0)
        self.focal_scale = _check_range("focal_scale", focal_scale, 1.0)
        self.ratio = _check_range("ratio", ratio, math.inf)
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        if len(blur_prob) != 3:
            raise ValueError(f"blur_prob must give (reference, large query, focal) probabilities, got {blur_prob!r}")
        self.flip_prob = _check_probability("flip_prob", flip_prob)
        self.color_jitter_prob = _check_probability("color_jitter_prob", color_jitter_prob)
        self.grayscale_prob = _check_probability("grayscale_prob", grayscale_prob)
        self.solarize_prob = _check_probability("solarize_prob", solarize_prob)
        self.blur_prob = tuple(_check_probability("blur_prob", p) for p in blur_prob)
        self.reference_size, self.query_size, self.focal_size = reference_size, query_size, focal_size
        self.num_focal, self.patch_size, self.max_tries = num_focal, patch_size, max_tries
        self.photometric, self.normalize, self.return_boxes = photometric, normalize, return_boxes
        self.jitter = dict(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        self._pipelines = (
            self._pipeline(reference_size, self.blur_prob[0], 0.0),
            self._pipeline(query_size, self.blur_prob[1], self.solarize_prob),
            self._pipeline(focal_size, self.blur_prob[2], 0.0),
        )

    @property
    def reference_grid(self) -> int:
        """Patches per side of the reference (G); target indices are row * G + col."""
        return self.reference_size // self.patch_size

    @property
    def query_grid(self) -> int:
        """Patches per side of the large query."""
        return self.query_size // self.patch_size

    @property
    def focal_grid(self) -> int:
        """Patches per side of a focal query."""
        return self.focal_size // self.patch_size

    def _pipeline(self, size: int, blur_prob: float, solarize_prob: float) -> Photometrics | None:
        """The release's photometric chain for one view: jitter, grayscale, blur, (solarize)."""
        if not self.photometric:
            return None
        # DINO-style blur: the kernel the release meant (size // 10 taps, made odd).
        return Photometrics(
            **self.jitter,
            jitter_prob=self.color_jitter_prob,
            grayscale_prob=self.grayscale_prob,
            blur_prob=blur_prob,
            blur_kernel=max(3, 2 * (size // 20) + 1),
            solarize_prob=solarize_prob,
        )

    def _finish(
        self, view: np.ndarray, pipeline: Photometrics | None, rng: np.random.Generator, out: np.ndarray
    ) -> None:
        """Photometrics on HWC uint8, then write ``view`` into ``out`` [3, S, S] (uint8, or float32 normalised)."""
        if pipeline is not None:
            view = pipeline(view, rng)
        if self.normalize:
            view = (view.astype(np.float32) * (1.0 / 255.0) - IMAGENET_MEAN) / IMAGENET_STD
        # [S, S] views of out's channels: cv2.split writes HWC -> CHW faster than numpy (performance history in docs/)
        planes = list(out)
        if cv2.split(view, planes)[0] is not planes[0]:  # OpenCV allocated new planes (dtype mismatch): copy
            np.copyto(out, view.transpose(2, 0, 1))

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """All views and targets of ``image`` (RGB uint8 [H, W, 3]); ``rng`` drives every random draw."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image must be an RGB uint8 array [H, W, 3], got "
                f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}"
            )
        rng = np.random.default_rng() if rng is None else rng
        image = np.ascontiguousarray(image)  # OpenCV takes row windows of a C-ordered array without a copy
        height, width = image.shape[:2]
        # Geometry first, so that boxes and flips for a given rng state do not depend on the photometrics.
        ref_box = random_resized_crop_box(rng, height, width, self.reference_scale, self.ratio, self.max_tries)
        scales = [self.query_scale] + [self.focal_scale] * self.num_focal
        boxes = [random_resized_crop_box(rng, height, width, scale, self.ratio, self.max_tries) for scale in scales]
        flips = [bool(flip) for flip in rng.random(len(boxes)) < self.flip_prob]
        ref_pipeline, large_pipeline, focal_pipeline = self._pipelines
        dtype = np.float32 if self.normalize else np.uint8
        size_r, size_q, size_f = self.reference_size, self.query_size, self.focal_size
        out = {
            "reference": np.empty((3, size_r, size_r), dtype),
            "query_large": np.empty((3, size_q, size_q), dtype),
            "query_focal": np.empty((self.num_focal, 3, size_f, size_f), dtype),
            "target_large": position_targets(boxes[0], size_q, flips[0], ref_box, size_r, self.patch_size),
            "target_focal": position_targets_batch(
                np.asarray(boxes[1:], dtype=np.int64), size_f, np.asarray(flips[1:]), ref_box, size_r, self.patch_size
            ),
        }  # [3, R, R], [3, S, S], [n, 3, F, F], [(S/P)^2], [n, (F/P)^2]
        self._finish(crop_resize(image, ref_box, size_r), ref_pipeline, rng, out["reference"])
        self._finish(crop_resize(image, boxes[0], size_q, flips[0]), large_pipeline, rng, out["query_large"])
        for i, (box, flip) in enumerate(zip(boxes[1:], flips[1:])):
            self._finish(crop_resize(image, box, size_f, flip), focal_pipeline, rng, out["query_focal"][i])
        if self.return_boxes:
            out["boxes"] = np.asarray([ref_box, *boxes], dtype=np.int64)  # [2 + n, 4] (y0, x0, h, w)
            out["flips"] = np.asarray([False, *flips], dtype=bool)  # [2 + n]
        return out

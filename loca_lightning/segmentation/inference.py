"""Inference modes for segmentation: whole image, sliding window, multi-scale + flip, at a test scale or native size.

Every mode is a pure function over ``model(images [B, 3, h, w]) -> logits [B, C, h, w]`` (logits already at the
input resolution). Call them under ``torch.no_grad()``.

Two protocols, chosen by ``SegmentationInference.test_scale``:

- test scale ``(long, short)``, the published one (Segmenter's ``segm/model/utils.py`` ``inference`` fed by
  MMSegmentation's test pipeline): each image is resized keeping its aspect ratio to fit the scale
  (:func:`view_size`, mmcv's ``rescale_size``; bilinear on the uint8 image, rounded like OpenCV), normalised,
  upsampled further when its short side is below the window (:func:`window_cover_size`, Segmenter's ``resize``),
  scored by sliding windows, and the averaged logits are resized bilinearly to the ORIGINAL size
  (:func:`rescaled_inference`), where the metric meets the original labels (labels are never resized);
- native size (``test_scale=None``): the model sees each image at its own size; images smaller than the window
  are zero-padded (after normalisation) and the padding is cropped from the logits.

Window placement (:func:`window_starts`) is MMSegmentation's ``slide_inference`` and gives the same windows as
Segmenter's ``sliding_window`` (starts ``0, s, 2s, ...`` below ``size - window``, then ``size - window``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from loca_lightning.data.transforms import rescale_size

Model = Callable[[Tensor], Tensor]
MODES = ("whole", "slide")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """(h, w) from an int or a pair of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _check_image(image: Tensor) -> None:
    if image.ndim != 4:
        raise ValueError(f"image must be [B, 3, H, W], got shape {tuple(image.shape)}")


def _check_logits(logits: Tensor, batch: int, num_classes: int | None, size: tuple[int, int]) -> None:
    if logits.ndim != 4 or logits.shape[0] != batch or tuple(logits.shape[-2:]) != size:
        raise ValueError(
            f"model must return logits [{batch}, C, {size[0]}, {size[1]}] at the input size, "
            f"got shape {tuple(logits.shape)}"
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"model returned {logits.shape[1]} channels, expected num_classes={num_classes}")


Pair = tuple[int, int]
Size = int | Sequence[int]  # one side for both, or (h, w)


def check_window(
    mode: str, window: int | Sequence[int] | None, stride: int | Sequence[int] | None, square: bool = False
) -> tuple[Pair, Pair] | None:
    """The ``(window, stride)`` of ``mode='slide'`` as (h, w) pairs, checked (present, positive, stride <= window,
    ``square`` when the test-scale protocol upsamples a short side to the window); None for ``mode='whole'``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "whole":
        return None
    if window is None or stride is None:
        raise ValueError("mode='slide' needs window and stride")
    win, step = _pair(window, "window"), _pair(stride, "stride")
    if step[0] > win[0] or step[1] > win[1]:
        raise ValueError(f"stride {step} larger than window {win} leaves pixels uncovered")
    if square and win[0] != win[1]:
        raise ValueError(
            f"test_scale needs a square window (Segmenter upsamples a short side below it), got {window!r}"
        )
    return win, step


def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive floats, got {scales!r}")
    return scales


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


# ---------------------------------------------------------------------------------------------- sizes and resizing
def view_size(height: int, width: int, test_scale: Sequence[int] | None, ratio: float = 1.0) -> tuple[int, int]:
    """The (h, w) an image of (height, width) is resized to for one scale ``ratio``, as MMSegmentation computes it.

    With ``test_scale`` (long, short): MultiScaleFlipAug's scale ``(int(long * ratio), int(short * ratio))``, then
    mmcv's keep-ratio rescale: factor ``min(long' / max(h, w), short' / min(h, w))``, sides ``int(side * factor + 0.5)``
    (the short side becomes short' unless the long side would pass long'). Without: the same with the image's own
    size as the scale (MultiScaleFlipAug with ``img_scale=None``), so ratio 1 keeps the native size.
    """
    scale = (width, height) if test_scale is None else tuple(test_scale)
    return rescale_size(height, width, ratio, scale)


def window_cover_size(height: int, width: int, window: int) -> tuple[int, int]:
    """Segmenter's ``resize`` before its sliding window: a short side below ``window`` is upsampled to it.

    The long side becomes ``int(long / short * window)``; an image whose short side reaches the window is unchanged.
    """
    if min(height, width) >= window:
        return height, width
    if height < width:
        return window, int(width / height * window)
    return int(height / width * window), window


def resize_image(image: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of ``image`` [B, 3, H, W] to ``size`` (h, w), half-pixel centres and no antialiasing.

    That is OpenCV's INTER_LINEAR, which mmcv's ``imrescale`` uses on the uint8 image: uint8 input is resized in
    float32 and rounded back to uint8 (within one grey level of OpenCV's fixed-point result); float input stays
    float. The same size returns the image itself.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    if image.dtype == torch.uint8:
        resized = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False)
        return resized.round_().clamp_(0, 255).to(torch.uint8)
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def rescaled_inference(run: Callable[[Tensor], Tensor], image: Tensor, size: Sequence[int]) -> Tensor:
    """Scores [B, C, H, W] of ``run`` on ``image`` [B, 3, H, W] resized to ``size``, brought back to (H, W).

    ``run`` maps the resized image to scores of any size (e.g. after upsampling to the window); they are resized
    once, bilinearly with ``align_corners=False``, to the original size, as Segmenter's ``merge_windows`` resizes
    the averaged window logits to ``ori_shape`` (float32). Scores already at (H, W) come back unchanged.
    """
    _check_image(image)
    height, width = image.shape[-2:]
    scores = run(resize_image(image, size))
    if tuple(scores.shape[-2:]) == (height, width):
        return scores
    return F.interpolate(scores.float(), size=(height, width), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------- modes
# The public functions check their arguments once, then run the unchecked ones below (``_``-prefixed), which
# SegmentationInference also calls with the arguments it checked when it was built.


def whole_inference(model: Model, image: Tensor, num_classes: int | None = None) -> Tensor:
    """Run the model once on the full image: [B, 3, H, W] -> logits [B, C, H, W] (C checked when ``num_classes``)."""
    _check_image(image)
    return _whole(model, image, num_classes)


def _whole(model: Model, image: Tensor, num_classes: int | None) -> Tensor:
    logits = model(image)
    _check_logits(logits, image.shape[0], num_classes, tuple(image.shape[-2:]))
    return logits


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window start offsets along one axis, as MMSegmentation places them.

    ``max(ceil((size - window) / stride), 0) + 1`` windows; the last is flush with the far edge,
    and no start is below 0.
    """
    count = max(math.ceil((size - window) / stride), 0) + 1
    return [max(min(i * stride, size - window), 0) for i in range(count)]


def slide_window_sum(
    model: Model, image: Tensor, window: Size, stride: Size, num_classes: int, batch_size: int = 8
) -> tuple[Tensor, Tensor]:
    """Summed window logits [B, C, H', W'] and per-pixel window counts [1, 1, H', W'] (float32).

    H' = max(H, window_h), W' = max(W, window_w): the image is zero-padded at the bottom/right
    up to the window when it is smaller.
    """
    _check_image(image)
    _check_batch_size(batch_size)
    return _slide_window_sum(model, image, *check_window("slide", window, stride), num_classes, batch_size)


def _slide_window_sum(
    model: Model, image: Tensor, window: Pair, stride: Pair, num_classes: int, batch_size: int
) -> tuple[Tensor, Tensor]:
    (win_h, win_w), (str_h, str_w) = window, stride
    batch, _, height, width = image.shape
    pad_h, pad_w = max(win_h - height, 0), max(win_w - width, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
    height, width = height + pad_h, width + pad_w

    boxes = [(y, x) for y in window_starts(height, win_h, str_h) for x in window_starts(width, win_w, str_w)]
    # window-major: crops[k * B + b] is window k of image b
    crops = torch.cat([image[:, :, y : y + win_h, x : x + win_w] for y, x in boxes])  # [K*B, 3, wh, ww]
    # float32 sums: many bf16 windows added in place would lose precision
    logit_sum = image.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = image.new_zeros((1, 1, height, width), dtype=torch.float32)
    for y, x in boxes:
        count[:, :, y : y + win_h, x : x + win_w] += 1
    start = 0
    for chunk in crops.split(batch_size):
        logits = model(chunk)
        _check_logits(logits, chunk.shape[0], num_classes, (win_h, win_w))
        # added chunk by chunk so that all window logits never sit in memory at once
        for offset, crop_logits in enumerate(logits.float()):
            window_index, image_index = divmod(start + offset, batch)
            y, x = boxes[window_index]
            logit_sum[image_index, :, y : y + win_h, x : x + win_w] += crop_logits
        start += chunk.shape[0]
    return logit_sum, count


def slide_inference(
    model: Model, image: Tensor, window: Size, stride: Size, num_classes: int, batch_size: int = 8
) -> Tensor:
    """Sliding-window logits [B, C, H, W]: overlapping windows averaged, run ``batch_size`` at a time."""
    _check_image(image)
    _check_batch_size(batch_size)
    return _slide(model, image, *check_window("slide", window, stride), num_classes, batch_size)


def _slide(model: Model, image: Tensor, window: Pair, stride: Pair, num_classes: int, batch_size: int) -> Tensor:
    height, width = image.shape[-2:]
    logit_sum, count = _slide_window_sum(model, image, window, stride, num_classes, batch_size)
    return (logit_sum / count)[:, :, :height, :width]


def multiscale_flip_inference(
    model: Model,
    image: Tensor,
    scales: Sequence[float],
    flip: bool,
    mode: str,
    window: int | Sequence[int] | None,
    stride: int | Sequence[int] | None,
    num_classes: int,
    batch_size: int = 8,
    test_scale: Sequence[int] | None = None,
    normalize: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Test-time augmentation: log of the softmax probabilities averaged over scales and flips, at (H, W).

    Each scale is a ratio of the test scale (MMSegmentation's MultiScaleFlipAug, as Segmenter's multi-scale
    evaluation uses it: :func:`view_size`), or of the image's own size when ``test_scale`` is None. Every view is
    resized from the original image, flipped, normalised, scored like a single view (with the window upsampling
    of the test-scale protocol), and its scores are resized to (H, W) and un-flipped before the softmax.
    Probabilities, not logits, are averaged (as MMSegmentation and Segmenter do) because logit magnitudes change
    with resolution while probabilities share one scale. The log makes the result usable like logits: its argmax
    is the prediction and its softmax is the averaged probability.
    """
    _check_image(image)
    _check_batch_size(batch_size)
    windows = check_window(mode, window, stride, square=test_scale is not None)
    scales = _check_scales(scales)
    return _multiscale_flip(model, image, scales, flip, windows, num_classes, batch_size, test_scale, normalize)


def _multiscale_flip(
    model: Model,
    image: Tensor,
    scales: tuple[float, ...],
    flip: bool,
    windows: tuple[Pair, Pair] | None,
    num_classes: int,
    batch_size: int,
    test_scale: Sequence[int] | None,
    normalize: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    height, width = image.shape[-2:]
    prob_sum = image.new_zeros((image.shape[0], num_classes, height, width), dtype=torch.float32)
    views = 0
    for scale in scales:
        size = view_size(height, width, test_scale, scale)
        for flipped in (False, True) if flip else (False,):

            def run(view: Tensor, flipped: bool = flipped) -> Tensor:
                view = view.flip(-1) if flipped else view
                view = normalize(view) if normalize is not None else view
                return _view_scores(model, view, windows, num_classes, batch_size, test_scale is not None)

            scores = rescaled_inference(run, image, size).float()
            if flipped:
                scores = scores.flip(-1)
            prob_sum += scores.softmax(dim=1)
            views += 1
    mean_prob = prob_sum / views
    return mean_prob.clamp_min(torch.finfo(mean_prob.dtype).tiny).log()


def _view_scores(
    model: Model,
    image: Tensor,
    windows: tuple[Pair, Pair] | None,
    num_classes: int,
    batch_size: int,
    upsample_to_window: bool,
) -> Tensor:
    """Scores of one (resized, normalised) view: whole (``windows`` None) or sliding ``windows`` = (window, stride)
    from :func:`check_window`. With ``upsample_to_window`` (the test-scale protocol, square windows), a view whose
    short side is below the window is first upsampled to it, and the scores come back at that size."""
    if windows is None:
        return _whole(model, image, num_classes)
    if upsample_to_window:
        image = resize_image(image, window_cover_size(image.shape[-2], image.shape[-1], windows[0][0]))
    return _slide(model, image, *windows, num_classes, batch_size)


@dataclass
class SegmentationInference:
    """How to turn a model into full-image scores: test scale, mode, window, stride, scales, flip, batch size.

    ``test_scale`` (long, short), e.g. ADE20K's (2048, 512), selects the published protocol (see the module
    docstring); None evaluates at native size. ``scales`` are ratios of the test scale (of the native size when
    None). ``__call__`` returns logits [B, C, H, W] at the original size for a single view and log mean
    probabilities for multi-scale/flip; in both cases argmax is the prediction and softmax the probabilities.
    """

    mode: str = "whole"
    window: int | tuple[int, int] | None = None
    stride: int | tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    batch_size: int = 8
    test_scale: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.test_scale is not None:
            self.test_scale = _pair(tuple(self.test_scale), "test_scale")
        self._windows = check_window(self.mode, self.window, self.stride, square=self.test_scale is not None)
        self.scales = _check_scales(self.scales)
        _check_batch_size(self.batch_size)

    @property
    def is_single_view(self) -> bool:
        """True when no test-time augmentation is asked for (one scale of 1.0, no flip)."""
        return self.scales == (1.0,) and not self.flip

    def __call__(
        self, model: Model, image: Tensor, num_classes: int, normalize: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        """Scores [B, C, H, W] for ``image`` [B, 3, H, W] under this configuration.

        ``normalize`` runs on each view after its resize to the test scale: MMSegmentation resizes the uint8
        image, then normalises (see :func:`resize_image`). Without it, ``image`` must be what ``model`` takes.
        """
        _check_image(image)
        if not self.is_single_view:
            return _multiscale_flip(
                model,
                image,
                self.scales,
                self.flip,
                self._windows,
                num_classes,
                self.batch_size,
                self.test_scale,
                normalize,
            )
        upsample = self.test_scale is not None

        def run(view: Tensor) -> Tensor:
            view = normalize(view) if normalize is not None else view
            return _view_scores(model, view, self._windows, num_classes, self.batch_size, upsample)

        size = view_size(image.shape[-2], image.shape[-1], self.test_scale)
        return rescaled_inference(run, image, size)

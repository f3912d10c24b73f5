"""Inference modes: sliding window vs whole image, window counts, batching, multi-scale + flip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from loca_lightning.segmentation.inference import (
    SegmentationInference,
    multiscale_flip_inference,
    slide_inference,
    slide_window_sum,
    whole_inference,
    window_starts,
)

NUM_CLASSES = 4


def _pointwise_model() -> nn.Module:
    """A 1x1 conv: each output pixel depends only on its own input pixel."""
    torch.manual_seed(0)
    return nn.Conv2d(3, NUM_CLASSES, kernel_size=1)


class _Recorder:
    """Wraps a model and records the batch size of every call."""

    def __init__(self, model):
        self.model = model
        self.calls: list[int] = []

    def __call__(self, x):
        self.calls.append(x.shape[0])
        return self.model(x)


def _ones(x: torch.Tensor) -> torch.Tensor:
    return x.new_ones(x.shape[0], NUM_CLASSES, *x.shape[-2:])


def test_window_starts_match_mmseg_rule():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(9, 4, 3) == [0, 3, 5]  # last window flush with the far edge
    assert window_starts(8, 8, 4) == [0]
    assert window_starts(512, 512, 512) == [0]
    assert window_starts(683, 512, 341) == [0, 171]
    assert window_starts(2048, 512, 512) == [0, 512, 1024, 1536]


@torch.no_grad()
def test_single_window_equals_whole_for_any_model():
    torch.manual_seed(1)
    model = nn.Conv2d(3, NUM_CLASSES, kernel_size=3, padding=1)  # not pointwise: borders matter
    image = torch.randn(2, 3, 12, 10)
    out = slide_inference(model, image, window=(12, 10), stride=(8, 8), num_classes=NUM_CLASSES)
    torch.testing.assert_close(out, whole_inference(model, image))


@torch.no_grad()
@pytest.mark.parametrize("window,stride", [(6, 4), ((6, 5), (4, 3)), (5, 1)])
def test_overlapping_windows_equal_whole_for_pointwise_model(window, stride):
    model = _pointwise_model()
    image = torch.randn(2, 3, 13, 17)  # two images: a window/image mix-up would show
    out = slide_inference(model, image, window, stride, NUM_CLASSES, batch_size=3)
    assert out.shape == (2, NUM_CLASSES, 13, 17)
    torch.testing.assert_close(out, whole_inference(model, image))


@torch.no_grad()
def test_window_counts_by_hand():
    image = torch.zeros(1, 3, 10, 9)
    logit_sum, count = slide_window_sum(_ones, image, window=4, stride=3, num_classes=NUM_CLASSES)
    rows = torch.tensor([1, 1, 1, 2, 1, 1, 2, 1, 1, 1.0])  # starts 0, 3, 6 over 10 rows
    cols = torch.tensor([1, 1, 1, 2, 1, 2, 2, 1, 1.0])  # starts 0, 3, 5 over 9 columns
    expected = rows[:, None] * cols[None, :]
    assert torch.equal(count[0, 0], expected)
    for c in range(NUM_CLASSES):
        assert torch.equal(logit_sum[0, c], expected)
    out = slide_inference(_ones, image, window=4, stride=3, num_classes=NUM_CLASSES)
    assert torch.equal(out, torch.ones(1, NUM_CLASSES, 10, 9))


@torch.no_grad()
@pytest.mark.parametrize("size", [(5, 7), (5, 20), (20, 3)])
def test_image_smaller_than_window_is_padded_and_cropped(size):
    model = _Recorder(_pointwise_model())
    image = torch.randn(2, 3, *size)
    out = slide_inference(model, image, window=8, stride=6, num_classes=NUM_CLASSES)
    assert out.shape == (2, NUM_CLASSES, *size)
    torch.testing.assert_close(out, whole_inference(model.model, image))
    _, count = slide_window_sum(_ones, image, window=8, stride=6, num_classes=NUM_CLASSES)
    assert count.shape[-2:] == (max(size[0], 8), max(size[1], 8))


@torch.no_grad()
@pytest.mark.parametrize("batch_size", [1, 4, 9, 100])
def test_windows_are_batched(batch_size):
    model = _Recorder(_pointwise_model())
    image = torch.randn(1, 3, 10, 9)  # 3 x 3 = 9 windows of 4 with stride 3
    slide_inference(model, image, window=4, stride=3, num_classes=NUM_CLASSES, batch_size=batch_size)
    assert len(model.calls) == math.ceil(9 / batch_size)
    assert sum(model.calls) == 9 and max(model.calls) <= batch_size


@torch.no_grad()
def test_multiscale_single_view_equals_single_scale():
    model = _pointwise_model()
    image = torch.randn(2, 3, 11, 13)
    logits = whole_inference(model, image)
    for mode in ("whole", "slide"):
        out = multiscale_flip_inference(model, image, [1.0], False, mode, 6, 4, NUM_CLASSES)
        torch.testing.assert_close(out, logits.log_softmax(1))  # log of the (only) softmax
        torch.testing.assert_close(out.softmax(1), logits.softmax(1))
    # the config object returns the plain logits for a single view
    config = SegmentationInference(mode="slide", window=6, stride=4)
    torch.testing.assert_close(config(model, image, NUM_CLASSES), logits)


@torch.no_grad()
def test_flip_with_flip_equivariant_model_equals_no_flip():
    model = _pointwise_model()
    image = torch.randn(1, 3, 9, 14)
    no_flip = multiscale_flip_inference(model, image, [1.0, 0.5], False, "whole", None, None, NUM_CLASSES)
    flip = multiscale_flip_inference(model, image, [1.0, 0.5], True, "whole", None, None, NUM_CLASSES)
    torch.testing.assert_close(flip, no_flip)


@torch.no_grad()
def test_flip_is_undone_before_averaging():
    # a model that always marks the left column of what it sees
    def left_marker(x):
        out = x.new_zeros(x.shape[0], 2, *x.shape[-2:])
        out[:, 0, :, 0] = 10.0
        return out

    image = torch.zeros(1, 3, 4, 5)
    out = multiscale_flip_inference(left_marker, image, [1.0], True, "whole", None, None, 2).softmax(1)
    mark = torch.tensor([10.0, 0.0]).softmax(0)[0]
    # the flipped view marks the right column once un-flipped; without un-flipping, the left
    # column would get `mark` twice and the right column none
    half = (mark + 0.5) / 2
    torch.testing.assert_close(out[0, 0, :, 0], half.expand(4))
    torch.testing.assert_close(out[0, 0, :, 4], half.expand(4))
    torch.testing.assert_close(out[0, 0, :, 1:4], torch.full((4, 3), 0.5))


@torch.no_grad()
def test_multiscale_averages_softmax_probabilities_at_full_size():
    # logits depend on the input height: known probabilities per scale
    def height_model(x):
        h = x.shape[-2]
        out = x.new_zeros(x.shape[0], 2, *x.shape[-2:])
        out[:, 0] = h / 4.0
        return out

    image = torch.randn(1, 3, 8, 6)
    out = multiscale_flip_inference(height_model, image, [0.5, 1.0, 1.5], False, "whole", None, None, 2)
    assert out.shape == (1, 2, 8, 6)
    probs = [torch.tensor([h / 4.0, 0.0]).softmax(0) for h in (4, 8, 12)]
    expected = torch.stack(probs).mean(0)
    torch.testing.assert_close(out.softmax(1)[0, :, 3, 2], expected)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(1, 8, 6))


@torch.no_grad()
def test_multiscale_slide_equals_whole_for_pointwise_model():
    model = _pointwise_model()
    image = torch.randn(2, 3, 16, 12)
    whole = SegmentationInference(mode="whole", scales=(0.5, 1.0, 1.25), flip=True)
    slide = SegmentationInference(mode="slide", window=6, stride=4, scales=(0.5, 1.0, 1.25), flip=True, batch_size=5)
    torch.testing.assert_close(slide(model, image, NUM_CLASSES), whole(model, image, NUM_CLASSES))


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="mode"):
        SegmentationInference(mode="tile")
    with pytest.raises(ValueError, match="window and stride"):
        SegmentationInference(mode="slide", window=8)
    with pytest.raises(ValueError, match="stride"):
        SegmentationInference(mode="slide", window=8, stride=9)
    with pytest.raises(ValueError, match="scales"):
        SegmentationInference(scales=(0.0,))
    with pytest.raises(ValueError, match="window"):
        slide_inference(_ones, torch.zeros(1, 3, 8, 8), window=0, stride=1, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="num_classes"):
        slide_inference(_ones, torch.zeros(1, 3, 8, 8), window=4, stride=4, num_classes=3)
    with pytest.raises(ValueError, match="input size"):
        whole_inference(lambda x: x[:, :, ::2], torch.zeros(1, 3, 8, 8))

"""Inference modes: sliding window vs whole image, window counts, batching, multi-scale + flip, and the test-scale
protocol (keep-ratio resize as mmcv computes it, Segmenter's upsampling to the window, scores back at the
original size)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loca_lightning.segmentation.inference import (
    SegmentationInference,
    multiscale_flip_inference,
    rescaled_inference,
    resize_image,
    slide_inference,
    slide_window_sum,
    view_size,
    whole_inference,
    window_cover_size,
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


# ---------------------------------------------------------------------------------------------- test scale
ADE_SCALE = (2048, 512)


class _SizeRecorder:
    """Records the (h, w) of every tensor it is called on and returns ``fn`` of it."""

    def __init__(self, fn=lambda x: x) -> None:
        self.fn = fn
        self.sizes: list[tuple[int, int]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        return self.fn(x)


def _coordinate_model(x: torch.Tensor) -> torch.Tensor:
    """Logits [B, 2, h, w]: the pixel-centre coordinates (x + 0.5) / w and (y + 0.5) / h of what the model sees."""
    height, width = x.shape[-2:]
    cols = ((torch.arange(width, dtype=torch.float32) + 0.5) / width).expand(height, width)
    rows = ((torch.arange(height, dtype=torch.float32) + 0.5) / height)[:, None].expand(height, width)
    return torch.stack([cols, rows])[None].expand(x.shape[0], -1, -1, -1)


def _uint8_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth uint8 image [1, 3, H, W] (low-frequency noise upsampled): resizing changes it by little."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 16), max(2, width // 16), generator=generator) * 200 + 20
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False).round().to(torch.uint8)


@pytest.mark.parametrize(
    "size,scale,ratio,expected",
    [
        ((375, 500), ADE_SCALE, 1.0, (512, 683)),  # short side -> 512; 682.67 rounds up (mmcv: int(x + 0.5))
        ((500, 375), ADE_SCALE, 1.0, (683, 512)),  # portrait: the same rule on the other side
        ((60, 500), ADE_SCALE, 1.0, (246, 2048)),  # long and thin: the long side bounds the scale (245.76 -> 246)
        ((683, 512), ADE_SCALE, 1.0, (683, 512)),  # already at the scale
        ((375, 500), ADE_SCALE, 0.5, (256, 341)),  # MultiScaleFlipAug: scale (1024, 256)
        ((375, 500), ADE_SCALE, 1.75, (896, 1195)),  # scale (3584, 896)
        ((375, 500), (4160, 520), 1.0, (520, 693)),  # Segmenter's Pascal Context scale: short side 520
        ((375, 500), (520, 520), 1.0, (390, 520)),  # MMSegmentation's pascal_context_59 scale: long side 520
        ((1024, 2048), (2048, 1024), 1.0, (1024, 2048)),  # Cityscapes keeps its size
        ((375, 500), None, 1.0, (375, 500)),  # native size
        ((375, 500), None, 0.5, (187, 249)),  # native ratio: scale (250, 187), then the same rescale
    ],
)
def test_view_size_known_answers(size, scale, ratio, expected):
    assert view_size(*size, scale, ratio) == expected


def test_window_cover_size_is_segmenters_resize():
    assert window_cover_size(246, 2048, 512) == (512, 4262)  # int(2048 / 246 * 512) = int(4262.4)
    assert window_cover_size(2048, 246, 512) == (4262, 512)
    assert window_cover_size(256, 341, 512) == (512, 682)
    assert window_cover_size(300, 300, 512) == (512, 512)
    assert window_cover_size(512, 683, 512) == (512, 683)  # short side at the window: unchanged
    assert window_cover_size(700, 600, 512) == (700, 600)


def test_resize_image_rounds_uint8_like_opencv():
    cv2 = pytest.importorskip("cv2")
    image = _uint8_image(75, 100)
    resized = resize_image(image, (103, 137))
    assert resized.dtype == torch.uint8 and resized.shape == (1, 3, 103, 137)
    reference = cv2.resize(image[0].permute(1, 2, 0).numpy(), (137, 103), interpolation=cv2.INTER_LINEAR)
    diff = (resized[0].permute(1, 2, 0).int() - torch.from_numpy(reference).int()).abs()
    assert int(diff.max()) <= 1  # OpenCV's fixed-point bilinear vs float32 + rounding
    assert resize_image(image, (75, 100)) is image
    assert resize_image(image.float(), (10, 20)).dtype == torch.float32


@torch.no_grad()
@pytest.mark.parametrize("size,scale", [((375, 500), ADE_SCALE), ((500, 375), ADE_SCALE), ((375, 500), (4160, 520))])
def test_model_sees_the_test_scale_and_scores_come_back_at_the_original_size(size, scale):
    image = _uint8_image(*size)
    normalize = _SizeRecorder(lambda x: x.float())
    model = _SizeRecorder(_coordinate_model)
    out = SegmentationInference(mode="whole", test_scale=scale)(model, image, 2, normalize=normalize)
    assert normalize.sizes == model.sizes == [view_size(*size, scale)]
    assert out.shape == (1, 2, *size)
    # bilinear with half-pixel centres maps pixel centres onto pixel centres: the coordinates come back aligned
    expected = _coordinate_model(torch.zeros(1, 3, *size))
    torch.testing.assert_close(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_slide_at_the_test_scale_runs_the_windows_of_the_rescaled_image():
    image = _uint8_image(375, 500)
    model = _Recorder(_pointwise_model())
    config = SegmentationInference(mode="slide", window=512, stride=512, test_scale=ADE_SCALE)
    out = config(model, image, NUM_CLASSES, normalize=lambda x: x.float())
    assert sum(model.calls) == 2  # 512 x 683: one row of two windows (starts 0 and 171)
    # a pointwise model commutes with the windows: the result is the model on the rescaled image, resized back
    expected = F.interpolate(
        model.model(resize_image(image, (512, 683)).float()), size=(375, 500), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(out, expected)


@torch.no_grad()
@pytest.mark.parametrize("size", [(60, 500), (500, 60)])
def test_short_side_below_the_window_is_upsampled_to_it(size):
    """A long, thin image: the long side bounds the test scale (246 x 2048), then Segmenter upsamples the short side
    to the 512 window (512 x 4262): one row of 9 windows, where padding would have given 4."""
    image = _uint8_image(*size)
    normalize = _SizeRecorder(lambda x: x.float())
    model = _Recorder(lambda x: x.clone())  # logits = the (normalised) pixels: the round trip is visible
    config = SegmentationInference(mode="slide", window=512, stride=512, test_scale=ADE_SCALE, batch_size=4)
    out = config(model, image, 3, normalize=normalize)
    assert normalize.sizes == [(246, 2048) if size[0] < size[1] else (2048, 246)]
    assert sum(model.calls) == 9 and max(model.calls) <= 4
    assert out.shape == (1, 3, *size)
    assert float((out - image.float()).abs().max()) <= 3.0  # resized up twice and back: the image, within rounding


@torch.no_grad()
def test_rescaled_inference_resizes_scores_of_any_size_once():
    image = torch.zeros(1, 3, 30, 40)
    seen = []

    def run(view):
        seen.append(tuple(view.shape[-2:]))
        return _coordinate_model(torch.zeros(1, 3, 64, 80))  # scores at another size than the view

    out = rescaled_inference(run, image, (45, 60))
    assert seen == [(45, 60)] and out.shape == (1, 2, 30, 40)
    torch.testing.assert_close(out, _coordinate_model(image), atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_test_scale_at_the_image_size_equals_native_evaluation(mode):
    torch.manual_seed(2)
    model = nn.Conv2d(3, NUM_CLASSES, kernel_size=3, padding=1)  # not pointwise: window borders matter
    image = _uint8_image(40, 56)

    def normalize(x):
        return x.float() / 255.0

    native = SegmentationInference(mode=mode, window=32, stride=16)
    for scale in ((56, 40), (40, 56)):  # (long, short) in either order
        rescaled = SegmentationInference(mode=mode, window=32, stride=16, test_scale=scale)
        assert torch.equal(rescaled(model, image, NUM_CLASSES, normalize), native(model, image, NUM_CLASSES, normalize))
    # multi-scale + flip: the views are ratios of the test scale, here the image's own size, as at native size
    kwargs = dict(mode=mode, window=16, stride=8, scales=(0.75, 1.0, 1.25), flip=True, batch_size=5)
    native_tta = SegmentationInference(**kwargs)(model, image, NUM_CLASSES, normalize)
    rescaled_tta = SegmentationInference(**kwargs, test_scale=(56, 40))(model, image, NUM_CLASSES, normalize)
    assert torch.equal(rescaled_tta, native_tta)


@torch.no_grad()
def test_multiscale_views_are_ratios_of_the_test_scale():
    image = _uint8_image(375, 500)
    normalize = _SizeRecorder(lambda x: x.float())
    model = _Recorder(_pointwise_model())
    config = SegmentationInference(
        mode="slide", window=512, stride=512, scales=(0.5, 1.0, 1.75), flip=True, test_scale=ADE_SCALE, batch_size=16
    )
    out = config(model, image, NUM_CLASSES, normalize=normalize)
    assert out.shape == (1, NUM_CLASSES, 375, 500)
    assert normalize.sizes == [(256, 341)] * 2 + [(512, 683)] * 2 + [(896, 1195)] * 2  # each without and with flip
    # 256 x 341 is upsampled to 512 x 682 (2 windows), 512 x 683 has 2, 896 x 1195 has 2 x 3
    assert model.calls == [2, 2, 2, 2, 6, 6]
    torch.testing.assert_close(out.exp().sum(1), torch.ones(1, 375, 500))


@torch.no_grad()
def test_single_scale_at_the_test_scale_is_the_multiscale_path_with_one_view():
    model = _pointwise_model()
    image = _uint8_image(45, 70)

    def normalize(x):
        return x.float() / 255.0

    config = SegmentationInference(mode="slide", window=32, stride=16, test_scale=(96, 40))
    logits = config(model, image, NUM_CLASSES, normalize)
    assert logits.shape == (1, NUM_CLASSES, 45, 70)
    one_view = multiscale_flip_inference(
        model, image, [1.0], False, "slide", 32, 16, NUM_CLASSES, test_scale=(96, 40), normalize=normalize
    )
    torch.testing.assert_close(one_view, logits.log_softmax(1))


def test_bad_test_scale_raises():
    with pytest.raises(ValueError, match="test_scale"):
        SegmentationInference(test_scale=(512,))
    with pytest.raises(ValueError, match="test_scale"):
        SegmentationInference(test_scale=(0, 512))
    with pytest.raises(ValueError, match="square window"):
        SegmentationInference(mode="slide", window=(32, 64), stride=16, test_scale=ADE_SCALE)


@pytest.mark.parametrize(
    "settings",
    [
        dict(mode="whole"),
        dict(mode="slide", window=8, stride=6),
        dict(mode="slide", window=8, stride=6, test_scale=(40, 20), scales=(0.5, 1.0), flip=True),
    ],
)
def test_settings_are_checked_once_when_built_and_each_models_output_once(monkeypatch, settings):
    import loca_lightning.segmentation.inference as inference

    config = SegmentationInference(**settings)  # checks window, stride, scales and batch size here
    checked, logits_checked = [], []
    check_logits = inference._check_logits
    monkeypatch.setattr(inference, "check_window", lambda *a, **k: checked.append(a), raising=False)
    monkeypatch.setattr(inference, "_check_logits", lambda *a: (logits_checked.append(a), check_logits(*a)))
    model = _Recorder(_pointwise_model())
    config(model, torch.rand(2, 3, 13, 11), NUM_CLASSES)
    assert checked == []  # not again per call
    assert len(logits_checked) == len(model.calls) > 0  # every model output once, not once more by its caller

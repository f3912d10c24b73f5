"""LOCA views: crop sampler, position targets (against geometry and two independent implementations), outputs."""

from __future__ import annotations

import math
from fractions import Fraction

import cv2
import numpy as np
import pytest

from loca_lightning.pretrain.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LOCAViews,
    crop_resize,
    position_targets,
    random_resized_crop_box,
)

IMAGE_SHAPES = [(375, 500), (500, 333), (64, 64), (40, 90), (17, 23)]  # incl. smaller than the outputs


def coordinate_image(height: int, width: int) -> np.ndarray:
    """int32 [H, W, 2] whose pixel (y, x) holds (y, x)."""
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([ys, xs], axis=-1).astype(np.int32)


# ------------------------------------------------------------------ crop sampler
@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("scale", [(0.05, 0.32), (0.32, 1.0)])
def test_crop_boxes_stay_in_range(shape, scale):
    height, width = shape
    ratio = (0.75, 1.33)
    rng = np.random.default_rng(0)
    min_area, max_area = scale[0] * height * width, scale[1] * height * width
    for _ in range(500):
        y0, x0, h, w = random_resized_crop_box(rng, height, width, scale, ratio)
        assert all(isinstance(v, int) for v in (y0, x0, h, w))
        if (y0, x0, h, w) == (0, 0, height, width):
            continue  # the fallback (or a legitimate whole-image crop)
        assert min_area <= h * w <= max_area
        # w = round(h * aspect) with aspect in the range: off by at most half a pixel
        assert ratio[0] - 0.5 / h <= w / h <= ratio[1] + 0.5 / h
        assert 0 <= y0 and y0 + h <= height and 0 <= x0 and x0 + w <= width
        # the release draws offsets in [0, H - h): a smaller crop never touches the bottom/right border
        assert h == height or y0 + h < height
        assert w == width or x0 + w < width


def test_crop_sampler_is_uniform_in_aspect_and_covers_the_height_range():
    rng = np.random.default_rng(1)
    height, width, scale, ratio = 2000, 2000, (0.05, 0.32), (0.75, 1.33)
    boxes = np.array([random_resized_crop_box(rng, height, width, scale, ratio) for _ in range(4000)])
    aspects = boxes[:, 3] / boxes[:, 2]
    # uniform mean (1.04) vs torchvision's log-uniform mean (1.012); standard error ~0.003
    assert abs(aspects.mean() - sum(ratio) / 2) < 0.01
    # at aspect 1 the height spans sqrt(0.05)..sqrt(0.32) of the side
    heights = boxes[:, 2][np.abs(aspects - 1) < 0.02]
    assert heights.min() < math.sqrt(0.06) * height and heights.max() > math.sqrt(0.30) * height


def test_crop_sampler_falls_back_to_the_whole_image():
    rng = np.random.default_rng(0)
    # an aspect of 3-4 cannot cover 90% of a square image
    assert random_resized_crop_box(rng, 50, 50, (0.9, 1.0), (3.0, 4.0)) == (0, 0, 50, 50)
    assert random_resized_crop_box(rng, 50, 70, (0.05, 0.1), (0.75, 1.33), max_tries=0) == (0, 0, 50, 70)


def test_full_area_crop_is_the_whole_image():
    rng = np.random.default_rng(0)
    assert random_resized_crop_box(rng, 64, 64, (1.0, 1.0), (1.0, 1.0)) == (0, 0, 64, 64)


# ------------------------------------------------------------------ position targets
def spec_targets(query_box, query_size, flipped, reference_box, reference_size, patch_size):
    """The spec's integer rule, written out patch by patch with exact fractions (even patch sizes)."""
    grid, grid_q = reference_size // patch_size, query_size // patch_size

    def cell(axis, p):
        c0, length = query_box[axis], query_box[axis + 2]
        r0, ref_length = reference_box[axis], reference_box[axis + 2]
        k = c0 + math.floor((Fraction(patch_size * p) + Fraction(patch_size, 2) + Fraction(1, 2)) * length / query_size)
        if not r0 <= k < r0 + ref_length:
            return -1
        return math.floor((k - r0 + Fraction(1, 2)) * grid / ref_length)

    out = []
    for i in range(grid_q):
        for j in range(grid_q):
            row, col = cell(0, i), cell(1, grid_q - 1 - j if flipped else j)
            out.append(-1 if row < 0 or col < 0 else row * grid + col)
    return np.array(out)


def nearest(array: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel nearest-neighbour resize (TF2 / PIL convention) in exact integer arithmetic."""
    rows = ((2 * np.arange(out_h) + 1) * array.shape[0]) // (2 * out_h)
    cols = ((2 * np.arange(out_w) + 1) * array.shape[1]) // (2 * out_w)
    return array[rows][:, cols]


def release_mask_targets(image_shape, query_box, query_size, flipped, reference_box, reference_size, patch_size):
    """The release's pipeline on label maps: grid -> reference crop, pad with -1, crop query, resize twice, flip."""
    grid = reference_size // patch_size
    ry, rx, rh, rw = reference_box
    full = np.full(image_shape, -1, dtype=np.int64)
    full[ry : ry + rh, rx : rx + rw] = nearest(np.arange(grid * grid).reshape(grid, grid), rh, rw)
    qy, qx, qh, qw = query_box
    mask = nearest(full[qy : qy + qh, qx : qx + qw], query_size, query_size)
    mask = nearest(mask, query_size // patch_size, query_size // patch_size)
    return (mask[:, ::-1] if flipped else mask).reshape(-1)


def random_case(rng, shape, query_size, reference_size, patch_size):
    height, width = shape
    reference_box = random_resized_crop_box(rng, height, width, (0.32, 1.0), (0.75, 1.33))
    scale = (0.05, 0.32) if rng.random() < 0.5 else (0.32, 1.0)
    query_box = random_resized_crop_box(rng, height, width, scale, (0.75, 1.33))
    return query_box, query_size, bool(rng.random() < 0.5), reference_box, reference_size, patch_size


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_targets_equal_the_spec_rule_written_as_a_loop(shape):
    rng = np.random.default_rng(2)
    for query_size, reference_size, patch_size in [(96, 224, 16), (224, 224, 16), (32, 48, 8), (28, 56, 14)]:
        for _ in range(15):
            case = random_case(rng, shape, query_size, reference_size, patch_size)
            np.testing.assert_array_equal(position_targets(*case), spec_targets(*case))


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_targets_equal_the_release_label_map_pipeline(shape):
    rng = np.random.default_rng(3)
    # odd patch sizes too: there the spec's written formula (P/2 + 1/2) and the release differ; we follow the release
    for query_size, reference_size, patch_size in [(96, 224, 16), (224, 224, 16), (30, 45, 15), (21, 35, 7)]:
        for _ in range(20):
            case = random_case(rng, shape, query_size, reference_size, patch_size)
            expected = release_mask_targets(shape, *case)
            np.testing.assert_array_equal(position_targets(*case), expected)


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_each_labelled_patch_centre_lies_in_its_reference_cell(shape, flip_prob):
    """Render the query from a coordinate image with the views' own crop/resize/flip; read the pixel under each
    patch centre; a label must be the reference cell containing that pixel's centre, -1 a pixel outside the crop."""
    height, width = shape
    coords = coordinate_image(height, width)
    rng = np.random.default_rng(4)
    for size, grid_ref, patch in [(96, 14, 16), (224, 14, 16), (32, 6, 8)]:
        reference_size = grid_ref * patch
        for _ in range(10):
            ry, rx, rh, rw = ref_box = random_resized_crop_box(rng, height, width, (0.32, 1.0), (0.75, 1.33))
            box = random_resized_crop_box(rng, height, width, (0.05, 1.0), (0.75, 1.33))
            flip = rng.random() < flip_prob
            view = crop_resize(coords, box, size, flip, interpolation=cv2.INTER_NEAREST_EXACT)  # [S, S, 2]
            targets = position_targets(box, size, flip, ref_box, reference_size, patch)
            # For an even patch the centre is a pixel corner; the rule samples the pixel below-right of it in the
            # unflipped view, so in a flipped view the one below-left (the mirror): both touch the centre.
            centres = np.arange(size // patch) * patch + patch // 2
            cols = size - 1 - centres[::-1] if flip else centres
            points = view[centres][:, cols].reshape(-1, 2)  # original (y, x) under each patch centre
            labelled = targets >= 0
            y, x = points[:, 0], points[:, 1]
            inside = (y >= ry) & (y < ry + rh) & (x >= rx) & (x < rx + rw)
            np.testing.assert_array_equal(labelled, inside)
            row, col = targets[labelled] // grid_ref, targets[labelled] % grid_ref
            # pixel centre (y + 1/2) in [r0 + row * R / G, r0 + (row + 1) * R / G), times 2G to stay in integers
            for pix, start, length, cell in ((y, ry, rh, row), (x, rx, rw, col)):
                doubled = grid_ref * (2 * (pix[labelled] - start) + 1)
                assert np.all(2 * cell * length <= doubled) and np.all(doubled < 2 * (cell + 1) * length)


def test_flip_mirrors_the_target_grid():
    box, ref = (10, 20, 100, 120), (0, 0, 150, 160)
    plain = position_targets(box, 64, False, ref, 64, 16).reshape(4, 4)
    flipped = position_targets(box, 64, True, ref, 64, 16).reshape(4, 4)
    np.testing.assert_array_equal(flipped, plain[:, ::-1])


def test_identical_boxes_give_the_identity_and_disjoint_boxes_give_no_label():
    box = (5, 7, 90, 120)
    np.testing.assert_array_equal(position_targets(box, 224, False, box, 224, 16), np.arange(196))
    assert np.all(position_targets((0, 0, 40, 40), 96, False, (50, 50, 40, 40), 224, 16) == -1)
    targets = position_targets(box, 224, False, box, 224, 16)
    assert targets.dtype == np.int64 and targets.shape == (196,)


def test_position_targets_rejects_sizes_off_the_patch_grid():
    with pytest.raises(ValueError, match="query_size"):
        position_targets((0, 0, 10, 10), 100, False, (0, 0, 10, 10), 224, 16)


# ------------------------------------------------------------------ LOCAViews
SMALL = dict(reference_size=48, query_size=32, focal_size=16, num_focal=3, patch_size=8)


def smooth_image(height=60, width=80, seed=0):
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)


def test_default_output_shapes_and_dtypes():
    out = LOCAViews(return_boxes=True)(smooth_image(375, 500), np.random.default_rng(0))
    expected = {
        "reference": ((3, 224, 224), np.uint8),
        "query_large": ((3, 224, 224), np.uint8),
        "query_focal": ((9, 3, 96, 96), np.uint8),
        "target_large": ((196,), np.int64),
        "target_focal": ((9, 36), np.int64),
        "boxes": ((11, 4), np.int64),
        "flips": ((11,), np.bool_),
    }
    assert set(out) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert out[key].shape == shape and out[key].dtype == dtype and out[key].flags.c_contiguous, key
    for key in ("target_large", "target_focal"):
        assert out[key].min() >= -1 and out[key].max() < 196
    assert not out["flips"][0]  # the reference is never flipped


@pytest.mark.parametrize("shape", [(60, 80), (20, 12)])
def test_views_and_targets_are_the_functions_applied_to_the_returned_boxes(shape):
    image = smooth_image(*shape)
    views = LOCAViews(**SMALL, photometric=False, return_boxes=True)
    out = views(image, np.random.default_rng(5))
    boxes, flips = [tuple(int(v) for v in b) for b in out["boxes"]], out["flips"]
    np.testing.assert_array_equal(out["reference"], crop_resize(image, boxes[0], 48).transpose(2, 0, 1))
    np.testing.assert_array_equal(out["query_large"], crop_resize(image, boxes[1], 32, flips[1]).transpose(2, 0, 1))
    np.testing.assert_array_equal(out["target_large"], position_targets(boxes[1], 32, flips[1], boxes[0], 48, 8))
    for i in range(3):
        box, flip = boxes[2 + i], flips[2 + i]
        np.testing.assert_array_equal(out["query_focal"][i], crop_resize(image, box, 16, flip).transpose(2, 0, 1))
        np.testing.assert_array_equal(out["target_focal"][i], position_targets(box, 16, flip, boxes[0], 48, 8))


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_flip_probability_is_obeyed(flip_prob):
    views = LOCAViews(**SMALL, photometric=False, return_boxes=True, flip_prob=flip_prob)
    flips = views(smooth_image(), np.random.default_rng(0))["flips"]
    assert not flips[0] and np.all(flips[1:] == bool(flip_prob))


def test_same_generator_state_gives_identical_samples_and_seeds_differ():
    views = LOCAViews(**SMALL, blur_prob=(0.5, 0.5, 0.5))
    image = smooth_image()
    first = views(image, np.random.default_rng(7))
    again = views(image, np.random.default_rng(7))
    other = views(image, np.random.default_rng(8))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert any(not np.array_equal(first[key], other[key]) for key in first)


def test_normalize_returns_the_normalised_uint8_views():
    image = smooth_image()
    raw = LOCAViews(**SMALL)(image, np.random.default_rng(3))
    normed = LOCAViews(**SMALL, normalize=True)(image, np.random.default_rng(3))
    for key in ("reference", "query_large", "query_focal"):
        assert normed[key].dtype == np.float32
        expected = (raw[key].astype(np.float32) / 255.0 - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
        np.testing.assert_allclose(normed[key], expected, atol=1e-5)
    np.testing.assert_array_equal(normed["target_focal"], raw["target_focal"])


def test_geometry_does_not_depend_on_the_photometrics():
    image = smooth_image()
    plain = LOCAViews(**SMALL, photometric=False, return_boxes=True)(image, np.random.default_rng(0))
    photo = LOCAViews(**SMALL, blur_prob=(1.0, 1.0, 1.0), return_boxes=True)(image, np.random.default_rng(0))
    for key in ("boxes", "flips", "target_large", "target_focal"):
        np.testing.assert_array_equal(plain[key], photo[key])


def test_grayscale_and_solarize_known_answers():
    image = smooth_image()
    plain = LOCAViews(**SMALL, photometric=False)(image, np.random.default_rng(0))
    gray = LOCAViews(**SMALL, color_jitter_prob=0.0, grayscale_prob=1.0, solarize_prob=0.0)(
        image, np.random.default_rng(0)
    )
    for key in ("reference", "query_large", "query_focal"):
        channels = gray[key].astype(int)
        assert np.array_equal(channels[..., 0, :, :], channels[..., 1, :, :])
        assert np.array_equal(channels[..., 1, :, :], channels[..., 2, :, :])
        # luma of the plain view (OpenCV's weights, within rounding of the release's 0.2989/0.5870/0.1140)
        weights = np.array([0.2989, 0.5870, 0.1140])[:, None, None]
        luma = (plain[key].astype(float) * weights).sum(axis=-3)
        assert np.abs(channels[..., 0, :, :] - luma).max() <= 1.0
    solar = LOCAViews(**SMALL, color_jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=1.0)(
        image, np.random.default_rng(0)
    )
    x = plain["query_large"]
    np.testing.assert_array_equal(solar["query_large"], np.where(x >= 128, 255 - x, x))  # release: x/255 >= 0.5
    np.testing.assert_array_equal(solar["reference"], plain["reference"])  # solarize is for the large query only
    np.testing.assert_array_equal(solar["query_focal"], plain["query_focal"])


def test_brightness_is_additive_like_the_release():
    image = np.full((60, 80, 3), 100, dtype=np.uint8)
    image[:, 40:] = 60  # two levels (and their bilinear blends): an additive change moves all by one delta
    only_brightness = dict(contrast=0.0, saturation=0.0, hue=0.0, grayscale_prob=0.0, solarize_prob=0.0)
    views = LOCAViews(**SMALL, color_jitter_prob=1.0, **only_brightness)
    plain = LOCAViews(**SMALL, photometric=False)
    spreads = []
    for seed in range(8):
        jittered = views(image, np.random.default_rng(seed))["reference"].astype(int)
        delta = (jittered - plain(image, np.random.default_rng(seed))["reference"].astype(int))[
            (jittered > 0) & (jittered < 255)  # not clipped
        ]
        spreads.append((delta.max() - delta.min(), abs(delta).max()))
    assert all(spread <= 1 for spread, _ in spreads)  # a factor f would move 100 and 60 apart by 40 |f - 1|
    assert max(size for _, size in spreads) > 45  # shifts reach 0.4 * 255, not 0.4 * the image mean (~80)


def test_invalid_arguments_name_the_argument():
    for name in ("reference_size", "query_size", "focal_size"):
        with pytest.raises(ValueError, match=name):
            LOCAViews(**{name: 100})
    with pytest.raises(ValueError, match="focal_scale"):
        LOCAViews(focal_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="ratio"):
        LOCAViews(ratio=(0.0, 1.0))
    with pytest.raises(ValueError, match="flip_prob"):
        LOCAViews(flip_prob=1.5)
    with pytest.raises(ValueError, match="blur_prob"):
        LOCAViews(blur_prob=(0.1, 0.2))
    with pytest.raises(ValueError, match="image"):
        LOCAViews(**SMALL)(np.zeros((10, 10), np.uint8))

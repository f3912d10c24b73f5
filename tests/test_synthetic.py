"""Tests of the procedural scene generator: determinism, exact masks, class coverage, colour statistics."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from loca_lightning.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    SyntheticScenes,
    _background,
    render_scene,
    render_scene_layers,
)

K = len(SYNTHETIC_CLASSES)


def _decode_flat(image: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Class of every pixel of a flat-colour render, -1 where the colour is none of ``colors``."""
    match = (image[:, :, None, :] == colors[None, None]).all(-1)  # [H, W, C]
    return np.where(match.any(-1), match.argmax(-1), -1)


def test_classes_and_palette_are_documented_and_distinct():
    assert SYNTHETIC_CLASSES[0] == "background" and K == 9
    assert SYNTHETIC_PALETTE.shape == (K, 3) and SYNTHETIC_PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in SYNTHETIC_PALETTE}) == K
    doc = sys.modules[SyntheticScenes.__module__].__doc__
    assert all(name in doc for name in SYNTHETIC_CLASSES)


def test_same_seed_and_index_give_identical_arrays_in_any_order():
    forward = SyntheticScenes(length=6, image_size=48, seed=3)
    backward = SyntheticScenes(length=6, image_size=48, seed=3)
    first = [forward[i] for i in range(6)]
    second = [backward[i] for i in reversed(range(6))][::-1]
    np.random.seed(123)  # global numpy state must play no part
    again = forward[2]
    for a, b in zip(first, second):
        assert a["index"] == b["index"]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    np.testing.assert_array_equal(again["image"], first[2]["image"])
    np.testing.assert_array_equal(forward[-1]["image"], first[5]["image"])


def test_different_index_or_seed_gives_different_scenes():
    a, b = SyntheticScenes(length=4, image_size=48, seed=0), SyntheticScenes(length=4, image_size=48, seed=1)
    images = [a[i]["image"] for i in range(4)] + [b[i]["image"] for i in range(4)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j])


def test_same_scene_in_another_process():
    code = (
        "import hashlib; from loca_lightning.data.synthetic import SyntheticScenes;"
        "s = SyntheticScenes(length=8, image_size=(40, 56), seed=5)[7];"
        "print(hashlib.sha256(s['image'].tobytes() + s['mask'].tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = SyntheticScenes(length=8, image_size=(40, 56), seed=5)[7]
    assert out.strip() == hashlib.sha256(here["image"].tobytes() + here["mask"].tobytes()).hexdigest()


@pytest.mark.parametrize("size", [(64, 64), (40, 96), (96, 40)])
def test_mask_is_exactly_the_drawn_pixels(size):
    """Painted with one flat colour per class, decoding the image by colour must give back the mask."""
    height, width = size
    for seed in range(6):
        flat_image, flat_mask = render_scene(np.random.default_rng(seed), height, width, flat_colors=SYNTHETIC_PALETTE)
        decoded = _decode_flat(flat_image, SYNTHETIC_PALETTE)
        np.testing.assert_array_equal(decoded, flat_mask)
        assert len(np.unique(flat_mask)) > 1
        # The textured render of the same generator state has the very same mask.
        _, mask = render_scene(np.random.default_rng(seed), height, width)
        np.testing.assert_array_equal(mask, flat_mask)


def test_textured_objects_are_painted_exactly_through_the_mask():
    """Without pixel noise, background pixels keep the background; object pixels all get repainted."""
    repainted, total = 0, 0
    for seed in range(8):
        image, mask = render_scene(np.random.default_rng(seed), 64, 80, noise=False)
        background = _background(np.random.default_rng(seed), 64, 80)  # the first thing drawn from rng
        keep = mask == 0
        np.testing.assert_array_equal(image[keep], background[keep])
        repainted += int((image[~keep] != background[~keep]).any(-1).sum())
        total += int((~keep).sum())
    assert total > 1000 and repainted >= 0.999 * total


def test_layers_composite_back_to_front_into_the_mask():
    for seed in range(6):
        image, mask, layers, labels = render_scene_layers(np.random.default_rng(seed), 56, 72)
        assert layers.shape == (len(labels), 56, 72) and layers.dtype == bool and 2 <= len(labels) <= 6
        painted = np.zeros_like(mask)
        for layer, label in zip(layers, labels):
            painted[layer] = label
        np.testing.assert_array_equal(painted, mask)
        same_image, same_mask = render_scene(np.random.default_rng(seed), 56, 72)
        np.testing.assert_array_equal(image, same_image)
        np.testing.assert_array_equal(mask, same_mask)
    # Occlusion really happens: somewhere a later object hides part of an earlier one.
    hidden = 0
    for seed in range(20):
        _, mask, layers, labels = render_scene_layers(np.random.default_rng(seed), 64, 64)
        hidden += sum(int((layer & (mask != label)).sum()) for layer, label in zip(layers, labels))
    assert hidden > 0


def test_all_classes_appear_in_fifty_images():
    data = SyntheticScenes(length=50, image_size=64, seed=0)
    seen = np.zeros(K, dtype=np.int64)
    for i in range(len(data)):
        seen += np.bincount(data[i]["mask"].ravel(), minlength=K)
    assert (seen > 0).all(), seen
    assert 0.4 < seen[0] / seen.sum() < 0.9  # background is a real class, but not everything


@pytest.mark.parametrize("image_size", [64, (48, 80), (80, 48), (16, 200)])
def test_shapes_and_dtypes(image_size):
    data = SyntheticScenes(length=3, image_size=image_size, seed=1)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    for i in range(len(data)):
        sample = data[i]
        assert sample["index"] == i
        assert sample["image"].shape == (height, width, 3) and sample["image"].dtype == np.uint8
        assert sample["mask"].shape == (height, width) and sample["mask"].dtype == np.uint8
        assert sample["mask"].max() < K
    unlabeled = SyntheticScenes(length=3, image_size=image_size, seed=1, with_masks=False)[1]
    assert set(unlabeled) == {"image", "index"}
    np.testing.assert_array_equal(unlabeled["image"], data[1]["image"])


def test_fewer_classes_use_only_their_labels():
    data = SyntheticScenes(length=20, image_size=48, num_classes=3)
    assert data.class_names == SYNTHETIC_CLASSES[:3]
    np.testing.assert_array_equal(data.palette, SYNTHETIC_PALETTE[:3])
    labels = np.unique(np.concatenate([data[i]["mask"].ravel() for i in range(len(data))]))
    np.testing.assert_array_equal(labels, [0, 1, 2])


def test_no_objects_means_all_background():
    data = SyntheticScenes(length=2, image_size=32, min_objects=0, max_objects=0)
    assert not data[0]["mask"].any() and data[0]["image"].std() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": K + 1}, "num_classes"),
        ({"num_classes": 1}, "num_classes"),
        ({"image_size": 4}, "at least 8"),
        ({"image_size": (32, 32, 3)}, "image_size"),
        ({"image_size": 32.0}, "image_size"),
        ({"min_objects": 5, "max_objects": 2}, "min_objects"),
        ({"seed": -1}, "seed"),
        ({"length": -3}, "length"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticScenes(**kwargs)


def test_index_out_of_range_raises():
    data = SyntheticScenes(length=3, image_size=16)
    with pytest.raises(IndexError):
        data[3]
    with pytest.raises(IndexError):
        data[-4]


def _mean_colours(images_masks):
    """Mean colour of each (image, class) region with at least 20 pixels: features [N, 3], labels [N]."""
    features, labels = [], []
    for image, mask in images_masks:
        for label in np.unique(mask):
            region = mask == label
            if region.sum() >= 20:
                features.append(image[region].mean(0))
                labels.append(label)
    return np.array(features), np.array(labels)


def _nearest_centroid_accuracy(train, test):
    (x_train, y_train), (x_test, y_test) = train, test
    classes = np.unique(y_train)
    centroids = np.stack([x_train[y_train == c].mean(0) for c in classes])
    predicted = classes[np.linalg.norm(x_test[:, None] - centroids[None], axis=-1).argmin(1)]
    return float(np.mean([(predicted[y_test == c] == c).mean() for c in np.unique(y_test)]))


def test_colour_alone_does_not_identify_the_class():
    def scenes(seed, flat):
        rng = np.random.default_rng(seed)
        return [render_scene(rng, 40, 40, flat_colors=SYNTHETIC_PALETTE if flat else None) for _ in range(100)]

    train, test = _mean_colours(scenes(0, False)), _mean_colours(scenes(1, False))
    # A class's mean colour varies widely from instance to instance (std of a uniform mix is ~50) ...
    for label in range(K):
        assert train[0][train[1] == label].std(0).min() > 30
    # ... and the classes' average colours barely differ ...
    class_means = np.stack([train[0][train[1] == label].mean(0) for label in range(K)])
    assert np.ptp(class_means, axis=0).max() < 50
    # ... so a colour classifier stays near chance (1/9), while the same classifier is perfect
    # when colour does carry the class (flat class colours).
    assert _nearest_centroid_accuracy(train, test) < 0.25
    flat = _nearest_centroid_accuracy(_mean_colours(scenes(0, True)), _mean_colours(scenes(1, True)))
    assert flat == 1.0

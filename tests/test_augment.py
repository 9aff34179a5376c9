"""Augmentation: a marked dot lands where its transformed coordinate says, for every op and for the
composition; boxes/polygons follow; randomness depends only on (seed, sample id, epoch)."""

import random

import numpy as np
import pytest

from data.augment import (AugmentConfig, AugmentParams, augment, augment_rng, augment_sample, crop_matrix,
                          flip_matrix, rotation_matrix, sample_params, transform_boxes, transform_points)

H, W = 96, 128
BG = 60


def _dot_image(x: float, y: float) -> np.ndarray:
    img = np.full((H, W, 3), BG, np.uint8)
    j, i = int(x), int(y)
    img[i - 1:i + 2, j - 1:j + 2] = 255  # a 3x3 bright dot centred on pixel (i, j): centre (j+.5, i+.5)
    return img


def _find_dot(img: np.ndarray):
    g = img.astype(np.float64).mean(axis=2)
    bg = np.median(g)
    if g.max() - bg < 40:
        return None
    w = np.clip(g - (g.max() + bg) / 2, 0, None)
    ys, xs = np.mgrid[0:g.shape[0], 0:g.shape[1]]
    return np.array([(w * (xs + 0.5)).sum() / w.sum(), (w * (ys + 0.5)).sum() / w.sum()])


def _params(matrix, **jitter):
    j = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, **jitter}
    return AugmentParams(matrix, (0, 0, W, H), False, 0.0, **j)


OPS = {
    "identity": np.eye(3),
    "crop": crop_matrix(20.5, 10.25, 20.5 + 80, 10.25 + 70, W, H),
    "flip": flip_matrix(W),
    "rotate+9": rotation_matrix(9.0, W, H),
    "rotate-7": rotation_matrix(-7.0, W, H),
    "composed": rotation_matrix(6.0, W, H) @ flip_matrix(W) @ crop_matrix(15, 8, 105, 80, W, H),
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dot", [(64.5, 48.5), (40.5, 30.5), (90.5, 70.5)])
def test_dot_lands_on_its_transformed_coordinate(op, dot):
    img, ann, _ = augment(_dot_image(*dot), _params(OPS[op]), {"points": [dot]})
    want = ann["points"][0]
    got = _find_dot(img)
    assert got is not None, f"{op}: dot vanished, expected at {want}"
    assert np.hypot(*(got - want)) < 0.35, f"{op}: dot at {got}, transform says {want}"


def test_color_jitter_moves_nothing():
    dot = (70.5, 40.5)
    img, ann, _ = augment(_dot_image(*dot), _params(np.eye(3), brightness=1.2, contrast=0.8, saturation=1.2),
                          {"points": [dot]})
    assert np.hypot(*(_find_dot(img) - np.array(dot))) < 0.5 and np.allclose(ann["points"], [dot])
    assert not np.array_equal(img, _dot_image(*dot))  # the colours did change


def test_random_params_track_the_dot_over_many_samples():
    dot = (64.5, 48.5)
    found = 0
    for k in range(40):
        img, ann, meta = augment_sample(_dot_image(*dot), seed=3, sample_id=["src", 0, k], epoch=0,
                                        annotations={"points": [dot], "boxes": [[60, 44, 69, 53]]})
        want = ann["points"][0]
        got = _find_dot(img)
        inside = 2 <= want[0] <= W - 2 and 2 <= want[1] <= H - 2
        if inside:
            assert got is not None and np.hypot(*(got - want)) < 0.35, (k, meta, got, want)
            x0, y0, x1, y1 = ann["boxes"][0]
            assert x0 <= want[0] <= x1 and y0 <= want[1] <= y1  # the box still contains the dot
            found += 1
        elif not (-2 <= want[0] <= W + 2 and -2 <= want[1] <= H + 2):
            assert got is None, (k, meta, got, want)  # cropped away: it must not appear elsewhere
    assert found >= 25


def test_orientation_metadata_and_polygons():
    m = rotation_matrix(5.0, W, H) @ flip_matrix(W)
    p = AugmentParams(m, (0, 0, W, H), True, 5.0, 1.0, 1.0, 1.0)
    poly = np.array([[10.0, 10.0], [50.0, 12.0], [30.0, 40.0]])
    _, ann, meta = augment(_dot_image(64.5, 48.5), p, {"polygons": [poly], "label": "x"})
    np.testing.assert_allclose(ann["polygons"][0], transform_points(poly, m))
    assert ann["label"] == "x" and meta["flipped"] is True and meta["rotation_deg"] == 5.0
    np.testing.assert_allclose(meta["affine"], m, atol=1e-8)
    # mirroring reverses the winding of a polygon (signed area changes sign), rotation keeps it
    area = lambda q: 0.5 * np.sum(q[:, 0] * np.roll(q[:, 1], -1) - np.roll(q[:, 0], -1) * q[:, 1])  # noqa: E731
    assert np.sign(area(ann["polygons"][0])) == -np.sign(area(poly))
    b = transform_boxes([[0, 0, W, H]], flip_matrix(W))
    np.testing.assert_allclose(b, [[0, 0, W, H]])


def test_randomness_is_keyed_by_seed_sample_and_epoch_only():
    img = _dot_image(64.5, 48.5)
    np.random.seed(123)
    random.seed(123)
    before = (np.random.get_state()[1].copy(), random.getstate())
    a = augment_sample(img, 7, "text/000001", 2)
    b = augment_sample(img, 7, "text/000001", 2)
    assert np.array_equal(a[0], b[0]) and a[2] == b[2]
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    others = [augment_sample(img, 8, "text/000001", 2), augment_sample(img, 7, "text/000002", 2),
              augment_sample(img, 7, "text/000001", 3)]
    assert all(o[2] != a[2] for o in others)
    assert augment_rng(1, ["a", 1], 0).integers(1 << 62) == augment_rng(1, ["a", 1], 0).integers(1 << 62)
    p = sample_params(augment_rng(0, "x", 0), H, W, AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(W / H, W / H),
                                                                  flip_prob=0.0, max_rotation_deg=0.0))
    np.testing.assert_allclose(p.matrix, np.eye(3), atol=1e-9)
    assert a[0].shape == img.shape  # same size: vision token counts from metadata stay exact

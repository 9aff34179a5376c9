"""Vision preprocessing: Kimi-K2.5 patch layout, token counts from index metadata == from pixels."""

import math

import numpy as np
import pytest

from data.decode import decode_image, decode_video_frames
from data.shards import open_dataset, read_index, read_member
from data.vision import (VisionPreprocess, grid_tokens, preprocess_image, preprocess_video, resized_size,
                         sample_frame_indices, sample_vision_tokens, vision_tokens_from_meta)
from tests.corpus_fixtures import make_dataset
from train.config import load_config
from train.model.vision import vision_tokens as model_vision_tokens

P = VisionPreprocess()


def _reference_patches(frames: np.ndarray, p: VisionPreprocess) -> np.ndarray:
    """Plain loops: frame by frame, patch rows then columns, each patch as (channel, y, x)."""
    ps, rows = p.patch_size, []
    for f in frames.astype(np.float64) / 255.0:
        for gy in range(f.shape[0] // ps):
            for gx in range(f.shape[1] // ps):
                patch = [(f[gy * ps:(gy + 1) * ps, gx * ps:(gx + 1) * ps, c] - p.mean[c]) / p.std[c]
                         for c in range(3)]
                rows.append(np.stack(patch).reshape(-1))
    return np.stack(rows)


def test_patch_layout_matches_reference_loop():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)  # already a multiple of 28: no resize
    patches, grid = preprocess_image(img, P)
    assert grid == (1, 4, 6) and patches.shape == (24, 3 * 14 * 14) and patches.dtype == np.float32
    np.testing.assert_allclose(patches, _reference_patches(img[None], P), atol=1e-6)
    video = rng.integers(0, 256, (6, 56, 56, 3), dtype=np.uint8)
    vp, grids = preprocess_video(video, VisionPreprocess(video_max_pixels=56 * 56))
    assert grids == [(4, 4, 4), (2, 4, 4)]
    np.testing.assert_allclose(vp, _reference_patches(video, P), atol=1e-6)  # frame-major


@pytest.mark.parametrize("h,w", [(213, 320), (1, 1), (27, 29), (28, 28), (4000, 3000), (10, 5000),
                                 (5000, 10), (511, 513), (1080, 1920), (300, 28), (57, 1000)])
def test_resized_size_is_on_grid_and_in_budget(h, w):
    H, W = resized_size(h, w, P.max_pixels, P.min_pixels, P.factor)
    assert H % 28 == 0 and W % 28 == 0 and H >= 28 and W >= 28
    assert H * W <= P.max_pixels
    if h * w >= P.min_pixels and min(h, w) >= 28 and max(h, w) / min(h, w) < 20:
        assert abs(math.log((H / W) / (h / w))) < 0.25  # aspect ratio kept (up to grid rounding)


def test_frame_sampling_is_arithmetic():
    assert sample_frame_indices(30, 12.0, 2.0, 64) == [0, 6, 12, 18, 24]
    assert sample_frame_indices(1, 30.0, 2.0, 64) == [0]
    assert sample_frame_indices(3000, 30.0, 2.0, 4) == [0, 750, 1500, 2250]  # spread over 100 s
    assert sample_frame_indices(10, 5.0, 10.0, 64) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    with pytest.raises(ValueError):
        sample_frame_indices(0, 30.0, 2.0, 8)


def test_tokens_from_meta_equal_tokens_from_preprocessing():
    rng = np.random.default_rng(1)
    p = VisionPreprocess.from_config(load_config("configs/tiny.toml"))
    for _ in range(40):
        h, w = (int(x) for x in rng.integers(1, 900, 2))
        _, grid = preprocess_image(np.zeros((h, w, 3), np.uint8), p)
        assert vision_tokens_from_meta(h, w, p=p) == grid_tokens(grid, 2) == model_vision_tokens([grid], 2)
    for frames, fps in [(30, 12.0), (7, 25.0), (1, 30.0), (301, 29.97), (5, 1.0)]:
        h, w = (int(x) for x in rng.integers(20, 400, 2))
        idx = sample_frame_indices(frames, fps, p.sample_fps, p.max_frames)
        _, grids = preprocess_video(np.zeros((len(idx), h, w, 3), np.uint8), p)
        assert all(t <= 4 for t, _, _ in grids) and sum(t for t, _, _ in grids) == len(idx)
        assert vision_tokens_from_meta(h, w, frames, fps, p) == model_vision_tokens(grids, 2)
    with pytest.raises(ValueError, match="fps"):
        vision_tokens_from_meta(100, 100, frames=8)


def test_index_metadata_predicts_tokens_of_real_samples(tmp_path):
    built = make_dataset(tmp_path)
    store, manifest = open_dataset(built.url)
    checked = {"image": 0, "video": 0, "interleaved": 0}
    for sh in manifest["shards"]:
        for s in read_index(store, sh["index"])["samples"]:
            if s["kind"] == "text":
                assert sample_vision_tokens(s, P) == 0
                continue
            grids = []
            for im in s["images"]:
                grids.append(preprocess_image(decode_image(read_member(store, sh["key"], s, im["member"])), P)[1])
            for v in s["videos"]:
                idx = sample_frame_indices(v["frames"], v["fps"], P.sample_fps, P.max_frames)
                frames = decode_video_frames(read_member(store, sh["key"], s, v["member"]), idx)
                grids += preprocess_video(frames, P)[1]
            assert sample_vision_tokens(s, P) == sum(grid_tokens(g, 2) for g in grids) > 0
            checked[s["kind"]] += 1
    assert min(checked.values()) >= 3, checked

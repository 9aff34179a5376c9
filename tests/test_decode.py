"""Decoding: EXIF orientation, formats, decompression-bomb limit, corrupt files, decord == PyAV,
decode timeout (also inside a DataLoader worker)."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from data.decode import (DecodeError, DecodeTimeout, decode_image, decode_video_frames, get_video_decoder,
                         image_size, probe_video, with_timeout)
from tests.corpus_fixtures import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("decode"), corrupt=True)


def _png(arr: np.ndarray, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    Image.fromarray(arr).save(buf, "PNG", **kw)
    return buf.getvalue()


# How a camera stores an upright picture for each EXIF orientation (numpy, independent of PIL's table).
STORED = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
          5: lambda a: np.transpose(a, (1, 0, 2)), 6: lambda a: np.rot90(a, 1), 7: lambda a: np.rot90(np.transpose(a, (1, 0, 2)), 2),
          8: lambda a: np.rot90(a, -1)}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(orientation):
    upright = np.zeros((30, 50, 3), np.uint8)
    upright[:5, :8] = (255, 0, 0)  # red top-left corner
    upright[-5:, -3:] = (0, 0, 255)  # blue bottom-right corner
    upright[:, 20] = (0, 255, 0)
    data = _png(np.ascontiguousarray(STORED[orientation](upright)), orientation)
    assert image_size(data) == (30, 50)
    np.testing.assert_array_equal(decode_image(data), upright)


def test_corpus_exif_jpeg_is_upright(corpus):
    from data.corpus import _load_photo

    upright = np.asarray(_load_photo("coffee.png"))
    raw = Image.open(corpus / "images" / "coffee.jpg")
    assert raw.size == (upright.shape[0], upright.shape[1])  # stored rotated
    got = decode_image((corpus / "images" / "coffee.jpg").read_bytes())
    assert got.shape == upright.shape
    assert np.abs(got.astype(int) - upright).mean() < 4  # JPEG loss only


def test_formats_modes_and_rejections(corpus):
    for name in ("astronaut.jpg", "chelsea.png", "motorcycle.webp", "coins.png", "horse.png"):
        img = decode_image((corpus / "images" / name).read_bytes(), name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    rgba = np.zeros((4, 4, 4), np.uint8)
    assert decode_image(_png(rgba)).shape == (4, 4, 3)
    gray = np.zeros((4, 6), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "PNG")
    assert decode_image(buf.getvalue()).shape == (4, 6, 3)
    Image.fromarray(gray).save(buf := io.BytesIO(), "GIF")
    with pytest.raises(DecodeError, match="x.gif: not a readable JPEG/PNG/WebP"):
        decode_image(buf.getvalue(), "x.gif")
    with pytest.raises(DecodeError, match=r"corrupt\.jpg: corrupt image"):
        decode_image((corpus / "images" / "corrupt.jpg").read_bytes(), "corrupt.jpg")


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the body is irrelevant: we must not decode)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    t = time.perf_counter()
    with pytest.raises(DecodeError, match=r"bomb.png: .*10000000000 pixels.*decompression bomb"):
        decode_image(_bomb_png(100_000, 100_000), "bomb.png")
    with pytest.raises(DecodeError, match=r"b2.png: image is 8000x8000 = 64000000 pixels, above the limit of 40000000"):
        decode_image(_bomb_png(8000, 8000), "b2.png")  # under pillow's limit, over ours
    with pytest.raises(DecodeError, match="decompression bomb"):
        image_size(_bomb_png(100_000, 100_000))
    assert time.perf_counter() - t < 1.0
    small = _png(np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(DecodeError, match="above the limit of 1000"):
        decode_image(small, max_pixels=1000)
    assert decode_image(small, max_pixels=1600).shape == (40, 40, 3)


def test_decord_and_pyav_give_the_same_frames(corpus):
    pytest.importorskip("decord")  # decord has no aarch64 wheel; PyAV alone is tested below
    for path in sorted((corpus / "videos").glob("*_*.mp4")):
        data = path.read_bytes()
        a, b = probe_video(data, backend="pyav"), probe_video(data, backend="decord")
        assert a == b and a.frames == 30 and (a.height, a.width, a.fps) == (112, 160, 12.0)
        idx = list(range(a.frames))
        fa = decode_video_frames(data, idx, backend="pyav")
        fb = decode_video_frames(data, idx, backend="decord")
        assert fa.shape == fb.shape == (30, 112, 160, 3)
        diff = np.abs(fa.astype(int) - fb)
        assert diff.max() <= 2 and diff.mean() < 0.1, (path.name, diff.max(), diff.mean())
        sub = decode_video_frames(data, [29, 0, 6, 6], backend="pyav")  # order and repeats kept
        np.testing.assert_array_equal(sub, fa[[29, 0, 6, 6]])


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_truncated_video_is_a_clear_error(corpus, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    data = (corpus / "videos" / "truncated.mp4").read_bytes()
    with pytest.raises(DecodeError, match="truncated.mp4: cannot decode"):
        probe_video(data, "truncated.mp4", backend=backend)
    good = (corpus / "videos" / "rocket_pan.mp4").read_bytes()
    with pytest.raises(DecodeError, match="not in video"):
        decode_video_frames(good, [0, 30], backend=backend)
    with pytest.raises(ValueError):
        get_video_decoder("ffmpeg")


def _hang(seconds):
    time.sleep(seconds)  # stands in for a decoder stuck on a malicious file
    return "finished"


def test_decode_timeout_fires():
    t = time.perf_counter()
    with pytest.raises(DecodeTimeout, match=r"evil.mp4: decoding took longer than 0.2 s"):
        with_timeout(_hang, 30, timeout_s=0.2, name="evil.mp4")
    assert time.perf_counter() - t < 2
    assert with_timeout(_hang, 0, timeout_s=5) == "finished"
    with pytest.raises(DecodeError, match=r"m: cannot decode \(ZeroDivisionError"):
        with_timeout(lambda: 1 / 0, timeout_s=5, name="m")


class _WorkerDataset(torch.utils.data.Dataset):
    def __init__(self, video: bytes):
        self.video = video

    def __len__(self):
        return 2

    def __getitem__(self, i):
        if i == 0:
            try:
                with_timeout(_hang, 30, timeout_s=0.2, name="hang")
            except DecodeTimeout as e:
                return str(e)
            return "no timeout"
        frames = decode_video_frames(self.video, [0, 6, 12], timeout_s=10)
        return f"frames {tuple(frames.shape)}"


def test_timeout_and_decoding_inside_dataloader_workers(corpus):
    ds = _WorkerDataset((corpus / "videos" / "chelsea_zoom.mp4").read_bytes())
    t = time.perf_counter()
    out = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                           multiprocessing_context="fork"))
    assert out == ["hang: decoding took longer than 0.2 s (abandoned)", "frames (3, 112, 160, 3)"]
    assert time.perf_counter() - t < 20  # the hung thread did not keep the worker from exiting

"""Decoding: images with pillow, video behind a small VideoDecoder interface (decord or PyAV).

Images: JPEG, PNG and WebP only; EXIF orientation applied; RGB uint8 [H, W, 3]; the pixel count is
checked from the header BEFORE decoding, so a decompression bomb is a clear DecodeError, not an
out-of-memory kill.

Video: `get_video_decoder("auto" | "decord" | "pyav")` returns an object with
    probe(data) -> VideoInfo(frames, height, width, fps)
    frames(data, indices) -> uint8 [len(indices), H, W, 3]
Both backends give the same frames for our H.264 test files. Which frames to take is pure
arithmetic on the index metadata (data.vision.sample_frame_indices), so token counts are known
before decoding.

Timeouts: `with_timeout(fn, *args, timeout_s=..., name=...)` runs a decode in a daemon thread and
raises DecodeTimeout if it does not finish in time. Threads (not subprocesses) because DataLoader
workers are daemonic processes and may not start children; both decoders release the GIL while
decoding. A decode that truly never returns leaves one abandoned daemon thread behind; the worker
goes on with the next sample (and the sample is reported as failed). Errors carry only a message,
never a traceback holding a decoder: we saw a forked DataLoader worker hang in decord when the parent
still held a live VideoReader (pinned by a kept exception), so readers are opened and dropped per call.
"""

from __future__ import annotations

import abc
import io
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; far above any training resolution
DEFAULT_TIMEOUT_S = 30.0
_SWAP_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that transpose the image


class DecodeError(Exception):
    """A sample's media could not be decoded. The message names the sample/file and the reason."""


class DecodeTimeout(DecodeError):
    pass


def _open_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:  # pillow's own, higher, limit tripped first
        raise DecodeError(f"{name}: {e} (our limit: {max_pixels} pixels; decompression bomb?)") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise DecodeError(f"{name}: not a readable JPEG/PNG/WebP image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError(f"{name}: image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                          "(decompression bomb?)")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block: treat as upright, the pixels may still be fine
        return 1


def image_size(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) as displayed, i.e. after EXIF orientation, from the header only."""
    img = _open_image(data, name, max_pixels)
    w, h = img.size
    return (w, h) if _orientation(img) in _SWAP_ORIENTATIONS else (h, w)


def decode_image(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 [H, W, 3] with EXIF orientation applied."""
    img = _open_image(data, name, max_pixels)
    try:
        img.load()
        try:
            upright = img.getexif().get(0x0112, 1) == 1
        except Exception:  # a broken EXIF block: exif_transpose reports it, as it always has
            upright = False
        if not upright:  # skips exif_transpose's full copy of an already upright image
            img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            img = img.convert("RGBA").convert("RGB") if "A" in img.getbands() or img.mode == "P" else img.convert("RGB")
        return np.asarray(img)
    except Exception as e:
        raise DecodeError(f"{name}: corrupt image ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# Video


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    height: int
    width: int
    fps: float

    def as_meta(self) -> dict:
        return {"frames": self.frames, "height": self.height, "width": self.width, "fps": self.fps}


class VideoDecoder(abc.ABC):
    name: str

    @abc.abstractmethod
    def probe(self, data: bytes) -> VideoInfo: ...

    @abc.abstractmethod
    def frames(self, data: bytes, indices: list[int]) -> np.ndarray: ...


class PyAVDecoder(VideoDecoder):
    """Decodes sequentially and keeps the requested frames (exact frame numbering, no seeking)."""

    name = "pyav"

    def _open(self, data: bytes):
        import av

        return av.open(io.BytesIO(data), mode="r")

    def probe(self, data: bytes) -> VideoInfo:
        with self._open(data) as c:
            stream = c.streams.video[0]
            stream.thread_type = "NONE"
            n = sum(1 for _ in c.decode(stream))  # container frame counts are not always present
            rate = stream.average_rate or stream.guessed_rate
            return VideoInfo(n, stream.codec_context.height, stream.codec_context.width, round(float(rate), 6))

    def frames(self, data: bytes, indices: list[int]) -> np.ndarray:
        want = sorted(set(indices))
        got: dict[int, np.ndarray] = {}
        with self._open(data) as c:
            stream = c.streams.video[0]
            stream.thread_type = "NONE"
            n = 0
            for i, frame in enumerate(c.decode(stream)):
                n = i + 1
                if i in want:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= want[-1]:
                    break
        missing = [i for i in want if i not in got]
        if missing:
            raise DecodeError(f"frames {missing[:5]} not in video ({n} frames)")
        return np.stack([got[i] for i in indices])


class DecordDecoder(VideoDecoder):
    name = "decord"

    def _reader(self, data: bytes):
        import decord

        return decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)

    def probe(self, data: bytes) -> VideoInfo:
        vr = self._reader(data)
        h, w = vr[0].shape[:2] if len(vr) else (0, 0)
        return VideoInfo(len(vr), int(h), int(w), round(float(vr.get_avg_fps()), 6))

    def frames(self, data: bytes, indices: list[int]) -> np.ndarray:
        vr = self._reader(data)
        n = len(vr)
        if indices and max(indices) >= n:
            del vr  # never let an error's traceback keep a reader alive: a forked child could hang
            raise DecodeError(f"frame {max(indices)} not in video ({n} frames)")
        return vr.get_batch(list(indices)).asnumpy()


def get_video_decoder(backend: str = "auto") -> VideoDecoder:
    """'decord' (fast, x86-64 only), 'pyav' (everywhere), or 'auto': decord if importable."""
    if backend == "auto":
        try:
            import decord  # noqa: F401

            return DecordDecoder()
        except ImportError:
            return PyAVDecoder()
    if backend == "decord":
        return DecordDecoder()
    if backend == "pyav":
        return PyAVDecoder()
    raise ValueError(f"video backend {backend!r}: expected 'auto', 'decord' or 'pyav'")


def with_timeout(fn, *args, timeout_s: float = DEFAULT_TIMEOUT_S, name: str = "media"):
    """fn(*args) in a daemon thread; DecodeTimeout after timeout_s, DecodeError for other failures."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except DecodeError as e:  # keep only the message: a traceback would pin decoder objects
            box["error"] = f"{name}: {e}"
        except Exception as e:  # noqa: BLE001  (reported in the caller's thread)
            box["error"] = f"{name}: cannot decode ({type(e).__name__}: {e})"

    t = threading.Thread(target=run, name=f"decode:{name}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise DecodeTimeout(f"{name}: decoding took longer than {timeout_s:g} s (abandoned)")
    if "error" in box:
        raise DecodeError(box["error"])
    return box["value"]


def probe_video(data: bytes, name: str = "video", backend: str = "auto",
                timeout_s: float = DEFAULT_TIMEOUT_S) -> VideoInfo:
    dec = get_video_decoder(backend)
    info = with_timeout(dec.probe, data, timeout_s=timeout_s, name=name)
    if info.frames <= 0 or info.height <= 0 or info.width <= 0 or not info.fps > 0:
        raise DecodeError(f"{name}: video has no decodable frames ({info})")
    return info


def decode_video_frames(data: bytes, indices: list[int], name: str = "video", backend: str = "auto",
                        timeout_s: float = DEFAULT_TIMEOUT_S) -> np.ndarray:
    """uint8 [len(indices), H, W, 3] for the given frame numbers."""
    if not indices:
        raise ValueError(f"{name}: no frame indices requested")
    return with_timeout(get_video_decoder(backend).frames, data, list(indices), timeout_s=timeout_s, name=name)

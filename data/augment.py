"""Stochastic image augmentation that keeps 2-D annotations and orientation metadata consistent.

Randomness comes only from (seed, sample id, epoch): a Philox generator keyed by a sha256 of the
three, never Python's hash(), the global numpy/random state, time or the process id. So the same
sample in the same epoch is augmented identically in any worker, on any rank, after any restart.

Geometric ops (random resized crop, horizontal flip, small rotation about the centre) compose into
ONE 3x3 affine matrix M that maps input coordinates to output coordinates. The pixels are resampled
once through M^-1; points, boxes and polygons are mapped through M; the metadata records M, whether
the image was mirrored and by how much it was rotated. Colour jitter (brightness, contrast,
saturation) follows and moves nothing. The output has the input's height and width, so the vision
token count computed from index metadata (data.vision) stays exact.

Coordinates are continuous pixel coordinates: x to the right, y down, the image spans [0, W] x [0, H]
and the centre of pixel (row i, column j) is (j + 0.5, i + 0.5) (pillow's convention too).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.6, 1.0)  # crop area as a fraction of the image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (w / h) range
    flip_prob: float = 0.5
    max_rotation_deg: float = 10.0
    brightness: float = 0.2  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2
    saturation: float = 0.2
    fill: int = 0  # value for pixels rotated in from outside the image


@dataclass(frozen=True)
class AugmentParams:
    matrix: np.ndarray  # 3x3, input (x, y, 1) -> output (x, y, 1)
    crop: tuple[float, float, float, float]  # (x0, y0, x1, y1) in input coordinates
    flipped: bool
    rotation_deg: float  # counter-clockwise as seen on screen
    brightness: float
    contrast: float
    saturation: float

    def metadata(self) -> dict:
        return {"affine": self.matrix.round(9).tolist(), "crop": [round(v, 6) for v in self.crop],
                "flipped": self.flipped, "rotation_deg": round(self.rotation_deg, 6)}


def augment_rng(seed: int, sample_id, epoch: int) -> np.random.Generator:
    """A generator keyed only by (seed, sample id, epoch); sample_id is any JSON-able value."""
    key = json.dumps([int(seed), sample_id, int(epoch)], sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(b"mmpt-augment\0" + key.encode()).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))


def _translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], dtype=np.float64)


def _scale(sx: float, sy: float) -> np.ndarray:
    return np.diag([sx, sy, 1.0])


def crop_matrix(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> np.ndarray:
    """Crop box -> the full output frame."""
    return _scale(width / (x1 - x0), height / (y1 - y0)) @ _translate(-x0, -y0)


def flip_matrix(width: int) -> np.ndarray:
    return np.array([[-1, 0, width], [0, 1, 0], [0, 0, 1]], dtype=np.float64)


def rotation_matrix(deg: float, width: int, height: int) -> np.ndarray:
    """Rotate by `deg` counter-clockwise on screen (y points down) about the image centre."""
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    rot = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]], dtype=np.float64)
    return _translate(width / 2, height / 2) @ rot @ _translate(-width / 2, -height / 2)


def sample_params(rng: np.random.Generator, height: int, width: int, cfg: AugmentConfig = AugmentConfig()) -> AugmentParams:
    area = height * width
    crop = (0.0, 0.0, float(width), float(height))
    for _ in range(10):  # the usual random-resized-crop rejection loop, then the full image
        a = area * rng.uniform(*cfg.crop_scale)
        r = math.exp(rng.uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
        cw, ch = math.sqrt(a * r), math.sqrt(a / r)
        if cw <= width and ch <= height:
            x0, y0 = rng.uniform(0, width - cw), rng.uniform(0, height - ch)
            crop = (x0, y0, x0 + cw, y0 + ch)
            break
    flipped = bool(rng.random() < cfg.flip_prob)
    deg = float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    m = crop_matrix(*crop, width, height)
    if flipped:
        m = flip_matrix(width) @ m
    m = rotation_matrix(deg, width, height) @ m
    jit = [float(rng.uniform(1 - j, 1 + j)) for j in (cfg.brightness, cfg.contrast, cfg.saturation)]
    return AugmentParams(m, crop, flipped, deg, *jit)


def warp_image(img: np.ndarray, matrix: np.ndarray, fill: int = 0) -> np.ndarray:
    """Resample uint8 [H, W, C] once through the inverse of `matrix` (same output size)."""
    h, w = img.shape[:2]
    inv = np.linalg.inv(matrix)
    coeffs = tuple(inv[0]) + tuple(inv[1])  # pillow asks: output (x, y) -> input (x, y)
    out = Image.fromarray(img).transform((w, h), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR,
                                         fillcolor=(fill,) * img.shape[2] if img.ndim == 3 else fill)
    return np.asarray(out)


def color_jitter(img: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    x = img.astype(np.float32) * brightness
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - gray.mean()) * contrast + gray.mean()
    gray = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    x = (x - gray) * saturation + gray
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def transform_points(points, matrix: np.ndarray) -> np.ndarray:
    """[N, 2] (x, y) -> [N, 2]."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return p @ matrix[:2, :2].T + matrix[:2, 2]


def transform_boxes(boxes, matrix: np.ndarray) -> np.ndarray:
    """[N, 4] (x0, y0, x1, y1) -> axis-aligned boxes around the transformed corners."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    corners = np.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [0, 3]], b[:, [2, 3]]], axis=1)
    t = transform_points(corners.reshape(-1, 2), matrix).reshape(-1, 4, 2)
    return np.concatenate([t.min(axis=1), t.max(axis=1)], axis=1)


def augment(img: np.ndarray, params: AugmentParams, annotations: dict | None = None,
            cfg: AugmentConfig = AugmentConfig()) -> tuple[np.ndarray, dict, dict]:
    """(image, annotations, metadata) after one set of params. annotations may hold "points"
    [N, 2], "boxes" [N, 4] and "polygons" (a list of [K, 2]); other keys pass through unchanged."""
    out = warp_image(img, params.matrix, cfg.fill)
    out = color_jitter(out, params.brightness, params.contrast, params.saturation)
    ann = dict(annotations or {})
    m = params.matrix
    if "points" in ann:
        ann["points"] = transform_points(ann["points"], m)
    if "boxes" in ann:
        ann["boxes"] = transform_boxes(ann["boxes"], m)
    if "polygons" in ann:
        ann["polygons"] = [transform_points(p, m) for p in ann["polygons"]]
    return out, ann, params.metadata()


def augment_sample(img: np.ndarray, seed: int, sample_id, epoch: int, annotations: dict | None = None,
                   cfg: AugmentConfig = AugmentConfig()) -> tuple[np.ndarray, dict, dict]:
    """The deterministic entry point: params drawn from (seed, sample_id, epoch) only."""
    params = sample_params(augment_rng(seed, sample_id, epoch), img.shape[0], img.shape[1], cfg)
    return augment(img, params, annotations, cfg)

"""The loader's view of media: token arithmetic from index metadata, and decode -> patches.

A thin adapter over data/decode.py (pillow, decord/PyAV with a timeout) and data/vision.py (NaViT
resize + patchify), so the catalog and the loader share one definition of "how many placeholder
tokens does this image / video chunk take". Items are images (grid t = 1) and video chunks of up
to frames_per_chunk frames; each costs (h / merge) * (w / merge) placeholder tokens.
"""

from __future__ import annotations

import torch

from data.augment import augment_sample
from data.decode import DEFAULT_TIMEOUT_S, decode_image, decode_video_frames
from data.vision import (VisionPreprocess, grid_tokens, preprocess_image, preprocess_video,
                         resized_size, sample_frame_indices)


class MediaRules:
    def __init__(self, pre: VisionPreprocess, video_backend: str = "auto",
                 timeout_s: float = DEFAULT_TIMEOUT_S, augment: bool = False):
        self.pre, self.video_backend, self.timeout_s = pre, video_backend, timeout_s
        self.augment = augment
        self.patch_dim = 3 * pre.patch_size * pre.patch_size

    @classmethod
    def from_config(cls, cfg) -> "MediaRules":
        return cls(VisionPreprocess.from_config(cfg), augment=cfg.data.augment)

    def tokens_of(self, grid) -> int:
        return grid_tokens(tuple(grid), self.pre.merge_size)

    def chunk_tokens(self, kind: str, meta: dict) -> list[int]:
        """Placeholder tokens of each item of one image (one item) or video (one per chunk)."""
        p, f = self.pre, self.pre.factor
        if kind == "image":
            H, W = resized_size(meta["height"], meta["width"], p.max_pixels, p.min_pixels, f)
            return [(H // f) * (W // f)]
        H, W = resized_size(meta["height"], meta["width"], p.video_max_pixels, p.min_pixels, f)
        n = len(self._frames(meta))
        return [(H // f) * (W // f)] * -(-n // p.frames_per_chunk)

    def chunk_grids(self, kind: str, meta: dict) -> list[tuple[int, int, int]]:
        """The (t, h, w) patch grid of each item of one image or video, from index metadata
        alone: what `load` gives once decoded (ranks that do not decode build the same
        grid_thw from it)."""
        p, f = self.pre, self.pre.factor
        if kind == "image":
            H, W = resized_size(meta["height"], meta["width"], p.max_pixels, p.min_pixels, f)
            return [(1, H // p.patch_size, W // p.patch_size)]
        H, W = resized_size(meta["height"], meta["width"], p.video_max_pixels, p.min_pixels, f)
        n, c = len(self._frames(meta)), p.frames_per_chunk
        return [(min(c, n - s), H // p.patch_size, W // p.patch_size) for s in range(0, n, c)]

    def _frames(self, meta: dict) -> list[int]:
        return sample_frame_indices(meta["frames"], meta["fps"], self.pre.sample_fps, self.pre.max_frames)

    def load(self, kind: str, data: bytes, meta: dict, name: str, key,
             chunks: list[int] | None = None) -> list[tuple[torch.Tensor, tuple]]:
        """Decode one image / video into [(patches [n, 3*p*p] uint8, grid (t, h, w))] per item
        (data.vision.normalize_patches makes the encoder's float32 input, on the device).

        `key` (seed, fingerprint, source, sample, epoch) seeds image augmentation when it is
        on: the same sample in the same epoch is augmented alike in every worker and run.
        `chunks` (a video): only those chunks, in that order, decoding only their frames (each
        frame is resized and patchified on its own, so a chunk's patches do not depend on
        which other chunks are decoded with it).
        """
        if kind == "image":
            rgb = decode_image(data, name)
            if self.augment:
                seed, fingerprint, source, sample, epoch = key
                rgb, _, _ = augment_sample(rgb, seed, [fingerprint, source, sample], epoch)
            patches, grid = preprocess_image(rgb, self.pre, normalize=False)
            return [(torch.from_numpy(patches), grid)]
        indices, c = self._frames(meta), self.pre.frames_per_chunk
        if chunks is None:
            chunks = list(range(-(-len(indices) // c)))
        wanted = [i for k in chunks for i in indices[k * c:(k + 1) * c]]
        frames = decode_video_frames(data, wanted, name, self.video_backend, self.timeout_s)
        out, at = [], 0
        for k in chunks:
            n = len(indices[k * c:(k + 1) * c])
            patches, [grid] = preprocess_video(frames[at:at + n], self.pre, normalize=False)
            out.append((torch.from_numpy(patches), grid))
            at += n
        return out

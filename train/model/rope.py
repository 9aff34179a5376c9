"""Rotary position embedding for the MLA rope part, with YaRN context extension.

Layout follows DeepSeek-V3 (HF `rope_interleave=True`): the rope dims are rotated in adjacent
pairs (x0, x1), (x2, x3), ... and the rotated result is written de-interleaved (all first
elements, then all second elements). q and k get the same permutation, so dot products equal
those of the interleaved form.

YaRN (factor > 1) changes three things: per-frequency blending between interpolated and
extrapolated inverse frequencies, an "attention factor" multiplying cos/sin, and an extra
mscale(factor, mscale_all_dim)^2 on the softmax scale (see `softmax_scale`).
"""

from __future__ import annotations

import math

import torch

from train.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def uses_yarn(cfg: ModelConfig) -> bool:
    return cfg.rope_factor > 1.0


def inv_freq_and_attention_factor(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim/2] (float32, always CPU: also under a meta-device
    context) and the factor applied to cos/sin."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolated = 1.0 / pos_freqs
    if not uses_yarn(cfg):
        return extrapolated, 1.0
    factor = cfg.rope_factor
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        attention_factor = yarn_mscale(factor, cfg.rope_mscale) / yarn_mscale(factor, cfg.rope_mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # The dimension index whose wavelength fits `rotations` turns in the original context.
        orig = cfg.rope_original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp  # high-frequency dims keep their original frequency
    interpolated = 1.0 / (factor * pos_freqs)
    inv_freq = interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated
    return inv_freq, float(attention_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk head dim), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if uses_yarn(cfg) and cfg.rope_mscale_all_dim:
        m = yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
        scale = scale * m * m
    return scale


class RotaryEmbedding(torch.nn.Module):
    """Maps position ids [B, S] to (cos, sin) [B, S, rope_dim/2] in float32.

    The inverse frequencies are a plain attribute computed from the config (no buffer), so a
    model built on the meta device needs no re-initialisation for them.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inv_freq, self.attention_factor = inv_freq_and_attention_factor(cfg)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(position_ids.device)
        angles = position_ids[..., None].float() * inv_freq
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, S, rope_dim] by (cos, sin) [B, S, rope_dim/2]; output de-interleaved."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

"""MoonViT-3D: the Kimi K2.5 vision encoder plus the patch-merger projector to the LM width.

Input is NaViT-style patch-n-pack: every image (or video chunk of up to `frames_per_chunk`
frames of one size) is cut into p x p patches, flattened to rows of C*p*p values in (C, p, p)
order, raster order per frame, frames one after another, and all items are concatenated
(`data/vision.py` emits this layout, the same as HF's Kimi-K2.5 processors).
`grid_thw` [M, 3] says how many frames / patch rows / patch columns each item has.

Per item: linear patch embedding -> + learned 2-D position grid resampled bicubically to (h, w)
-> + sinusoidal time embedding (frames of a multi-frame chunk only) -> pre-norm transformer
blocks with axial 2-D rope, attention restricted to the item (all t*h*w patches of a chunk see
each other) -> final LayerNorm -> 2x2 spatial merge with the mean over the chunk's frames ->
projector (LayerNorm per patch, MLP on the merged 4 patches) -> one LM-width row per merged patch.

Numerics follow `transformers`' Kimi_K25VisionModel + Kimi_K25MultimodalProjection (the parity
test is tests/test_model_vision.py). The model knows nothing about parallelism.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from train.config import VisionConfig

Grid = tuple[int, int, int]  # (frames, patch rows, patch columns) of one item


def grid_list(grid_thw: torch.Tensor | list) -> list[Grid]:
    """grid_thw [M, 3] as a list of int triples."""
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def num_patches(grid_thw: torch.Tensor | list) -> int:
    """Patch rows the encoder consumes for these items."""
    return sum(t * h * w for t, h, w in grid_list(grid_thw))


def vision_tokens(grid_thw: torch.Tensor | list, merge_size: int = 2) -> int:
    """LM placeholder tokens these items produce: (h/m)*(w/m) per item, whatever its frames."""
    return sum((h // merge_size) * (w // merge_size) for _, h, w in grid_list(grid_thw))


def time_embedding_table(num_frames: int, dim: int) -> torch.Tensor:
    """Fixed sinusoid [num_frames, dim] (sin half, then cos half) added to frames of a video chunk."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.arange(num_frames, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def axial_rope_angles(grids: list[Grid], head_dim: int, theta: float) -> torch.Tensor:
    """Rotation angles [N, head_dim/2] per patch for axial 2-D rope.

    Frequencies f_k = theta^(-4k/head_dim), k < head_dim/4. Angle slot 2k uses the patch's column
    times f_k, slot 2k+1 its row times f_k; the two halves of the head are rotated as pairs
    (x[i], x[i + head_dim/2]). Every frame of a chunk has the same positions.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)))
    parts = []
    for t, h, w in grids:
        rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w)
        cols = torch.arange(w, dtype=torch.float32).repeat(h)
        per_frame = torch.stack([cols[:, None] * inv_freq, rows[:, None] * inv_freq], dim=-1).flatten(1)
        parts.append(per_frame.repeat(t, 1))
    return torch.cat(parts)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, head_dim] by angles given as cos/sin [N, 1, head_dim/2], in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class ItemBatches:
    """Groups packed items by length so attention runs as one batched SDPA per distinct length.

    Built once per forward; `perm` gathers the rows of equal-length items next to each other and
    `inverse` puts the attention output back in packed order.
    """

    def __init__(self, lengths: list[int], device: torch.device):
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        by_length: dict[int, list[int]] = defaultdict(list)
        for start, n in zip(starts, lengths):
            by_length[n].append(start)
        self.shapes = [(len(s), n) for n, s in by_length.items()]  # (items, length) per group
        order = [torch.arange(s, s + n) for n, ss in by_length.items() for s in ss]
        perm = torch.cat(order)
        self.identity = bool(torch.equal(perm, torch.arange(len(perm))))
        self.perm = perm.to(device)
        self.inverse = torch.argsort(perm).to(device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Bidirectional attention within each item. q, k, v: [N, heads, head_dim]."""
        if not self.identity:
            q, k, v = q[self.perm], k[self.perm], v[self.perm]
        sizes = [items * n for items, n in self.shapes]
        outs = []
        for (items, n), q_g, k_g, v_g in zip(self.shapes, q.split(sizes), k.split(sizes), v.split(sizes)):
            q_g, k_g, v_g = (t.unflatten(0, (items, n)).transpose(1, 2) for t in (q_g, k_g, v_g))
            o = F.scaled_dot_product_attention(q_g, k_g, v_g, scale=scale)  # [items, heads, n, hd]
            outs.append(o.transpose(1, 2).flatten(0, 1))
        out = torch.cat(outs)
        return out if self.identity else out[self.inverse]


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, items: ItemBatches):
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.num_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = items.attend(q, k, v, scale=self.head_dim**-0.5)
        return self.o_proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm -> attention, LayerNorm -> gelu-tanh MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x, cos, sin, items: ItemBatches):
        x = x + self.attn(self.norm1(x), cos, sin, items)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class Projector(nn.Module):
    """Patch merger to the LM width: LayerNorm per patch, then an MLP over the m*m merged patches."""

    def __init__(self, cfg: VisionConfig, lm_hidden_size: int):
        super().__init__()
        merged = cfg.hidden_size * cfg.merge_size**2
        hidden = cfg.projector_hidden_size or merged
        self.pre_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.projector_ln_eps)
        self.in_proj = nn.Linear(merged, hidden)
        self.out_proj = nn.Linear(hidden, lm_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, m*m, D] -> [M, lm_hidden]."""
        x = self.pre_norm(x).flatten(1)
        return self.out_proj(F.gelu(self.in_proj(x)))


class VisionTower(nn.Module):
    """MoonViT-3D encoder + projector. Images and video chunks share every parameter."""

    def __init__(self, cfg: VisionConfig, lm_hidden_size: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = nn.Linear(cfg.in_channels * cfg.patch_size**2, d)
        self.pos_grid = nn.Parameter(torch.empty(cfg.pos_emb_height, cfg.pos_emb_width, d))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.projector = Projector(cfg, lm_hidden_size)

    # -- counts ---------------------------------------------------------------------------------

    def num_patches(self, grid_thw) -> int:
        return num_patches(grid_thw)

    def vision_tokens(self, grid_thw) -> int:
        return vision_tokens(grid_thw, self.cfg.merge_size)

    # -- pieces ---------------------------------------------------------------------------------

    def check_grids(self, pixel_patches: torch.Tensor, grid_thw: torch.Tensor) -> list[Grid]:
        cfg = self.cfg
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must be [items, 3], got shape {tuple(grid_thw.shape)}")
        grids = grid_list(grid_thw)
        for i, (t, h, w) in enumerate(grids):
            if not 1 <= t <= cfg.frames_per_chunk:
                raise ValueError(f"grid_thw[{i}]: {t} frames, allowed 1..{cfg.frames_per_chunk} "
                                 "(vision.frames_per_chunk); split longer videos into chunks")
            if h <= 0 or w <= 0 or h % cfg.merge_size or w % cfg.merge_size:
                raise ValueError(f"grid_thw[{i}]: {h}x{w} patches must be positive multiples of "
                                 f"vision.merge_size={cfg.merge_size}")
        want = (num_patches(grids), cfg.in_channels * cfg.patch_size**2)
        if tuple(pixel_patches.shape) != want:
            raise ValueError(f"pixel_patches has shape {tuple(pixel_patches.shape)}, grid_thw needs {want}")
        return grids

    def position_embedding(self, grids: list[Grid]) -> torch.Tensor:
        """Learned grid resampled to each (h, w) plus the time sinusoid: [N, D] float32."""
        grid = self.pos_grid.float()
        table = grid.permute(2, 0, 1)[None]  # [1, D, Hp, Wp]
        times = time_embedding_table(self.cfg.pos_emb_time, grid.shape[-1]).to(grid.device)
        resized: dict[tuple[int, int], torch.Tensor] = {}
        parts = []
        for t, h, w in grids:
            if (h, w) not in resized:
                if (h, w) == tuple(grid.shape[:2]):
                    resized[h, w] = grid.reshape(h * w, -1)
                else:
                    out = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
                    resized[h, w] = out[0].permute(1, 2, 0).reshape(h * w, -1)
            spatial = resized[h, w].repeat(t, 1)
            if t > 1:  # a single frame (an image) gets no time term
                spatial = spatial + times[:t].repeat_interleave(h * w, dim=0)
            parts.append(spatial)
        return torch.cat(parts)

    def merge(self, x: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """[N, D] -> [M, m*m, D]: m x m neighbours of each merged patch, averaged over frames."""
        m = self.cfg.merge_size
        out = []
        for xi, (t, h, w) in zip(x.split([t * h * w for t, h, w in grids]), grids):
            xi = xi.view(t, h // m, m, w // m, m, -1).mean(dim=0)  # [h/m, m, w/m, m, D]
            out.append(xi.transpose(1, 2).reshape((h // m) * (w // m), m * m, -1))
        return torch.cat(out)

    # -- forward --------------------------------------------------------------------------------

    def encode(self, pixel_patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Encoder only: per-patch features [N, D] after the final LayerNorm (before merging)."""
        grids = self.check_grids(pixel_patches, grid_thw)
        return self._encode(pixel_patches, grids)

    def _encode(self, pixel_patches: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        x = self.patch_embed(pixel_patches.to(self.patch_embed.weight.dtype))
        x = x + self.position_embedding(grids).to(x.dtype)
        angles = axial_rope_angles(grids, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_theta)
        angles = angles.to(x.device)[:, None, :]
        cos, sin = angles.cos(), angles.sin()
        items = ItemBatches([t * h * w for t, h, w in grids], x.device)
        for block in self.blocks:
            x = block(x, cos, sin, items)
        return self.final_norm(x)

    def forward(self, pixel_patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_patches [N, C*p*p], grid_thw [M, 3] -> [sum (h/m)*(w/m), lm_hidden], grid order."""
        grids = self.check_grids(pixel_patches, grid_thw)
        return self.projector(self.merge(self._encode(pixel_patches, grids), grids))

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"patch={c.patch_size}, width={c.hidden_size}, layers={c.num_layers}, heads={c.num_heads}, "
                f"merge={c.merge_size}, frames_per_chunk={c.frames_per_chunk}")

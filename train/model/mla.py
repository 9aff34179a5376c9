"""Multi-head Latent Attention (DeepSeek-V2/V3): low-rank q and kv, decoupled shared rope key.

Weight layouts match HF deepseek_v3 (and so the QK-Clip row slices in the contract):
q_b_proj / q_proj rows per head h: [h*(nope+rope), +nope) = q-nope, next `rope` rows = q-rope;
kv_b_proj rows per head h: [h*(nope+v), +nope) = k-nope, next `v` rows = v;
kv_a_proj_with_mqa rows: [0, kv_lora_rank) = kv latent, last `rope` rows = the shared rope key.
"""

from __future__ import annotations

import torch
from torch import nn

from train.config import ModelConfig
from train.model.attention import DocMask, attention, max_logits
from train.model.norm import RMSNorm
from train.model.rope import apply_rope, softmax_scale

LATENT_NORM_EPS = 1e-6  # HF and the reference use the default eps for q_a / kv_a norms


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        hidden = cfg.hidden_size
        if cfg.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(hidden, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.num_heads * qk_dim, bias=False)
            self.q_proj = None
        else:
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
            self.q_proj = nn.Linear(hidden, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, cfg.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim),
                                   bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=False)
        self.scale = softmax_scale(cfg)
        # QK-Clip: when set, each forward stores the exact per-head max logit [num_heads].
        self.record_max_logits = False
        self.last_max_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: DocMask) -> torch.Tensor:
        batch, seq, _ = x.shape
        q_in = x if self.q_proj is not None else self.q_a_norm(self.q_a_proj(x))
        kv_latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], -1)
        q, k, v = self.up_project(q_in, self.kv_a_norm(kv_latent), k_rope, cos, sin)
        if self.record_max_logits:
            self.last_max_logits = max_logits(q.detach(), k.detach(), mask, self.scale)
        out = self.attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def up_project(self, q_in: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents (q_in: normed q latent, or x without q low rank) -> per-head q, k [B, H, S,
        nope+rope] and v [B, H, S, v_dim], rope applied."""
        batch, seq, _ = q_in.shape
        q = (self.q_proj if self.q_proj is not None else self.q_b_proj)(q_in)
        q = q.view(batch, seq, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(kv_latent).view(batch, seq, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.reshape(batch, 1, seq, self.rope_dim), cos, sin)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: DocMask) -> torch.Tensor:
        return attention(q, k, v, mask, self.scale)

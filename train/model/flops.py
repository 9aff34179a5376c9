"""Training FLOPs per token of the text model, for model-FLOPs utilisation (MFU).

FLOPs/token = 6 * (activated matmul weights) + attention, where
- activated matmul weights: every Linear the token passes through (MLA projections, dense MLP,
  router, shared experts, its top-k routed experts, output head); the embedding is a lookup
  and norms are elementwise, so neither counts;
- attention: q.k and p.v over the causal context, forward 2 * heads * (qk_dim + v_dim) * S/2
  per token and layer on average, times 3 for forward + backward.
Packed documents attend to less than S/2 keys on average, so this is an upper bound for them.
"""

from __future__ import annotations

from train.config import ModelConfig


def mla_matmul_params(cfg: ModelConfig) -> int:
    h, heads = cfg.hidden_size, cfg.num_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = (h * cfg.q_lora_rank + cfg.q_lora_rank * heads * qk) if cfg.q_lora_rank else h * heads * qk
    kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv += cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + heads * cfg.v_head_dim * h


def activated_matmul_params(cfg: ModelConfig) -> int:
    """Weights of the matrix multiplies one token goes through (forward)."""
    h = cfg.hidden_size
    dense = 3 * h * cfg.intermediate_size
    moe = (cfg.n_routed_experts * h  # router
           + 3 * h * cfg.moe_intermediate_size * (cfg.n_shared_experts + cfg.num_experts_per_tok))
    n_moe = cfg.num_layers - cfg.first_k_dense
    return (cfg.num_layers * mla_matmul_params(cfg) + cfg.first_k_dense * dense + n_moe * moe
            + h * cfg.vocab_size)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    forward = 2 * cfg.num_heads * (qk + cfg.v_head_dim) * (seq_len / 2)
    return 3 * cfg.num_layers * forward


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 6 * activated_matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, peak_flops: float) -> float:
    return tokens_per_s * training_flops_per_token(cfg, seq_len) / peak_flops

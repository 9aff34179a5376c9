"""Conversion between our DecoderLM and HF `transformers` DeepseekV3ForCausalLM, both ways.

Config: `config_to_hf(model_cfg) -> DeepseekV3Config`, `config_from_hf(hf_cfg) -> dict` of
ModelConfig fields. Weights: `state_dict_to_hf` / `state_dict_from_hf` work on plain state
dicts in HF's in-memory layout (transformers >= 5 stacks routed experts as
`mlp.experts.gate_up_proj [E, 2I, H]` (gate rows first) and `mlp.experts.down_proj [E, H, I]`;
`save_pretrained` writes its own on-disk layout from that and `from_pretrained` reads it back).
Everything else is a rename: the matrices have the same orientation in both models.
"""

from __future__ import annotations

import re

import torch

from train.config import ModelConfig

# (ours, HF) name prefixes for everything except the stacked expert weights; {i} is the layer.
# Checked in order, so more specific prefixes come first.
_PREFIXES = [
    ("embed.", "model.embed_tokens."),
    ("norm.", "model.norm."),
    ("head.", "lm_head."),
    ("layers.{i}.attn_norm.", "model.layers.{i}.input_layernorm."),
    ("layers.{i}.mlp_norm.", "model.layers.{i}.post_attention_layernorm."),
    ("layers.{i}.attn.q_a_norm.", "model.layers.{i}.self_attn.q_a_layernorm."),
    ("layers.{i}.attn.kv_a_norm.", "model.layers.{i}.self_attn.kv_a_layernorm."),
    ("layers.{i}.attn.", "model.layers.{i}.self_attn."),
    ("layers.{i}.mlp.router.", "model.layers.{i}.mlp.gate."),
    ("layers.{i}.mlp.", "model.layers.{i}.mlp."),
]
_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(w_gate|w_up|w_down)$")
_HF_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _rename(name: str, to_hf: bool) -> str:
    for ours, hf in _PREFIXES:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        m = re.match(re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)"), name)
        if m:
            layer = m.groupdict().get("i")
            return dst.format(i=layer) + name[m.end():]
    side = "DecoderLM" if to_hf else "HF DeepseekV3"
    raise KeyError(f"unexpected {side} parameter name {name!r}")


def state_dict_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our DecoderLM state dict -> DeepseekV3ForCausalLM state dict (HF in-memory layout)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        m = _EXPERTS.match(name)
        if m:
            experts.setdefault(m.group(1), {})[m.group(2)] = tensor
        else:
            out[_rename(name, to_hf=True)] = tensor
    for layer, w in experts.items():
        prefix = f"model.layers.{layer}.mlp.experts."
        out[prefix + "gate_up_proj"] = torch.cat([w["w_gate"], w["w_up"]], dim=1)
        out[prefix + "down_proj"] = w["w_down"]
    return out


def state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepseekV3ForCausalLM state dict (HF in-memory layout) -> our DecoderLM state dict."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        m = _HF_EXPERTS.match(name)
        if m is None:
            out[_rename(name, to_hf=False)] = tensor
        elif m.group(2) == "gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)
            out[f"layers.{m.group(1)}.mlp.experts.w_gate"] = gate
            out[f"layers.{m.group(1)}.mlp.experts.w_up"] = up
        else:
            out[f"layers.{m.group(1)}.mlp.experts.w_down"] = tensor
    return out


def rope_parameters(cfg: ModelConfig) -> dict:
    if cfg.rope_factor <= 1.0:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
            "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow,
            "mscale": cfg.rope_mscale, "mscale_all_dim": cfg.rope_mscale_all_dim}


def config_to_hf(cfg: ModelConfig):
    """The DeepseekV3Config that describes the same network as `cfg`."""
    from transformers import DeepseekV3Config

    if cfg.n_shared_experts == 0:
        raise ValueError("model.n_shared_experts=0 has no DeepseekV3 equivalent (it always has "
                         "shared experts)")
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, n_shared_experts=cfg.n_shared_experts,
        n_routed_experts=cfg.n_routed_experts, routed_scaling_factor=cfg.routed_scaling_factor,
        kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank or None,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim, n_group=cfg.n_group, topk_group=cfg.topk_group,
        num_experts_per_tok=cfg.num_experts_per_tok, first_k_dense_replace=cfg.first_k_dense,
        norm_topk_prob=cfg.norm_topk_prob, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, initializer_range=cfg.init_std,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=rope_parameters(cfg), rope_interleave=True, attention_bias=False,
        attention_dropout=0.0, num_mtp_layers=0,
    )


def config_from_hf(hf_cfg) -> dict:
    """ModelConfig fields (a dict, for `ModelConfig(**d)` or `replace`) from a DeepseekV3Config."""
    for name, want in (("hidden_act", "silu"), ("attention_bias", False), ("rope_interleave", True)):
        if getattr(hf_cfg, name) != want:
            raise ValueError(f"HF config {name}={getattr(hf_cfg, name)!r} is not supported "
                             f"(need {want!r})")
    if hf_cfg.num_key_value_heads != hf_cfg.num_attention_heads:
        raise ValueError("HF config num_key_value_heads must equal num_attention_heads for MLA")
    rope = dict(hf_cfg.rope_parameters or {})
    out = dict(
        vocab_size=hf_cfg.vocab_size, hidden_size=hf_cfg.hidden_size,
        num_layers=hf_cfg.num_hidden_layers, first_k_dense=hf_cfg.first_k_dense_replace,
        intermediate_size=hf_cfg.intermediate_size, num_heads=hf_cfg.num_attention_heads,
        q_lora_rank=hf_cfg.q_lora_rank or 0, kv_lora_rank=hf_cfg.kv_lora_rank,
        qk_nope_head_dim=hf_cfg.qk_nope_head_dim, qk_rope_head_dim=hf_cfg.qk_rope_head_dim,
        v_head_dim=hf_cfg.v_head_dim, n_routed_experts=hf_cfg.n_routed_experts,
        n_shared_experts=hf_cfg.n_shared_experts, num_experts_per_tok=hf_cfg.num_experts_per_tok,
        moe_intermediate_size=hf_cfg.moe_intermediate_size, n_group=hf_cfg.n_group,
        topk_group=hf_cfg.topk_group, routed_scaling_factor=float(hf_cfg.routed_scaling_factor),
        norm_topk_prob=bool(hf_cfg.norm_topk_prob), rms_norm_eps=float(hf_cfg.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        max_position_embeddings=hf_cfg.max_position_embeddings,
        tie_word_embeddings=bool(hf_cfg.tie_word_embeddings),
        init_std=float(hf_cfg.initializer_range),
    )
    rope_type = rope.get("rope_type", "default")
    if rope_type == "yarn":
        out.update(
            rope_factor=float(rope["factor"]),
            rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            rope_beta_fast=float(rope.get("beta_fast") or 32.0),
            rope_beta_slow=float(rope.get("beta_slow") or 1.0),
            rope_mscale=float(rope.get("mscale") or 0.0),
            rope_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0))
        if rope.get("attention_factor") is not None or rope.get("truncate", True) is not True:
            raise ValueError("HF rope_parameters attention_factor / truncate=False are not supported")
    elif rope_type != "default":
        raise ValueError(f"HF rope_parameters rope_type={rope_type!r} is not supported "
                         "(default or yarn)")
    return out


def to_hf_model(lm):
    """A DeepseekV3ForCausalLM (float32, CPU) holding the weights of a whole DecoderLM."""
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM(config_to_hf(lm.cfg)).float()
    hf.load_state_dict(state_dict_to_hf({k: v.detach().cpu().float() if v.is_floating_point() else v
                                         for k, v in lm.state_dict().items()}), strict=True)
    return hf


def from_hf_model(hf, **overrides):
    """A DecoderLM with the weights of a DeepseekV3ForCausalLM; overrides set other fields
    (e.g. image_token_id) of the ModelConfig."""
    from train.model.lm import DecoderLM

    lm = DecoderLM(ModelConfig(**{**config_from_hf(hf.config), **overrides}))
    lm.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=True)
    return lm

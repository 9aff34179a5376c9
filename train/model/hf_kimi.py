"""Interop with `transformers`' Kimi-K2.5 (`Kimi_K25ForConditionalGeneration`), both ways.

Config: our `model` + `vision` sections <-> `Kimi_K25Config` (a deepseek_v3 text_config plus a
kimi_k25_vision vision_config). Weights: our `KimiK25` state dict <-> the HF module state dict
(the in-memory names; `save_pretrained` / `from_pretrained` handle HF's on-disk format). The
language model part reuses `hf_deepseek`; this file adds the vision tower and projector.
"""

from __future__ import annotations

import torch

from train.config import VisionConfig

Tensor = torch.Tensor

HF_TOWER = "model.vision_tower."
HF_PROJECTOR = "model.mm_projector."

# Per encoder block: our name -> HF name (both relative to the block).
_BLOCK_NAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.q_proj": "attn.q_proj",
    "attn.k_proj": "attn.k_proj",
    "attn.v_proj": "attn.v_proj",
    "attn.o_proj": "attn.proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def vision_config_to_hf(v: VisionConfig) -> dict:
    """Our vision section -> kwargs of `Kimi_K25VisionConfig` plus the projector fields of
    `Kimi_K25Config`. Raises ValueError naming the field HF cannot represent."""
    if v.in_channels != 3:
        raise ValueError(f"vision.in_channels={v.in_channels}: HF Kimi-K2.5 supports only 3")
    if v.pos_emb_height != v.pos_emb_width:
        raise ValueError(f"vision.pos_emb_height={v.pos_emb_height} != vision.pos_emb_width="
                         f"{v.pos_emb_width}: HF Kimi-K2.5 resamples a square position grid only")
    merged = v.hidden_size * v.merge_size**2
    if v.projector_hidden_size not in (0, merged):
        raise ValueError(f"vision.projector_hidden_size={v.projector_hidden_size}: HF Kimi-K2.5 "
                         f"needs 0 or the merged width {merged}")
    if v.layer_norm_eps != 1e-5:
        raise ValueError(f"vision.layer_norm_eps={v.layer_norm_eps}: HF Kimi-K2.5 fixes it at 1e-5")
    vision = dict(
        patch_size=v.patch_size, pos_emb_height=v.pos_emb_height, pos_emb_width=v.pos_emb_width,
        pos_emb_time=v.pos_emb_time, num_attention_heads=v.num_heads, num_hidden_layers=v.num_layers,
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        hidden_act="gelu_pytorch_tanh", merge_kernel_size=[v.merge_size, v.merge_size],
        rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
    )
    projector = dict(projection_hidden_size=v.hidden_size, projection_layer_norm_eps=v.projector_ln_eps)
    return {"vision_config": vision, **projector}


def vision_config_from_hf(hf_config) -> dict:
    """`Kimi_K25Config` -> field values of our VisionConfig (frames_per_chunk = pos_emb_time)."""
    hv = hf_config.vision_config
    kh, kw = hv.merge_kernel_size
    if kh != kw:
        raise ValueError(f"vision_config.merge_kernel_size={hv.merge_kernel_size}: only square merges")
    if hv.hidden_act != "gelu_pytorch_tanh":
        raise ValueError(f"vision_config.hidden_act={hv.hidden_act!r}: only gelu_pytorch_tanh")
    if hf_config.projection_hidden_size != hv.hidden_size:
        raise ValueError(f"projection_hidden_size={hf_config.projection_hidden_size} must equal "
                         f"vision_config.hidden_size={hv.hidden_size}")
    return dict(
        enabled=True, patch_size=hv.patch_size, hidden_size=hv.hidden_size,
        num_layers=hv.num_hidden_layers, num_heads=hv.num_attention_heads,
        intermediate_size=hv.intermediate_size, in_channels=3, pos_emb_height=hv.pos_emb_height,
        pos_emb_width=hv.pos_emb_width, pos_emb_time=hv.pos_emb_time, merge_size=kh,
        frames_per_chunk=hv.pos_emb_time, projector_hidden_size=0,
        rope_theta=float(hv.rope_parameters["rope_theta"]), layer_norm_eps=1e-5,
        projector_ln_eps=hf_config.projection_layer_norm_eps,
    )


# --------------------------------------------------------------------------------------------
# Weights: vision tower + projector
# --------------------------------------------------------------------------------------------


def _vision_name_pairs(num_layers: int) -> list[tuple[str, str]]:
    """(our name in VisionTower, HF name in Kimi_K25ForConditionalGeneration) for every tensor
    except the patch embedding, whose shape differs (Linear vs Conv2d)."""
    pairs = [("pos_grid", HF_TOWER + "patch_embed.pos_emb.position_embeddings")]
    for i in range(num_layers):
        for ours, theirs in _BLOCK_NAMES.items():
            for leaf in ("weight", "bias"):
                pairs.append((f"blocks.{i}.{ours}.{leaf}", f"{HF_TOWER}layers.{i}.{theirs}.{leaf}"))
    for ours, theirs in (("final_norm", HF_TOWER + "final_layernorm"),
                         ("projector.pre_norm", HF_PROJECTOR + "pre_norm"),
                         ("projector.in_proj", HF_PROJECTOR + "in_proj"),
                         ("projector.out_proj", HF_PROJECTOR + "out_proj")):
        for leaf in ("weight", "bias"):
            pairs.append((f"{ours}.{leaf}", f"{theirs}.{leaf}"))
    return pairs


def vision_state_from_hf(hf_state: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """HF state dict (full model names) -> VisionTower state dict."""
    out = {ours: hf_state[theirs] for ours, theirs in _vision_name_pairs(num_layers)}
    conv_w = hf_state[HF_TOWER + "patch_embed.proj.weight"]  # [D, C, p, p]
    out["patch_embed.weight"] = conv_w.reshape(conv_w.shape[0], -1)  # (C, p, p) = patch row order
    out["patch_embed.bias"] = hf_state[HF_TOWER + "patch_embed.proj.bias"]
    return out


def vision_state_to_hf(state: dict[str, Tensor], num_layers: int, patch_size: int) -> dict[str, Tensor]:
    """VisionTower state dict -> HF state dict entries (full model names)."""
    out = {theirs: state[ours] for ours, theirs in _vision_name_pairs(num_layers)}
    w = state["patch_embed.weight"]
    out[HF_TOWER + "patch_embed.proj.weight"] = w.reshape(w.shape[0], -1, patch_size, patch_size)
    out[HF_TOWER + "patch_embed.proj.bias"] = state["patch_embed.bias"]
    return out

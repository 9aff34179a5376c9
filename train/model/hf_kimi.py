"""Interop with `transformers`' Kimi-K2.5 (`Kimi_K25ForConditionalGeneration`), both ways.

Config: our `model` + `vision` sections <-> `Kimi_K25Config` (a deepseek_v3 text_config plus a
kimi_k25_vision vision_config). Weights: our `KimiK25` state dict <-> the HF module state dict
(the in-memory names; `save_pretrained` / `from_pretrained` handle HF's on-disk format). The
language model part reuses `hf_deepseek`; this file adds the vision tower and projector.
"""

from __future__ import annotations

import torch

from train.config import Config, VisionConfig, from_dict
from train.model import hf_deepseek

Tensor = torch.Tensor

HF_LM = "model.language_model."  # DeepseekV3ForCausalLM's "model." inside Kimi-K2.5
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
    pairs = _vision_name_pairs(num_layers)
    known = {theirs for _, theirs in pairs} | {HF_TOWER + "patch_embed.proj.weight",
                                                HF_TOWER + "patch_embed.proj.bias"}
    extra = sorted(k for k in hf_state if k.startswith((HF_TOWER, HF_PROJECTOR)) and k not in known)
    if extra:
        raise KeyError(f"unexpected HF vision tensors (vision.num_layers={num_layers}?): {extra[:3]}")
    out = {ours: hf_state[theirs] for ours, theirs in pairs}
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


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------


def config_to_hf(cfg: Config):
    """The `Kimi_K25Config` describing the same network as cfg's model + vision sections."""
    from transformers import Kimi_K25Config

    if not cfg.vision.enabled:
        raise ValueError("vision.enabled=false: a text-only model maps to DeepseekV3 "
                         "(train.model.hf_deepseek), not Kimi-K2.5")
    text = hf_deepseek.config_to_hf(cfg.model).to_dict()
    return Kimi_K25Config(
        text_config=text, **vision_config_to_hf(cfg.vision),
        image_token_id=cfg.model.image_token_id, video_token_id=cfg.model.video_token_id,
        tie_word_embeddings=cfg.model.tie_word_embeddings,
    )


def config_from_hf(hf_config, base: Config | None = None) -> Config:
    """A validated Config whose model + vision sections describe `hf_config` (a Kimi_K25Config);
    the other sections come from `base` (defaults when None)."""
    model = hf_deepseek.config_from_hf(hf_config.text_config)
    model.update(image_token_id=hf_config.image_token_id, video_token_id=hf_config.video_token_id,
                 tie_word_embeddings=bool(hf_config.tie_word_embeddings))
    raw = (base or Config()).to_dict()
    raw["model"].update(model)
    raw["vision"].update(vision_config_from_hf(hf_config))
    return from_dict(raw)


def state_dict_to_hf(state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    """Our KimiK25 state dict -> Kimi_K25ForConditionalGeneration state dict (in-memory names)."""
    lm = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
    vision = {k[len("vision."):]: v for k, v in state.items() if k.startswith("vision.")}
    unknown = set(state) - {"lm." + k for k in lm} - {"vision." + k for k in vision}
    if unknown:
        raise KeyError(f"unexpected KimiK25 parameter names {sorted(unknown)[:3]}")
    out = {}
    for name, tensor in hf_deepseek.state_dict_to_hf(lm).items():
        out[HF_LM + name[len("model."):] if name.startswith("model.") else name] = tensor
    out.update(vision_state_to_hf(vision, cfg.vision.num_layers, cfg.vision.patch_size))
    return out


def state_dict_from_hf(hf_state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    """Kimi_K25ForConditionalGeneration state dict -> our KimiK25 state dict."""
    text = {}
    for name, tensor in hf_state.items():
        if name.startswith(HF_LM):
            text["model." + name[len(HF_LM):]] = tensor
        elif name.startswith("lm_head."):
            text[name] = tensor
        elif not name.startswith((HF_TOWER, HF_PROJECTOR)):
            raise KeyError(f"unexpected Kimi-K2.5 parameter name {name!r}")
    out = {"lm." + k: v for k, v in hf_deepseek.state_dict_from_hf(text).items()}
    vision = vision_state_from_hf(hf_state, cfg.vision.num_layers)
    out.update({"vision." + k: v for k, v in vision.items()})
    return out

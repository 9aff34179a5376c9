"""Parity with HF transformers DeepseekV3ForCausalLM: config mapping, YaRN rope, logits, and the
save_pretrained / from_pretrained round trip of converted weights."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the `hf` extra

from safetensors import safe_open  # noqa: E402
from transformers import DeepseekV3ForCausalLM  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from train.config import ModelConfig  # noqa: E402
from train.model import build_lm  # noqa: E402
from train.model.hf_deepseek import (config_from_hf, config_to_hf, from_hf_model,  # noqa: E402
                                     state_dict_from_hf, to_hf_model)
from train.model.rope import inv_freq_and_attention_factor, softmax_scale  # noqa: E402

BASE = dict(vocab_size=320, hidden_size=64, num_layers=3, first_k_dense=1, intermediate_size=112,
            num_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=3, moe_intermediate_size=40, n_group=1, topk_group=1,
            routed_scaling_factor=2.5, max_position_embeddings=512, image_token_id=318,
            video_token_id=319)
YARN = dict(rope_factor=4.0, rope_original_max_position_embeddings=64, rope_beta_fast=32.0,
            rope_beta_slow=1.0, rope_mscale=1.0, rope_mscale_all_dim=0.8,
            max_position_embeddings=256)
CASES = {
    "q_lora": {},
    "q_lora_yarn": YARN,
    "full_rank_q_grouped_routing": dict(q_lora_rank=0, n_group=4, topk_group=2,
                                        norm_topk_prob=False, n_shared_experts=2),
}


def random_hf_model(cfg: ModelConfig, seed: int) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(config_to_hf(cfg)).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # perturb everything, norms and router bias included
        for name, t in list(hf.named_parameters()) + list(hf.named_buffers()):
            if "norm" in name:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.05 * torch.randn(t.shape, generator=gen))
            elif t.is_floating_point() and t.dim() >= 2:
                t.copy_(0.05 * torch.randn(t.shape, generator=gen))
    return hf


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case):
    cfg = ModelConfig(**{**BASE, **CASES[case]})
    hf = random_hf_model(cfg, seed=1)
    ours = build_lm(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=True)
    ids = torch.randint(5, 318, (2, 96), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(96).expand(2, 96)
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos).logits
        got = ours(ids, position_ids=pos, doc_ids=torch.zeros_like(ids))
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"max relative difference {rel:.2e}"
    # Guard against a vacuous pass: a small weight change is visible at this tolerance.
    with torch.no_grad():
        ours.layers["2"].mlp.experts.w_down.mul_(1.01)
        moved = ours(ids, position_ids=pos, doc_ids=torch.zeros_like(ids))
    assert ((moved - ref).abs().max() / ref.abs().max()).item() > 1e-4


def test_save_pretrained_round_trip(tmp_path):
    cfg = ModelConfig(**{**BASE, **YARN})
    ours = build_lm(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in list(ours.parameters()) + list(ours.buffers()):
            t.copy_(torch.randn(t.shape, generator=gen))
    ours_state = ours.state_dict()
    to_hf_model(ours).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:  # the on-disk expert layout
        assert "model.layers.1.mlp.experts.7.gate_proj.weight" in set(f.keys())
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    back = state_dict_from_hf(reloaded.state_dict())
    assert sorted(back) == sorted(ours_state)
    for name, t in ours_state.items():
        assert torch.equal(back[name], t), name
    assert config_from_hf(reloaded.config) == {k: getattr(cfg, k) for k in config_from_hf(reloaded.config)}
    again = from_hf_model(reloaded, image_token_id=318, video_token_id=319)
    assert all(torch.equal(again.state_dict()[k], t) for k, t in ours_state.items())


@pytest.mark.parametrize("rope", [{}, YARN, dict(YARN, rope_mscale=0.0, rope_mscale_all_dim=0.0),
                                  dict(YARN, rope_factor=40.0, rope_beta_fast=16.0,
                                       max_position_embeddings=2560)])
def test_rope_and_softmax_scale_match_hf(rope):
    cfg = ModelConfig(**{**BASE, **rope})
    hf_cfg = config_to_hf(cfg)
    kind = hf_cfg.rope_parameters["rope_type"]
    if kind == "default":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
        ref_inv, ref_factor = DeepseekV3RotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        ref_inv, ref_factor = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu")
    inv, factor = inv_freq_and_attention_factor(cfg)
    assert torch.equal(inv, ref_inv.float())
    assert factor == pytest.approx(ref_factor, rel=1e-12)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention
    assert softmax_scale(cfg) == pytest.approx(DeepseekV3Attention(hf_cfg, 0).scaling, rel=1e-12)
    if rope:
        assert inv[0] == ref_inv[0] and not torch.equal(inv, inv_freq_and_attention_factor(
            ModelConfig(**BASE))[0])  # YaRN really changed the low frequencies


def test_config_mapping_round_trip_and_errors():
    for case in CASES.values():
        cfg = ModelConfig(**{**BASE, **case})
        back = config_from_hf(config_to_hf(cfg))
        assert back == {k: getattr(cfg, k) for k in back}
    hf_cfg = config_to_hf(ModelConfig(**BASE))
    hf_cfg.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf(hf_cfg)
    with pytest.raises(KeyError, match="unexpected"):
        state_dict_from_hf({"model.layers.0.mystery.weight": torch.zeros(1)})

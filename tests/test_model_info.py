"""Parameter counts (mmpt model-info) and the FLOPs formula used for MFU."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from train.config import load_config
from train.model import build_lm, init_weights
from train.model.flops import activated_matmul_params, attention_flops_per_token
from train.model.info import count_text, main
from train.model.moe import GroupedExperts


def meta_counts(path: str, *overrides: str):
    cfg = load_config(path, list(overrides))
    with torch.device("meta"):
        return count_text(build_lm(cfg.model))


def test_k25_counts_match_the_published_figures():
    c = meta_counts("configs/k2.5.toml")
    assert abs(c.total / 1.04e12 - 1) < 0.02, c.total
    assert abs(c.activated / 32e9 - 1) < 0.02, c.activated
    assert c.activated_with_embedding_table - c.activated == c.embedding - 7168


def test_deepseek_v3_dimensions_give_671b_and_37b():
    """The same counting rule on DeepSeek-V3's published dimensions (an independent check)."""
    c = meta_counts("configs/k2.5.toml", "--model.num_heads=128", "--model.first_k_dense=3",
                    "--model.n_routed_experts=256", "--model.vocab_size=129280",
                    "--model.n_group=8", "--model.topk_group=4", "--model.image_token_id=0",
                    "--model.video_token_id=0")
    assert abs(c.total / 671e9 - 1) < 0.005, c.total
    assert abs(c.activated / 37e9 - 1) < 0.02, c.activated


def test_model_info_cli_prints_table_and_json(capsys):
    assert main(["--config", "configs/k2.5.toml"]) == 0
    out = capsys.readouterr().out
    assert "text activated per token" in out and "1.03T" in out and "31.7B" in out
    assert main(["--config", "configs/tiny.toml", "--json", "--model.num_layers=2"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = load_config("configs/tiny.toml", ["--model.num_layers=2"])
    assert info["text"]["total"] == sum(p.numel() for p in build_lm(cfg.model).parameters())
    assert info["vision_encoder"] > 0 and info["train_flops_per_token"] > 6 * info["text"]["activated_matmul"]


def test_flops_formula_matches_counted_flops():
    """torch's FLOP counter over a real forward+backward: matmuls are exactly 6 * activated
    matmul weights per token; attention (counted over the full S x S square) is twice our
    causal estimate."""
    cfg = load_config("configs/tiny.toml").model
    model = build_lm(cfg)
    init_weights(model, 0)
    for m in model.modules():  # the FLOP counter has no formula for torch._grouped_mm
        if isinstance(m, GroupedExperts):
            m.use_grouped_mm = False
    batch, seq = 2, 32
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(ids, position_ids=torch.arange(seq).expand(batch, seq),
              doc_ids=torch.zeros(batch, seq, dtype=torch.long)).sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    tokens = batch * seq
    assert counts["aten.mm"] == 6 * activated_matmul_params(cfg) * tokens
    assert counts["aten.bmm"] == pytest.approx(2 * attention_flops_per_token(cfg, seq) * tokens)

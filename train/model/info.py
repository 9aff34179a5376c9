"""`mmpt model-info`: parameter counts of a config, built on the meta device (no memory).

Activated text parameters = what one token's forward touches: everything except the routed
experts and the embedding table, plus top_k / n_routed_experts of the routed experts and ONE
embedding row (a lookup reads a row, not the table). This reproduces the published figures:
K2 ~32B of ~1.04T, DeepSeek-V3 ~37B of 671B. The count with the whole table is shown too.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from train.config import load_config
from train.model.flops import activated_matmul_params, training_flops_per_token
from train.model.lm import DecoderLM
from train.model.moe import GroupedExperts


@dataclass
class TextCounts:
    total: int
    routed_experts: int
    activated: int
    activated_with_embedding_table: int
    embedding: int
    activated_matmul: int  # what the FLOPs formula uses (no embedding, no norms)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_text(lm: DecoderLM) -> TextCounts:
    cfg = lm.cfg
    total = _numel(lm)
    routed = sum(_numel(m) for m in lm.modules() if isinstance(m, GroupedExperts))
    active_routed = routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    embedding = lm.embed.weight.numel() if lm.embed is not None else 0
    with_table = total - routed + active_routed
    one_row = cfg.hidden_size if lm.embed is not None else 0
    return TextCounts(total=total, routed_experts=routed,
                      activated=with_table - embedding + one_row,
                      activated_with_embedding_table=with_table, embedding=embedding,
                      activated_matmul=activated_matmul_params(cfg))


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmpt model-info", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="TOML config file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)

    from train.model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    text = count_text(model.lm)
    vision = _numel(model.vision) if model.vision is not None else 0
    projector = _numel(model.vision.projector) if model.vision is not None else 0
    flops = training_flops_per_token(cfg.model, cfg.data.seq_len)
    result = {"config": args.config, "text": asdict(text), "vision_encoder": vision - projector,
              "vision_projector": projector, "total": text.total + vision,
              "train_flops_per_token": flops, "seq_len": cfg.data.seq_len}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [
        ("text total", text.total),
        ("  routed experts", text.routed_experts),
        ("  embedding", text.embedding),
        ("text activated per token", text.activated),
        ("  with the embedding table", text.activated_with_embedding_table),
        ("  matmul weights (FLOPs)", text.activated_matmul),
        ("vision encoder", vision - projector),
        ("vision projector", projector),
        ("model total", text.total + vision),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{args.config}")
    for name, n in rows:
        print(f"  {name:<{width}}  {_human(n):>8}  {n:>16,}")
    print(f"  {'train FLOPs / token':<{width}}  {_human(flops):>8}  (seq_len {cfg.data.seq_len})")
    return 0

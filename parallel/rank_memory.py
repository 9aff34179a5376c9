"""`mmpt rank-memory`: what one rank holds at a config's layout, counted from its meta-device
pieces (parallel/pieces.py) and ZeRO-1's ownership plan (parallel/zero.py), without allocating.

Per rank: parameters (its pipeline chunks, its EP slice of the experts, the DEP encoder); their
weights in `train.dtype` plus the float32 router biases; the fp32 gradients accumulated over the
step's micro-batches (parallel/main_grad.py); on the owner of each piece only, its fp32 master and
optimizer state (Muon: momentum; AdamW: two moments and a step count); the fp32 buffers the
gradient reduce-to-owner fills (the owned pieces' reduced gradients, kept for the optimizer, and
the largest bucket sent to another owner, freed after its reduce). The states' peak is during
that reduce; the main gradients are freed before the optimizer steps. Activations come on top.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from parallel.expert import is_expert_param
from parallel.pieces import RankCoords, build_rank_pieces
from parallel.plan_costs import memoise_by_repr
from parallel.zero import plan_ownership
from train.config import Config, load_config
from train.optim.muon import uses_muon

FP32 = 4


@dataclass
class RankMemory:
    rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    layers: list[int]
    parameters: int
    expert_parameters: int
    encoder_parameters: int
    weights_bytes: int  # parameters in train.dtype + float32 buffers
    main_grad_bytes: int  # fp32 gradients accumulated over the micro-batches
    master_bytes: int  # fp32 masters of the pieces this rank owns
    optimizer_state_bytes: int  # of the pieces this rank owns
    owned_grad_bytes: int  # reduced fp32 gradients of owned pieces (groups of more than 1 rank)
    transient_reduce_bytes: int  # largest fp32 bucket reduced to another owner

    @property
    def peak_state_bytes(self) -> int:
        return (self.weights_bytes + self.main_grad_bytes + self.master_bytes
                + self.optimizer_state_bytes + self.owned_grad_bytes
                + self.transient_reduce_bytes)


def rank_memory(cfg: Config, rank: int) -> RankMemory:
    """What global rank `rank` holds at cfg's layout (see the module docstring)."""
    p = cfg.parallel
    coords = RankCoords.of_rank(cfg, rank)
    pieces = build_rank_pieces(cfg, coords)
    chunks = [(n, q) for _, m in pieces.stages for n, q in m.named_parameters()]
    encoder = ([(f"vision.{n}", q) for n, q in pieces.encoder.named_parameters()]
               if pieces.encoder is not None else [])
    # The shard groups of parallel/runtime.py: (params, group size, my index, split dim 0?)
    groups = [([(n, q) for n, q in chunks if not is_expert_param(n)], p.dp, coords.dp_rank, False),
              ([(n, q) for n, q in chunks if is_expert_param(n)], p.dp // p.ep, coords.edp_rank,
               True)]
    if encoder:
        groups.append((encoder, p.pp * p.dp, rank, False))
    weight_size = torch.empty(0, dtype=getattr(torch, cfg.train.dtype)).element_size()
    all_params = chunks + encoder
    n_params = sum(q.numel() for _, q in all_params)
    masters = state = owned_grads = transient = 0
    for params, size, me, split in groups:
        shapes = dict(params)
        buckets: dict[int, int] = {}
        for name, a, b, owner in plan_ownership(params, size, lambda n: split):
            piece = shapes[name][a:b] if split else shapes[name]
            numel = piece.numel()
            buckets[owner] = buckets.get(owner, 0) + numel
            if owner != me:
                continue
            masters += FP32 * numel
            state += FP32 * numel if uses_muon(name, piece) else 2 * FP32 * numel + FP32
        if size > 1:
            owned_grads += FP32 * buckets.get(me, 0)
            transient = max([transient] + [FP32 * n for o, n in buckets.items() if o != me])
    buffers = sum(b.numel() * b.element_size() for _, b in pieces.named_buffers())
    return RankMemory(
        rank=rank, pp_rank=coords.pp_rank, dp_rank=coords.dp_rank, ep_rank=coords.ep_rank,
        layers=[int(k) for _, m in pieces.stages for k in m.lm.layers],
        parameters=n_params,
        expert_parameters=sum(q.numel() for n, q in chunks if is_expert_param(n)),
        encoder_parameters=sum(q.numel() for _, q in encoder),
        weights_bytes=weight_size * n_params + buffers, main_grad_bytes=FP32 * n_params,
        master_bytes=masters, optimizer_state_bytes=state, owned_grad_bytes=owned_grads,
        transient_reduce_bytes=transient)


ROWS = (("parameters", "parameters", False),
        ("  of them routed experts", "expert_parameters", False),
        ("  of them the DEP encoder", "encoder_parameters", False),
        ("weights (train.dtype) + router biases", "weights_bytes", True),
        ("fp32 main gradients", "main_grad_bytes", True),
        ("fp32 masters (owned pieces)", "master_bytes", True),
        ("optimizer state (owned pieces)", "optimizer_state_bytes", True),
        ("reduced fp32 grads (owned pieces)", "owned_grad_bytes", True),
        ("largest transient reduce bucket", "transient_reduce_bytes", True),
        ("peak of the states (at the reduce)", "peak_state_bytes", True))


@memoise_by_repr
def rank_memory_of(cfg: Config, rank: int) -> RankMemory:
    """rank_memory, once per config and rank (the planner asks for the same ranks often)."""
    return rank_memory(cfg, rank)


def table(cfg: Config, mems: list[RankMemory]) -> str:
    p = cfg.parallel
    head = ["", *(f"rank {m.rank} (pp {m.pp_rank}, dp {m.dp_rank})" for m in mems)]
    lines = [f"layout PP{p.pp} x V{p.virtual_stages} x DP{p.dp}, EP{p.ep}, "
             f"DEP {'on' if p.dep else 'off'}, train.dtype {cfg.train.dtype}",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| layers | " + " | ".join(",".join(map(str, m.layers)) for m in mems) + " |"]
    for label, field, is_bytes in ROWS:
        vals = [getattr(m, field) for m in mems]
        cells = [f"{v / 1e9:.2f} GB" if is_bytes else f"{v / 1e9:.3f}B" for v in vals]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmpt rank-memory", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="TOML config file")
    parser.add_argument("--rank", type=int, action="append",
                        help="global rank (repeatable; default: data-parallel rank 0 at the "
                             "first, a middle and the last pipeline position)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    p = cfg.parallel
    world = p.pp * p.dp
    bad = [r for r in args.rank or [] if not 0 <= r < world]
    if bad:
        parser.error(f"--rank {bad[0]} is outside the world of parallel.pp * parallel.dp = "
                     f"{p.pp} * {p.dp} = {world} ranks")
    ranks = args.rank or sorted({0, (p.pp // 2 - 1) * p.dp if p.pp > 1 else 0, (p.pp - 1) * p.dp})
    mems = [rank_memory(cfg, r) for r in ranks]
    if args.json:
        print(json.dumps([asdict(m) | {"peak_state_bytes": m.peak_state_bytes} for m in mems],
                         indent=2))
    else:
        print(table(cfg, mems))
    return 0

"""Activation memory of one K2.5 MoE decoder layer per setting, and what a k2.5 rank holds.

    .venv/bin/python bench/activation_memory.py                 # full width, CPU, bf16
    .venv/bin/python bench/activation_memory.py --tokens 256 512 --out bench/results/x.json

Saved-activation bytes are measured, not modelled: the layer (train/model, at the width of
configs/k2.5.toml, with the 384 / EP16 = 24 experts one rank holds, top-8 routing among them)
runs one forward with its parameters requiring grad, and every tensor autograd saves passes
through a counting store (`apply_activation_memory(..., store=...)`); storages are counted once,
parameters not at all. Offload moves bytes to the host: the table gives device and host bytes.
Two attention cores are measured. "sdpa" is the CPU path as it runs: it saves float32 copies
of the scaled q, k and of v, and the float32 attention probabilities (heads x seq_len x 4 bytes
per token); two sequence lengths separate that seq-dependent part from the per-token part.
"flash" swaps in a core that saves what FlashAttention / flex attention keep on a GPU (q, k, v,
the output and the float32 log-sum-exp) and recomputes the rest in backward; everything else is
the same layer. The flash rows are what a GPU rank keeps.

The rank's states follow the recipe at the shipped layout (PP16 x V2, DP16, EP16, so the
expert-data-parallel size is 1): bf16 weights + a float32 gradient-accumulation buffer for
every parameter a rank holds; float32 master weights and optimizer state (Muon momentum for
matrices, AdamW moments for embedding, head and 1-D parameters) on the ZeRO-1 owner only
(sharded over DP for dense parameters, over DP / EP for experts, over the world for the DEP
vision encoder, which every rank holds). Prints a table and writes JSON
(bench/results/activation_memory.json unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel.pipeline import chunk_layer_keys, layer_counts  # noqa: E402
from train.config import Config, load_config  # noqa: E402
from train.model.activation_probe import moe_layer_config, per_token_table  # noqa: E402
from train.model.lm import DecoderLM  # noqa: E402
from train.model.vision import VisionTower  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# What one rank holds in states (the recipe's precision layout)
# --------------------------------------------------------------------------------------------


def rank_state_bytes(cfg: Config) -> dict:
    """Parameters and state bytes of every pipeline rank (one DP/EP position; all are alike),
    counted from the meta-device model; the heaviest rank is reported."""
    p = cfg.parallel
    with torch.device("meta"):
        lm = DecoderLM(cfg.model)
        vision = VisionTower(cfg.vision, cfg.model.hidden_size) if cfg.vision.enabled else None
    n_chunks = p.pp * p.virtual_stages
    keys = chunk_layer_keys(cfg.model.num_layers, layer_counts(cfg.model.num_layers, n_chunks))
    edp = p.dp // p.ep
    world = p.pp * p.dp

    def role(name: str, param: torch.Tensor) -> str:
        if ".experts." in f".{name}":
            return "expert"
        if name.startswith(("embed.", "head.")) or param.dim() < 2:
            return "adamw"
        return "muon"

    ranks = []
    for pp_rank in range(p.pp):
        stages = list(range(pp_rank, n_chunks, p.pp))
        layer_keys = {k for s in stages for k in keys[s]}
        count = {"expert": 0, "muon": 0, "adamw": 0}
        for name, param in lm.named_parameters():
            parts = name.split(".")
            if parts[0] == "layers" and parts[1] not in layer_keys:
                continue
            if parts[0] == "embed" and 0 not in stages:
                continue
            if parts[0] in ("norm", "head") and n_chunks - 1 not in stages:
                continue
            r = role(name, param)
            count[r] += param.numel() // (p.ep if r == "expert" else 1)
        vision_params = sum(q.numel() for q in vision.parameters()) if vision is not None else 0
        local = count["expert"] + count["muon"] + count["adamw"] + vision_params
        weights_and_accum = local * (2 + 4)  # bf16 weights + float32 gradient accumulation
        owner = (count["expert"] * (4 + 4) / edp + count["muon"] * (4 + 4) / p.dp
                 + count["adamw"] * (4 + 8) / p.dp + vision_params * (4 + 8) / world)
        ranks.append({"pp_rank": pp_rank, "layers": sorted(layer_keys, key=int),
                      "params": local, "expert_params": count["expert"],
                      "vision_params": vision_params,
                      "bf16_weights_fp32_grad_accum_bytes": weights_and_accum,
                      "zero1_master_and_optimizer_bytes": owner,
                      "state_bytes": weights_and_accum + owner})
    heaviest = max(ranks, key=lambda r: r["state_bytes"])
    return {"layout": {"pp": p.pp, "virtual_stages": p.virtual_stages, "dp": p.dp, "ep": p.ep,
                       "expert_dp": edp, "world": world},
            "heaviest_rank": heaviest, "ranks": ranks}


def rank_fit(cfg: Config, tables: dict[str, dict], states: dict, hbm_gib: float = 80e9 / 2 ** 30,
             host_gib: float = 2e12 / 8 / 2 ** 30, attention: str = "flash") -> dict:
    """Peak saved activations of the heaviest rank per setting at the shipped schedule, next to
    its states (HBM: 80 GB; host: 2 TB per node of 8 GPUs). Interleaved 1F1B runs
    (V - 1) * PP + 2 * (PP - 1 - r) warm-up forwards on pipeline rank r before its first
    backward (torch's schedule), so that many chunk forwards, plus the one of the first steady
    step, are alive at once. With offload the device still holds one layer's saved tensors of
    one micro-batch while that layer runs (they are released when its forward ends and the
    copies are done); with full recomputation, one layer's whole set while it is recomputed."""
    p = cfg.parallel
    heavy = states["heaviest_rank"]
    r = heavy["pp_rank"]
    in_flight = min((p.virtual_stages - 1) * p.pp + 2 * (p.pp - 1 - r) + 1,
                    p.microbatches * p.virtual_stages)
    layers_per_chunk = len(heavy["layers"]) / p.virtual_stages
    mb_sequences = cfg.data.global_batch_size // (p.dp * p.microbatches)
    gib = 2 ** 30
    states_gib = heavy["state_bytes"] / gib
    out = {"attention": attention, "pp_rank": r, "chunk_forwards_in_flight": in_flight,
           "layers_per_chunk": layers_per_chunk, "sequences_per_microbatch": mb_sequences,
           "states_gib": states_gib, "hbm_gib": hbm_gib, "host_gib_per_gpu": host_gib,
           "settings": {}}
    seq = cfg.data.seq_len
    for name, e in tables[attention].items():
        dev_seq, host_seq = ((e[f"{k}_per_token"] + e[f"{k}_per_token_per_seq"] * seq) * seq / gib
                             for k in ("device_bytes", "host_bytes"))
        alive = in_flight * layers_per_chunk  # layer-forwards whose saved tensors are alive
        # One layer's whole saved set is on the device while it runs: the forward under
        # offload (host_seq > 0 only then), the recomputed forward in backward under "full".
        transient = host_seq
        if name.startswith("full"):
            none = tables[attention]["none"]
            transient = (none["device_bytes_per_token"]
                         + none["device_bytes_per_token_per_seq"] * seq) * seq / gib
        dev_per_seq = dev_seq * alive + transient  # per sequence of the micro-batch
        host_per_seq = host_seq * alive
        dev = dev_per_seq * mb_sequences
        host = host_per_seq * mb_sequences
        fit_dev = int((hbm_gib - states_gib) // dev_per_seq)
        fit_host = int(host_gib // host_per_seq) if host_per_seq > 0 else None
        out["settings"][name] = {
            "device_activation_gib": dev, "host_activation_gib": host,
            "device_total_gib": states_gib + dev,
            "fits": states_gib + dev <= hbm_gib and host <= host_gib,
            "max_sequences_per_microbatch": fit_dev if fit_host is None else min(fit_dev, fit_host)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/k2.5.toml"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--attention", nargs="+", default=["sdpa", "flash"], choices=["sdpa", "flash"])
    ap.add_argument("--out", default=str(ROOT / "bench/results/activation_memory.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(args.config)
    local_experts = cfg.model.n_routed_experts // cfg.parallel.ep
    layer_cfg = moe_layer_config(cfg.model, local_experts)
    dtype = getattr(torch, args.dtype)
    tables = {kind: per_token_table(layer_cfg, args.tokens, dtype, attention=kind)
              for kind in args.attention}
    states = rank_state_bytes(cfg)
    seq = cfg.data.seq_len
    heavy = states["heaviest_rank"]
    gib = 2 ** 30
    print(f"one MoE layer, hidden {layer_cfg.hidden_size}, {local_experts} local experts, "
          f"top-{layer_cfg.num_experts_per_tok}, {args.dtype}, tokens {args.tokens}")
    print(f"{'attention':9s} {'setting':24s} {'device B/tok':>13s} {'+ per seq pos':>13s} "
          f"{'host B/tok':>11s} {'GiB/layer/seq':>14s}")
    for kind, table in tables.items():
        for name, e in table.items():
            per_seq = (e["device_bytes_per_token"]
                       + e["device_bytes_per_token_per_seq"] * seq) * seq
            e["device_gib_per_layer_per_sequence"] = per_seq / gib
            print(f"{kind:9s} {name:24s} {e['device_bytes_per_token']:13.0f} "
                  f"{e['device_bytes_per_token_per_seq']:13.1f} {e['host_bytes_per_token']:11.0f} "
                  f"{per_seq / gib:14.2f}")
    print(f"heaviest rank (pp_rank {heavy['pp_rank']}, layers {heavy['layers']}): "
          f"{heavy['params'] / 1e9:.2f}B params ({heavy['expert_params'] / 1e9:.2f}B expert), "
          f"states {heavy['state_bytes'] / gib:.1f} GiB")
    config = Path(args.config).resolve()
    out = {"config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
           "device": "cpu", "device_name": platform.machine(), "dtype": args.dtype,
           "torch": torch.__version__, "tokens": args.tokens, "seq_len": seq,
           "layer": {"hidden_size": layer_cfg.hidden_size, "num_heads": layer_cfg.num_heads,
                     "q_lora_rank": layer_cfg.q_lora_rank, "kv_lora_rank": layer_cfg.kv_lora_rank,
                     "local_experts": local_experts, "top_k": layer_cfg.num_experts_per_tok,
                     "moe_intermediate_size": layer_cfg.moe_intermediate_size,
                     "attention": {"sdpa": "CPU math path as it runs",
                                   "flash": "a core saving q, k, v, out, lse (GPU kernels)"}},
           "activations": tables, "rank_states": states,
           "rank_fit": rank_fit(cfg, tables, states,
                                attention="flash" if "flash" in tables else args.attention[0])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

The rank's states at the shipped layout are `parallel.rank_memory`'s count for each pipeline
position (bf16 weights + fp32 main gradients of what the rank holds; fp32 masters and optimizer
state of what it owns under ZeRO-1; the reduce buffers); `rank_fit` reports, per setting, the
rank that binds first. Prints a table and writes JSON (bench/results/activation_memory.json
unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel.rank_memory import rank_memory  # noqa: E402
from train.config import Config, load_config  # noqa: E402
from train.model.activation_probe import moe_layer_config, per_token_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# What one rank holds in states (the recipe's precision layout)
# --------------------------------------------------------------------------------------------


def rank_state_bytes(cfg: Config) -> dict:
    """State bytes of one rank per pipeline position (data-parallel rank 0), counted by
    `parallel.rank_memory` from the rank's meta-device pieces and ZeRO-1's ownership plan; the
    heaviest rank is reported."""
    p = cfg.parallel
    ranks = []
    for pp_rank in range(p.pp):
        m = rank_memory(cfg, pp_rank * p.dp)
        ranks.append({"pp_rank": pp_rank, "layers": m.layers, "params": m.parameters,
                      "expert_params": m.expert_parameters, "vision_params": m.encoder_parameters,
                      "bf16_weights_fp32_grad_accum_bytes": m.weights_bytes + m.main_grad_bytes,
                      "zero1_master_and_optimizer_bytes": m.master_bytes + m.optimizer_state_bytes,
                      "reduce_buffer_bytes": m.owned_grad_bytes + m.transient_reduce_bytes,
                      "state_bytes": m.peak_state_bytes})
    heaviest = max(ranks, key=lambda r: r["state_bytes"])
    return {"layout": {"pp": p.pp, "virtual_stages": p.virtual_stages, "dp": p.dp, "ep": p.ep,
                       "expert_dp": p.dp // p.ep, "world": p.pp * p.dp},
            "heaviest_rank": heaviest, "ranks": ranks}


def rank_fit(cfg: Config, tables: dict[str, dict], states: dict, hbm_gib: float = 80e9 / 2 ** 30,
             host_gib: float = 2e12 / 8 / 2 ** 30, attention: str = "flash") -> dict:
    """Per setting, the pipeline rank that binds first (fewest sequences per micro-batch that
    fit) with its states and peak saved activations at the shipped schedule (HBM: 80 GB; host:
    2 TB per node of 8 GPUs). Interleaved 1F1B runs (V - 1) * PP + 2 * (PP - 1 - r) warm-up
    forwards on pipeline rank r before its first backward (torch's schedule), so that many chunk
    forwards, plus the one of the first steady step, are alive at once. With offload the device
    still holds one layer's saved tensors of one micro-batch while that layer runs (they are
    released when its forward ends and the copies are done); with full recomputation, one
    layer's whole set while it is recomputed."""
    p = cfg.parallel
    mb_sequences = cfg.data.global_batch_size // (p.dp * p.microbatches)
    gib = 2 ** 30
    seq = cfg.data.seq_len
    out = {"attention": attention, "sequences_per_microbatch": mb_sequences, "hbm_gib": hbm_gib,
           "host_gib_per_gpu": host_gib, "settings": {}}
    for name, e in tables[attention].items():
        dev_seq, host_seq = ((e[f"{k}_per_token"] + e[f"{k}_per_token_per_seq"] * seq) * seq / gib
                             for k in ("device_bytes", "host_bytes"))
        # One layer's whole saved set is on the device while it runs: the forward under
        # offload (host_seq > 0 only then), the recomputed forward in backward under "full".
        transient = host_seq
        if name.startswith("full"):
            none = tables[attention]["none"]
            transient = (none["device_bytes_per_token"]
                         + none["device_bytes_per_token_per_seq"] * seq) * seq / gib
        per_rank = []
        for rank in states["ranks"]:
            r = rank["pp_rank"]
            in_flight = min((p.virtual_stages - 1) * p.pp + 2 * (p.pp - 1 - r) + 1,
                            p.microbatches * p.virtual_stages)
            alive = in_flight * len(rank["layers"]) / p.virtual_stages  # layer-forwards alive
            states_gib = rank["state_bytes"] / gib
            dev_per_seq = dev_seq * alive + transient  # per sequence of the micro-batch
            host_per_seq = host_seq * alive
            dev, host = dev_per_seq * mb_sequences, host_per_seq * mb_sequences
            fit_dev = max(0, int((hbm_gib - states_gib) // dev_per_seq))
            fit_host = int(host_gib // host_per_seq) if host_per_seq > 0 else None
            per_rank.append({
                "pp_rank": r, "chunk_forwards_in_flight": in_flight, "states_gib": states_gib,
                "device_activation_gib": dev, "host_activation_gib": host,
                "device_total_gib": states_gib + dev,
                "fits": states_gib + dev <= hbm_gib and host <= host_gib,
                "max_sequences_per_microbatch": fit_dev if fit_host is None
                else min(fit_dev, fit_host)})
        out["settings"][name] = min(per_rank, key=lambda x: (x["max_sequences_per_microbatch"],
                                                             -x["device_total_gib"]))
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

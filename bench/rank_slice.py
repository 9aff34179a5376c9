"""One rank's share of k2.5 at the shipped layout, on one device: tokens/s, MFU, peak memory.

    .venv/bin/python bench/rank_slice.py                         # CUDA, full width
    .venv/bin/python bench/rank_slice.py --pp-rank 0 --settings k2 none
    .venv/bin/python bench/rank_slice.py --device cpu --reduced  # small width, proves it runs

What runs is exactly what pipeline rank `--pp-rank` (data-parallel rank 0) of configs/k2.5.toml
holds and does in one step, minus the other ranks:
- its pipeline chunks at full width and its EP slice of every expert stack (the rank's pieces,
  parallel/pieces.py, materialised on the device in bf16), fp32 main-gradient buffers for
  every parameter and a stand-in buffer of the bytes of its ZeRO-1 masters, optimizer state
  and reduce buffers (parallel/rank_memory.py), so peak memory includes the states;
- the EP all-to-all replaced by local routing with the same token counts: the router still
  scores all experts, and the copies routed to the 16 experts that EP would place on
  different ranks at the same local position are folded onto that local expert, so the rank's
  experts process the k copies of each token, as they do on average under EP;
- torch's own action list for the configured schedule on this rank (parallel/plan.py reads it
  from torch.distributed.pipelining): forwards and backwards in that order, so as many
  micro-batches are in flight as the real schedule keeps; inputs from other stages and output
  gradients are random tensors of the real shapes; the last chunk runs the chunked loss.
Each setting (`none`: no activation-memory technique; `k2`: the config's [activations], K2's
selective recomputation + FP8 storage + offload) runs one warm-up step and `--steps` timed
steps. A CUDA out-of-memory error is recorded as not fitting. Writes
bench/results/rank_slice[_cpu].json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from parallel.pieces import RankCoords, build_rank_pieces, materialize_pieces  # noqa: E402
from parallel.plan_costs import layer_training_flops_per_token  # noqa: E402
from parallel.schedule_replay import schedule_actions  # noqa: E402
from parallel.rank_memory import rank_memory  # noqa: E402
from train.config import ActivationConfig, load_config, replace  # noqa: E402
from train.model.activations import apply_activation_memory  # noqa: E402
from train.model.lm import lm_head_loss_sum  # noqa: E402
from train.model.moe import MoE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REDUCED = dict(model=dict(hidden_size=256, num_heads=4, q_lora_rank=64, kv_lora_rank=32,
                          qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                          intermediate_size=512, moe_intermediate_size=64, vocab_size=4096),
               vision=dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
               data=dict(seq_len=128))


class FoldedLocalDispatcher:
    """Local stand-in for the EP all-to-all: global experts [e * ep, (e + 1) * ep) are folded
    onto local expert e. Copies arrive sorted by global expert, so each local expert's rows are
    contiguous and the order is unchanged (combine is the identity)."""

    def __init__(self, local_experts: int, ep: int):
        self.local, self.ep = local_experts, ep

    def dispatch(self, x_sorted, counts):
        return x_sorted, counts.view(self.local, self.ep).sum(1)

    def combine(self, y):
        return y


def build_slice(cfg, pp_rank: int, device: str, dtype: torch.dtype, act: ActivationConfig):
    p = cfg.parallel
    coords = RankCoords.of_rank(cfg, pp_rank * p.dp)
    pieces = materialize_pieces(build_rank_pieces(cfg, coords), device, seed=0,
                                init_std=cfg.model.init_std)
    local = cfg.model.n_routed_experts // p.ep
    for _, module in pieces.stages:
        for m in module.modules():
            if isinstance(m, MoE):
                m.dispatcher = FoldedLocalDispatcher(local, p.ep)
        apply_activation_memory(module, act, device)
    for _, q in pieces.named_parameters():
        q.data = q.data.to(dtype)
    return pieces


def run_setting(cfg, pp_rank: int, device: str, steps: int, act: ActivationConfig) -> dict:
    p, m = cfg.parallel, cfg.model
    dtype = torch.bfloat16
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    pieces = build_slice(cfg, pp_rank, device, dtype, act)
    stages = dict(pieces.stages)
    params = [q for _, q in pieces.named_parameters()]
    main_grads = [torch.zeros(q.shape, dtype=torch.float32, device=device) for q in params]
    mem = rank_memory(cfg, pp_rank * p.dp)
    zero_state = torch.empty((mem.master_bytes + mem.optimizer_state_bytes
                              + mem.owned_grad_bytes + mem.transient_reduce_bytes) // 4,
                             dtype=torch.float32, device=device)
    rows = cfg.data.global_batch_size // (p.dp * p.microbatches)
    seq = cfg.data.seq_len
    n_stages = p.pp * p.virtual_stages
    order = schedule_actions(p.schedule, p.pp, p.virtual_stages, p.microbatches)[pp_rank]
    gen = torch.Generator(device=device).manual_seed(0)
    pos = torch.arange(seq, device=device).expand(rows, seq)
    doc = torch.zeros(rows, seq, dtype=torch.long, device=device)
    chunk_tokens = cfg.activations.loss_chunk_tokens or rows * seq
    for s, module in stages.items():
        if s == n_stages - 1:
            module.lm.head_in_loss = True

    def step() -> None:
        alive: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        for stage, kind, mb in order:
            module = stages[stage]
            if kind == "F":
                if stage == 0:
                    x = torch.randint(10, m.vocab_size, (rows, seq), device=device, generator=gen)
                else:
                    x = torch.randn(rows, seq, m.hidden_size, device=device, generator=gen,
                                    dtype=dtype).requires_grad_(True)
                out = module(x, position_ids=pos, doc_ids=doc)
                if stage == n_stages - 1:
                    labels = torch.randint(0, m.vocab_size, (rows, seq), device=device,
                                           generator=gen)
                    out = lm_head_loss_sum(out, module.lm.head.weight, labels,
                                           torch.ones_like(labels, dtype=torch.bool),
                                           chunk_tokens)[0]
                alive[(stage, mb)] = (out, None)
            elif kind in ("B", "I"):
                out, _ = alive.pop((stage, mb))
                grad = None if out.dim() == 0 else torch.randn(out.shape, device=device,
                                                               generator=gen, dtype=out.dtype)
                out.backward(grad)
                with torch.no_grad():  # fold into the fp32 main gradients, as MainGradStage
                    for q, g in zip(params, main_grads):
                        if q.grad is not None:
                            g.add_(q.grad)
                            q.grad = None

    def sync():
        if cuda:
            torch.cuda.synchronize()

    step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    tokens = p.microbatches * rows * seq  # tokens through this pipeline position per step
    layers = [int(k) for _, mod in pieces.stages for k in mod.lm.layers]
    flops_per_token = sum(layer_training_flops_per_token(m, seq, i < m.first_k_dense)
                          for i in layers)
    if n_stages - 1 in stages:
        flops_per_token += 6 * m.hidden_size * m.vocab_size
    out = dict(step_s=round(step_s, 4), tokens_per_step=tokens,
               tokens_per_s=round(tokens / step_s, 1), model_flops_per_token=flops_per_token,
               achieved_tflops=round(flops_per_token * tokens / step_s / 1e12, 3),
               layers=layers, zero_state_bytes=zero_state.numel() * 4)
    if cuda:
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    del pieces, stages, main_grads, zero_state
    return out


SETTINGS = {"none": lambda cfg: ActivationConfig(loss_chunk_tokens=cfg.activations.loss_chunk_tokens),
            "k2": lambda cfg: cfg.activations}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/k2.5.toml"))
    ap.add_argument("--pp-rank", type=int, default=8, help="pipeline position (default: middle)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=["k2", "none"], choices=sorted(SETTINGS))
    ap.add_argument("--reduced", action="store_true",
                    help="small width and sequence (same layout, layers and schedule): for CPU")
    ap.add_argument("--microbatches", type=int, default=0,
                    help="override parallel.microbatches (0: the config's)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 peak for MFU")
    ap.add_argument("--memory-gb", type=float, default=80.0, help="device memory for 'fits'")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    if args.reduced:
        cfg = replace(cfg, **REDUCED)
    if args.microbatches:
        cfg = replace(cfg, parallel={"microbatches": args.microbatches})
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("rank_slice: no CUDA device here; use --device cpu --reduced", file=sys.stderr)
        return 1
    if args.device == "cpu" and not args.reduced:
        print("rank_slice: warning: full width on CPU needs > 100 GB and hours", file=sys.stderr)
    p = cfg.parallel
    result = {"bench": "rank_slice", "config": args.config, "device": args.device,
              "device_name": (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                              else "cpu"),
              "reduced": args.reduced, "torch": torch.__version__, "pp_rank": args.pp_rank,
              "layout": dict(pp=p.pp, virtual_stages=p.virtual_stages, dp=p.dp, ep=p.ep,
                             microbatches=p.microbatches, schedule=p.schedule),
              "seq_len": cfg.data.seq_len,
              "rows_per_microbatch": cfg.data.global_batch_size // (p.dp * p.microbatches),
              "settings": {}}
    for name in args.settings:
        act = SETTINGS[name](cfg)
        try:
            r = run_setting(cfg, args.pp_rank, args.device, args.steps, act)
            r["mfu"] = round(r["achieved_tflops"] / args.peak_tflops, 4)
            if "peak_memory_bytes" in r:
                r["fits"] = r["peak_memory_bytes"] <= args.memory_gb * 1e9
        except torch.OutOfMemoryError as e:
            r = {"fits": False, "error": f"out of memory: {str(e).splitlines()[0]}"}
            torch.cuda.empty_cache()
        r["activations"] = {k: getattr(act, k) for k in ("recompute", "recompute_moe_down",
                                                          "fp8_storage", "offload",
                                                          "loss_chunk_tokens")}
        result["settings"][name] = r
        print(name, json.dumps(r), flush=True)
    out = Path(args.out or ROOT / "bench/results" /
               f"rank_slice{'' if args.device.startswith('cuda') else '_cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`mmpt plan` against measurement: activation bytes at K2.5 width, the pipeline bubble, and the
step time of real gloo runs on this CPU machine after a calibration pass.

    .venv/bin/python bench/plan_check.py                 # all parts, bench/results/plan_check.json
    .venv/bin/python bench/plan_check.py --skip-k25      # without the K2.5-width probes (~3 min)

1. Activations: the planner's per-token bytes of one K2.5-width MoE layer (probed at 128 and
   256 tokens with top-8 local experts, parallel/plan.py) against bench/activation_memory.py's
   measurement of the layer with its 24 local experts at 256 and 512 tokens (the recorded
   bench/results/activation_memory.json), per setting and attention core. Goal: within 5%.
   Parts skipped with --skip-* keep their earlier results in the output file.
2. Bubble: the planner's replay of torch's interleaved 1F1B list (the bench's per-action costs,
   the measured gloo latency per hop) against bench/pipeline_bubble.py's measured
   `bubble_schedule` (stand-in layers that sleep, gloo P2P). Goal: within 10%.
3. Step time: real ParallelRuntime steps (fp32, AdamW-free MuonClip, synthetic packed batches
   with images and video chunks) on forked gloo ranks at world 2, 4 and 8, PP / EP / DP / DEP on
   and off, for the tests' tiny config and a wider one. Calibration pass: a gloo all-reduce
   ping at world 2 gives the latency of a collective; three world-1 runs of each config
   (micro-batch count and tokens varied) give seconds per FLOP, per layer action and per owned
   parameter of the optimizer step. The planner then predicts every layout with those, each
   rank getting its fair share of the cores among the machine's other runnable processes (the
   1-minute load average before the run). Goal: within 20%. The machine is shared and heavily
   loaded; its load average is recorded with each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel.plan import (GPU, Hardware, layer_saved_per_token, plan, replay,  # noqa: E402
                           schedule_actions)
from train.config import ActivationConfig, load_config, replace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def loadavg() -> float:
    return os.getloadavg()[0]


# --------------------------------------------------------------------------------------------
# 1. activations at K2.5 width
# --------------------------------------------------------------------------------------------


def check_k25_activations() -> list[dict]:
    from train.model.activation_probe import SETTINGS

    recorded = json.loads((ROOT / "bench/results/activation_memory.json").read_text())
    model = load_config(ROOT / "configs/k2.5.toml").model
    rows = []
    for attention, table in recorded["activations"].items():
        for name, entry in table.items():
            act = SETTINGS[name]
            t0 = time.perf_counter()
            k = layer_saved_per_token(model, act, "moe", attention, "bfloat16")
            for n, meas in entry["by_tokens"].items():
                n = int(n)
                kind = "host" if act.offload else "device"
                pred = (k[kind] + k[f"{kind}_per_seq"] * n) * n
                got = meas[f"{kind}_bytes"]
                rows.append(dict(attention=attention, setting=name, tokens=n, kind=kind,
                                 predicted_bytes=pred, measured_bytes=got,
                                 rel_error=round(abs(pred - got) / got, 4),
                                 within_5pct=abs(pred - got) <= 0.05 * got,
                                 probe_s=round(time.perf_counter() - t0, 1)))
                print(json.dumps(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# 2. bubble
# --------------------------------------------------------------------------------------------


def check_bubble(cost_ms: float) -> list[dict]:
    from bench import pipeline_bubble as pb

    rows = []
    latency = measure_latency()
    for p, v, m in ((2, 1, 4), (2, 2, 4), (2, 2, 8)):
        meas = pb.measure(p, v, m, cost_ms, 1)
        order = schedule_actions("interleaved_1f1b", p, v, m)
        t_f = cost_ms / 1000 / (3 * v)  # the bench's forward per chunk; backward twice that
        pred = replay(order, lambda s, kind, mb: t_f if kind == "F" else 2 * t_f, latency,
                      p * v, p)["bubble_fraction"]
        got = meas["bubble_schedule"]
        rows.append(dict(pp=p, v=v, microbatches=m, cost_ms=cost_ms, p2p_latency_s=latency,
                         predicted=round(pred, 4), formula=round((p - 1) / (v * m), 4),
                         measured=got, rel_error=round(abs(pred - got) / pred, 4),
                         within_10pct=abs(pred - got) <= 0.10 * pred, loadavg=loadavg()))
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# 3. step time of real gloo runs
# --------------------------------------------------------------------------------------------


def configs() -> dict:
    from tests.parallel_fixtures import tiny_config

    tiny = tiny_config()
    wide = replace(tiny, model=dict(hidden_size=128, num_heads=4, q_lora_rank=64,
                                    kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                                    v_head_dim=32, intermediate_size=256,
                                    moe_intermediate_size=64), data=dict(seq_len=64))
    return {"tiny": tiny, "wide": wide}


LAYOUTS = [  # (world, parallel overrides)
    (1, dict(pp=1, virtual_stages=1, dp=1, ep=1, microbatches=4, schedule="1f1b", dep=True)),
    (2, dict(pp=2, virtual_stages=2, dp=1, ep=1, microbatches=4, dep=True)),
    (2, dict(pp=1, virtual_stages=1, dp=2, ep=2, microbatches=4, schedule="1f1b", dep=False)),
    (4, dict(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=4, dep=True)),
    (4, dict(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=4, dep=False)),
    (8, dict(pp=2, virtual_stages=2, dp=4, ep=2, microbatches=4, dep=True)),
    (8, dict(pp=4, virtual_stages=1, dp=2, ep=1, microbatches=4, dep=False)),
]
ROWS_PER_REPLICA = 8


def layout_config(base, par: dict):
    return replace(base, parallel=par,
                   data={"global_batch_size": par["dp"] * ROWS_PER_REPLICA})


def batches(cfg, seed: int = 0) -> list[dict]:
    from tests.parallel_fixtures import make_batch

    return [make_batch(ROWS_PER_REPLICA, cfg.data.seq_len, seed=seed + d)
            for d in range(cfg.parallel.dp)]


def _timed_steps(rank, world, cfg, per_replica, warmup, steps):
    from parallel.mesh import build_mesh
    from parallel.pieces import RankCoords, build_rank_pieces, materialize_pieces
    from parallel.runtime import ParallelRuntime
    from train.optim.muon import muonclip_factory
    from train.step import training_step

    torch.set_num_threads(1)
    mesh = build_mesh(cfg)
    pieces = materialize_pieces(build_rank_pieces(cfg, RankCoords.of_mesh(mesh)), "cpu",
                                seed=0, init_std=cfg.model.init_std)
    rt = ParallelRuntime(cfg, pieces, mesh, muonclip_factory(cfg.optim))
    from parallel.dep import rank_batch

    # DEP: each rank holds the pixels of the items it encodes (what the loader reads for it)
    batch = rank_batch(per_replica, mesh) if cfg.parallel.dep else per_replica[mesh.dp_rank]
    for _ in range(warmup):
        training_step(rt, batch)
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        training_step(rt, batch)
        times.append(time.perf_counter() - t0)
    return times


def measure_step(cfg, world: int, warmup: int, steps: int) -> float:
    from tests.dist import run_distributed

    out = run_distributed(_timed_steps, world, cfg, batches(cfg), warmup, steps, timeout=900)
    # a step ends when its slowest rank ends; the fastest such step is the one the other
    # users of this shared machine disturbed least
    return min(max(t[i] for t in out) for i in range(steps))


def cpu_hardware(sec_per_flop: float, layer_s: float, opt_s_per_param: float,
                 latency_s: float, world: int, share: float = 1.0, dep_s: float = 0.0) -> Hardware:
    """This machine as the planner sees it: calibrated seconds per FLOP, per layer action and per
    owned parameter of the optimizer step, gloo latency; every rank gets `share` of the
    calibration run's CPU (ranks and other users' processes share the cores)."""
    gpu = GPU("cpu", 1e12, share / sec_per_flop, 2e9, 1e12)
    return Hardware(gpu, gpus_per_node=world, roce_bytes_per_s_per_node=2e9 * world,
                    efficiency=1.0, p2p_latency_s=latency_s, attention="sdpa", overlap_ep=False,
                    layer_overhead_s=layer_s / share, collective_latency_s=latency_s,
                    optimizer_s_per_param=opt_s_per_param / share, dep_overhead_s=dep_s / share,
                    p2p_occupies_rank=True)


def cpu_share(world: int, cores: int, background: float) -> float:
    """CPU per rank relative to a world-1 run when `background` other runnable processes share
    `cores` cores fairly."""
    return min(1.0, cores / (background + world)) / min(1.0, cores / (background + 1))


def _latency(rank, world, reps):
    x = torch.zeros(8)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(x)
    return (time.perf_counter() - t0) / reps


def measure_latency(reps: int = 50) -> float:
    from tests.dist import run_distributed

    return max(run_distributed(_latency, 2, reps, timeout=300))


def vision_items_of(cfg, per_replica) -> tuple[list[int], list[int]]:
    patches, replica_of = [], []
    for d, b in enumerate(per_replica):
        if b["grid_thw"] is not None:
            for t, h, w in b["grid_thw"].tolist():
                patches.append(t * h * w)
                replica_of.append(d)
    return patches, replica_of


CALIBRATION = [dict(microbatches=4, rows=8), dict(microbatches=1, rows=8),
               dict(microbatches=2, rows=4)]


def _predict(cfg, hw):
    return plan(cfg, hw, vision_items=vision_items_of(cfg, batches(cfg))).step_time_s


def calibrate(base, warmup: int, steps: int, latency: float) -> dict:
    """Three world-1 runs (micro-batch count and tokens varied) give seconds per FLOP, per
    layer action and the optimizer's fixed cost: the planner is linear in them at world 1."""
    import numpy as np

    rows_a, t = [], []
    for c in CALIBRATION:
        global ROWS_PER_REPLICA
        saved, ROWS_PER_REPLICA = ROWS_PER_REPLICA, c["rows"]
        try:
            cfg = layout_config(base, dict(LAYOUTS[0][1], microbatches=c["microbatches"]))
            t.append(measure_step(cfg, 1, warmup, steps))
            rows_a.append([_predict(cfg, cpu_hardware(1.0, 0.0, 0.0, 0.0, 1)),
                           _predict(cfg, cpu_hardware(1e-30, 1.0, 0.0, 0.0, 1)),
                           _predict(cfg, cpu_hardware(1e-30, 0.0, 1.0, 0.0, 1))])
        finally:
            ROWS_PER_REPLICA = saved
    a, b = np.array(rows_a), np.array(t)
    best = None  # non-negative least squares over the subsets of the three terms
    for mask in range(1, 8):
        cols = [i for i in range(3) if mask >> i & 1]
        sol, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        if (sol < 0).any():
            continue
        full = np.zeros(3)
        full[cols] = sol
        err = float(((a @ full - b) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, full)
    sec_per_flop, layer_s, opt_s = (float(x) for x in best[1])
    sec_per_flop = max(sec_per_flop, 1e-30)
    # DEP's fixed cost: the first calibration layout with DEP off, against its DEP-on time
    cfg = layout_config(base, dict(LAYOUTS[0][1], dep=False))
    no_dep = measure_step(cfg, 1, warmup, steps)
    hw = cpu_hardware(sec_per_flop, layer_s, opt_s, latency, 1)
    modelled = _predict(layout_config(base, LAYOUTS[0][1]), hw) - _predict(cfg, hw)
    dep_s = max(0.0, t[0] - no_dep - modelled)
    return dict(sec_per_flop=sec_per_flop, layer_overhead_s=layer_s, optimizer_s_per_param=opt_s,
                dep_overhead_s=dep_s, no_dep_measured_s=round(no_dep, 4),
                latency_s=latency, runs=[dict(c, measured_s=round(x, 4))
                                         for c, x in zip(CALIBRATION, t)])


def check_step_time(warmup: int, steps: int) -> tuple[list[dict], dict]:
    cores = os.cpu_count() or 1
    latency = measure_latency()
    rows, calibrations = [], {}
    for name, base in configs().items():
        cal = calibrations[name] = calibrate(base, warmup, steps, latency)
        print(json.dumps({name: cal}), flush=True)
        for world, par in LAYOUTS[1:]:
            cfg = layout_config(base, par)
            load_before = loadavg()
            measured = measure_step(cfg, world, warmup, steps)
            share = cpu_share(world, cores, max(0.0, load_before - 1))
            hw = cpu_hardware(cal["sec_per_flop"], cal["layer_overhead_s"],
                              cal["optimizer_s_per_param"], latency, world, share,
                              cal["dep_overhead_s"])
            pred = _predict(cfg, hw)
            rows.append(dict(config=name, world=world, **par, measured_step_s=round(measured, 4),
                             predicted_step_s=round(pred, 4),
                             rel_error=round(abs(pred - measured) / measured, 4),
                             within_20pct=abs(pred - measured) <= 0.2 * measured,
                             cpu_share=round(share, 3), loadavg_before=load_before,
                             loadavg_after=loadavg()))
            print(json.dumps(rows[-1]), flush=True)
    return rows, calibrations


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-k25", action="store_true", help="skip the K2.5-width probes")
    ap.add_argument("--skip-bubble", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--bubble-cost-ms", type=float, default=200.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench/results/plan_check.json"))
    args = ap.parse_args(argv)
    # parts skipped in this run keep their results from an earlier one
    prev = Path(args.out)
    out = json.loads(prev.read_text()) if prev.is_file() else {}
    out.update({"bench": "plan_check", "torch": torch.__version__, "cpu_count": os.cpu_count(),
                "loadavg_start": loadavg()})
    if not args.skip_k25:
        out["activations_k25"] = check_k25_activations()
    if not args.skip_bubble:
        out["bubble"] = check_bubble(args.bubble_cost_ms)
    if not args.skip_steps:
        out["step_time"], out["calibration"] = check_step_time(args.warmup, args.steps)
    out["loadavg_end"] = loadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`mmpt plan`: per-GPU memory and step time of a layout, counted from the real modules.

    mmpt plan --config configs/k2.5.toml --gpus 2048 --gpu h800 [--json] [--tokens 15.5T]
              [--search] [--section.field=value ...]

`--gpus N` keeps `parallel.pp` and sets `parallel.dp = N / pp`. The plan (parallel/plan.py) is
printed as a memory table per pipeline position and the step's parts, or as JSON; a layout that
cannot run or fit comes with the reason and the smallest change that fixes it
(parallel/plan_search.py); `--search` ranks the layouts that fit.
"""

from __future__ import annotations

import argparse
import json

from parallel.plan import GB, Plan, plan
from parallel.plan_search import fix_for_invalid, search, smallest_fix, with_gpus
from parallel.step_time import GPUS, Hardware
from train.config import load_config
from train.errors import ConfigError

def parse_tokens(text: str) -> float:
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    t = text.strip().upper()
    try:
        return float(t[:-1]) * units[t[-1]] if t[-1] in units else float(t)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"--tokens {text!r}: a number, optionally with K/M/B/T")


def render(r: Plan) -> str:
    lay = r.layout
    if "pp" not in lay:  # the config itself did not validate
        lines = ["CANNOT RUN: " + "; ".join(r.reasons)]
        lines.append(f"smallest change that runs and fits: {r.fix}" if r.fix else
                     "no single change of virtual_stages, pp or microbatches makes it run and fit")
        return "\n".join(lines)
    lines = [f"layout PP{lay['pp']} x V{lay['virtual_stages']} x DP{lay['dp']}, EP{lay['ep']}, "
             f"{lay['microbatches']} micro-batches ({lay['schedule']}), DEP "
             f"{'on' if lay['dep'] else 'off'}, {lay['gpus']} x {r.gpu}; activations: recompute "
             f"{lay['recompute']}{' + moe_down' if lay['recompute_moe_down'] else ''}, fp8 "
             f"{lay['fp8_storage']}, offload {lay['offload']}"]
    if not r.runs:
        lines.append("CANNOT RUN: " + "; ".join(r.reasons))
        if r.fix:
            lines.append(f"smallest change that runs and fits: {r.fix}")
        return "\n".join(lines)
    lines.append(("FITS" if r.fits else "DOES NOT FIT: " + "; ".join(r.reasons)))
    if not r.fits and r.fix:
        lines.append(f"smallest change that fits: {r.fix}")
    head = ["GB", *(f"{s.stage} (pp {s.pp_rank})" for s in r.per_stage)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in r.per_stage[0].bytes:
        lines.append(f"| {key} | " + " | ".join(f"{s.bytes[key] / GB:.2f}" for s in r.per_stage)
                     + " |")
    lines.append("| **total** | " + " | ".join(f"**{s.total_bytes / GB:.2f}**" for s in r.per_stage)
                 + " |")
    lines.append("| host (offload) | " + " | ".join(f"{s.host_bytes / GB:.1f}" for s in r.per_stage)
                 + " |")
    lines.append("| micro-batch chunks in flight | "
                 + " | ".join(str(s.microbatches_in_flight) for s in r.per_stage) + " |")
    st = r.step
    lines.append(f"step {r.step_time_s:.2f} s (pipeline {st['pipeline_s']:.2f}, bubble "
                 f"{r.bubble_fraction:.3f}; ZeRO-1 reduce/gather {st['dp_reduce_gather_s']:.2f}; "
                 f"DEP encoder {st['dep_encoder_s']:.2f}); EP all-to-all "
                 f"{st['ep_all_to_all_s_per_layer'] * 1e3:.2f} ms per layer and micro-batch")
    lines.append(f"{r.tokens_per_s_per_gpu:.0f} tokens/s/GPU, MFU {r.mfu:.1%}, DEP encoder "
                 f"max/mean {r.dep_max_over_mean:.3f}")
    if r.multimodal_over_text_step:
        mm = r.multimodal_over_text_step
        lines.append(f"multimodal / text-only step time: {mm['dep']:.3f} with DEP, "
                     f"{mm['encoder_on_stage0']:.3f} with the encoder on stage 0")
    if r.gpu_days is not None:
        lines.append(f"GPU-days for the token budget: {r.gpu_days:,.0f} "
                     f"({r.gpu_days / lay['gpus']:.1f} days on {lay['gpus']} GPUs)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mmpt plan", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="TOML config file")
    ap.add_argument("--gpus", type=int, required=True, help="total GPUs (dp = gpus / pp)")
    ap.add_argument("--gpu", choices=sorted(GPUS), required=True)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tokens", type=parse_tokens, default=None, help="token budget, e.g. 15.5T")
    ap.add_argument("--search", action="store_true", help="rank the layouts that fit")
    ap.add_argument("--efficiency", type=float, default=0.5,
                    help="achieved fraction of bf16 peak for the model's math (default 0.5)")
    ap.add_argument("--roce-gbps", type=float, default=8 * 400.0,
                    help="RoCE bandwidth per node in Gb/s (default 8 x 400)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--attention", choices=["flash", "sdpa"], default="flash",
                    help="what attention saves: flash (GPU kernels) or sdpa (CPU math path)")
    ap.add_argument("--no-ep-overlap", action="store_true",
                    help="EP all-to-all adds to compute instead of hiding behind it")
    args, overrides = ap.parse_known_args(argv)
    if args.gpus < 1:
        ap.error(f"--gpus {args.gpus} must be >= 1")
    hw = Hardware(GPUS[args.gpu], gpus_per_node=args.gpus_per_node,
                  roce_bytes_per_s_per_node=args.roce_gbps * 1e9 / 8,
                  efficiency=args.efficiency, attention=args.attention,
                  overlap_ep=not args.no_ep_overlap)
    try:
        overrides = with_gpus(args.config, overrides, args.gpus)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:  # a layout the config validation rejects cannot run
        r = Plan({"gpus": args.gpus}, hw.gpu.name, fits=False, runs=False, reasons=[str(e)])
        r.fix = fix_for_invalid(args.config, overrides, args.gpus, hw)
        print(json.dumps(r.to_dict(), indent=1) if args.json else render(r))
        return 1
    if args.search:
        found = search(cfg, hw, args.gpus)
        if args.json:
            print(json.dumps([r.to_dict() for r in found], indent=1))
        else:
            print(f"{len(found)} layouts fit; best first")
            for r in found:
                print(render(r), "\n")
        return 0 if found else 1
    r = plan(cfg, hw, args.tokens)
    if not (r.runs and r.fits):
        r.fix = smallest_fix(cfg, hw, r)
    print(json.dumps(r.to_dict(), indent=1) if args.json else render(r))
    return 0 if r.runs and r.fits else 1

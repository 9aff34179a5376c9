"""DEP encoder load balance: max/mean patches per rank, DEP planner vs encoder on stage 0 only.

A synthetic but realistic step (parallel/dep_workload.py): sequences of 4096 tokens, 10% of
tokens vision tokens, a heavy-tailed mix of native-resolution images and videos in 4-frame
chunks, each sample on the data-parallel replica with the fewest vision tokens so far.

    .venv/bin/python bench/dep_balance.py            # table + bench/results/dep_balance.json
    .venv/bin/python bench/dep_balance.py --quick    # fewer scenarios

Goal: max/mean <= 1.05 with DEP. `bound` is max(1, largest item / mean load): no assignment of
whole items can do better, so a step with fewer items than ranks cannot reach the goal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel.dep_plan import plan_encoder_work, stage0_only_load  # noqa: E402

from parallel.dep_workload import build_step  # noqa: E402


def ratio(load: list[int]) -> float:
    return max(load) * len(load) / sum(load)


def run(scenarios, seed: int) -> list[dict]:
    rows = []
    for ranks, tokens in scenarios:
        pp = min(16, ranks // 4)
        dp = ranks // pp
        patches, replica_of = build_step(tokens, dp, seed)
        mean = sum(patches) / ranks
        t0 = time.perf_counter()
        lpt = plan_encoder_work(patches, ranks, refine_rounds=0)
        plan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = plan_encoder_work(patches, ranks)
        refine_s = time.perf_counter() - t0
        s0 = stage0_only_load(patches, replica_of, pp, dp)
        rows.append(dict(
            ranks=ranks, pp=pp, dp=dp, tokens_per_step=tokens, items=len(patches),
            mean_patches_per_rank=round(mean), largest_item=max(patches),
            bound=round(max(1.0, max(patches) / mean), 4),
            dep_lpt=round(lpt.max_over_mean, 4), dep=round(plan.max_over_mean, 4),
            stage0_only=round(ratio(s0), 4), stage0_only_among_stage0=round(ratio(s0[:dp]), 4),
            plan_ms=round(plan_s * 1e3, 1), plan_refined_ms=round(refine_s * 1e3, 1),
            goal_met=plan.max_over_mean <= 1.05))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two scenarios only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dep_balance.json"))
    args = ap.parse_args(argv)
    if args.quick:
        scenarios = [(16, 4 << 20), (256, 16 << 20)]
    else:  # K2 trained with ~67M tokens per step; smaller steps show the item-granularity limit
        scenarios = [(r, t) for t in (1 << 20, 4 << 20, 16 << 20, 64 << 20) for r in (16, 32, 64, 128, 256)]
    rows = run(scenarios, args.seed)
    head = ("ranks", "pp", "dp", "tokens_per_step", "items", "bound", "dep_lpt", "dep",
            "stage0_only", "stage0_only_among_stage0", "plan_refined_ms", "goal_met")
    print(" ".join(f"{h:>14}" for h in head))
    for r in rows:
        print(" ".join(f"{r[h]:>14}" for h in head))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(bench="dep_balance", seed=args.seed, metric="max/mean "
                                   "encoder patches per rank", goal="dep <= 1.05", rows=rows),
                              indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

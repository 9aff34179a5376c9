"""Where the planner's CPU model for gloo ranks is not additive: virtual stages under EP, and the
CPU of a receive by how long it waits.

1. Per-rank CPU seconds per step (process time, the gloo threads included) of six layouts that
   differ by one knob, at DP2 with 4 micro-batches of 2 rows, as bench/plan_check.py runs them:
   PP1 x EP1, PP1 x EP2, PP2 x V1 x EP1, PP2 x V1 x EP2, PP2 x V2 x EP1, PP2 x V2 x EP2, each
   --repeats times, the layouts interleaved so that every repeat sees the same spell of the
   machine. The differences (what EP adds at PP1 and at PP2 x V1; what V2 adds without and with
   EP, per pipeline rank, the median over repeats of the same-repeat differences) are set
   against the planner's (parallel/step_time.py cpu_s_per_rank under the calibration recorded in
   bench/results/plan_check.json). The planner's per-event costs add: V2's extra pipeline
   actions cost the same with EP as without.
2. A gloo receive's CPU (process time) when its sender computes for a given time first: what a
   wait costs a rank.

    .venv/bin/python bench/pp_ep_cpu.py              # both configs, 5 repeats (~6 min idle)
    .venv/bin/python bench/pp_ep_cpu.py --repeats 1  # a quick look

Writes bench/results/pp_ep_cpu.json. Needs an idle machine (2 cores here, so the world-4
layouts share them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import plan_check as pc  # noqa: E402

ROOT = pc.ROOT
LAYOUTS = {
    "pp1_ep1": dict(pp=1, virtual_stages=1, dp=2, ep=1, microbatches=4, schedule="1f1b", dep=False),
    "pp1_ep2": dict(pp=1, virtual_stages=1, dp=2, ep=2, microbatches=4, schedule="1f1b", dep=False),
    "v1_ep1": dict(pp=2, virtual_stages=1, dp=2, ep=1, microbatches=4, schedule="1f1b", dep=False),
    "v1_ep2": dict(pp=2, virtual_stages=1, dp=2, ep=2, microbatches=4, schedule="1f1b", dep=False),
    "v2_ep1": dict(pp=2, virtual_stages=2, dp=2, ep=1, microbatches=4, dep=False),
    "v2_ep2": dict(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=4, dep=False),
}
DIFFERENCES = {  # what one knob adds: (with, without)
    "EP2 at PP1": ("pp1_ep2", "pp1_ep1"),
    "EP2 at PP2 x V1": ("v1_ep2", "v1_ep1"),
    "V2 without EP": ("v2_ep1", "v1_ep1"),
    "V2 with EP2": ("v2_ep2", "v1_ep2"),
}


def measure(name: str, base, repeats: int) -> dict:
    runs = {k: [] for k in LAYOUTS}
    for r in range(repeats):
        for k, par in LAYOUTS.items():
            cfg = pc.layout_config(base, par)
            got = pc.measure_step(cfg, par["pp"] * par["dp"], 2, 4, 2.0)
            runs[k].append(pc._measured_cpu(cfg, got))
            print(f"{name} {k} repeat {r}: cpu per pipeline rank "
                  f"{[round(x * 1e3, 1) for x in runs[k][-1]]} ms", flush=True)
    return runs


def predicted(base, cal: dict) -> dict:
    out = {}
    for k, par in LAYOUTS.items():
        cfg = pc.layout_config(base, par)
        out[k] = pc._plan_cpu(cfg, pc.cpu_hardware(cal, par["pp"] * par["dp"], pc.cores()))
    return out


def differences(runs: dict, pred: dict) -> list[dict]:
    rows = []
    for label, (a, b) in DIFFERENCES.items():
        ranks = len(runs[a][0])
        # PP1 has one pipeline rank, PP2 two; a PP1 difference compares rank 0 with rank 0
        meas = [statistics.median(x[r] - y[r] for x, y in zip(runs[a], runs[b]))
                for r in range(ranks)]
        rows.append(dict(difference=label, layouts=[a, b],
                         measured_ms=[round(x * 1e3, 1) for x in meas],
                         predicted_ms=[round((pred[a][r] - pred[b][r]) * 1e3, 1)
                                       for r in range(ranks)]))
    return rows


def _recv_cpu(rank, world, delays, reps):
    """Rank 1 computes `d` seconds, then sends; rank 0's CPU over its receive."""
    x = torch.zeros(16)
    out = {}
    for d in delays:
        cpu = 0.0
        for _ in range(reps):
            dist.barrier()
            if rank == 1:
                t = time.perf_counter()
                while time.perf_counter() - t < d:
                    pass
                dist.send(x, 0)
            else:
                c0 = time.process_time()
                dist.recv(x, 1)
                cpu += time.process_time() - c0
        out[d] = cpu / reps
    return out


def recv_cpu(reps: int = 100) -> list[dict]:
    from tests.dist import run_distributed

    delays = [0.0, 20e-6, 100e-6, 300e-6, 1e-3, 3e-3, 10e-3]
    got = run_distributed(_recv_cpu, 2, delays, reps, timeout=300)[0]
    return [dict(sender_late_us=round(d * 1e6), receive_cpu_us=round(got[d] * 1e6, 1))
            for d in delays]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calibration", default=str(ROOT / "bench/results/plan_check.json"),
                    help="plan_check results whose calibration the planner predicts with")
    ap.add_argument("--out", default=str(ROOT / "bench/results/pp_ep_cpu.json"))
    args = ap.parse_args(argv)
    cals = json.loads(Path(args.calibration).read_text())["calibration"]
    out = {"bench": "pp_ep_cpu", "torch": torch.__version__, "repeats": args.repeats,
           "loadavg_start": pc.loadavg(), "configs": {}}
    for name, base in pc.configs().items():
        cal = {k: v for k, v in cals[name].items() if k != "runs"}
        runs = measure(name, base, args.repeats)
        rows = differences(runs, predicted(base, cal))
        out["configs"][name] = {"differences": rows, "cpu_s_per_rank": runs}
        for row in rows:
            print(f"{name:5} {row['difference']:16} measured {row['measured_ms']} ms, "
                  f"planner {row['predicted_ms']} ms", flush=True)
    out["receive_cpu"] = recv_cpu()
    for row in out["receive_cpu"]:
        print(f"receive, sender {row['sender_late_us']:6d} us late: "
              f"{row['receive_cpu_us']:7.1f} us CPU")
    out["loadavg_end"] = pc.loadavg()
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

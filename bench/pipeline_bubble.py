"""Pipeline bubble: measured idle time of the interleaved 1F1B schedule vs (p-1)/(v*m).

Each pipeline chunk is a chain of stand-in layers of controlled cost: the forward sleeps t_f and
the backward 2*t_f (sleeping, not spinning, so 4 ranks measure cleanly on a 2-core machine).
The work per micro-batch and rank is fixed (--cost-ms, forward + backward over the rank's v
chunks), so every layout does the same useful work. The chunks run through the project's own
PipelineRunner (parallel/pipeline.py), i.e. torch.distributed.pipelining with gloo P2P.

Per rank: busy = time inside the layers, idle = step wall time - busy. The interleaved 1F1B
bubble is (p-1)/(v*m) of the useful time. `bubble_raw` = idle/busy counts everything that is not
layer time as bubble, including the framework's per-action overhead (Python, bookkeeping, about
a millisecond per action on a loaded 2-core machine), which the formula ignores. So the same v*m
actions are also run on ONE rank (no pipeline, no bubble): its idle time is that overhead, and
`bubble_schedule` = (idle - overhead) / (busy + overhead) is the schedule's own bubble, the number
compared with the formula. Goal: within 10% of the formula. Raise --cost-ms to shrink the share
of overhead further.

    .venv/bin/python bench/pipeline_bubble.py          # table + bench/results/pipeline_bubble.json
    .venv/bin/python bench/pipeline_bubble.py --quick  # PP 2 only, fewer steps
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from parallel.pipeline import PipelineRunner, StageModule  # noqa: E402
from tests.dist import run_distributed  # noqa: E402

BUSY = [0.0]  # seconds this process spent inside the stand-in layers


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        t0 = time.perf_counter()
        time.sleep(seconds)
        BUSY[0] += time.perf_counter() - t0
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        t0 = time.perf_counter()
        time.sleep(2 * ctx.seconds)
        BUSY[0] += time.perf_counter() - t0
        return grad * 1.0, None


class SleepLayer(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, h, cos=None, sin=None, mask=None):
        return _Sleep.apply(h, self.seconds)


class StandInLM(nn.Module):
    """The DecoderLM interface (embed / layers / norm / head) with sleeping layers."""

    def __init__(self, keys, seconds, first, last, vocab=16, hidden=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden) if first else None
        self.layers = nn.ModuleDict({k: SleepLayer(seconds) for k in keys})
        self.norm = None
        self.head = nn.Linear(hidden, vocab, bias=False) if last else None

    def forward(self, x, *, position_ids, doc_ids, vision_embeds=None):
        h = self.embed(x) if self.embed is not None else x
        for layer in self.layers.values():
            h = layer(h)
        return self.head(h) if self.head is not None else h


def _run(rank, world, v, m, cost_ms, layers_per_chunk, steps):
    torch.manual_seed(0)
    n_chunks = world * v
    seconds = cost_ms / 1000 / (3 * v * layers_per_chunk)  # fwd + 2x bwd over v chunks
    stages = []
    for s in range(rank, n_chunks, world):
        keys = [str(s * layers_per_chunk + i) for i in range(layers_per_chunk)]
        lm = StandInLM(keys, seconds, first=s == 0, last=s == n_chunks - 1)
        stages.append((s, StageModule(lm, None, is_first=s == 0)))
    runner = PipelineRunner(stages, n_chunks, dist.group.WORLD, m, "interleaved_1f1b",
                            hidden_size=8, vocab_size=16)
    ids = [torch.randint(0, 16, (1, 4)) for _ in range(m)]
    kw = [dict(position_ids=torch.zeros(1, 4, dtype=torch.long),
               doc_ids=torch.zeros(1, 4, dtype=torch.long)) for _ in range(m)]
    tgt = [torch.stack([torch.randint(0, 16, (1, 4)), torch.ones(1, 4, dtype=torch.long)], -1)
           for _ in range(m)]
    runner.run(ids, kw, tgt, 4.0 * m)  # warm-up: builds the schedule, first P2P connections
    walls, busies = [], []
    for _ in range(steps):
        dist.barrier()
        BUSY[0] = 0.0
        t0 = time.perf_counter()
        runner.run(ids, kw, tgt, 4.0 * m)
        walls.append(time.perf_counter() - t0)
        busies.append(BUSY[0])
    return walls, busies


def _idle(p, v, m, cost_ms, steps):
    """(mean busy s, mean idle s, mean step s) over ranks; idle = step wall - layer time."""
    out = run_distributed(_run, p, v, m, cost_ms, 1, steps, timeout=600)
    # the step ends for everyone when the slowest rank ends: use each step's max wall
    walls = [max(w[i] for w, _ in out) for i in range(steps)]
    per_rank = [dict(busy_s=round(sum(b) / steps, 4),
                     idle_s=round(sum(walls[i] - b[i] for i in range(steps)) / steps, 4))
                for _, b in out]
    busy = sum(r["busy_s"] for r in per_rank) / p
    idle = sum(r["idle_s"] for r in per_rank) / p
    return busy, idle, sum(walls) / steps, per_rank


_ONE_RANK: dict = {}


def measure(p, v, m, cost_ms, steps):
    busy, idle, step_s, per_rank = _idle(p, v, m, cost_ms, steps)
    # Framework overhead (Python between actions, loss, bookkeeping), measured on ONE rank
    # running the same v*m actions, where the schedule has no bubble at all.
    key = (v, m, cost_ms, steps)
    if key not in _ONE_RANK:
        _ONE_RANK[key] = _idle(1, v, m, cost_ms, steps)
    busy1, idle1, _, _ = _ONE_RANK[key]
    overhead = idle1 * (busy / busy1)
    formula = (p - 1) / (v * m)
    raw = idle / busy
    sched = (idle - overhead) / (busy + overhead)
    return dict(pp=p, v=v, microbatches=m, cost_ms=cost_ms, step_s=round(step_s, 4),
                bubble_raw=round(raw, 4), bubble_schedule=round(sched, 4),
                bubble_formula=round(formula, 4), overhead_s=round(overhead, 4),
                rel_error=round(abs(sched - formula) / formula, 4),
                idle_fraction=round(idle / (idle + busy), 4), per_rank=per_rank,
                within_10pct=abs(sched - formula) <= 0.10 * formula)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cost-ms", type=float, default=None,
                    help="useful work per micro-batch and rank (forward + backward), ms")
    ap.add_argument("--steps", type=int, default=1, help="measured steps after one warm-up")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pipeline_bubble.json"))
    args = ap.parse_args(argv)
    pps = (2,) if args.quick else (2, 4)
    # Per-hop P2P latency and framework overhead are ~1 ms here; chunk compute must dwarf them
    # for the small bubbles (1/32) to be measurable to 10%: 400 ms per micro-batch by default.
    cost = args.cost_ms or (90.0 if args.quick else 400.0)
    rows = []
    head = ("pp", "v", "microbatches", "step_s", "bubble_raw", "overhead_s", "bubble_schedule",
            "bubble_formula", "rel_error", "within_10pct")
    print(" ".join(f"{h:>15}" for h in head))
    for p in pps:
        for v in (1, 2):
            for m in (4, 8, 16):
                row = measure(p, v, m, cost, args.steps)
                rows.append(row)
                print(" ".join(f"{row[h]:>15}" for h in head), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(bench="pipeline_bubble", schedule="interleaved_1f1b",
                                   metric="idle/busy per rank vs (p-1)/(v*m)", rows=rows), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

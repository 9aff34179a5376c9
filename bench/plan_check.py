"""`mmpt plan` against measurement: activation bytes at K2.5 width, the pipeline bubble, and the
step time of real gloo runs on this CPU machine after a calibration pass.

    .venv/bin/python bench/plan_check.py                 # all parts (~13 min)
    .venv/bin/python bench/plan_check.py --skip-k25      # without the K2.5-width probes
    .venv/bin/python bench/plan_check.py --steps-only    # the step-time part alone (~12.5 min)
    .venv/bin/python bench/plan_check.py --refit IN --out OUT  # IN's step-time runs refitted

1. Activations: the planner's per-token bytes of one K2.5-width MoE layer (probed at 128 and
   256 tokens with top-8 local experts, parallel/plan.py) against bench/activation_memory.py's
   measurement of the layer with its 24 local experts at 256 and 512 tokens (the recorded
   bench/results/activation_memory.json), per setting and attention core. Goal: within 5%.
   Parts skipped with --skip-* keep their earlier results in the output file.
2. Bubble: the planner's replay of torch's interleaved 1F1B list (the bench's per-action costs,
   the measured gloo latency per hop) against bench/pipeline_bubble.py's measured
   `bubble_schedule` (stand-in layers that sleep, gloo P2P). Goal: within 10%.
3. Step time: real training steps (train.step.training_step; fp32, MuonClip, synthetic packed
   batches with images and video chunks) on gloo ranks at world 2, 4 and 8, PP / EP /
   DP / DEP on and off, for the tests' tiny config and a wider one; per run at least --steps
   steps and about --timed-s seconds of them after --warmup; a checked layout's step is the
   median of its steps over four runs, two in each of two rounds.
   Calibration, never on the checked layouts: gloo pings at world 2 (three at the start, one
   before each round, the fastest of each kind kept) give the CPU time and the latency of a
   collective and of a send or receive; world-1 runs of each config
   (micro-batch count and tokens varied, DEP on and off) and runs of twelve layouts outside the
   checked twelve (EVENT_CALIBRATION: five at world 2, five at world 4, two at world 8, each
   four times, with 2-row micro-batches as the checked layouts have) give, by non-negative
   least squares on each rank's measured CPU time per step (process time, the gloo threads
   included; relative residuals), seconds per FLOP, per layer action, per owned parameter of
   the optimizer step, DEP's fixed cost and the runtime's CPU per event (per ZeRO-1
   parameter moved, per MoE layer pass under EP, per communicating pipeline action without
   and with EP, per DEP exchange, per communication operation of ranks crowding their cores),
   which the planner counts for each layout from its own schedule (parallel/step_time.py
   cpu_event_counts, cpu_s_per_rank). CPU time does not depend on how the schedule's waits
   fall, so these need no replay. Two wall-time constants are then fitted on the same runs'
   step times: the wait per communication operation (its peer arrives late, a blocked rank is
   woken) and the extra wait of crowded ranks (a rank that blocks sleeps until its peer gets
   a core). The calibration runs are interleaved with the checked ones, so both see the same
   spells of the machine's other users. The planner then predicts every layout on the cores
   those users left free while its steps ran (their threads' CPU time, read from /proc, and
   the time the hypervisor stole from this machine's cores, /proc/stat), the ranks sharing
   those cores (processor sharing in the schedule replay; a rank waiting on a receive or a
   collective uses none). Goal: within 20%. The machine is shared; the cores left, the cores
   stolen and the load average are recorded with each run, and each checked layout's
   measured and predicted CPU per pipeline rank beside its step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel.plan import plan  # noqa: E402
from parallel.plan_costs import layer_saved_per_token  # noqa: E402
from parallel.schedule_replay import replay, schedule_actions  # noqa: E402
from parallel.step_time import GPU, Hardware  # noqa: E402
from train.config import load_config, replace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def loadavg() -> float:
    return os.getloadavg()[0]


def _others_cpu_ns() -> dict[str, int]:
    """CPU nanoseconds so far of every thread of the other sessions' processes (the machine's
    other users), /proc/PID/task/TID/schedstat."""
    mine = os.getsid(0)
    out: dict[str, int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[3]) == mine:
                    continue  # this session: the bench and its ranks
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    out[tid] = int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while it was read
    return out


def _steal_s() -> float:
    """Seconds so far, summed over this machine's cores, that the hypervisor ran something else
    while a core of this virtual machine had work (/proc/stat's `steal`)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")


class OthersCpuWatch:
    """The cores the machine's other users took while the timed steps ran (their threads' CPU
    time over the window's length, plus the time the hypervisor stole from this machine's
    cores): the bench gives the planner the cores left. /proc is read every `interval_s`, so a
    thread that ends in the window (others' short test processes) counts up to its last look;
    one born in it counts from its birth."""

    def __init__(self, interval_s: float = 0.1):
        import threading

        from tests.dist import rank_context

        self.interval_s = interval_s
        # set by rank 0 around its timed steps (handed to the ranks)
        ctx = rank_context()
        self.started, self.finished = ctx.Event(), ctx.Event()
        self._first: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._window = 0.0
        self._steal = [0.0, 0.0]  # at the first look and at the last
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _look(self, first_look: bool) -> None:
        for tid, ns in _others_cpu_ns().items():
            self._first.setdefault(tid, ns if first_look else 0)
            self._last[tid] = ns

    def _watch(self) -> None:
        self.started.wait()
        t0 = time.perf_counter()
        self._look(True)
        self._steal[0] = _steal_s()
        while not self.finished.wait(self.interval_s):
            self._look(False)
        self._look(False)
        self._steal[1] = _steal_s()
        self._window = time.perf_counter() - t0

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.started.set()
        self.finished.set()
        self._thread.join()

    def cores_used(self) -> float:
        """Others' cores, the stolen ones included."""
        return self.cores_stolen() + sum(
            max(0, last - self._first[tid]) for tid, last in self._last.items()) / 1e9 / max(
            self._window, 1e-9)

    def cores_stolen(self) -> float:
        return (self._steal[1] - self._steal[0]) / max(self._window, 1e-9)


def cores() -> int:
    return len(os.sched_getaffinity(0))


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


def _timed_steps(rank, world, cfg, per_replica, warmup, steps, timed_s, started, finished):
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
    last = torch.zeros(1, dtype=torch.float64)  # the last warm-up step's seconds
    for _ in range(warmup):
        t0 = time.perf_counter()
        training_step(rt, batch)
        last.fill_(time.perf_counter() - t0)
    # at least `steps` steps and about timed_s seconds of them (10 steps of a world-2 layout
    # last about a second); every rank runs the same count
    dist.all_reduce(last, op=dist.ReduceOp.MAX)
    if float(last) > 0:
        steps = max(steps, round(timed_s / float(last)))
    dist.barrier()
    if rank == 0:  # the bench watches the other sessions' demand while the steps run
        started.set()
    times, cpus = [], []
    for _ in range(steps):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        training_step(rt, batch)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)  # the rank's threads, gloo's included
    dist.barrier()
    if rank == 0:
        finished.set()
    return times, cpus


def measure_step(cfg, world: int, warmup: int, steps: int, timed_s: float) -> dict:
    """The median step (a step ends when its slowest rank ends), each rank's median CPU
    seconds per step, and the cores the other users leave the ranks while the steps run
    (OthersCpuWatch)."""
    import statistics

    from tests.dist import run_distributed

    with OthersCpuWatch() as watch:
        out = run_distributed(_timed_steps, world, cfg, batches(cfg), warmup, steps, timed_s,
                              watch.started, watch.finished, timeout=900)
    per_step = [max(t[i] for t, _ in out) for i in range(len(out[0][0]))]
    return {"step_s": statistics.median(per_step), "fastest_s": min(per_step),
            "per_step": per_step, "cpu_s": [statistics.median(c) for _, c in out],
            "cores_free": max(0.1, cores() - watch.cores_used()),
            "cores_stolen": watch.cores_stolen()}


def cpu_hardware(cal: dict, world: int, cores_free: float) -> Hardware:
    """This machine as the planner sees it while a run's steps ran: the `cores_free` cores the
    other users left the ranks, shared by them; cal's CPU seconds per FLOP, per layer action,
    per owned parameter of the optimizer step, DEP's fixed cost, the pinged CPU and latency
    per collective, send or receive and EP all-to-all, the runtime's CPU per event and the
    fitted waits (EVENT_FIELDS; 0 before they are fitted)."""
    c = {k: cal.get(k, 0.0) for k in CPU_FIELDS + EVENT_FIELDS}
    gpu = GPU("cpu", 1e12, 1 / max(c["sec_per_flop"], 1e-30), 2e9, 1e12)
    return Hardware(gpu, gpus_per_node=world, roce_bytes_per_s_per_node=2e9 * world,
                    efficiency=1.0, p2p_latency_s=cal["p2p_latency_s"], attention="sdpa",
                    overlap_ep=False, layer_overhead_s=c["layer_overhead_s"],
                    collective_latency_s=cal["collective_latency_s"],
                    optimizer_s_per_param=c["optimizer_s_per_param"],
                    dep_overhead_s=c["dep_overhead_s"], cores=cores_free,
                    collective_cpu_s=cal["collective_cpu_s"],
                    ep_all_to_all_cpu_s=cal["ep_all_to_all_cpu_s"], p2p_cpu_s=cal["p2p_cpu_s"],
                    **{k: c[k] for k in EVENT_FIELDS})


def _latency(rank, world, reps):
    x = torch.zeros(8)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(x)
    return (time.perf_counter() - t0) / reps


def measure_latency(reps: int = 50) -> float:
    """The wall time of a small gloo all-reduce at world 2: the bubble check's time per hop."""
    from tests.dist import run_distributed

    return max(run_distributed(_latency, 2, reps, timeout=300))


LATE_S = 0.5e-3


def _comm_ping(rank, world, reps):
    """Per collective (all-reduce, all-to-all, broadcast of a few floats), per send or receive
    (one-op batch_isend_irecv, as torch's pipeline runtime issues them) and per MoE layer's EP
    exchange through parallel/expert.py's dispatcher (forward and backward, a few tokens):
    wall and CPU (process time: the gloo threads too) per operation on this rank."""
    x, y = torch.zeros(16), torch.empty(16)
    peer = 1 - rank
    ops = {
        "collective": [lambda: dist.all_reduce(x), lambda: dist.all_to_all_single(y, x),
                       lambda: dist.broadcast(x, src=0)],
        "p2p": [lambda: dist.batch_isend_irecv(
            [dist.P2POp(dist.isend, x, peer) if rank == 0 else dist.P2POp(dist.irecv, y, peer)]
        )[0].wait(),
                lambda: dist.batch_isend_irecv(
            [dist.P2POp(dist.irecv, y, peer) if rank == 0 else dist.P2POp(dist.isend, x, peer)]
        )[0].wait()],
    }
    # one MoE layer's EP traffic as parallel/expert.py moves it (three all-to-alls forward,
    # two backward), on 2 token copies per expert
    from parallel.expert import AllToAllDispatcher

    disp = AllToAllDispatcher(dist.group.WORLD, 8, 2)

    def ep_layer():
        xs = torch.randn(16, 8, requires_grad=True)
        x_local, counts_local = disp.dispatch(xs, torch.full((8,), 2))
        disp.combine(x_local * 2).sum().backward()

    ops["ep_all_to_all"] = [ep_layer]

    def late(i: int) -> float:
        """In a step one side of an exchange is usually still computing: before operation i
        rank i % 2 computes LATE_S, so its peer waits (a wait sleeps, and waking costs CPU).
        Returns the CPU time that took, which the ping leaves out."""
        if i % 2 != rank:
            return 0.0
        c, t = time.thread_time(), time.perf_counter()
        while time.perf_counter() - t < LATE_S:
            pass
        return time.thread_time() - c

    out = {}
    for kind, fns in ops.items():
        for f in fns * 5:
            f()
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            for f in fns:
                f()
        n = reps * len(fns)
        wall, prompt_cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
        dist.barrier()
        c0, spun = time.process_time(), 0.0
        for i in range(reps):
            for f in fns:
                spun += late(i)
                f()
        out[kind] = (wall, prompt_cpu, (time.process_time() - c0 - spun) / n)
    return out


def measure_comm(reps: int = 200, repeats: int = 3,
                 best: dict[str, tuple[float, float, float]] | None = None) -> dict:
    """Gloo at world 2 (one rank per core): CPU seconds per operation when one side arrives
    late (the mean over the two ranks; an EP layer's split over its five all-to-alls) and the
    latency, the wall time of back-to-back operations beyond their CPU. Per kind of operation
    the least disturbed (fastest) of `repeats` pings is kept, and of the earlier pings in
    `best` (updated in place), so that pings spread over a run outlast a busy spell."""
    from tests.dist import run_distributed

    best = {} if best is None else best
    for _ in range(repeats):
        out = run_distributed(_comm_ping, 2, reps, timeout=300)
        for kind in out[0]:
            wall = max(o[kind][0] for o in out)
            prompt_cpu, late_cpu = (sum(o[kind][i] for o in out) / len(out) for i in (1, 2))
            if kind not in best or wall < best[kind][0]:
                best[kind] = (wall, prompt_cpu, late_cpu)
    return {"collective_cpu_s": best["collective"][2],
            "ep_all_to_all_cpu_s": best["ep_all_to_all"][2] / 5,
            "collective_latency_s": max(0.0, best["collective"][0] - best["collective"][1]),
            "p2p_cpu_s": best["p2p"][2],
            "p2p_latency_s": max(0.0, best["p2p"][0] - best["p2p"][1])}


def vision_items_of(cfg, per_replica) -> tuple[list[int], list[int]]:
    patches, replica_of = [], []
    for d, b in enumerate(per_replica):
        if b["grid_thw"] is not None:
            for t, h, w in b["grid_thw"].tolist():
                patches.append(t * h * w)
                replica_of.append(d)
    return patches, replica_of


CALIBRATION = [dict(microbatches=4, rows=8), dict(microbatches=1, rows=8),
               dict(microbatches=2, rows=4), dict(microbatches=4, rows=8, dep=False)]
CALIBRATION_PASSES = 2  # each world-1 run twice: the fit sees six, so one disturbed run moves it less


def _predict(cfg, hw):
    return plan(cfg, hw, vision_items=vision_items_of(cfg, batches(cfg))).step_time_s


def nonneg_lstsq(rows: list[list[float]], target: list[float]) -> list[float]:
    """Non-negative least squares by enumeration of the column subsets (a handful of terms):
    the best fit among those whose unconstrained solution has no negative term."""
    import numpy as np

    a, b = np.array(rows, dtype=float), np.array(target, dtype=float)
    n = a.shape[1]
    best = (float((b ** 2).sum()), np.zeros(n))  # all terms 0
    for mask in range(1, 2 ** n):
        cols = [i for i in range(n) if mask >> i & 1]
        sol, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        if (sol < 0).any():
            continue
        full = np.zeros(n)
        full[cols] = sol
        err = float(((a @ full - b) ** 2).sum())
        if err < best[0]:
            best = (err, full)
    return [float(x) for x in best[1]]


def world1_config(base, c: dict):
    return _with_rows(c["rows"], layout_config, base, dict(LAYOUTS[0][1], **{
        k: v for k, v in c.items() if k != "rows"}))


# Layouts that are not among LAYOUTS, calibrating the runtime's CPU per event
# (parallel/step_time.py Hardware, counted by cpu_event_counts). Their micro-batches have 2
# rows, as the checked layouts' do: a layer's CPU is not linear in its tokens at a row or two,
# so a fit on other micro-batch sizes charges the difference to the per-event constants. What
# each run has:
EVENT_CALIBRATION = [
    # DP2, EP1, no DEP, 2 micro-batches: ZeRO-1's parameters only (dense and experts)
    dict(pp=1, virtual_stages=1, dp=2, ep=1, microbatches=2, schedule="1f1b", dep=False, rows=4),
    # PP2 x V1, 8 micro-batches: pipeline actions only
    dict(pp=2, virtual_stages=1, dp=1, ep=1, microbatches=8, schedule="1f1b", dep=False, rows=16),
    # PP2 x V2 under interleaved 1F1B (the checked layouts' schedule), 8 micro-batches
    dict(pp=2, virtual_stages=2, dp=1, ep=1, microbatches=8, dep=False, rows=16),
    # DP2 x EP2, no DEP, 2 micro-batches of 2 rows: EP layer passes (and ZeRO-1's dense)
    dict(pp=1, virtual_stages=1, dp=2, ep=2, microbatches=2, schedule="1f1b", dep=False, rows=4),
    # DP2, EP1, DEP, 2 micro-batches: DEP exchanges (and ZeRO-1 of the encoder too)
    dict(pp=1, virtual_stages=1, dp=2, ep=1, microbatches=2, schedule="1f1b", dep=True, rows=4),
    # world 4, twice the ranks of the cores: crowded communication (and the events above)
    dict(pp=1, virtual_stages=1, dp=4, ep=2, microbatches=2, schedule="1f1b", dep=False, rows=4),
    dict(pp=4, virtual_stages=1, dp=1, ep=1, microbatches=8, schedule="1f1b", dep=False, rows=16),
    dict(pp=2, virtual_stages=1, dp=2, ep=1, microbatches=4, schedule="1f1b", dep=True, rows=8),
    # PP2 x DP2 x EP2: EP in a pipeline, which costs a rank less per MoE layer than EP alone
    dict(pp=2, virtual_stages=1, dp=2, ep=2, microbatches=4, schedule="1f1b", dep=False, rows=8),
    # PP2 x V2 x DP2 x EP2, 8 micro-batches: interleaving's extra actions on ranks under EP
    dict(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=8, dep=False, rows=16),
    # world 8, four times the ranks of the cores: the crowding of the checked world-8 layouts
    dict(pp=1, virtual_stages=1, dp=8, ep=2, microbatches=2, schedule="1f1b", dep=False, rows=4),
    dict(pp=2, virtual_stages=1, dp=4, ep=1, microbatches=4, schedule="1f1b", dep=True, rows=8),
]
EVENT_PASSES = 4  # each of these layouts four times, spread over the rounds
# The CPU constants fitted on the calibration runs' CPU time (Hardware's fields; the pinged
# CPU per collective, send or receive and EP all-to-all are kept as measured)
CPU_FIELDS = ("sec_per_flop", "layer_overhead_s", "optimizer_s_per_param", "dep_overhead_s",
              "zero_param_cpu_s", "ep_layer_cpu_s", "pp_action_cpu_s", "ep_pp_action_cpu_s",
              "dep_exchange_cpu_s", "crowded_op_cpu_s")
EVENT_FIELDS = CPU_FIELDS[4:] + ("crowded_op_wait_s", "op_wait_s")


def _layout_key(par: dict) -> tuple:
    return (par["pp"], par["virtual_stages"], par["dp"], par["ep"], par["microbatches"],
            par.get("schedule", "interleaved_1f1b"), par["dep"])


def _with_rows(rows: int, fn, *args):
    global ROWS_PER_REPLICA
    saved, ROWS_PER_REPLICA = ROWS_PER_REPLICA, rows
    try:
        return fn(*args)
    finally:
        ROWS_PER_REPLICA = saved


def event_config(base, c: dict):
    par = {k: v for k, v in c.items() if k != "rows"}
    assert _layout_key(par) not in {_layout_key(lay) for _, lay in LAYOUTS}, par
    return _with_rows(c["rows"], layout_config, base, par)


def _plan_cpu(cfg, hw) -> list[float]:
    """The planner's CPU seconds per step of each pipeline rank (on a core of its own)."""
    return plan(cfg, hw, vision_items=vision_items_of(cfg, batches(cfg))).step["cpu_s_per_rank"]


def _measured_cpu(cfg, got: dict) -> list[float]:
    """Each pipeline rank's CPU seconds per step: the mean over its DP replicas (rank =
    pp_rank * dp + dp_rank, parallel/mesh.py)."""
    dp = cfg.parallel.dp
    return [sum(got["cpu_s"][r * dp:(r + 1) * dp]) / dp for r in range(cfg.parallel.pp)]


WAIT_FIELDS = ("op_wait_s", "crowded_op_wait_s")


def fit_waits(runs: list[tuple[dict, object, dict]], cal: dict, step: float = 1e-4) -> dict:
    """The wall-time constants beside the pinged latencies (WAIT_FIELDS: the wait per
    communication operation, and the extra wait of crowded ranks) by non-negative least
    squares on the calibration runs' relative step-time errors (Gauss-Newton on the planner's
    replay, four iterations), the CPU constants held at cal's."""
    def predict(c, cfg, got, waits):
        world = cfg.parallel.pp * cfg.parallel.dp
        return _with_rows(c["rows"], _predict, cfg, cpu_hardware(
            dict(cal, **waits), world, got["cores_free"]))

    est = {k: 0.0 for k in WAIT_FIELDS}
    for _ in range(4):
        rows_a, target = [], []
        for c, cfg, got in runs:
            p0 = predict(c, cfg, got, est)
            slopes = [(predict(c, cfg, got, dict(est, **{k: est[k] + step})) - p0) / step
                      for k in WAIT_FIELDS]
            rows_a.append([x / got["step_s"] for x in slopes])
            target.append((got["step_s"] - p0 + sum(x * est[k] for x, k in zip(slopes, WAIT_FIELDS)))
                          / got["step_s"])
        est = dict(zip(WAIT_FIELDS, nonneg_lstsq(rows_a, target)))
    return est


def calibrate(base, comm: dict, runs: list[tuple[dict, object, dict]]) -> dict:
    """CPU_FIELDS by non-negative least squares on the calibration runs' CPU time (relative
    residuals): each pipeline rank's measured CPU seconds per step (process time, the gloo
    threads included) against the planner's (`cpu_s_per_rank`), which is linear in these
    constants, so its columns are its values at a unit of each. `runs`: (entry, its config,
    measure_step's result), the world-1 runs and the EVENT_CALIBRATION runs. CPU time does not depend on
    where the schedule's waits fall, so the fit needs no replay; the cores left enter only
    through the crowding of crowded_op_cpu_s. The pinged latencies stay as measured; the
    waits are fitted after (fit_waits)."""
    zero = {k: 0.0 for k in CPU_FIELDS}
    rows_a, target, index = [], [], []
    for c, cfg, got in runs:
        world = cfg.parallel.pp * cfg.parallel.dp
        predict = lambda f: _with_rows(c["rows"], _plan_cpu, cfg, cpu_hardware(  # noqa: E731
            dict(comm, **f), world, got["cores_free"]))
        base_cpu = predict(zero)
        unit = [predict(dict(zero, **{k: 1.0})) for k in CPU_FIELDS]
        for r, measured in enumerate(_measured_cpu(cfg, got)):
            # relative residuals, as the goal is relative: a fast rank counts as a slow one
            rows_a.append([(u[r] - base_cpu[r]) / measured for u in unit])
            target.append((measured - base_cpu[r]) / measured)
            index.append((c, cfg, got, r, base_cpu[r], measured))
    # columns scaled to unit norm: the constants differ by orders of magnitude
    import numpy as np

    a = np.array(rows_a)
    norm = np.linalg.norm(a, axis=0)
    norm[norm == 0] = 1.0
    sol = [float(x / n) for x, n in zip(nonneg_lstsq((a / norm).tolist(), target), norm)]
    cal = dict(comm, **dict(zip(CPU_FIELDS, sol)))
    cal["sec_per_flop"] = max(cal["sec_per_flop"], 1e-30)
    cal.update(fit_waits(runs, cal))
    fitted = []
    for (c, cfg, got, r, b0, measured), row in zip(index, rows_a):
        world = cfg.parallel.pp * cfg.parallel.dp
        fitted.append(dict(c, world=world, pp_rank=r, measured_cpu_s=round(measured, 4),
                           fitted_cpu_s=round(b0 + measured * sum(x * y for x, y in zip(row, sol)),
                                              4),
                           measured_step_s=round(got["step_s"], 4),
                           fitted_step_s=round(_with_rows(c["rows"], _predict, cfg, cpu_hardware(
                               cal, world, got["cores_free"])), 4),
                           cores_free=round(got["cores_free"], 2),
                           cores_stolen=round(got["cores_stolen"], 3)))
    return dict(cal, runs=fitted)


STEP_ROUNDS = 2  # rounds of the interleaved measurement order (see check_step_time)


def _prediction(cfg, cal: dict, world: int, cores_free: float, measured: float) -> dict:
    """The planner's step and per-rank CPU for a checked layout on `cores_free` cores, and its
    error against the measured step."""
    hw = cpu_hardware(cal, world, cores_free)
    pred = _predict(cfg, hw)
    return dict(predicted_step_s=round(pred, 4),
                predicted_cpu_s=[round(x, 4) for x in _plan_cpu(cfg, hw)],
                rel_error=round(abs(pred - measured) / measured, 4),
                within_20pct=abs(pred - measured) <= 0.2 * measured)


def _checked_row(name: str, base, layout: tuple[int, dict], got: list[dict], cal: dict,
                 loads: list[float]) -> dict:
    """A checked layout's measurement (the median of its steps over all its runs) against the
    planner on the mean of its runs' cores left; `run_cv` is the spread of its runs' medians
    (standard deviation over mean): how far the machine itself moves one layout's step."""
    import statistics

    world, par = layout
    cfg = layout_config(base, par)
    per_step = [t for g in got for t in g["per_step"]]
    measured = statistics.median(per_step)
    cores_free = sum(g["cores_free"] for g in got) / len(got)
    cpu_measured = [sum(x) / len(x) for x in zip(*(_measured_cpu(cfg, g) for g in got))]
    return dict(config=name, world=world, **par, measured_step_s=round(measured, 4),
                fastest_step_s=round(min(per_step), 4),
                run_medians_s=[round(g["step_s"], 4) for g in got],
                run_cv=round(statistics.pstdev([g["step_s"] for g in got])
                             / statistics.mean(g["step_s"] for g in got), 4),
                measured_cpu_s=[round(x, 4) for x in cpu_measured],
                **_prediction(cfg, cal, world, cores_free, measured),
                cores=cores(), cores_free=round(cores_free, 2),
                run_cores_free=[round(g["cores_free"], 2) for g in got],
                run_cores_stolen=[round(g["cores_stolen"], 3) for g in got],
                loadavg_before=loads[0], loadavg_after=loads[-1])


COMM_FIELDS = ("collective_cpu_s", "ep_all_to_all_cpu_s", "collective_latency_s", "p2p_cpu_s",
               "p2p_latency_s")  # measure_comm's, kept in a calibration as measured
# what calibrate() adds to a run's entry
_RUN_RECORD = ("world", "pp_rank", "measured_cpu_s", "fitted_cpu_s", "measured_step_s",
               "fitted_step_s", "cores_free", "cores_stolen")


def _recorded_runs(base, cal: dict) -> list[tuple[dict, object, dict]]:
    """The calibration runs of a recorded calibration (its `runs`, a row per pipeline rank
    with the mean CPU of its DP replicas) as calibrate() takes them."""
    runs = []
    for e in cal["runs"]:
        if e["pp_rank"] == 0:
            c = {k: v for k, v in e.items() if k not in _RUN_RECORD}
            cfg = event_config(base, c) if "pp" in c else world1_config(base, c)
            # runs recorded before stolen time was counted have none
            runs.append((c, cfg, {"cpu_s": [], "step_s": e["measured_step_s"],
                                  "cores_free": e["cores_free"],
                                  "cores_stolen": e.get("cores_stolen", 0.0)}))
        _, cfg, got = runs[-1]
        got["cpu_s"] += [e["measured_cpu_s"]] * cfg.parallel.dp
    return runs


def refit_step_time(recorded: dict) -> tuple[list[dict], dict]:
    """The step-time part of a recorded result calibrated and predicted again from its
    measurements, with the planner as it is now (nothing is measured): what a change of the
    model does to the same runs."""
    rows, calibrations = [], {}
    for name, base in configs().items():
        old = recorded["calibration"][name]
        cal = calibrations[name] = calibrate(base, {k: old[k] for k in COMM_FIELDS},
                                             _recorded_runs(base, old))
        for row in recorded["step_time"]:
            if row["config"] != name:
                continue
            world, par = next(lay for lay in LAYOUTS[1:] if lay[0] == row["world"] and all(
                row.get(k) == v for k, v in lay[1].items()))
            rows.append(dict(row, **_prediction(layout_config(base, par), cal, world,
                                                row["cores_free"], row["measured_step_s"])))
    return rows, calibrations


def check_step_time(warmup: int, steps: int, timed_s: float) -> tuple[list[dict], dict]:
    """Three gloo pings, then per config STEP_ROUNDS rounds of: a ping, a pass over the twelve
    checked layouts, half of the EVENT_CALIBRATION runs, the world-1 calibration (DEP on and
    off), a pass over the checked layouts in the reverse order, the other half of the
    EVENT_CALIBRATION runs. The machine's speed drifts over minutes (one layout's runs a few
    minutes apart differ by up to a third on an idle machine); interleaving the calibration
    with the checked runs lets both see the same spells, four runs of each checked layout
    spread over the config's measurement average the drift as the calibration's repeats do,
    and the alternating order evens out the layouts' mean times. A config's
    calibration takes the fastest ping of each kind so far (a busy spell at the start once
    doubled every pinged cost). Only the calibration runs are fitted; a checked layout's step
    is the median of its steps over its runs, predicted on the mean of its runs' cores left
    (_checked_row)."""
    pings: dict = {}
    comm = measure_comm(best=pings)
    print(json.dumps({"comm": comm}), flush=True)
    rows, calibrations = [], {}
    for name, base in configs().items():
        runs = []  # (entry, config, measured)
        checked = {i: [] for i in range(1, len(LAYOUTS))}
        loads = {i: [] for i in checked}
        half = EVENT_PASSES // (2 * STEP_ROUNDS)

        def events():
            for c in EVENT_CALIBRATION * half:
                cfg = event_config(base, c)
                runs.append((c, cfg, _with_rows(c["rows"], measure_step, cfg, c["pp"] * c["dp"],
                                                warmup, steps, timed_s)))

        def check_pass(order):
            for i in order:
                world, par = LAYOUTS[i]
                loads[i].append(loadavg())
                checked[i].append(measure_step(layout_config(base, par), world, warmup, steps,
                                               timed_s))
                loads[i].append(loadavg())

        for _ in range(STEP_ROUNDS):
            comm = measure_comm(repeats=1, best=pings)
            check_pass(list(checked))
            events()
            for c in CALIBRATION * (CALIBRATION_PASSES // STEP_ROUNDS):
                cfg = world1_config(base, c)
                runs.append((c, cfg, _with_rows(c["rows"], measure_step, cfg, 1, warmup, steps,
                                                timed_s)))
            check_pass(list(reversed(checked)))
            events()
        cal = calibrations[name] = calibrate(base, comm, runs)
        print(json.dumps({name: cal}), flush=True)
        for i, got in checked.items():
            rows.append(_checked_row(name, base, LAYOUTS[i], got, cal, loads[i]))
            print(json.dumps(rows[-1]), flush=True)
    return rows, calibrations


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-k25", action="store_true", help="skip the K2.5-width probes")
    ap.add_argument("--skip-bubble", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--steps-only", action="store_true",
                    help="only the step-time part (--skip-k25 --skip-bubble)")
    ap.add_argument("--bubble-cost-ms", type=float, default=200.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run, at least")
    ap.add_argument("--timed-s", type=float, default=3.0,
                    help="seconds of timed steps per run, about (more steps if needed)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/plan_check.json"))
    ap.add_argument("--refit", metavar="FILE",
                    help="measure nothing: calibrate and predict the step-time part of a recorded "
                         "result again with the planner as it is now; writes --out")
    args = ap.parse_args(argv)
    if args.refit:
        out = json.loads(Path(args.refit).read_text())
        out["step_time"], out["calibration"] = refit_step_time(out)
        out["step_time_refit"] = True  # the measurements are the recorded run's
        for row in out["step_time"]:
            print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
        return 0
    if args.steps_only:
        args.skip_k25 = args.skip_bubble = True
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
        out["step_time"], out["calibration"] = check_step_time(args.warmup, args.steps, args.timed_s)
        out.pop("step_time_refit", None)
    out["loadavg_end"] = loadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

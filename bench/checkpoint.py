"""Checkpoint benchmark: 4 CPU ranks (gloo), each with ZeRO-1-like state, against a local
directory and the embedded SeaweedFS S3 server.

Per rank (default --dense-mib-params=96 --expert-mib-params=64, about 0.55 GB per rank):
    bf16 weights of every dense tensor (replicated: data parallel) and of its quarter of each
    expert stack (EP4), fp32 masters and fp32 momentum of what it owns (dense tensor i belongs to
    rank i % 4, its experts to itself).
Measured, per backend:
    sync_save_s          a synchronous save (training waits for all of it)
    async_stall_s        how long an asynchronous save stops training: the second save of a run
                         (plan reused, staging buffers reused), the first one too; split into
                         async_plan_s (the agreement on the plan) and async_host_copy_s
    async_write_s        from save() to the commit on rank 0 (background)
    write_MBps           data bytes / async_write_s, all ranks together
    bytes_per_param      data bytes / parameters, weights rebuilt from masters; and when the
                         weights do not round from the masters (so they are stored)
    resume_s, requests   load_latest on every rank: seconds, store requests per rank
Writes bench/results/checkpoint.json. The machine this ran on is shared: 2 cores, 24 GB RAM,
so the state is kept near 0.5 GB per rank (not the few GB of a real rank).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD = 4
LAYERS = 4
EXPERTS = 8


def make_state(rank: int, dense_params: int, expert_params: int, off_masters: bool):
    gen = torch.Generator().manual_seed(1234)
    state = {}
    n_dense = 12
    per = dense_params // n_dense
    for i in range(n_dense):
        master = torch.randn(per // 1024, 1024, generator=gen)
        w = master.to(torch.bfloat16)
        if off_masters:
            w = w + 1  # a weight that is not its master rounded: stored on its own
        state[f"model/dense{i}.weight"] = w
        if i % WORLD == rank:
            state[f"master/dense{i}.weight"] = master
            state[f"optim/dense{i}.weight/momentum_buffer"] = torch.zeros_like(master)
    rows = expert_params // LAYERS // EXPERTS // 1024
    local = EXPERTS // WORLD
    for layer in range(LAYERS):
        gen_l = torch.Generator().manual_seed(layer * 10 + rank)
        stack = torch.randn(local, rows, 1024, generator=gen_l)
        w = stack.to(torch.bfloat16)
        if off_masters:
            w = w + 1
        mom = torch.zeros_like(stack)
        for j in range(local):
            e = rank * local + j
            base = f"layers.{layer}.experts.w"
            state[f"model/{base}/expert-{e}"] = w[j]
            state[f"master/{base}/expert-{e}"] = stack[j]
            state[f"optim/{base}/expert-{e}/momentum_buffer"] = mom[j]
    params = n_dense * per + LAYERS * EXPERTS * rows * 1024
    return state, params


class Counting:
    """Counts store requests (what S3 would bill and throttle)."""

    def __init__(self, store):
        self._store, self.requests = store, 0

    def _count(self, fn):
        def call(*a, **k):
            self.requests += 1
            return fn(*a, **k)
        return call

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if name in ("get", "put", "size", "list", "delete", "exists"):
            return self._count(attr)
        return attr


def _body(rank, port, url, args, out_q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from data.store import open_store
    from train.checkpoint import CheckpointManager

    def store():
        return open_store(url) if not url.startswith("s3://") else args.s3_store()

    res = {}
    state, params = make_state(rank, args.dense, args.expert, off_masters=False)
    res["params"] = params
    res["state_bytes"] = sum(t.numel() * t.element_size() for t in state.values())

    sync = CheckpointManager(store(), keep_last=1, async_save=False)
    dist.barrier()
    t0 = time.monotonic()
    sync.save(1, state)
    res["sync_save_s"] = time.monotonic() - t0

    amgr = CheckpointManager(store(), keep_last=1, async_save=True)
    stalls, writes, parts = [], [], []
    for step in (2, 3):
        dist.barrier()
        t0 = time.monotonic()
        amgr.save(step, state)
        stalls.append(time.monotonic() - t0)
        done = amgr.wait()
        parts.append((done["plan_s"], done["stage_s"], done["plan_reused"]))
        writes.append(done.get("commit_s", done.get("write_s")) + done["stall_s"])
        dist.barrier()
    amgr.close()
    res["async_stall_s"], res["async_write_s"], res["stall_parts"] = stalls, writes, parts
    res["written_bytes"] = amgr.last_save["bytes"]

    counting = Counting(store())
    target = {k: torch.empty_like(v) for k, v in state.items()}
    dist.barrier()
    t0 = time.monotonic()
    loaded = CheckpointManager(counting, keep_last=1).load_latest(target)
    res["resume_s"] = time.monotonic() - t0
    res["resume_requests"] = counting.requests
    res["resume_exact"] = loaded is not None and all(torch.equal(target[k], v)
                                                     for k, v in state.items())
    del target

    off, _ = make_state(rank, args.dense, args.expert, off_masters=True)
    del state
    mgr = CheckpointManager(store(), keep_last=1)
    mgr.save(4, off)
    res["written_bytes_weights_stored"] = mgr.last_save["bytes"]
    out_q.put((rank, res))
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_backend(url, args):
    load_before = os.getloadavg()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_body, args=(r, port, url, args, q)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=1800) for _ in range(WORLD))
    for p in procs:
        p.join(timeout=60)
    ranks = [results[r] for r in range(WORLD)]
    params = ranks[0]["params"]
    data = sum(r["written_bytes"] for r in ranks)
    stored = sum(r["written_bytes_weights_stored"] for r in ranks)
    sync_s = max(r["sync_save_s"] for r in ranks)
    stall = [max(r["async_stall_s"][i] for r in ranks) for i in range(2)]
    write_s = max(r["async_write_s"][-1] for r in ranks)
    return {
        "state_bytes_per_rank": ranks[0]["state_bytes"],
        "params": params,
        "sync_save_s": round(sync_s, 3),
        "async_stall_s_first": round(stall[0], 3),
        "async_stall_s": round(stall[1], 3),
        "async_stall_over_sync": round(stall[1] / sync_s, 4),
        # of the second stall, slowest rank: planning (the one all_reduce when the plan is
        # reused) and the host copy
        "async_plan_s": round(max(r["stall_parts"][1][0] for r in ranks), 3),
        "async_host_copy_s": round(max(r["stall_parts"][1][1] for r in ranks), 3),
        "async_plan_reused": all(r["stall_parts"][1][2] for r in ranks),
        "async_write_s": round(write_s, 3),
        "write_MBps": round(data / write_s / 1e6, 1),
        "bytes_per_param": round(data / params, 3),
        "bytes_per_param_weights_stored": round(stored / params, 3),
        "resume_s": round(max(r["resume_s"] for r in ranks), 3),
        "resume_requests_per_rank": [r["resume_requests"] for r in ranks],
        "resume_exact": all(r["resume_exact"] for r in ranks),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dense-mib-params", type=int, default=96)
    ap.add_argument("--expert-mib-params", type=int, default=64)
    ap.add_argument("--backends", default="local,s3")
    ap.add_argument("--local-json", help="reuse the local figures of an earlier run's JSON")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint.json"))
    args = ap.parse_args()
    args.dense, args.expert = args.dense_mib_params << 20, args.expert_mib_params << 20
    out = {"world": WORLD, "note": "4 CPU ranks on a shared 2-core machine; ~0.55 GB per rank"}
    with tempfile.TemporaryDirectory(prefix="mmpt-bench-ckpt-") as tmp:
        if args.local_json:
            out["local"] = json.loads(Path(args.local_json).read_text())["local"]
        elif "local" in args.backends:
            out["local"] = run_backend(str(Path(tmp) / "local"), args)
            print(json.dumps({"local": out["local"]}, indent=1), flush=True)
        if "s3" in args.backends:
            from data.embedded_s3 import EmbeddedS3

            with EmbeddedS3(Path(tmp) / "s3", bucket="mmpt-bench-ckpt", max_volumes=0) as s3:
                from train.config import StoreConfig

                # what `mmpt train` opens: the checkpoint retry budget, 8 requests at once
                opts = StoreConfig().checkpoint_store_opts(8)
                args.s3_store = lambda: s3.store("ckpt", **opts)
                out["s3"] = run_backend("s3://mmpt-bench-ckpt/ckpt", args)
            print(json.dumps({"s3": out["s3"]}, indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Run a function on N gloo ranks inside one test: fork after imports, one thread per rank.

    from tests.dist import run_distributed

    def body(rank, world, scale):
        t = torch.ones(1) * rank * scale
        torch.distributed.all_reduce(t)
        return t.item()

    assert run_distributed(body, 4, 2.0) == [12.0] * 4

The function runs with the default process group initialised (gloo, TCP store on a free loopback
port). Its return value comes back per rank (it must be picklable: results are test data). Any
rank's exception fails the call with every failing rank's own traceback, because a crash on one
rank usually shows up on the others only as "connection closed". A timeout kills all ranks.

`backend="nccl"` (the GPU lane) gives rank r the device cuda:r and starts ranks by spawn, since
a forked child cannot use CUDA once the parent has; fn must then be importable (module level).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class DistributedTestError(AssertionError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable, rank: int, world: int, port: int, args: tuple, kwargs: dict,
           results: mp.Queue, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    try:
        device = None
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, device_id=device)
        out = fn(rank, world, *args, **kwargs)
        # Plain pickle copies tensors by value; the queue's own (torch) pickler would share
        # their storage by file descriptor, which dies with this process before the parent reads.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # report everything, including SystemExit/KeyboardInterrupt
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        # mp.Queue.put hands the pickled result to a feeder thread: wait for it to reach the
        # pipe, or os._exit drops large results (the rank then "gave no result").
        results.close()
        results.join_thread()
        # Skip atexit handlers and buffered-stream flushing inherited from the parent (pytest).
        os._exit(0)


def run_distributed(fn: Callable, world: int, *args: Any, timeout: float = 300.0,
                    backend: str = "gloo", **kwargs: Any) -> list[Any]:
    """Run fn(rank, world, *args, **kwargs) on `world` forked ranks; return results by rank."""
    ctx = mp.get_context("spawn" if backend == "nccl" else "fork")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args, kwargs, results, backend),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[bool, Any]] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(outcome) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
                outcome[rank] = (ok, pickle.loads(value) if ok else value)
                if not ok:
                    # Give the others a moment to report their own failures, then stop waiting.
                    deadline = min(deadline, time.monotonic() + 5.0)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=0.5)
            if p.is_alive():
                p.kill()
                p.join()

    failed = {r: v for r, (ok, v) in sorted(outcome.items()) if not ok}
    missing = [r for r in range(world) if r not in outcome]
    if failed or missing:
        parts = [f"--- rank {r} raised ---\n{tb}" for r, tb in failed.items()]
        if missing:
            codes = {r: procs[r].exitcode for r in missing}
            parts.append(f"--- ranks {missing} gave no result (timeout {timeout}s or crash; "
                         f"exit codes {codes}) ---")
        raise DistributedTestError(f"{fn.__name__} failed on {world} ranks:\n" + "\n".join(parts))
    return [outcome[r][1] for r in range(world)]

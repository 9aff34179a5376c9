"""Run a function on N gloo ranks inside one test: one process and one thread per rank.

    from tests.dist import run_distributed

    def body(rank, world, scale):
        t = torch.ones(1) * rank * scale
        torch.distributed.all_reduce(t)
        return t.item()

    assert run_distributed(body, 4, 2.0) == [12.0] * 4

The function runs with the default process group initialised (gloo, TCP store on a free loopback
port). Its return value comes back per rank (it must be picklable: results are test data). Any
rank's exception fails the call with every failing rank's own traceback, because a crash on one
rank usually shows up on the others only as "connection closed". A timeout stops all ranks.
Each rank's stderr is echoed to the test's; for a rank that crashed or was stopped at the
timeout (by SIGABRT, then SIGKILL), the error also ends with its stderr, where faulthandler has
printed every thread's Python stack.

Ranks are forked from a forkserver: a process that has imported torch and the trainer and has
run nothing, so each rank starts as fast as a fork of pytest would but inherits none of its
threads (torch's OpenMP pool, decoders, servers of earlier tests), whose copied locks and thread
handles are unusable in a child. Hence fn and its arguments are pickled: fn must be defined at
module level. Each rank gets the caller's current environment and working directory.

`backend="nccl"` (the GPU lane) gives rank r the device cuda:r and starts ranks by spawn, since
a child cannot use CUDA once the parent has.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import socket
import sys
import tempfile
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
           results: mp.Queue, backend: str, environ: dict[str, str], stderr_path: str) -> None:
    err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)  # C++ aborts and faulthandler write to fd 2, not to sys.stderr's buffer
    os.close(err)
    faulthandler.enable(sys.stderr, all_threads=True)
    torch.set_num_threads(1)
    os.environ.clear()
    os.environ.update(environ)
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
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # no atexit handlers: the process group is gone and the result is sent


# What the forkserver imports once, so that ranks do not import it each.
_PRELOAD = ["torch", "torch.distributed", "numpy", "tests.dist", "train.trainer"]


def rank_context(backend: str = "gloo"):
    """The multiprocessing context ranks start in; a lock or event handed to a rank comes
    from it."""
    if backend == "nccl":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_distributed(fn: Callable, world: int, *args: Any, timeout: float = 300.0,
                    backend: str = "gloo", **kwargs: Any) -> list[Any]:
    """Run fn(rank, world, *args, **kwargs) on `world` ranks; return results by rank."""
    ctx = rank_context(backend)
    results: mp.Queue = ctx.Queue()
    port = free_port()
    logs = tempfile.mkdtemp(prefix="ranks-")
    stderr_paths = [os.path.join(logs, f"rank-{r}.stderr") for r in range(world)]
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args, kwargs, results, backend,
                                              dict(os.environ), stderr_paths[r]),
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
                _stop(p)
        stderr = _collect(stderr_paths)
        shutil.rmtree(logs, ignore_errors=True)

    failed = {r: v for r, (ok, v) in sorted(outcome.items()) if not ok}
    missing = [r for r in range(world) if r not in outcome]
    if failed or missing:
        parts = [f"--- rank {r} raised ---\n{tb}" for r, tb in failed.items()]
        if missing:
            codes = {r: procs[r].exitcode for r in missing}
            parts.append(f"--- ranks {missing} gave no result (timeout {timeout}s or crash; "
                         f"exit codes {codes}) ---")
            parts += [f"--- rank {r} stderr (end) ---\n{stderr[r][-_STDERR_TAIL:]}"
                      for r in missing if stderr[r]]
        raise DistributedTestError(f"{fn.__name__} failed on {world} ranks:\n" + "\n".join(parts))
    return [outcome[r][1] for r in range(world)]


_STDERR_TAIL = 4000  # characters of a crashed rank's stderr kept in the error


def _stop(p) -> None:
    """SIGABRT first, so that faulthandler prints where every thread of the rank was stuck."""
    try:
        os.kill(p.pid, signal.SIGABRT)
    except ProcessLookupError:  # it has just exited
        pass
    p.join(timeout=5.0)
    if p.is_alive():
        p.kill()
        p.join()


def _collect(paths: list[str]) -> list[str]:
    """Each rank's stderr, also echoed to this process's stderr (the test's captured output)."""
    out = []
    for r, path in enumerate(paths):
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except FileNotFoundError:  # the rank never started
            text = ""
        if text:
            sys.stderr.write(f"--- rank {r} stderr ---\n{text}")
        out.append(text)
    return out

"""SMOKE training loop: a stand-in used ONLY by the launcher tests (torchrun, SLURM, restarts).

This is not the mmpt trainer. It trains a tiny MLP on a synthetic regression task so the launch
machinery (process group per rank, world-size checks, JSONL logs, periodic checkpoints, automatic
restart that resumes from the newest complete checkpoint) can be tested in seconds on CPU. The
real trainer (`train.trainer.run`) replaces it: `launch.train.run` calls the real one whenever it
exists, and this loop only when asked for with `mmpt train --smoke` (or while there is no
trainer yet).

What it does, per rank:
- builds the MLP from `train.seed` (identical on every rank) and averages gradients over all
  ranks with one all-reduce per parameter on the process group `launch.train` initialised (not
  DDP: DDP re-buckets gradients after its first step, which changes the summation order, so a
  resumed run would differ from an uninterrupted one in the last bits);
- draws each step's batch from a generator keyed by (seed, step, rank): the data depends on the
  position only, so a resumed run sees exactly the batches an uninterrupted run would;
- rank 0 logs loss and a parameter fingerprint per step to `RUN_DIR/metrics.jsonl`
  (`train.metrics.MetricsLogger`); every rank's fingerprint is all-gathered and compared;
- rank 0 saves `{model, optimizer, step}` every `checkpoint.every` steps to
  `CKPT_DIR/smoke-step-XXXXXXXX.pt` (written to a temporary name, then renamed, so a file with the
  final name is complete); the last `checkpoint.keep_last` are kept;
- on start, every rank loads the newest checkpoint that loads (`torch.load(weights_only=True)`);
  an unreadable one is reported and skipped;
- at the end each rank writes `RUN_DIR/smoke-final-rank{R}.json` (rank, host, steps, fingerprint).

Fault injection for the restart tests: with `MMPT_SMOKE_CRASH_AT_STEP=N`, the last rank exits
with status 3 just before step N, but only in the first attempt (`TORCHELASTIC_RESTART_COUNT`
unset or 0), so `torchrun --max-restarts=1` restarts the group once and the run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from train.config import Config
from train.metrics import MetricsLogger

FEATURES, HIDDEN = 16, 32
CKPT_NAME = re.compile(r"^smoke-step-(\d{8})\.pt$")


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def batch_at(seed: int, step: int, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of (step, rank): a pure function of its position, never of wall time or pid."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + rank)
    x = torch.randn(size, FEATURES, generator=g)
    w_true = torch.linspace(-1.0, 1.0, FEATURES)  # the function to learn, fixed
    y = torch.sin(x @ w_true).unsqueeze(1)
    return x, y


def fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter's bytes: equal strings mean bit-identical parameters."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CKPT_NAME.match(p.name))]
    return sorted(found, reverse=True)


def load_newest(ckpt_dir: Path, log=print) -> dict | None:
    """The newest checkpoint that loads, or None; unreadable ones are reported and skipped."""
    for step, path in _checkpoints(ckpt_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file is skipped, never half-loaded
            log(f"[smoke] skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
            continue
        if state.get("step") != step:
            log(f"[smoke] skipping checkpoint {path}: it records step {state.get('step')}")
            continue
        return state
    return None


def _save(ckpt_dir: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
          keep_last: int) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"smoke-step-{step:08d}.pt"
    tmp = ckpt_dir / f".{final.name}.tmp"
    torch.save({"step": step, "model": model.state_dict(), "optim": opt.state_dict()}, tmp)
    os.replace(tmp, final)  # atomic: a file under the final name is always complete
    for _, old in _checkpoints(ckpt_dir)[keep_last:]:
        old.unlink(missing_ok=True)
    return final


def _maybe_crash(step: int, rank: int, world: int) -> None:
    crash_at = os.environ.get("MMPT_SMOKE_CRASH_AT_STEP")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if crash_at and int(crash_at) == step and first_attempt and rank == world - 1:
        print(f"[smoke] rank {rank}: injected crash before step {step}", file=sys.stderr,
              flush=True)
        os._exit(3)


def run(cfg: Config) -> dict:
    """Train the stand-in MLP for cfg.train.steps steps on the initialised process group."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.train.device == "cuda" \
        else torch.device("cpu")
    seed = cfg.train.seed
    model = make_model(seed).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    if ckpt_dir is not None and cfg.checkpoint.dir.startswith("s3://"):
        raise NotImplementedError("the smoke loop checkpoints to local directories only")

    logger = MetricsLogger(cfg.train.run_dir, cfg.train.steps, enabled=rank == 0,
                           tensorboard=False)
    start = 0
    if ckpt_dir is not None:
        state = load_newest(ckpt_dir, log=print if rank == 0 else (lambda *_: None))
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            start = state["step"]
            logger.event(f"[smoke] resumed from step {start} ({ckpt_dir})")
    per_rank = max(1, cfg.data.global_batch_size // world)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    for step in range(start + 1, cfg.train.steps + 1):
        _maybe_crash(step, rank, world)
        x, y = (t.to(device) for t in batch_at(seed, step, rank, per_rank))
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():  # data parallel: the mean gradient over all ranks
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        prints = [None] * world
        dist.all_gather_object(prints, fingerprint(model))
        if len(set(prints)) != 1:
            raise RuntimeError(f"step {step}: ranks disagree on parameters: {prints}")
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            logger.log(step, {"loss": mean_loss.item() / world, "fingerprint": prints[0],
                              "world": world, "attempt": attempt})
        if ckpt_dir is not None and step % cfg.checkpoint.every == 0:
            if rank == 0:
                path = _save(ckpt_dir, step, model, opt, cfg.checkpoint.keep_last)
                logger.event(f"[smoke] checkpoint {path}")
            dist.barrier()  # nobody runs ahead of a checkpoint that is not written yet
    logger.close()

    result = {"rank": rank, "world": world, "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
              "node_rank": int(os.environ.get("GROUP_RANK", 0)), "host": socket.gethostname(),
              "pid": os.getpid(), "attempt": attempt, "start_step": start, "steps": cfg.train.steps,
              "fingerprint": fingerprint(model)}
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"smoke-final-rank{rank}.json").write_text(json.dumps(result) + "\n")
    return result

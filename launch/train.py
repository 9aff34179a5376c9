"""`mmpt train --config FILE [--section.field=value ...]`: the training entry point, one rank per process.

Run it directly for one process, or under torchrun for many:

    mmpt train --config configs/tiny.toml
    torchrun --nproc-per-node=4 -m train.cli train --config configs/tiny.toml --parallel.dp=4

Under torchrun (or SLURM's `launch/slurm/train.sbatch`, which runs torchrun on every node) the
rank comes from the environment torchrun sets: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT. Each process then:
1. loads the config (TOML + overrides) and checks WORLD_SIZE == parallel.pp * parallel.dp, before
   touching the network, so a mismatch fails at once on every rank with the numbers named;
2. initialises the default process group: gloo for `train.device = "cpu"` (one compute thread
   per rank, so N ranks on N cores do not oversubscribe), nccl for "cuda" (device = LOCAL_RANK);
3. calls the trainer, `train.trainer.run(cfg)`, and destroys the process group when it returns
   or fails. `mmpt` then ends the process without interpreter finalization and prints a
   `train.errors.UserError` as one line (train/cli.py explains both).
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from train.config import Config, load_config
from train.errors import ConfigError


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} must be an integer") from None


def dist_env() -> dict[str, int | str]:
    """Rank layout from torchrun's environment; a plain `mmpt train` is rank 0 of 1."""
    env = {"rank": _env_int("RANK", 0), "world_size": _env_int("WORLD_SIZE", 1),
           "local_rank": _env_int("LOCAL_RANK", 0),
           "master_addr": os.environ.get("MASTER_ADDR", ""),
           "master_port": os.environ.get("MASTER_PORT", "")}
    if not 0 <= env["rank"] < env["world_size"]:
        raise ConfigError(f"RANK={env['rank']} is outside WORLD_SIZE={env['world_size']}")
    if env["world_size"] > 1 and not (env["master_addr"] and env["master_port"]):
        raise ConfigError("WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT (start the ranks "
                          "with torchrun, or launch/slurm/train.sbatch)")
    return env


def check_world_size(cfg: Config, world_size: int) -> None:
    """Every rank must belong to exactly one (pipeline stage, data-parallel replica) pair."""
    p = cfg.parallel
    if world_size != p.pp * p.dp:
        raise ConfigError(
            f"world size {world_size} does not match parallel.pp * parallel.dp = "
            f"{p.pp} * {p.dp} = {p.pp * p.dp}; launch {p.pp * p.dp} processes or set "
            f"--parallel.dp={world_size // p.pp if world_size % p.pp == 0 else '?'} "
            f"(expert parallelism lives inside the data-parallel ranks: parallel.ep divides "
            f"parallel.dp)")


def init_process_group(cfg: Config, env: dict) -> str:
    """gloo on CPU (1 thread per rank), nccl on CUDA (one device per local rank)."""
    if cfg.train.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but torch sees no CUDA device on this node")
        if env["local_rank"] >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={env['local_rank']} but this node has only "
                              f"{torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(env["local_rank"])
        # NCCL for CUDA tensors: every per-step collective gets device tensors (counted in
        # tests/test_device_placement.py). gloo only for the CPU-tensor collectives outside the
        # step (checkpoint coordination, DCP planning, object gathers), which NCCL rejects.
        backend, device = "cpu:gloo,cuda:nccl", torch.device("cuda", env["local_rank"])
    else:
        torch.set_num_threads(1)
        backend, device = "gloo", None
    # Collective timeout; launch/slurm/nccl-roce.env explains the default.
    timeout = timedelta(seconds=_env_int("MMPT_PG_TIMEOUT_S", 1800))
    if env["world_size"] == 1 and not env["master_port"]:
        # A plain single process: an in-memory store, no port to pick.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout, device_id=device)
    else:  # env:// reads MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE set by torchrun
        dist.init_process_group(backend, init_method="env://", timeout=timeout,
                                device_id=device)
    return backend


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mmpt train", allow_abbrev=False,
        description="Train from a TOML config; under torchrun, one rank per process. Any "
                    "config field can be overridden as --section.field=value.")
    ap.add_argument("--config", required=True, help="TOML config file, e.g. configs/tiny.toml")
    return ap


def main(argv: list[str]) -> int:
    args, overrides = _parser().parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    env = dist_env()
    check_world_size(cfg, env["world_size"])
    from train.trainer import run  # seconds of imports: config and world-size errors come first

    backend = init_process_group(cfg, env)
    if env["rank"] == 0:
        print(f"mmpt train: {env['world_size']} ranks ({backend}), pp={cfg.parallel.pp} "
              f"dp={cfg.parallel.dp} ep={cfg.parallel.ep}, run_dir={cfg.train.run_dir}",
              flush=True)
    try:
        run(cfg)
    finally:
        dist.destroy_process_group()
    return 0

"""The collectives the checkpoint protocol runs on the main thread: no-ops (or the value
itself) on a single process. The manager's background thread never calls them.
"""

from __future__ import annotations

import uuid

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def barrier() -> None:
    if distributed():
        dist.barrier()


def world() -> int:
    return dist.get_world_size() if distributed() else 1


def broadcast(obj):
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj) -> list:
    if not distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> tuple[bool, int]:
    """(flag is set on some rank, a random 62-bit number drawn by rank 0) in one all_reduce."""
    salt = uuid.uuid4().int >> 66 if rank() == 0 else 0
    if not distributed():
        return flag, salt
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    box = torch.tensor([int(flag), salt], dtype=torch.int64, device=device)
    dist.all_reduce(box)
    return bool(box[0].item()), int(box[1].item())

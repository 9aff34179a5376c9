"""Step 1 of a save, on the training thread: the ranks agree on who writes what, and each rank
copies what it writes to host memory. That copy is all that training waits for; the writes and
the commit follow (manager.py).

The plan depends only on the ranks' chunk lists (keys, offsets, sizes, dtypes), so the last one
is kept: one all_reduce of a flag says whether every rank's list is unchanged (and carries rank
0's new attempt id); only if one changed do the ranks plan afresh (one gather, one scatter). No
store request.
"""

from __future__ import annotations

import hashlib
import uuid

import torch
import torch.distributed as dist

from train.checkpoint import ranks
from train.checkpoint.layout import Entry
from train.checkpoint.save_plan import RowCheck, global_plan
from train.checkpoint.storage import Staged, dtype_name


class SaveStaging:
    """The kept plan and, for asynchronous saves (training goes on while the copies are
    written), the host buffers, reused save after save."""

    def __init__(self, asynchronous: bool):
        self.asynchronous = asynchronous
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._last_plan: tuple | None = None  # (chunk lists' signature, mine, checks, table)

    def plan(self, ents: list[Entry]):
        """(indices of the entries this rank writes, its row checks (master index, weight index,
        first row), rank 0: the table of logical tensors for metadata, the attempt id, whether
        the previous save's plan was reused); the kept plan when no rank's chunk list changed."""
        local = [(e.key, e.offsets, e.sizes, dtype_name(e.tensor.dtype), e.nbytes, e.stacked)
                 for e in ents]
        signature = hashlib.blake2b(repr(local).encode(), digest_size=16).digest()
        cached = self._last_plan
        stale, salt = ranks.any_rank(cached is None or cached[0] != signature)
        if not stale:
            _, mine, checks, table = cached
            return mine, checks, table, f"{salt:016x}", True
        if ranks.distributed():
            plans = [None] * ranks.world() if ranks.rank() == 0 else None
            dist.gather_object(local, plans, dst=0)
        else:
            plans = [local]
        picks, table = (global_plan(plans) if ranks.rank() == 0 else (None, None))
        if picks is not None:
            attempt = uuid.uuid4().hex[:16]
            picks = [(*p, attempt) for p in picks]
        if ranks.distributed():
            box = [None]
            dist.scatter_object_list(box, picks, src=0)
            mine, checks, attempt = box[0]
        else:
            mine, checks, attempt = picks[0]
        self._last_plan = (signature, mine, checks, table)
        return mine, checks, table, attempt, False

    def _host(self, spec: tuple, t: torch.Tensor) -> torch.Tensor:
        """A host copy of t (what training waits for). Asynchronous saves keep the buffers for
        the next save (pinned on CUDA); a synchronous save uses contiguous CPU tensors as they
        are."""
        t = t.detach()
        if not self.asynchronous and t.device.type == "cpu" and t.is_contiguous():
            return t
        buf = self._buffers.get(spec)
        if buf is None:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu",
                              pin_memory=t.device.type == "cuda")
            if self.asynchronous:
                self._buffers[spec] = buf
        buf.copy_(t, non_blocking=t.device.type == "cuda")
        return buf

    def stage(self, ents: list[Entry], mine: list[int], checks: list[tuple[int, int, int]]
               ) -> tuple[list[Staged], list[RowCheck]]:
        """Host copies of the chunks this rank writes, and of the weight rows its masters are
        compared with in the background."""
        staged = {}
        for i in mine:
            e = ents[i]
            staged[i] = Staged(e.key, e.offsets, self._host(
                ("chunk", e.key, e.offsets, e.sizes, e.tensor.dtype), e.tensor))
        rows = []
        for i, j, lo in checks:
            m, w = ents[i], ents[j]
            t = w.tensor.narrow(0, lo, m.sizes[0]) if m.sizes else w.tensor
            rows.append(RowCheck(w.key, m.offsets, staged[i].tensor, self._host(
                ("rows", w.key, m.offsets, m.sizes, t.dtype), t)))
        if any(ents[i].tensor.device.type == "cuda" for i in mine + [j for _, j, _ in checks]):
            torch.cuda.synchronize()  # the copies were non-blocking
        return list(staged.values()), rows

"""What a checkpoint load reads: per entry of a rank's state, a fresh buffer and the reads that
fill it (a weight rebuilt from its fp32 master reads the master, then the rows stored of its own
over it), or why the checkpoint does not fit this model; and which errors mean damaged data.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from data.store import StoreError, StoreUnavailable
from train.checkpoint.layout import Entry, fresh_like
from train.checkpoint.storage import CorruptCheckpoint, Read, master_key


def read_plan(url: str, name: str, ents: list[Entry], stored: dict, from_master: set[str],
              optional: tuple[str, ...]):
    """([(entry, fresh buffer, reads, overlay reads)], missing in-memory keys, config problem
    or None). A weight rebuilt from its master reads the master, then the rows stored of its
    own (overlay reads, applied after the first ones)."""
    plan, missing = [], []
    for e in ents:
        if e.key in from_master:
            sources = [master_key(e.key)] + ([e.key] if e.key in stored else [])
        elif e.key in stored:
            sources = [e.key]
        else:
            missing += e.members
            continue
        fresh = fresh_like(e)
        chunk = ChunkStorageMetadata(offsets=torch.Size(e.offsets), sizes=torch.Size(e.sizes))
        reads: list[list[Read]] = []
        for src in sources:
            md = stored[src]
            size, t = tuple(md.size), e.tensor
            fits = (len(size) == t.dim() and (e.stacked or e.sizes == size)
                    and all(o + z <= n for o, z, n in zip(e.offsets, e.sizes, size)))
            same_kind = (md.properties.dtype == t.dtype if src == e.key
                         else t.is_floating_point())
            if not (fits and same_kind):
                rows = f" rows {e.offsets[0]}..{e.offsets[0] + e.sizes[0]}" if e.stacked else ""
                shown = src + rows
                return [], [], (f"checkpoint {url}/{name}: {shown} is {md.properties.dtype} "
                                f"{size} there and {t.dtype} {tuple(t.shape)} here (model config "
                                "differs?)")
            reads.append([])
            for ri in create_read_items_for_chunk_list(src, md, [chunk]):
                target = fresh
                for dim, (o, n) in enumerate(zip(ri.dest_offsets, ri.lengths)):
                    target = target.narrow(dim, o, n)
                reads[-1].append(Read(storage=ri.storage_index,
                                      src_offsets=tuple(ri.storage_offsets), target=target))
        plan.append((e, fresh, reads[0], reads[1] if len(reads) > 1 else []))
    required = [k for k in missing if not k.startswith(optional)]
    if required:
        return [], missing, (f"checkpoint {url}/{name} lacks {len(required)} entries, e.g. "
                             f"{required[:3]}; was it written by a different model config?")
    return plan, missing, None


def damage_reason(e: BaseException) -> str | None:
    """The reason when e means damaged or unreadable stored data, else None."""
    if isinstance(e, StoreUnavailable):  # the store is down, the checkpoint may be fine
        return None
    if isinstance(e, (CorruptCheckpoint, StoreError)):
        return f"{type(e).__name__}: {e}"
    return None

"""What this rank reads of the data stream: stage-aware reading (data/stream.py ReadRole).

Pipeline stage 0 reads the token ids, the last stage the labels, loss mask and token categories;
every stage builds the layout (positions, documents, vision items) from the catalog's metadata.
Without DEP, stage 0 decodes its replica's images and video chunks; middle stages read nothing.
With DEP, every rank reads and decodes exactly the items it encodes, of any replica: the loader
plans the whole global batch on every rank, so the DEP plan (parallel/dep_plan.py) is known from
metadata before any pixel is fetched, and only embeddings move between ranks (parallel/dep.py).

A document a rank cannot read keeps its slot; `share_skips` tells every rank of the step's
unreadable documents (a media failure is known only to the rank that decoded the item, under
DEP possibly of another replica), so the text readers of every replica give them no loss alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from data.stream import ReadRole
from parallel.dep_plan import EncoderItems
from parallel.mesh import ParallelMesh
from train.config import Config


def read_role(cfg: Config, mesh: ParallelMesh) -> ReadRole:
    """The ReadRole of this rank (picklable: the loader's workers build batches with it)."""
    first, last = mesh.pp_rank == 0, mesh.pp_rank == cfg.parallel.pp - 1
    if cfg.parallel.dep:
        media = EncoderItems(mesh.rank, mesh.world_size)
    else:
        media = "replica" if first else None
    return ReadRole(inputs=first, targets=last, media=media)


def share_skips(batch, stream, device: torch.device, group=None) -> int:
    """Share the documents this rank's batch skipped with every rank of `group` (default: the
    world) and make each of them, where it is in this rank's batch, padding ids without loss
    (`PackedStream.mark_unread`, in place); returns the step's skipped documents, each counted
    once. One all-gather of a count on the training thread; the documents travel as integers
    (source, shard, member) only when some rank skipped one."""
    names = stream.catalog.names
    mine = sorted({(names.index(name), shard, member) for name, shard, member, _ in batch.skipped})
    world = dist.get_world_size(group)
    count = torch.tensor([len(mine)], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    most = max(int(c) for c in counts)
    if most == 0:
        return 0
    rows = torch.full((most, 3), -1, dtype=torch.int64, device=device)
    if mine:
        rows[:len(mine)] = torch.tensor(mine, dtype=torch.int64, device=device)
    every = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(every, rows, group=group)
    docs = {tuple(r) for t in every for r in t.tolist() if r[0] >= 0}
    stream.mark_unread(batch, docs)
    return len(docs)

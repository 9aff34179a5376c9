"""What this rank reads of the data stream: stage-aware reading (data/loader.py ReadRole).

Pipeline stage 0 reads the token ids, the last stage the labels, loss mask and token categories;
every stage builds the layout (positions, documents, vision items) from the catalog's metadata.
Without DEP, stage 0 decodes its replica's images and video chunks; middle stages read nothing.
With DEP, every rank reads and decodes exactly the items it encodes, of any replica: the loader
plans the whole global batch on every rank, so the DEP plan (parallel/dep_plan.py) is known from
metadata before any pixel is fetched, and only embeddings move between ranks (parallel/dep.py).
"""

from __future__ import annotations

from data.loader import ReadRole
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

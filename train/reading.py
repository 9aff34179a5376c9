"""What this rank reads of the data stream: stage-aware reading (data/loader.py ReadRole).

Pipeline stage 0 reads the token ids, the last stage the labels, loss mask and token categories;
every stage builds the layout (positions, documents, vision items) from the catalog's metadata.
Without DEP, stage 0 decodes its replica's images and video chunks; middle stages read nothing.
"""

from __future__ import annotations

from data.loader import ReadRole
from parallel.mesh import ParallelMesh
from train.config import Config


def read_role(cfg: Config, mesh: ParallelMesh) -> ReadRole:
    """The ReadRole of this rank (picklable: the loader's workers build batches with it)."""
    first, last = mesh.pp_rank == 0, mesh.pp_rank == cfg.parallel.pp - 1
    if cfg.parallel.dep:
        media = "replica"  # every pipeline position moves its replica's pixels (parallel/dep.py)
    else:
        media = "replica" if first else None
    return ReadRole(inputs=first, targets=last, media=media)

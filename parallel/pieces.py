"""What one rank holds, built for that rank alone: its pipeline chunks, its EP slice of every
expert stack and (under DEP) the vision encoder.

    pieces = build_rank_pieces(cfg, RankCoords.of_mesh(mesh))   # meta device: no memory
    materialize_pieces(pieces, device, seed=cfg.train.seed, init_std=cfg.model.init_std)
    rt = ParallelRuntime(cfg, pieces, mesh, ...)

`build_rank_pieces` is a pure function of (config, mesh coordinates): the whole model is built on
the meta device (modules and shapes only), split into this rank's chunks without copying
(parallel/pipeline.py), and every expert stack is cut to this rank's rows, still on meta. Only
`materialize_pieces` allocates, and only what the rank keeps; `init_weights` seeds every
parameter, and every routed expert, from its name in the whole model, so the values equal the
whole model's initialisation bit for bit. No rank ever holds another rank's weights.

Because it needs no process group, a test or `mmpt model-info --rank` builds the pieces of any
rank of any layout in one process and counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from parallel.expert import slice_experts
from parallel.pipeline import StageModule, split_model
from train.config import Config
from train.errors import ConfigError
from train.model import build_model, init_weights


@dataclass(frozen=True)
class RankCoords:
    """A rank's place in the mesh (parallel/mesh.py: dp_rank = edp_rank * ep + ep_rank)."""

    pp_rank: int
    dp_rank: int
    ep_rank: int
    edp_rank: int

    @classmethod
    def of_rank(cls, cfg: Config, rank: int) -> RankCoords:
        p = cfg.parallel
        if not 0 <= rank < p.pp * p.dp:
            raise ValueError(f"rank {rank} is outside the world of parallel.pp * parallel.dp = "
                             f"{p.pp * p.dp}")
        pp_rank, dp_rank = divmod(rank, p.dp)
        edp_rank, ep_rank = divmod(dp_rank, p.ep)
        return cls(pp_rank, dp_rank, ep_rank, edp_rank)

    @classmethod
    def of_mesh(cls, mesh) -> RankCoords:
        return cls(mesh.pp_rank, mesh.dp_rank, mesh.ep_rank, mesh.edp_rank)


@dataclass
class RankPieces:
    """This rank's modules, named as in the whole model."""

    stages: list[tuple[int, StageModule]]  # (pipeline stage index, chunk), EP-sliced experts
    encoder: nn.Module | None  # the DEP vision encoder (a full replica), or None

    def named_modules(self) -> list[tuple[str, nn.Module]]:
        """(prefix of full-model names, module): chunks carry full names already."""
        out = [("", m) for _, m in self.stages]
        return out + ([("vision.", self.encoder)] if self.encoder is not None else [])

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(prefix + n, p) for prefix, m in self.named_modules()
                for n, p in m.named_parameters()]

    def named_buffers(self) -> list[tuple[str, torch.Tensor]]:
        return [(prefix + n, b) for prefix, m in self.named_modules()
                for n, b in m.named_buffers()]

    def on_meta(self) -> bool:
        return any(t.is_meta for _, t in self.named_parameters() + self.named_buffers())


def _check_tied_embeddings(cfg: Config) -> None:
    p = cfg.parallel
    if cfg.model.tie_word_embeddings and p.pp * p.virtual_stages > 1:
        raise ConfigError(
            "model.tie_word_embeddings = true needs the embedding and the head in one pipeline "
            f"chunk, but parallel.pp * parallel.virtual_stages = {p.pp * p.virtual_stages} "
            "puts them on different chunks (their gradients would never be summed)")


def take_rank_pieces(model: nn.Module, cfg: Config, coords: RankCoords) -> RankPieces:
    """This rank's pieces out of `model` (a KimiK25 on any device), sharing its modules: the
    chunks, experts sliced to the EP rank's rows (the rows are copied, nothing else), and the
    vision tower as the DEP encoder when `parallel.dep` is on."""
    p = cfg.parallel
    _check_tied_embeddings(cfg)
    vision = getattr(model, "vision", None)
    dep = p.dep and vision is not None
    stages = split_model(model, p.pp, p.virtual_stages, coords.pp_rank,
                         vision_in_first_stage=not dep)
    for _, module in stages:
        slice_experts(module, coords.ep_rank, p.ep)
    return RankPieces(stages, vision if dep else None)


def build_rank_pieces(cfg: Config, coords: RankCoords) -> RankPieces:
    """The pieces of the rank at `coords`, on the meta device (see the module docstring)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return take_rank_pieces(model, cfg, coords)


@torch.no_grad()
def materialize_pieces(pieces: RankPieces, device: torch.device | str, *, seed: int,
                       init_std: float) -> RankPieces:
    """Allocate the pieces on `device` (float32) and initialise them as the whole model would be
    (`init_weights` keyed by full-model names and global expert indices)."""
    for prefix, module in pieces.named_modules():
        tied = _tied_head(module)
        module.to_empty(device=device)
        if tied:  # to_empty gives each registration its own tensor; restore the tie
            module.lm.head.weight = module.lm.embed.weight
        init_weights(module, seed, prefix=prefix, std=init_std)
    return pieces


def _tied_head(module: nn.Module) -> bool:
    lm = getattr(module, "lm", None)
    return (lm is not None and lm.embed is not None and lm.head is not None
            and lm.head.weight is lm.embed.weight)

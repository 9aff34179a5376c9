"""ZeRO-1 by whole-parameter ownership, around any per-parameter torch optimizer.

Why whole parameters: Muon orthogonalises each weight matrix with Newton-Schulz, which needs the
entire matrix (its Gram products mix every row with every column). Flat-buffer ZeRO (reduce-
scatter of a concatenation, each rank stepping an arbitrary 1/N slice) would hand Muon pieces of
matrices and silently compute something else. So each parameter gets ONE owner rank in its
group, chosen to balance bytes (largest-first greedy); only a stacked expert weight [E, r, c]
may be cut, along dim 0, since every expert slice is itself a whole matrix. AdamW (elementwise)
is indifferent, so the same plan serves MuonClip's two halves.

The pieces of a step, per shard group (dense params over the stage's DP group, expert shards
over the expert-data-parallel group, the DEP vision encoder over the world); the training step
(train/step.py) calls them in this order and decides whether the update happens:
  1. `reduce_grads()`: the fp32 gradients accumulated over the step's micro-batches (`.grad` of
     fp32 params, the fp32 `main_grad` of bf16 ones: parallel/main_grad.py) are summed onto each
     piece's owner (one bucketed `reduce` per owner) and freed everywhere,
  2. `clip_grad_norm()`: the global grad norm over the world, and the optional clip,
  3. `optimizer_step()`: the owner's optimizer steps fp32 master copies of the pieces it owns
     (state lives only there: that is the memory saving),
  4. `broadcast()`: each owner broadcasts its updated pieces (one bucket per owner) into the
     live parameters, cast to their dtype (bf16 compute on GPU; fp32 on CPU tests, where
     master == param values),
  5. `zero_grad()`: the master gradients are dropped.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel.main_grad import clear_main_grads, main_grad
from train.optim.grad_norm import clip_grad_norm_


MakeOptimizer = Callable[[list[tuple[str, Tensor]]], torch.optim.Optimizer]


@dataclass
class Piece:
    """Rows [start, stop) along dim 0 of one parameter (the whole of it unless an expert stack)."""

    name: str
    param: nn.Parameter
    start: int
    stop: int
    owner: int  # rank within the shard group
    master: Tensor | None = None

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.param.shape[0]

    @property
    def key(self) -> str:
        """Unique name; the FQN for a whole parameter, FQN@start:stop for an expert slice."""
        return self.name if self.whole else f"{self.name}@{self.start}:{self.stop}"

    def view(self, t: Tensor) -> Tensor:
        return t if self.whole else t[self.start:self.stop]


@dataclass
class ShardGroup:
    """Parameters replicated on every rank of `group`, whose optimizer state is sharded over it."""

    group: dist.ProcessGroup
    params: list[tuple[str, nn.Parameter]]
    split_dim0: Callable[[str], bool] = lambda name: False  # may this param be cut along dim 0?
    pieces: list[Piece] = field(default_factory=list)


def plan_ownership(params: Sequence[tuple[str, Tensor]], size: int,
                   split_dim0: Callable[[str], bool]) -> list[tuple[str, int, int, int]]:
    """(name, start, stop, owner) pieces: largest first to the least-loaded owner (by numel).

    A splittable parameter is first cut into min(size, dim0) contiguous runs of dim-0 rows."""
    units = []
    for name, p in params:
        n0 = p.shape[0] if p.ndim else 1
        parts = min(size, n0) if (split_dim0(name) and p.ndim >= 3) else 1
        bounds = [round(i * n0 / parts) for i in range(parts + 1)]
        per_row = p.numel() // max(n0, 1)
        for a, b in zip(bounds[:-1], bounds[1:]):
            units.append((name, a, b, (b - a) * per_row))
    heap = [(0, r) for r in range(size)]
    out = []
    for name, a, b, numel in sorted(units, key=lambda u: (-u[3], u[0], u[1])):
        load, r = heapq.heappop(heap)
        out.append((name, a, b, r))
        heapq.heappush(heap, (load + numel, r))
    return out


class ZeroOptimizer:
    """ZeRO-1 over several shard groups with one inner optimizer per rank (its owned pieces)."""

    def __init__(self, groups: list[ShardGroup], make_optimizer: MakeOptimizer,
                 max_grad_norm: float = 0.0, norm_group: dist.ProcessGroup | None = None):
        self.groups = groups
        self.max_grad_norm = max_grad_norm
        self.norm_group = norm_group  # where every owned piece has exactly one owner (the world)
        mine: list[tuple[str, Tensor]] = []
        for g in groups:
            size, rank = dist.get_world_size(g.group), dist.get_rank(g.group)
            names = dict(g.params)
            if len(names) != len(g.params):
                raise ValueError("duplicate parameter names in a shard group")
            for name, a, b, owner in plan_ownership(g.params, size, g.split_dim0):
                piece = Piece(name, names[name], a, b, owner)
                if owner == rank:
                    piece.master = piece.view(piece.param.detach()).float().clone()
                    piece.master.requires_grad_(True)
                    mine.append((piece.key, piece.master))
                g.pieces.append(piece)
        self.owned = [p for g in groups for p in g.pieces if p.master is not None]
        # A rank that owns nothing (more ranks than pieces) has no optimizer to step.
        self.optimizer = make_optimizer(mine) if mine else None

    # -- the pieces of a step (train/step.py calls them in order and owns the policy) --------

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Sum every piece's fp32 gradient onto its owner (the owner's master.grad) and free
        the parameters' gradients on every rank."""
        for g in self.groups:
            self._reduce_grads(g)
        self._clear_param_grads()  # the owners' master grads hold what is still needed

    @torch.no_grad()
    def clip_grad_norm(self) -> Tensor:
        """The global grad norm of the owned fp32 masters over `norm_group` (every piece has
        exactly one owner there), before clipping and identical on every rank; with
        max_grad_norm > 0 and a finite norm the master grads are scaled by torch's clip rule."""
        device = next(p.device for g in self.groups for _, p in g.params)
        return clip_grad_norm_([p.master for p in self.owned], self.max_grad_norm,
                               group=self.norm_group, device=device)

    @torch.no_grad()
    def optimizer_step(self) -> None:
        """The inner optimizer steps the fp32 masters this rank owns (a rank owning nothing has
        none)."""
        if self.optimizer is not None:
            self.optimizer.step()

    @torch.no_grad()
    def broadcast(self) -> None:
        """Each owner sends its pieces' masters (one bucket per owner) into the live
        parameters of its group, cast to their dtype."""
        for g in self.groups:
            self._broadcast_params(g)

    def zero_grad(self) -> None:
        self._clear_param_grads()
        for p in self.owned:
            p.master.grad = None

    def _clear_param_grads(self) -> None:
        for g in self.groups:
            clear_main_grads(p for _, p in g.params)

    def _by_owner(self, g: ShardGroup) -> dict[int, list[Piece]]:
        out: dict[int, list[Piece]] = {}
        for p in g.pieces:
            out.setdefault(p.owner, []).append(p)
        return out

    def _reduce_grads(self, g: ShardGroup) -> None:
        """Sum the fp32 main grads (parallel/main_grad.py) onto owners. A piece with no grad on
        any rank (e.g. the vision tower in a text-only step) keeps master.grad = None, so the
        optimizer skips it as torch's would. Master grads are views of the reduced buffer, and
        in a group of one rank of the main grads themselves: no further fp32 copy."""
        rank = dist.get_rank(g.group)
        for owner, pieces in sorted(self._by_owner(g).items()):
            grads = [main_grad(p.param) for p in pieces]
            if dist.get_world_size(g.group) == 1:
                for p, grad in zip(pieces, grads):
                    p.master.grad = p.view(grad).view_as(p.master) if grad is not None else None
                continue
            parts = [(p.view(grad) if grad is not None
                      else torch.zeros(p.view(p.param).shape, device=p.param.device)).reshape(-1)
                     for p, grad in zip(pieces, grads)]
            has_grad = torch.tensor([float(grad is not None) for grad in grads],
                                    device=pieces[0].param.device)
            flat = torch.cat(parts + [has_grad])
            dist.reduce(flat, dst=dist.get_global_rank(g.group, owner), group=g.group)
            if owner == rank:
                sizes = [p.view(p.param).numel() for p in pieces]
                chunks = flat.split(sizes + [len(pieces)])
                for p, part, seen in zip(pieces, chunks, chunks[-1].tolist()):
                    p.master.grad = part.view_as(p.master) if seen else None

    def _broadcast_params(self, g: ShardGroup) -> None:
        rank = dist.get_rank(g.group)
        for owner, pieces in sorted(self._by_owner(g).items()):
            sizes = [p.view(p.param).numel() for p in pieces]
            if owner == rank:
                flat = torch.cat([p.master.reshape(-1) for p in pieces])
            else:
                flat = torch.empty(sum(sizes), dtype=torch.float32, device=pieces[0].param.device)
            dist.broadcast(flat, src=dist.get_global_rank(g.group, owner), group=g.group)
            for p, part in zip(pieces, flat.split(sizes)):
                p.view(p.param.data).copy_(part.view(p.view(p.param).shape))

    # -- introspection ----------------------------------------------------------------------

    def reduced_grads(self) -> dict[str, Tensor | None]:
        """Piece key ("fqn", or "fqn@a:b" for rows of an expert stack, local to this EP shard)
        -> the gradient summed over the shard group of each piece this rank owns (None: no rank
        had one), as the last reduce_grads() left it. clip_grad_norm() then scales it in place
        and zero_grad() clears it. The tensors are live: read, do not modify."""
        return {p.key: p.master.grad for p in self.owned}

    def masters(self) -> dict[str, Tensor]:
        """FQN -> fp32 master of every WHOLE parameter this rank owns (for QK-Clip)."""
        return {p.name: p.master for p in self.owned if p.whole}

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for optimizer state and fp32 masters."""
        states = self.optimizer.state.values() if self.optimizer is not None else []
        state = sum(t.numel() * t.element_size() for s in states for t in s.values()
                    if isinstance(t, Tensor))
        masters = sum(p.master.numel() * p.master.element_size() for p in self.owned)
        return dict(optimizer_state=state, fp32_masters=masters)

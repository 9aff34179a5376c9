"""How a rank's flat training state (state.py keys) maps onto stored logical tensors.

In memory a stacked expert weight [E, r, c] is split per routed expert (`model/<fqn>/expert-<e>`,
views of the stack), which is what the rest of the code and the layout-free tests address. On
storage every stack is ONE logical tensor `model/<fqn>` of the full [E, r, c], and each rank
writes the rows it holds as one chunk at offset (first expert, 0, 0), the chunk layout of
torch.distributed.checkpoint metadata. Optimizer state and ZeRO-1 masters of expert stacks go the
same way (`optim/<fqn>/<state>`, `master/<fqn>`). Metadata then grows with the parameters (and
the number of chunks a stack is cut into), not with experts x layers, and a reader at any expert
layout asks for the rows it holds now: DCP's chunk overlap logic finds the stored chunks that
cover them.

Consecutive experts are one chunk when their tensors are adjacent views of one storage (the
normal case: they come from one local stack); otherwise each expert is a chunk of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

_EXPERT_KEY = re.compile(r"^(?P<base>.+)/expert-(?P<e>\d+)(?P<state>/[^/]+)?$")


@dataclass
class Entry:
    """One chunk of a stored logical tensor, as this rank holds it."""

    key: str  # the logical (stored) key
    tensor: Tensor  # this rank's data: shape = the chunk's sizes
    offsets: tuple[int, ...]  # where the chunk starts in the logical tensor
    members: list[str] = field(default_factory=list)  # in-memory keys it covers
    stacked: bool = False  # a chunk of an expert stack (dim 0 = experts)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def logical_key(key: str) -> tuple[str, int | None]:
    """In-memory key -> (stored key, expert index or None)."""
    m = _EXPERT_KEY.match(key)
    if m is None:
        return key, None
    return m["base"] + (m["state"] or ""), int(m["e"])


def _adjacent(a: Tensor, b: Tensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and a.is_contiguous() and b.is_contiguous()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.storage_offset() == a.storage_offset() + a.numel())


def _stack_view(first: Tensor, n: int) -> Tensor:
    """[n, *first.shape] view of n adjacent contiguous tensors starting at `first`."""
    return first.as_strided((n, *first.shape), (first.numel(), *first.stride()),
                            first.storage_offset())


def entries(tensors: dict[str, Tensor], *, stacks: bool = True) -> list[Entry]:
    """This rank's state as stored chunks (stacks=False: every key its own whole tensor, the
    layout of checkpoints written before expert stacks were stored as one tensor)."""
    out: list[Entry] = []
    experts: dict[str, list[tuple[int, str]]] = {}
    for key, t in tensors.items():
        base, e = logical_key(key) if stacks else (key, None)
        if e is None:
            out.append(Entry(key, t, (0,) * t.dim(), [key]))
        else:
            experts.setdefault(base, []).append((e, key))
    for base, items in experts.items():
        items.sort()
        run: list[tuple[int, str]] = []

        def close():
            first_e, first_key = run[0]
            t0 = tensors[first_key]
            view = _stack_view(t0, len(run)) if len(run) > 1 else t0.unsqueeze(0)
            out.append(Entry(base, view, (first_e,) + (0,) * t0.dim(), [k for _, k in run],
                             stacked=True))

        for e, key in items:
            if run and (e == run[-1][0] + 1 and _adjacent(tensors[run[-1][1]], tensors[key])):
                run.append((e, key))
                continue
            if run:
                close()
            run = [(e, key)]
        if run:
            close()
    return out


def fresh_like(entry: Entry) -> Tensor:
    """A CPU buffer for loading `entry` (the live tensor is written only once a load succeeds)."""
    return torch.empty(entry.sizes, dtype=entry.tensor.dtype, device="cpu")

"""DEP planner: spread every vision item of a training step over all ranks by patch count.

A pure function of the items' patch counts and the number of ranks, so every rank computes the
same plan from the same (all-gathered) metadata without talking to the others.

Algorithm: longest-processing-time-first greedy (largest item to the least-loaded rank), then a
local search that moves or swaps single items between the most- and least-loaded ranks while
that lowers the maximum. Ties break by rank and item index, so the plan is deterministic.
The achievable balance is bounded below by max(1, largest_item / mean_load): an item (an image
or one video chunk of <= 4 frames) is never split across ranks.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderPlan:
    """owner[i] is the rank that encodes item i; load[r] the patches rank r encodes."""

    owner: tuple[int, ...]
    load: tuple[int, ...]

    @property
    def max_over_mean(self) -> float:
        total = sum(self.load)
        return max(self.load) * len(self.load) / total if total else 1.0

    def items_of(self, rank: int) -> list[int]:
        return [i for i, r in enumerate(self.owner) if r == rank]


def plan_encoder_work(patches: Sequence[int], num_ranks: int, refine_rounds: int = 64,
                      good_enough: float = 1.001) -> EncoderPlan:
    """Assign each item (given by its patch count) to one of num_ranks ranks, balancing load.

    The local search stops after refine_rounds moves or once max/mean <= good_enough."""
    if num_ranks <= 0:
        raise ValueError(f"num_ranks={num_ranks} must be > 0")
    if any(p < 0 for p in patches):
        raise ValueError("patch counts must be >= 0")
    owner = [0] * len(patches)
    load = [0] * num_ranks
    heap = [(0, r) for r in range(num_ranks)]
    for i in sorted(range(len(patches)), key=lambda i: (-patches[i], i)):
        ld, r = heapq.heappop(heap)
        owner[i] = r
        load[r] = ld + patches[i]
        heapq.heappush(heap, (load[r], r))
    _refine(patches, owner, load, refine_rounds, good_enough)
    return EncoderPlan(tuple(owner), tuple(load))


def _refine(patches: Sequence[int], owner: list[int], load: list[int], rounds: int,
            good_enough: float) -> None:
    """Move or swap one item between the heaviest and lightest rank while the max drops."""
    target = good_enough * sum(load) / len(load)
    for _ in range(rounds):
        hi = max(range(len(load)), key=lambda r: (load[r], -r))
        if load[hi] <= target:
            return
        lo = min(range(len(load)), key=lambda r: (load[r], r))
        gap = load[hi] - load[lo]
        if gap <= 1:
            return
        hi_items = [i for i, r in enumerate(owner) if r == hi]
        lo_items = [i for i, r in enumerate(owner) if r == lo]
        # Moving weight d from hi to lo gives a new pair max of max(hi - d, lo + d): best d ~ gap/2.
        best = None  # (new pair max, item from hi, item from lo or None)
        for a in hi_items:
            for b in [None, *lo_items]:
                d = patches[a] - (patches[b] if b is not None else 0)
                if 0 < d < gap:
                    new_max = max(load[hi] - d, load[lo] + d)
                    if best is None or new_max < best[0]:
                        best = (new_max, a, b)
        if best is None or best[0] >= load[hi]:
            return
        _, a, b = best
        owner[a] = lo
        load[hi] -= patches[a]
        load[lo] += patches[a]
        if b is not None:
            owner[b] = hi
            load[lo] -= patches[b]
            load[hi] += patches[b]


@dataclass(frozen=True)
class EncoderItems:
    """The items one rank encodes under DEP, as a picklable callable for the data loader
    (data/stream.py ReadRole.media): given the patch counts of every replica's items (replica
    d's list in its grid_thw order), the (replica, item) pairs `rank` of `world` encodes, in
    replica-major order. The same plan parallel/dep.py computes on every rank, so a rank reads
    and decodes exactly the images and video chunks it encodes."""

    rank: int
    world: int

    def __call__(self, patches: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        flat = [(d, i) for d, per in enumerate(patches) for i in range(len(per))]
        plan = plan_encoder_work([patches[d][i] for d, i in flat], self.world)
        return [flat[k] for k in plan.items_of(self.rank)]


def stage0_only_load(patches: Sequence[int], replica_of: Sequence[int], pp: int, dp: int
                     ) -> list[int]:
    """Per-rank encoder load of the layout DEP replaces: each replica's stage 0 encodes its own
    items, every other rank encodes nothing. Rank = pp_rank * dp + dp_rank (parallel.mesh)."""
    load = [0] * (pp * dp)
    for p, d in zip(patches, replica_of):
        load[d] += p  # pp_rank 0 of replica d is global rank d
    return load

"""A synthetic vision workload for one training step: what DEP balances.

Sequences of 4096 tokens, 10% of tokens vision tokens, drawn from a heavy-tailed mix of
native-resolution images (log-normal size and aspect ratio) and videos (Pareto-distributed
length, 2 fps, 4-frame chunks; every chunk is one encoder item). Samples go to the data-parallel
replica with the fewest vision tokens so far (the loader keeps the 10/90 mix at every prefix).
bench/dep_balance.py measures the DEP planner on it; the planner (parallel/plan.py) samples it
for the encoder's max/mean load.
"""

from __future__ import annotations

import math
import random

PATCH, MERGE, SEQ_LEN, VISION_FRACTION = 14, 2, 4096, 0.10
UNIT = PATCH * MERGE  # image sides are multiples of the merged patch


def _round_side(x: float) -> int:
    return max(UNIT, int(round(x / UNIT)) * UNIT)


def draw_sample(rng: random.Random) -> list[tuple[int, int]]:
    """One vision sample as a list of encoder items (patches, vision tokens)."""
    if rng.random() < 0.75:  # image at native resolution, long side capped at 2016 px
        long_side = min(2016.0, max(112.0, rng.lognormvariate(math.log(640), 0.6)))
        aspect = min(4.0, max(0.25, rng.lognormvariate(0.0, 0.35)))
        h, w = _round_side(long_side), _round_side(long_side / aspect)
        patches = (h // PATCH) * (w // PATCH)
        return [(patches, patches // MERGE**2)]
    # video: Pareto length (seconds), 2 fps, at most 256 frames, one of a few resolutions
    seconds = min(600.0, 2.0 * rng.paretovariate(1.2))
    frames = max(1, min(256, int(seconds * 2)))
    h, w = rng.choice([(252, 448), (448, 448), (392, 672), (504, 896)])
    per_frame = (h // PATCH) * (w // PATCH)
    items = []
    for start in range(0, frames, 4):
        t = min(4, frames - start)
        items.append((t * per_frame, per_frame // MERGE**2))
    return items


def build_step(tokens_per_step: int, dp: int, seed: int):
    """Items of one step: (patches, replica) lists, filling each replica's vision budget."""
    rng = random.Random(seed)
    budget = tokens_per_step * VISION_FRACTION
    replica_tokens = [0] * dp
    patches, replica_of = [], []
    while sum(replica_tokens) < budget:
        d = min(range(dp), key=lambda i: (replica_tokens[i], i))
        for p, tok in draw_sample(rng):
            patches.append(p)
            replica_of.append(d)
            replica_tokens[d] += tok
    return patches, replica_of

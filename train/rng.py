"""Random streams: one per purpose, each a pure function of (seed, purpose, rank), keyed by
blake2b (data.mix.derive_key), never Python's `hash`, the wall clock or the process id.

    purpose          key                                          per rank?   where
    model init       (train.seed, parameter name[, expert index])  no          train/model
    torch global     (train.seed, "torch", rank)                   yes         seed_torch()
    augmentation     (data.seed, sample id, epoch)                 no          data/augment.py
    S3 retry jitter  (store seed, "s3-retry-jitter", rank, worker) yes         data/s3_store.py

Model init and augmentation are deliberately the same on every rank: replicas must hold the same
weights, and the data stream must not depend on the layout. The torch global generator serves
dropout and any other torch random op of the step; it differs per rank, so a random op repeats
across ranks only on purpose. Checkpoints save each rank's generator states (rng/rank-<r>/...,
train/checkpoint/state.py), so a resume continues them exactly; a rank that did not exist before
a change of world size starts from its derived seed. Retry jitter only spaces out requests (it
never changes what is read), so it is derived afresh in each process, not checkpointed.
"""

from __future__ import annotations

import torch

from data.mix import derive_key

_M63 = (1 << 63) - 1


def stream_seed(seed: int, purpose: str, rank: int) -> int:
    """A 63-bit seed for one purpose on one rank (fits torch.manual_seed and random.Random)."""
    return derive_key(seed, "", purpose, f"rank-{int(rank)}") & _M63


def seed_torch(seed: int, rank: int) -> int:
    """Seed torch's global CPU and CUDA generators with this rank's "torch" stream."""
    s = stream_seed(seed, "torch", rank)
    torch.manual_seed(s)
    return s

"""Random streams per purpose and rank (train/rng.py, the store's retry jitter)."""

from __future__ import annotations

import random

import torch

from data.s3_store import retry_jitter_seed
from train.model import _generator
from train.rng import seed_torch, stream_seed


def test_streams_differ_by_rank_purpose_and_seed_and_are_stable():
    seeds = {(s, p, r): stream_seed(s, p, r) for s in (0, 1) for p in ("torch", "other")
             for r in range(4)}
    assert len(set(seeds.values())) == len(seeds)  # every (seed, purpose, rank) its own stream
    assert all(0 <= v < 2 ** 63 for v in seeds.values())
    assert stream_seed(0, "torch", 3) == seeds[0, "torch", 3]  # a pure function


def test_torch_stream_is_per_rank_and_reproducible():
    draws = {}
    for rank in (0, 1, 0):
        seed_torch(7, rank)
        draws.setdefault(rank, []).append(torch.rand(4))
    assert torch.equal(draws[0][0], draws[0][1])
    assert not torch.equal(draws[0][0], draws[1][0])


def test_model_init_stays_keyed_by_name_only():
    """Replicas must initialise alike: the init stream ignores the rank (and train.rng)."""
    a = torch.empty(5).normal_(generator=_generator(3, "lm.embed.weight"))
    seed_torch(3, 1)
    b = torch.empty(5).normal_(generator=_generator(3, "lm.embed.weight"))
    assert torch.equal(a, b)


def test_retry_jitter_differs_per_rank(monkeypatch):
    got = {}
    for rank in ("0", "1", "0"):
        monkeypatch.setenv("RANK", rank)
        got.setdefault(rank, []).append(random.Random(retry_jitter_seed(5)).random())
    assert got["0"][0] == got["0"][1] and got["0"][0] != got["1"][0]
    monkeypatch.setenv("RANK", "0")
    assert retry_jitter_seed(5) != retry_jitter_seed(6)

"""LR schedules and the distributed global gradient-norm clip."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.dist import run_distributed
from train.config import OptimConfig
from train.optim.muon import MuonClip
from train.optim.grad_norm import clip_grad_norm_, global_grad_norm
from train.optim.schedule import lr_multiplier, set_lr


def _curve(schedule, total=20, warmup=4, min_lr_ratio=0.1, decay_fraction=0.25):
    return [lr_multiplier(s, total_steps=total, warmup_steps=warmup, schedule=schedule,
                          min_lr_ratio=min_lr_ratio, decay_fraction=decay_fraction)
            for s in range(total)]


def test_warmup_is_linear_and_starts_above_zero():
    for schedule in ("cosine", "wsd", "constant"):
        assert _curve(schedule)[:4] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_reaches_min_at_last_step():
    c = _curve("cosine")
    assert c[4] == 1.0 and c[-1] == pytest.approx(0.1)
    # decay over steps 4..19: step 11 is 7/15 of the way
    assert c[11] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert all(a >= b for a, b in zip(c[4:], c[5:]))  # monotone after warm-up


def test_wsd_is_stable_then_decays_linearly_over_the_last_fraction():
    c = _curve("wsd")  # 20 steps, decay over the last 5
    assert c[3:15] == [1.0] * 12
    assert c[15:] == pytest.approx([1 - 0.9 * k / 5 for k in range(1, 6)])
    assert c[-1] == pytest.approx(0.1)


def test_constant_after_warmup():
    assert _curve("constant")[4:] == [1.0] * 16


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_multiplier(5, total_steps=10, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)


def test_set_lr_scales_each_group_from_its_base():
    opt = MuonClip([dict(algo="muon", params=[nn.Parameter(torch.zeros(2, 2))], lr=0.02),
                    dict(algo="adamw", params=[nn.Parameter(torch.zeros(2))], lr=0.003)])
    cfg = OptimConfig(warmup_steps=4, schedule="cosine")
    for step in (0, 1, 0):  # never compounds: the same step gives the same lr
        mult = set_lr(opt, step, cfg, total_steps=20)
        assert [g["lr"] for g in opt.param_groups] == [0.02 * mult, 0.003 * mult]
    assert mult == 0.25


# ------------------------------------------------------------------------------------------
# Global grad norm: 4 ranks = 2 pipeline stages x 2 data-parallel ranks, EP 2 inside DP.
# Stage s has dense params (replicated over its 2 DP ranks) and 4 experts, 2 per EP rank.
# ------------------------------------------------------------------------------------------


def _global_grads(seed=0):
    gen = torch.Generator().manual_seed(seed)
    dense = [[torch.randn(6, 5, generator=gen) * 3, torch.randn(7, generator=gen)] for _ in range(2)]
    experts = [torch.randn(4, 3, 5, generator=gen) for _ in range(2)]
    return dense, experts


def _rank_params(rank):
    stage, dp_rank = divmod(rank, 2)
    dense, experts = _global_grads()
    params = []
    for g in dense[stage]:
        params.append(nn.Parameter(torch.zeros_like(g)))
        params[-1].grad = g.clone()
        params[-1].copies = 2
    shard = experts[stage][2 * dp_rank:2 * dp_rank + 2]
    params.append(nn.Parameter(torch.zeros_like(shard)))
    params[-1].grad = shard.clone()
    params[-1].copies = 1
    return params


def _dist_clip(rank, world, max_norm):
    params = _rank_params(rank)
    norm = clip_grad_norm_(params, max_norm, group=dist.group.WORLD, copies=lambda p: p.copies)
    return norm.item(), [p.grad.numpy().copy() for p in params]


@pytest.mark.parametrize("max_norm", [1.0, 0.0, 1e6])
def test_distributed_norm_and_clip_equal_single_process(max_norm):
    results = run_distributed(_dist_clip, 4, max_norm)
    dense, experts = _global_grads()
    unique = [g.clone() for gs in dense for g in gs] + [e.clone() for e in experts]
    ref_params = [nn.Parameter(torch.zeros_like(g)) for g in unique]
    for p, g in zip(ref_params, unique):
        p.grad = g
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm if max_norm > 0 else math.inf)
    for rank, (norm, grads) in enumerate(results):
        assert norm == pytest.approx(ref_norm.item(), rel=1e-6)
        stage, dp_rank = divmod(rank, 2)
        expected = [ref_params[2 * stage].grad, ref_params[2 * stage + 1].grad,
                    ref_params[4 + stage].grad[2 * dp_rank:2 * dp_rank + 2]]
        for got, want in zip(grads, expected):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-6, atol=1e-7)
    if max_norm == 1.0:  # the case really clips
        assert ref_norm > 10


def _naive_norm(rank, world):
    return global_grad_norm(_rank_params(rank)).item()


def test_norm_without_copies_double_counts_replicas():
    """The contract matters: counting each replica's copy inflates the norm."""
    naive = run_distributed(_naive_norm, 4)[0]
    dense, experts = _global_grads()
    ref = torch.sqrt(sum(g.pow(2).sum() for gs in dense for g in gs)
                     + sum(e.pow(2).sum() for e in experts)).item()
    assert naive > ref * 1.05


def test_nonfinite_norm_leaves_grads_alone():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, float("inf"), 2.0])
    norm = clip_grad_norm_([p], 1.0)
    assert not torch.isfinite(norm)
    assert torch.equal(p.grad, torch.tensor([1.0, float("inf"), 2.0]))


def test_single_process_matches_torch_clip():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(4, 4, generator=gen), torch.randn(9, generator=gen)]
    ours = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    ref = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for a, b, g in zip(ours, ref, grads):
        a.grad, b.grad = g.clone(), g.clone()
    n1 = clip_grad_norm_(ours, 0.5)
    n2 = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    assert n1.item() == pytest.approx(n2.item(), rel=1e-6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_config_fields_feed_the_schedule():
    cfg = types.SimpleNamespace(warmup_steps=0, schedule="wsd", min_lr_ratio=0.0,
                                decay_fraction=0.5)
    opt = MuonClip([nn.Parameter(torch.zeros(2, 2))], lr=1.0)
    assert [set_lr(opt, s, cfg, 4) for s in range(4)] == [1.0, 1.0, 0.5, 0.0]

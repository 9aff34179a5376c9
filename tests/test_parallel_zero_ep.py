"""ZeRO-1 ownership and the EP dispatcher on stand-in modules, against plain single-process runs."""

import torch
import torch.distributed as dist
from torch import nn

from parallel.expert import AllToAllDispatcher
from parallel.zero import ShardGroup, ZeroOptimizer, plan_ownership
from tests.dist import run_distributed
from tests.grad_check import assert_grads_match, capture_reduced_grads, merge_ranks
from tests.parallel_fixtures import zero_update


def test_plan_ownership_balances_and_splits_only_expert_stacks():
    params = [("a", torch.zeros(64, 64)), ("b", torch.zeros(64, 8)), ("c", torch.zeros(8)),
              ("e.experts.w_up", torch.zeros(8, 16, 16)), ("d", torch.zeros(32, 32))]
    plan = plan_ownership(params, 4, split_dim0=lambda n: "experts" in n)
    by_name = {}
    for name, a, b, owner in plan:
        by_name.setdefault(name, []).append((a, b, owner))
    shapes = dict(params)
    for name in ("a", "b", "c", "d"):  # whole matrices: exactly one owner, the full range
        assert [(a, b) for a, b, _ in by_name[name]] == [(0, shapes[name].shape[0])]
    expert = sorted(by_name["e.experts.w_up"])
    assert [(a, b) for a, b, _ in expert] == [(0, 2), (2, 4), (4, 6), (6, 8)]  # whole experts
    load = [0] * 4
    sizes = {n: p.numel() // p.shape[0] for n, p in params}
    for name, a, b, owner in plan:
        load[owner] += (b - a) * sizes[name]
    assert max(load) == 64 * 64  # the biggest matrix alone; everything else packs around it


def _make_params(seed):
    g = torch.Generator().manual_seed(seed)
    return [("w1", nn.Parameter(torch.randn(6, 5, generator=g))),
            ("w2", nn.Parameter(torch.randn(5, 7, generator=g))),
            ("w3", nn.Parameter(torch.randn(4, 4, generator=g))),
            ("bias", nn.Parameter(torch.randn(7, generator=g))),
            ("experts.w_gate", nn.Parameter(torch.randn(4, 3, 5, generator=g)))]


def _grads(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(p.shape, generator=g) for _, p in _make_params(0)]


def _opt(kind):
    if kind == "adamw":
        return lambda named: torch.optim.AdamW([t for _, t in named], lr=0.05, weight_decay=0.1)
    return lambda named: torch.optim.Muon([t for _, t in named], lr=0.05, weight_decay=0.1)


def _zero(rank, world, kind):
    params = _make_params(0)
    if kind == "muon":
        params = [(n, p) for n, p in params if p.ndim == 2]
    zero = ZeroOptimizer([ShardGroup(dist.group.WORLD, params,
                                     split_dim0=lambda n: n.startswith("experts"))],
                         _opt(kind), max_grad_norm=3.0)
    reduced = capture_reduced_grads(zero)
    norms = []
    for step in range(3):
        for (n, p), g in zip(_make_params(0), _grads(step, rank)):
            for name, q in params:
                if name == n:
                    q.grad = g.clone()
        norms.append(float(zero_update(zero)))
    return {n: p.detach() for n, p in params}, norms, zero.state_bytes(), reduced


def _reference(kind, world):
    params = _make_params(0)
    if kind == "muon":
        params = [(n, p) for n, p in params if p.ndim == 2]
    opt = _opt(kind)(params)
    norms, grads = [], []
    for step in range(3):
        total = [sum(gs) for gs in zip(*[_grads(step, r) for r in range(world)])]
        for (n, _), g in zip(_make_params(0), total):
            for name, q in params:
                if name == n:
                    q.grad = g
        grads.append({n: q.grad.clone() for n, q in params})
        norms.append(float(torch.nn.utils.clip_grad_norm_([q for _, q in params], 3.0)))
        opt.step()
        opt.zero_grad()
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if isinstance(t, torch.Tensor))
    return {n: p.detach() for n, p in params}, norms, state, grads


def test_zero1_equals_plain_optimizer_adamw_and_muon():
    for kind in ("adamw", "muon"):
        ref, ref_norms, ref_state, ref_grads = _reference(kind, 4)
        out = run_distributed(_zero, 4, kind)
        for step, want in enumerate(ref_grads):  # each owner's summed gradient, before the clip
            assert_grads_match(merge_ranks([o[3][step] for o in out]), want, atol=1e-6,
                               context=f"{kind} step {step}")
        for params, norms, state, _ in out:
            for n, p in params.items():
                torch.testing.assert_close(p, ref[n], rtol=0, atol=1e-6, msg=f"{kind} {n}")
            torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-6,
                                       atol=0)
        states = [s["optimizer_state"] for _, _, s, _ in out]
        # Sharded: no rank holds the whole state; together they hold what one optimizer holds
        # (plus one AdamW step counter per extra expert slice).
        assert max(states) < ref_state <= sum(states) <= ref_state + 64


def _dispatch(rank, world):
    torch.manual_seed(rank)
    experts, hidden = 8, 3
    weights = torch.randn(experts, hidden, hidden, generator=torch.Generator().manual_seed(7))
    # uneven counts, some experts receive nothing from some ranks
    counts = torch.randint(0, 4, (experts,))
    counts[rank] = 0
    x = torch.randn(int(counts.sum()), hidden, requires_grad=True)
    d = AllToAllDispatcher(dist.group.WORLD, experts, world)
    x_local, c_local = d.dispatch(x, counts)
    per = experts // world
    outs = [xs @ weights[rank * per + j] for j, xs in enumerate(x_local.split(c_local.tolist()))]
    y = d.combine(torch.cat(outs))
    y.pow(2).sum().backward()
    # reference: every token through its own expert locally
    owner = torch.repeat_interleave(torch.arange(experts), counts)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.stack([x_ref[i] @ weights[int(e)] for i, e in enumerate(owner)]) \
        if len(owner) else x_ref.clone()
    y_ref.pow(2).sum().backward()
    return (y - y_ref).abs().max().item() if len(owner) else 0.0, \
        (x.grad - x_ref.grad).abs().max().item() if len(owner) else 0.0


def test_all_to_all_dispatcher_matches_local_experts_forward_and_backward():
    for err_y, err_g in run_distributed(_dispatch, 4):
        assert err_y < 1e-6 and err_g < 1e-6

"""The step's bad-step decision (train/step.py): a non-finite loss skips the update even when
every gradient is finite, on every rank alike; the next good step updates, clips and rebalances.
(A NaN gradient through the whole loop is in tests/test_trainer.py.)"""

from __future__ import annotations

import dataclasses
import math

import torch

from parallel.mesh import build_mesh
from parallel.runtime import ParallelRuntime
from tests.dist import run_distributed
from tests.parallel_fixtures import make_batch, rank_view, tiny_config
from train.checkpoint import training_state
from train.model import build_model, init_weights
from train.optim.muon import optimizer_for
from train.optim.qk_clip import QKClip
from train.step import training_step
from train.trainer import rank_pieces, state_fingerprint


def _body(rank, world):
    cfg = tiny_config(dp=2, ep=2)
    mesh = build_mesh(cfg)
    model = build_model(cfg)
    init_weights(model, 0)
    rt = ParallelRuntime(cfg, model, mesh,
                         lambda named: optimizer_for(named, cfg.optim, ns_dtype=torch.float32))
    clip = QKClip(rt.stage_modules, tau=0.01, group=mesh.dp_group)  # tiny tau: clips every step
    batch = rank_view(cfg, mesh, [make_batch(4, 32, seed=d) for d in range(cfg.parallel.dp)])

    def state():
        return state_fingerprint(training_state(rank_pieces(rt), rt.zero, rank))

    def biases():
        return {n: b.clone() for m in rt.stage_modules for n, b in m.named_buffers()
                if n.endswith("e_score_correction_bias")}

    start, start_bias = state(), biases()
    forward_backward = rt.forward_backward
    rt.forward_backward = lambda *a, **k: dataclasses.replace(forward_backward(*a, **k),
                                                              loss=float("nan"))
    bad = training_step(rt, batch, lr_multiplier=1.0, qk_clip=clip)
    after_bad, bias_after_bad = state(), biases()
    leftover = [n for n, p in rt.named_parameters()
                if p.grad is not None or getattr(p, "main_grad", None) is not None]
    leftover += [p.key for p in rt.zero.owned if p.master.grad is not None]
    rt.forward_backward = forward_backward
    good = training_step(rt, batch, lr_multiplier=1.0, qk_clip=clip)
    moved = any(not torch.equal(b, start_bias[n]) for n, b in biases().items())
    return (bad, after_bad == start, all(torch.equal(b, start_bias[n])
                                         for n, b in bias_after_bad.items()),
            leftover, good, state() != start, moved, bool(start_bias))


def test_a_non_finite_loss_alone_skips_update_qk_clip_and_router_bias_on_every_rank():
    for rank, (bad, unchanged, bias_kept, leftover, good, changed, moved, has_bias) in \
            enumerate(run_distributed(_body, 2, timeout=180)):
        where = f"rank {rank}"
        assert not bad.good and math.isnan(bad.loss) and math.isfinite(bad.grad_norm), where
        assert unchanged and bias_kept and has_bias, where  # params, masters, optimizer, bias
        assert math.isnan(bad.max_logit) and bad.clipped_heads == 0, where
        assert leftover == [], f"{where}: gradients kept after the step: {leftover}"
        assert good.good and math.isfinite(good.loss) and good.clipped_heads > 0, where
        assert changed and moved, where

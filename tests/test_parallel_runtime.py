"""The whole runtime (PP x V, DP, EP, ZeRO-1, DEP on/off) against a single-process reference.

Every case trains the same tiny KimiK25 (float32, seed 0) for several optimizer steps on the same
global batches (text + images + multi-frame video chunks; in step 1 replica 1 has no vision, in
an extra step of the world-4 case the whole global batch is text only) and compares per-step
losses, every parameter's reduced gradient before each optimizer step (tests/grad_check.py),
all final parameters (expert params slice-by-slice) and router biases with the reference run of
one process over the concatenated global batch.

Tolerance: atol 1e-5 on losses and parameters (AdamW lr 1e-3: float32 round-off only, the
parameters move ~1e-3 per step), atol 1e-6 + rtol 1e-4 on gradients (float32 round-off of
another summation order; the largest gradients are ~1e-1), router biases exactly (the loads are
integer counts).
"""

import pytest
import torch

from parallel.mesh import build_mesh
from parallel.runtime import ParallelRuntime
from tests.dist import run_distributed
from tests.grad_check import assert_grads_match, capture_reduced_grads, merge_ranks, model_grads
from tests.parallel_fixtures import concat_batches, make_batch, rank_view, tiny_config
from train.config import OptimConfig
from train.model import build_model, init_weights
from train.model.lm import lm_loss_sum
from train.model.moe import collect_expert_loads, update_router_bias
from train.optim.muon import optimizer_for
from train.optim.grad_norm import clip_grad_norm_
from train.step import training_step
from train.trainer import rank_pieces

ATOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4


def adamw(named):
    return torch.optim.AdamW([t for _, t in named], lr=1e-3, weight_decay=0.1)


MUONCLIP = OptimConfig(lr=1e-3, adamw_lr=1e-3, weight_decay=0.1)


def muonclip(named):
    """MuonClip with float32 Newton-Schulz (bf16 would turn round-off into visible noise)."""
    return optimizer_for(named, MUONCLIP, ns_dtype=torch.float32)


def reference(cfg, global_batches, make_opt):
    model = build_model(cfg)
    init_weights(model, 0)
    opt = make_opt(list(model.named_parameters()))
    losses, grads = [], []
    for b in global_batches:
        logits = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"],
                       pixel_patches=b["pixel_patches"], grid_thw=b["grid_thw"])
        s, n = lm_loss_sum(logits, b["labels"], b["loss_mask"])
        (s / n).backward()
        grads.append(model_grads(model))
        clip_grad_norm_(list(model.parameters()), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad()
        update_router_bias(model, collect_expert_loads(model), cfg.model.bias_update_rate)
        losses.append((s / n).item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, grads


def _train(rank, world, cfg, steps, make_opt):
    mesh = build_mesh(cfg)
    model = build_model(cfg)
    init_weights(model, 0)
    rt = ParallelRuntime(cfg, model, mesh, make_opt)
    grads = capture_reduced_grads(rt.zero, rank_pieces(rt))
    results = [training_step(rt, rank_view(cfg, mesh, per_replica)) for per_replica in steps]
    state = {}
    for module in rt.stage_modules:
        for name, t in module.state_dict().items():
            state[name] = t.clone()
        for name, sub in module.named_modules():
            if name.endswith(".experts"):
                state[f"{name}.first_expert"] = sub.first_expert
    if rt.dep is not None:
        state.update({f"vision.{k}": v.clone() for k, v in rt.dep.encoder.state_dict().items()})
    return [r.loss for r in results], [r.expert_load for r in results], state, \
        [r.encoder_load for r in results], grads


def _compare(cfg, world, steps, make_opt=adamw):
    ref_losses, ref_state, ref_grads = reference(cfg, [concat_batches(s) for s in steps],
                                                 make_opt)
    out = run_distributed(_train, world, cfg, steps, make_opt, timeout=300)
    for step, want in enumerate(ref_grads):
        assert_grads_match(merge_ranks([o[4][step] for o in out]), want, atol=GRAD_ATOL,
                           rtol=GRAD_RTOL, context=f"step {step}")
    covered, bias_moved = set(), False
    for rank, (losses, stats, state, _, _) in enumerate(out):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0,
                                   atol=ATOL, msg=f"rank {rank} losses")
        assert stats == out[0][1], "expert load stats differ between ranks"
        for name, value in state.items():
            if name.endswith(".first_expert"):
                continue
            want = ref_state[name]
            if name.endswith(("w_gate", "w_up", "w_down")):
                first = state[name.rsplit(".", 1)[0] + ".first_expert"]
                want = want[first:first + value.shape[0]]
            if name.endswith("e_score_correction_bias"):
                assert torch.equal(value, want), f"rank {rank}: {name} differs"
                bias_moved |= bool(value.abs().sum() > 0)
            else:
                torch.testing.assert_close(value, want, rtol=0, atol=ATOL,
                                           msg=f"rank {rank}: {name}")
            covered.add(name)
    assert covered == set(ref_state)  # every parameter and buffer lives on some rank
    assert bias_moved  # the balancing update really ran (a ±rate step can cancel in a layer)
    if cfg.parallel.dep:  # DEP spread the encoder over ranks beyond pipeline stage 0
        dp = cfg.parallel.dp
        assert any(sum(load[dp:]) > 0 for load in out[0][3][:2])
    return out


def _steps(dp, microbatches, n=3, text_only_last=False):
    steps = [[make_batch(2 * microbatches, 32, seed=100 * s + d, vision=not (s == 1 and d == 1))
              for d in range(dp)] for s in range(n)]
    if text_only_last:
        steps.append([make_batch(2 * microbatches, 32, seed=999 + d, vision=False)
                      for d in range(dp)])
    return steps


@pytest.mark.parametrize("dep", [True, False], ids=["dep", "no_dep"])
def test_pp2_v2_world2(dep):
    cfg = tiny_config(pp=2, virtual_stages=2, microbatches=4, dep=dep)
    _compare(cfg, 2, _steps(1, 4))


@pytest.mark.parametrize("dep", [True, False], ids=["dep", "no_dep"])
def test_pp2_v2_dp2_ep2_world4(dep):
    cfg = tiny_config(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=4, dep=dep)
    steps = _steps(2, 4, text_only_last=True)
    assert all(b["grid_thw"] is None for b in steps[-1])  # a text-only global batch
    assert steps[1][1]["grid_thw"] is None and steps[1][0]["grid_thw"] is not None
    _compare(cfg, 4, steps)


@pytest.mark.parametrize("dep", [True, False], ids=["dep", "no_dep"])
def test_pp2_v2_dp4_ep4_world8(dep):
    cfg = tiny_config(pp=2, virtual_stages=2, dp=4, ep=4, microbatches=2, dep=dep)
    _compare(cfg, 8, _steps(4, 2))


def test_zero_bubble_schedule_with_ep_and_muonclip_world4():
    cfg = tiny_config(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=4, dep=True,
                      schedule="interleaved_zero_bubble")
    _compare(cfg, 4, _steps(2, 4, n=2), make_opt=muonclip)

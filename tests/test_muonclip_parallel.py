"""MuonClip under ZeRO-1 (whole-parameter ownership) and EP equals the single-process optimizer.

Part 1, ZeRO-1 alone: two gloo ranks, each with its own micro-batch; a real forward/backward of the tiny decoder with
two attention heads forced far above tau, so QK-Clip acts on every step. Per step: loss summed
and divided by the global token count, gradients reduced to owners, global grad-norm clip,
MuonClip on the owned fp32 masters, broadcast, QK-Clip (MAX of the max logits over the ranks) on
the live weights and the owners' masters, schedule from the step. Reference: one process, both
micro-batches, the same optimizer, clip and schedule. Parameters after 3 steps agree to fp32
round-off; the checkpointed optimizer state agrees key by key too.

Part 2, the whole runtime (parallel/runtime.py: PP2 x V2 x DP2, EP2, DEP, ZeRO-1 on 4 ranks)
with MuonClip, the schedule and QK-Clip on each stage's layers over its DP group, against one
process over the global batches.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallel.mesh import build_mesh
from parallel.runtime import ParallelRuntime
from tests.dist import run_distributed
from tests.grad_check import assert_grads_match, capture_reduced_grads, merge_ranks, model_grads
from tests.parallel_fixtures import concat_batches, make_batch, rank_view, tiny_config, zero1_replica
from train.checkpoint import CheckpointManager, fill_masters, model_tensors, optimizer_tensors
from train.config import ModelConfig, replace
from train.model import build_model, init_weights
from train.model.lm import DecoderLM, lm_loss_sum
from train.model.moe import collect_expert_loads, update_router_bias
from train.optim.muon import build_optimizer, optimizer_for
from train.optim.qk_clip import QKClip, q_weight
from train.optim.grad_norm import clip_grad_norm_
from train.optim.schedule import schedule_multiplier, set_lr
from train.step import training_step
from train.trainer import rank_pieces

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, first_k_dense=1,
                  intermediate_size=48, num_heads=4, q_lora_rank=16, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=16)
OPTIM = types.SimpleNamespace(lr=0.02, adamw_lr=3e-3, weight_decay=0.1, momentum=0.95,
                              betas=(0.9, 0.95), eps=1e-8, warmup_steps=1, schedule="cosine",
                              min_lr_ratio=0.1, decay_fraction=0.2)
TAU, STEPS, WORLD, MAX_NORM = 100.0, 3, 2, 1.0
BATCH, SEQ = 2, 16
GLOBAL_TOKENS = WORLD * BATCH * (SEQ - 1)


def _model() -> DecoderLM:
    model = DecoderLM(CFG)
    init_weights(model, 0)
    attn = model.layers["0"].attn
    with torch.no_grad():  # heads 0 and 2 of layer 0 start with logits well above tau
        for h in (0, 2):
            q_weight(attn)[h * 12:(h + 1) * 12] *= 100
            attn.kv_b_proj.weight[h * 16:h * 16 + 8] *= 100
    return model


def _loss(model, step: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(5, 64, (BATCH, SEQ), generator=gen)
    logits = model(ids, position_ids=torch.arange(SEQ).expand(BATCH, -1),
                   doc_ids=torch.zeros_like(ids))
    ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1),
                                     reduction="sum")
    return ce / GLOBAL_TOKENS


def _reference():
    model = _model()
    opt = build_optimizer(model, OPTIM, ns_dtype=torch.float32)
    clip = QKClip(model, TAU)
    clipped, grads = 0, []
    for step in range(STEPS):
        set_lr(opt, step, OPTIM, STEPS)
        for rank in range(WORLD):
            _loss(model, step, rank).backward()
        grads.append(model_grads(model))
        clip_grad_norm_(list(model.parameters()), MAX_NORM)
        opt.step()
        clipped += clip.step().clipped_heads
        opt.zero_grad()
    return model, opt, clipped, grads


def _zero_replica(rank, world, ep):
    model = _model()
    zero = zero1_replica(model, lambda named: optimizer_for(named, OPTIM, ns_dtype=torch.float32),
                         ep, max_grad_norm=MAX_NORM)
    return model, zero


def _state(model, zero):
    return {**model_tensors(model), **optimizer_tensors(zero, model)}


def _numpy(state):
    return {k: v.detach().numpy().copy() for k, v in state.items()}


def _body(rank, world, ep, root):
    model, zero = _zero_replica(rank, world, ep)
    clip = QKClip(model, TAU, group=dist.group.WORLD)
    reduced = capture_reduced_grads(zero, model)
    clipped = 0
    for step in range(STEPS):
        if zero.optimizer is not None:
            set_lr(zero.optimizer, step, OPTIM, STEPS)
        _loss(model, step, rank).backward()
        zero.reduce_grads()
        zero.clip_grad_norm()
        zero.optimizer_step()
        zero.broadcast()
        clipped += clip.step(masters=zero.masters()).clipped_heads
        zero.zero_grad()
    params = _numpy(model_tensors(model))
    state = _numpy(optimizer_tensors(zero, model))
    CheckpointManager(root).save(STEPS, _state(model, zero))
    return params, state, clipped, reduced


def _load_body(rank, world, ep, root):
    model, zero = _zero_replica(rank, world, ep)
    state = _state(model, zero)
    loaded = CheckpointManager(root).load_latest(state)
    assert loaded.step == STEPS and loaded.missing == []
    return _numpy(state)


@pytest.mark.parametrize("ep", [1, 2], ids=["zero1-dp2", "zero1-dp2-ep2"])
def test_zero1_muonclip_equals_single_process(ep, tmp_path):
    results = run_distributed(_body, WORLD, ep, str(tmp_path))
    ref_model, ref_opt, ref_clipped, ref_grads = _reference()
    assert ref_clipped >= 2  # QK-Clip really acted
    for step, want in enumerate(ref_grads):  # owners' summed gradients, before the clip
        # step 0 agrees to 1e-7; later steps inherit the parameters' fp32 round-off (2e-5)
        assert_grads_match(merge_ranks([r[3][step] for r in results]), want, atol=1e-6,
                           rtol=1e-4, context=f"step {step}")
    ref_params = model_tensors(ref_model)
    ref_state = optimizer_tensors(ref_opt, ref_model)
    seen_state = set()
    for params, state, clipped, _ in results:
        assert clipped == ref_clipped
        for key, value in params.items():
            ref = ref_params[key]
            # fp32 round-off: grad-norm sums and gradient reductions run in another order
            torch.testing.assert_close(torch.from_numpy(value), ref.detach(), rtol=1e-5,
                                       atol=1e-6, msg=key)
        for key, value in state.items():
            if key.startswith("master/"):  # the owner's fp32 master equals the parameter
                ref = ref_params["model/" + key.removeprefix("master/")]
            else:
                ref = ref_state[key]
            torch.testing.assert_close(torch.from_numpy(value), ref.detach(), rtol=1e-5,
                                       atol=1e-6, msg=key)
            seen_state.add(key)
    # Between them the ranks hold every piece of optimizer state exactly as the reference does.
    assert {k for k in seen_state if not k.startswith("master/")} == set(ref_state)
    assert {k.removeprefix("master/") for k in seen_state if k.startswith("master/")} == {
        k.removeprefix("model/") for k in ref_params if k in {f"model/{n}" for n, _ in
                                                             ref_model.named_parameters()}
        or "/expert-" in k}

    # The ZeRO checkpoint loads into a plain single-process optimizer (masters ignored) and into
    # ZeRO at the other expert layout, bit for bit.
    saved = {}
    for params, state, _, _ in results:
        saved.update(params)
        saved.update(state)
    plain_model = _model()
    plain_opt = build_optimizer(plain_model, OPTIM, ns_dtype=torch.float32)
    plain = {**model_tensors(plain_model), **optimizer_tensors(plain_opt, plain_model)}
    assert CheckpointManager(str(tmp_path)).load_latest(plain).step == STEPS
    for key, value in plain.items():
        assert torch.equal(value, torch.from_numpy(saved[key])), key
    for state in run_distributed(_load_body, WORLD, 3 - ep, str(tmp_path)):
        for key, value in state.items():
            assert (value == saved[key]).all(), key


def _masters_from_plain(rank, world, root):
    model, zero = _zero_replica(rank, world, 2)
    state = _state(model, zero)
    loaded = CheckpointManager(root).load_latest(state, optional=("rng/", "master/"))
    assert fill_masters(zero, loaded.missing) == len(zero.owned)
    return {p.key: (p.master.detach().numpy().copy(), p.view(p.param.detach()).numpy().copy())
            for p in zero.owned}


def test_zero_loads_a_plain_checkpoint_and_fills_masters(tmp_path):
    model = _model()
    opt = build_optimizer(model, OPTIM, ns_dtype=torch.float32)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    CheckpointManager(str(tmp_path)).save(1, {**model_tensors(model),
                                               **optimizer_tensors(opt, model)})
    for owned in run_distributed(_masters_from_plain, WORLD, str(tmp_path)):
        for key, (master, param) in owned.items():
            assert (master == param).all(), key


# ------------------------------------------------------------------------------------------
# Part 2: PP2 x V2 x DP2 with EP2 and DEP through ParallelRuntime, QK-Clip per stage
# ------------------------------------------------------------------------------------------

PP_TAU = 0.03  # the tiny model's initial max logits are 0.024-0.039: most heads clip each step


def _pp_config():
    cfg = tiny_config(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=4, dep=True)
    return replace(cfg, optim={"qk_clip_tau": PP_TAU, "warmup_steps": 1, "lr": 0.01,
                               "adamw_lr": 0.003})


def _pp_steps(n=3):
    return [[make_batch(8, 32, seed=100 * s + d, vision=not (s == 1 and d == 1)) for d in range(2)]
            for s in range(n)]


def _pp_body(rank, world, steps):
    cfg = _pp_config()
    mesh = build_mesh(cfg)
    model = build_model(cfg)
    init_weights(model, 0)
    rt = ParallelRuntime(cfg, model, mesh,
                         lambda named: optimizer_for(named, cfg.optim, ns_dtype=torch.float32))
    clip = QKClip(rt.stage_modules, cfg.optim.qk_clip_tau, group=mesh.dp_group)
    reduced = capture_reduced_grads(rt.zero, rank_pieces(rt))
    losses, clipped = [], []
    clip_stage = clip.step

    def clip_and_count(**kwargs):  # this pipeline rank's own clipped heads
        stats = clip_stage(**kwargs)
        clipped.append(stats.clipped_heads)
        return stats
    clip.step = clip_and_count
    for step, per_replica in enumerate(steps):
        out = training_step(rt, rank_view(cfg, mesh, per_replica), qk_clip=clip,
                            lr_multiplier=schedule_multiplier(step, cfg.optim, len(steps)))
        losses.append(out.loss)
    state = model_tensors(rt.stage_modules + [("vision.", rt.dep.encoder)])
    optim = optimizer_tensors(rt.zero, rt.stage_modules + [("vision.", rt.dep.encoder)])
    return mesh.dp_rank, losses, clipped, _numpy(state), _numpy(optim), reduced


def _pp_reference(steps):
    cfg = _pp_config()
    model = build_model(cfg)
    init_weights(model, 0)
    opt = build_optimizer(model, cfg.optim, ns_dtype=torch.float32)
    clip = QKClip(model, cfg.optim.qk_clip_tau)
    losses, clipped, grads = [], [], []
    for step, per_replica in enumerate(steps):
        b = concat_batches(per_replica)
        set_lr(opt, step, cfg.optim, len(steps))
        logits = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"],
                       pixel_patches=b["pixel_patches"], grid_thw=b["grid_thw"])
        loss_sum, n = lm_loss_sum(logits, b["labels"], b["loss_mask"])
        (loss_sum / n).backward()
        grads.append(model_grads(model))
        clip_grad_norm_(list(model.parameters()), cfg.optim.grad_clip)
        opt.step()
        clipped.append(clip.step().clipped_heads)
        opt.zero_grad()
        update_router_bias(model, collect_expert_loads(model), cfg.model.bias_update_rate)
        losses.append((loss_sum / n).item())
    return losses, clipped, model_tensors(model), optimizer_tensors(opt, model), grads


def test_runtime_pp2_v2_dp2_ep2_dep_muonclip_equals_single_process():
    steps = _pp_steps()
    ref_losses, ref_clipped, ref_state, ref_optim, ref_grads = _pp_reference(steps)
    assert all(c > 0 for c in ref_clipped) and min(ref_clipped) < 8  # clips some heads, not all
    out = run_distributed(_pp_body, 4, steps, timeout=300)
    for step, want in enumerate(ref_grads):
        assert_grads_match(merge_ranks([o[5][step] for o in out]), want, atol=1e-6, rtol=1e-4,
                           context=f"step {step}")
    covered = set()
    for dp_rank in range(2):
        per_stage = [o for o in out if o[0] == dp_rank]
        # the two pipeline ranks of a replica clip disjoint layers: together, the reference
        assert [sum(c) for c in zip(*(o[2] for o in per_stage))] == ref_clipped
    for _, losses, _, state, optim, _ in out:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0,
                                   atol=1e-5)
        for key, value in state.items():
            torch.testing.assert_close(torch.from_numpy(value), ref_state[key], rtol=0,
                                       atol=1e-5, msg=key)
            covered.add(key)
        for key, value in optim.items():  # the checkpoint keys of the sharded optimizer state
            want = ref_state["model/" + key[7:]] if key.startswith("master/") else ref_optim[key]
            torch.testing.assert_close(torch.from_numpy(value), want, rtol=1e-4, atol=1e-5,
                                       msg=key)
            covered.add(key)
    assert covered == set(ref_state) | set(ref_optim) | {
        "master/" + k[6:] for k in ref_state if not k.endswith("e_score_correction_bias")}

"""Code that runs on a GPU creates its tensors on its inputs' device: QK-Clip, Muon/AdamW,
ZeRO-1, EP, DEP and the step's metrics run here with every parameter and batch tensor on a
second device (tests/simulated_device.py: tensors that report `meta` but compute on the CPU), so
a CPU tensor mixed into device math raises, as it would on CUDA. Each case also checks that the
values equal a plain CPU run to float32 round-off (attention takes its generic kernel on an
unknown device, so sums run in another order; a misplaced or wrong value would differ by far more).
The per-step collectives are counted here too: under NCCL each one must get device tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel.mesh import build_mesh
from parallel.pipeline import split_model
from parallel.runtime import ParallelRuntime
from tests.dist import run_distributed
from tests.parallel_fixtures import make_batch, rank_view, tiny_config
from tests.simulated_device import (DeviceMixError, patch_collectives, simulated_device,
                                    to_device, unwrap)
from train.checkpoint import training_state
from train.config import OptimConfig
from train.model import build_model, init_weights
from train.model.lm import DecoderLM
from train.optim.muon import build_optimizer, optimizer_for
from train.optim.qk_clip import QKClip, q_weight
from train.step import training_step
from train.trainer import rank_pieces, state_fingerprint


def test_the_simulated_device_rejects_a_cpu_tensor_in_device_math():
    with simulated_device() as dev:
        x = torch.ones(3, device=dev)
        with pytest.raises(DeviceMixError, match="aten::cat mixes device tensors"):
            torch.cat([x, torch.ones(3)])
        with pytest.raises(DeviceMixError, match="aten::mul"):
            x * torch.ones(3)
        assert (x * torch.tensor(2.0)).device == dev  # a 0-dim CPU scalar is fine, as on CUDA
        assert (x + torch.ones(3, device=x.device)).device == dev
        with pytest.raises(DeviceMixError, match="aten::index_put_"):
            x[torch.tensor([0, 1])] = torch.ones(2)  # CPU indices are fine, CPU values not
        assert x[torch.tensor([0, 2])].device == dev
        assert torch.tensor([1.0, 2.0], device=dev).tolist() == [1.0, 2.0]
        assert x.cpu().device.type == "cpu" and float(x.sum()) == 3.0


def _lm(cfg):
    model = build_model(cfg)
    init_weights(model, 0)
    return model.lm if hasattr(model, "lm") else model


def _forward(lm: DecoderLM, batch):
    return lm(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])


def _qk_clip_run(on_device: bool):
    cfg = tiny_config()
    lm = _lm(cfg)
    with torch.no_grad():  # head 0 of layer 0 far above tau
        q_weight(lm.layers["0"].attn)[:16] *= 30
    batch = make_batch(2, 32, seed=3, vision=False)
    with simulated_device() as dev:
        if on_device:
            lm = to_device(lm)
            batch = {k: v.to(dev) for k, v in batch.items() if v is not None}
        # Two chunks, one never run: its layers report no maxima this step.
        chunks = [m.lm for _, m in split_model(lm, 2, 1, 0, vision_in_first_stage=False)
                  + split_model(lm, 2, 1, 1, vision_in_first_stage=False)]
        clip = QKClip(chunks, tau=0.5)
        h = chunks[0].embed(batch["input_ids"])
        for layer in chunks[0].layers.values():
            layer.attn.record_max_logits = True
        _forward(chunks[0], batch)
        stats = clip.step(masters={"layers.0.attn.kv_b_proj.weight":
                                   chunks[0].layers["0"].attn.kv_b_proj.weight.detach().clone()})
        del h
        return stats, {n: unwrap(p.detach()).clone() for n, p in chunks[0].named_parameters()}


def test_qk_clip_on_device_equals_cpu():
    ref_stats, ref = _qk_clip_run(on_device=False)
    stats, got = _qk_clip_run(on_device=True)
    assert ref_stats.clipped_heads > 0 and stats.clipped_heads == ref_stats.clipped_heads
    assert stats.max_logit == pytest.approx(ref_stats.max_logit, rel=1e-6)
    for n, p in ref.items():
        torch.testing.assert_close(got[n], p, rtol=1e-6, atol=1e-7, msg=n)


def _muon_run(on_device: bool):
    cfg = tiny_config()
    model = build_model(cfg)
    init_weights(model, 0)
    batch = make_batch(2, 32, seed=4)
    with simulated_device() as dev:
        if on_device:
            model = to_device(model)
            batch = {k: v.to(dev) if v is not None else None for k, v in batch.items()}
        # float32 Newton-Schulz: bf16 would turn the attention kernel's round-off into bf16 ulps
        opt = build_optimizer(model, OptimConfig(lr=1e-2, adamw_lr=1e-3), ns_dtype=torch.float32)
        for _ in range(2):
            logits = model(batch["input_ids"], position_ids=batch["position_ids"],
                           doc_ids=batch["doc_ids"], pixel_patches=batch["pixel_patches"],
                           grid_thw=batch["grid_thw"])
            logits.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return {n: unwrap(p.detach()).clone() for n, p in model.named_parameters()}


def test_muon_and_adamw_on_device_equal_cpu():
    ref = _muon_run(on_device=False)
    got = _muon_run(on_device=True)
    for n, p in ref.items():
        torch.testing.assert_close(got[n], p, rtol=1e-5, atol=1e-6, msg=n)


# Per training step (train/step.py) on every rank of PP1 x DP2 (EP2, DEP, 2 micro-batches): the
# loss-token count; DEP's two all-to-alls (embeddings, their gradients: each rank was given the
# pixels it encodes, so neither grids nor pixels move); per MoE layer and micro-batch a count, a token and a combine all-to-all forward
# and two backward; the loss total; the expert-load reduction; one bucketed reduce and broadcast
# per owner in each shard group; the grad-norm reduction; QK-Clip's max logits; the expert-load
# stats table; the max logit and the clipped heads over PP. A new per-step collective must be
# added here, on purpose.
MOE_LAYERS, MICROBATCHES = 3, 2


def _expected_collectives(owners: tuple[int, int]) -> dict[str, int]:
    """owners: (owners in all shard groups, owners in groups of more than one rank: a group of
    one rank hands its fp32 main grads to the optimizer without a reduce)."""
    return {"all_reduce": 1 + 1 + 1 + 1 + 1 + 1 + 2,
            "all_to_all_single": 2 + MOE_LAYERS * MICROBATCHES * (3 + 2),
            "reduce": owners[1], "broadcast": owners[0]}


def _runtime_body(rank, world, on_device: bool):
    cfg = tiny_config(dp=2, ep=2, dep=True, microbatches=MICROBATCHES)
    mesh = build_mesh(cfg)
    model = build_model(cfg)
    init_weights(model, 0)
    batches = [rank_view(cfg, mesh, [make_batch(4, 32, seed=10 * s + d)
                                     for d in range(cfg.parallel.dp)]) for s in range(2)]
    per_step: list[list[tuple[str, set[str]]]] = []
    with simulated_device() as dev:
        if on_device:
            model = to_device(model)
            batches = [{k: v.to(dev) if v is not None else None for k, v in b.items()}
                       for b in batches]
        rt = ParallelRuntime(cfg, model, mesh,
                             lambda named: optimizer_for(named, cfg.optim, ns_dtype=torch.float32),
                             device=dev if on_device else "cpu")
        clip = QKClip(rt.stage_modules, tau=0.01, group=mesh.dp_group)
        results, clipped = [], []
        for b in batches:
            calls: list[tuple[str, set[str]]] = []
            with patch_collectives(calls):
                results.append(training_step(rt, b, qk_clip=clip))
                clipped.append(results[-1].clipped_heads)
            per_step.append(calls)
        owners = (sum(len({p.owner for p in g.pieces}) for g in rt.zero.groups),
                  sum(len({p.owner for p in g.pieces}) for g in rt.zero.groups
                      if dist.get_world_size(g.group) > 1))
        params = {n: unwrap(p.detach()).clone() for n, p in rt.named_parameters()}
        # What a checkpoint saves: optimizer state and masters live on the device too (torch's
        # own 0-dim step counters stay on the CPU, as with CUDA parameters).
        state = training_state(rank_pieces(rt), rt.zero, rank)
        assert state_fingerprint(state)
        if on_device:
            placed = {k: t.device.type for k, t in state.items()
                      if k.startswith(("model/", "optim/", "master/")) and t.dim() > 0}
            assert placed and set(placed.values()) == {dev.type}, placed
    return ([(r.loss, r.grad_norm, r.expert_load, c) for r, c in zip(results, clipped)], params,
            per_step, owners)


def test_runtime_step_on_device_equals_cpu_and_its_collectives_are_counted():
    ref = run_distributed(_runtime_body, 2, False, timeout=180)
    got = run_distributed(_runtime_body, 2, True, timeout=180)
    for rank in range(2):
        for (loss, norm, loads, clipped), ref_step in zip(got[rank][0], ref[rank][0]):
            assert loss == pytest.approx(ref_step[0], rel=1e-6)
            assert norm == pytest.approx(ref_step[1], rel=1e-5)
            assert loads == ref_step[2] and clipped == ref_step[3] > 0
        for n, p in ref[rank][1].items():
            torch.testing.assert_close(got[rank][1][n], p, rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank}: {n}")
        owners = got[rank][3]
        for step, calls in enumerate(got[rank][2]):
            counts: dict[str, int] = {}
            for name, _ in calls:
                counts[name] = counts.get(name, 0) + 1
            assert counts == _expected_collectives(owners), f"rank {rank} step {step}"
            cpu = [name for name, kinds in calls if "cpu" in kinds]
            assert cpu == [], f"rank {rank} step {step}: collectives on CPU tensors {cpu}"

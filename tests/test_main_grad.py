"""fp32 gradient accumulation over micro-batches with bf16 compute weights (parallel/main_grad.py).

The runtime runs 16 micro-batches in bf16 (CPU) and the gradient ZeRO-1 hands to the optimizer is
captured. The reference runs the same bf16 model on each micro-batch alone and keeps each bf16
gradient. The runtime's gradient must be the fp32 sum of those 16 gradients to fp32 round-off
(bound: 16 * 2^-24 * sum_k |g_k| per element), and the bf16 accumulation that autograd would do
without main gradients must break that bound (so the test can fail). Covered: PP1 (one chunk
holds the whole model), PP2 x V2 under interleaved 1F1B and under the zero-bubble schedule, whose
weight pass writes `.grad` itself; the vision tower runs inside stage 0 (DEP off).

Also: fp32 masters and optimizer state exist only on the ZeRO-1 owner of each piece.
"""

import pytest
import torch

from parallel.batch import split_microbatches
from parallel.mesh import build_mesh
from parallel.pieces import RankCoords, build_rank_pieces, materialize_pieces
from parallel.rank_memory import rank_memory
from parallel.runtime import ParallelRuntime
from tests.dist import run_distributed
from tests.parallel_fixtures import IMAGE, VIDEO, make_batch, rank_view, tiny_config
from train.config import replace
from train.model import build_model, init_weights
from train.model.lm import lm_loss_sum
from train.optim.muon import muonclip_factory
from train.step import training_step

MICROBATCHES = 16
EPS32 = 2.0 ** -24


class CaptureGrads(torch.optim.Optimizer):
    """Records the gradients ZeRO-1 hands to the optimizer (the fp32 masters' grads)."""

    def __init__(self, named):
        super().__init__([t for _, t in named], {})
        self.names = [n for n, _ in named]
        self.grads: dict[str, torch.Tensor] = {}

    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        self.grads = {n: p.grad.clone() for n, p in zip(self.names, params)
                      if p.grad is not None}


def _config(pp: int, schedule: str):
    cfg = tiny_config(pp=pp, virtual_stages=2 if pp > 1 else 1, microbatches=MICROBATCHES,
                      schedule=schedule if pp > 1 else "1f1b", dep=False)
    # grad_clip 0: the norm is measured, grads untouched; whole-logits loss, as the reference
    return replace(cfg, optim=dict(grad_clip=0.0), activations=dict(loss_chunk_tokens=0))


def _runtime_grads(rank, world, cfg, batch):
    mesh = build_mesh(cfg)
    pieces = materialize_pieces(build_rank_pieces(cfg, RankCoords.of_mesh(mesh)), "cpu",
                                seed=0, init_std=cfg.model.init_std)
    captured = []

    def make_optimizer(named):
        captured.append(CaptureGrads(named))
        return captured[0]

    rt = ParallelRuntime(cfg, pieces, mesh, make_optimizer, dtype=torch.bfloat16)
    assert all(q.dtype == torch.bfloat16 for _, q in rt.named_parameters())
    # fp32 masters of the exact (fp32) initial values, before the cast to bf16
    for piece in rt.zero.owned:
        assert piece.master.dtype == torch.float32
    training_step(rt, rank_view(cfg, mesh, [batch]))
    assert all(q.grad is None and q.main_grad is None for _, q in rt.named_parameters())
    return captured[0].grads


def _per_microbatch_grads(cfg, batch) -> dict[str, list[torch.Tensor]]:
    model = build_model(cfg)
    init_weights(model, 0)
    for q in model.parameters():
        q.data = q.data.to(torch.bfloat16)
    mbs = split_microbatches(batch, MICROBATCHES, image_token_id=IMAGE, video_token_id=VIDEO,
                             merge_size=cfg.vision.merge_size)
    n_tokens = float(batch["loss_mask"].sum())
    grads: dict[str, list[torch.Tensor]] = {n: [] for n, _ in model.named_parameters()}
    for mb in mbs:
        logits = model(mb.input_ids, position_ids=mb.position_ids, doc_ids=mb.doc_ids,
                       pixel_patches=mb.pixel_patches, grid_thw=mb.grid_thw)
        (lm_loss_sum(logits, mb.target[..., 0], mb.target[..., 1])[0] / n_tokens).backward()
        for n, q in model.named_parameters():
            grads[n].append(q.grad if q.grad is not None else torch.zeros_like(q))
            q.grad = None
    return grads


@pytest.mark.parametrize("pp,schedule", [(1, "1f1b"), (2, "interleaved_1f1b"),
                                         (2, "interleaved_zero_bubble")],
                         ids=["pp1", "pp2_v2_1f1b", "pp2_v2_zero_bubble"])
def test_bf16_grads_accumulate_in_fp32_over_16_microbatches(pp, schedule):
    cfg = _config(pp, schedule)
    batch = make_batch(MICROBATCHES, 32, seed=3)
    got = {}
    for grads in run_distributed(_runtime_grads, pp, cfg, batch, timeout=300):
        assert not set(got) & set(grads)
        got.update(grads)
    per_mb = _per_microbatch_grads(cfg, batch)
    assert set(got) == set(per_mb)
    worst_fp32, worst_bf16 = 0.0, 0.0
    for name, gs in per_mb.items():
        fp32_sum = torch.stack([g.float() for g in gs]).sum(0)
        bound = MICROBATCHES * EPS32 * torch.stack([g.float().abs() for g in gs]).sum(0)
        bf16_sum = gs[0].clone()
        for g in gs[1:]:
            bf16_sum += g  # what autograd's accumulation into a bf16 .grad does
        assert got[name].dtype == torch.float32
        # (Measured: equal bit for bit, the schedule adds the micro-batches in the same order.)
        err = (got[name] - fp32_sum).abs()
        worst_fp32 = max(worst_fp32, float((err / (bound + 1e-30)).max()))
        worst_bf16 = max(worst_bf16, float(((bf16_sum.float() - fp32_sum).abs()
                                            / (bound + 1e-30)).max()))
    assert worst_fp32 <= 1.0, worst_fp32
    assert worst_bf16 > 100.0, worst_bf16  # a bf16 accumulation is far outside the bound


def _ownership(rank, world, cfg):
    mesh = build_mesh(cfg)
    model = build_model(cfg)
    init_weights(model, 0)
    rt = ParallelRuntime(cfg, model, mesh, muonclip_factory(cfg.optim))
    training_step(rt, rank_view(cfg, mesh, [make_batch(4, 32, seed=d)
                                            for d in range(cfg.parallel.dp)]))
    out = []
    for g in rt.zero.groups:
        me = torch.distributed.get_rank(g.group)
        for piece in g.pieces:
            out.append((piece.key, piece.owner == me, piece.master is not None))
    state = {id(t) for t in rt.zero.optimizer.state} if rt.zero.optimizer else set()
    masters = {id(p.master) for p in rt.zero.owned}
    held = dict(rt.zero.state_bytes(),
                weights=sum(t.numel() * t.element_size() for m in rt.modules()
                            for t in list(m.parameters()) + list(m.buffers())),
                parameters=sum(q.numel() for _, q in rt.named_parameters()))
    return out, state <= masters, len(state), held


@pytest.mark.parametrize("ep", [1, 2], ids=["ep1_experts_split_by_zero", "ep2"])
def test_masters_and_optimizer_state_only_on_owners_world2(ep):
    """Each piece has a master exactly on its owner, the optimizer state lives on the masters,
    and `mmpt rank-memory`'s count (from meta pieces and the plan alone) matches what the
    runtime holds, byte for byte."""
    cfg = tiny_config(dp=2, ep=ep, microbatches=2, dep=True)
    out = run_distributed(_ownership, 2, cfg)
    for rank, (pieces, state_on_masters, n_state, held) in enumerate(out):
        assert state_on_masters and n_state > 0
        for key, owned, has_master in pieces:
            assert owned == has_master, key
        counted = rank_memory(cfg, rank)
        assert counted.master_bytes == held["fp32_masters"]
        assert counted.optimizer_state_bytes == held["optimizer_state"]
        assert counted.weights_bytes == held["weights"]
        assert counted.parameters == held["parameters"]

"""Validation and per-category losses.

Runtime (synthetic batches, tiny KimiK25): `ParallelRuntime.evaluate` (forward only over PP x V,
DP, EP, DEP) gives the single-process loss sums; the per-category sums of training and evaluation
equal a plain per-token loop over the whole global batch; interleaving evaluations with training
steps changes no training loss, parameter, optimizer state or router bias (bit for bit).
Data (the real small corpus): the hold-out split is disjoint from training and fixed by sample
identity; token categories name each target token's source and role.
Trainer: validation metrics, per-modality metrics, bit-identical training with evaluation on,
Weights & Biases offline, the plot's panels.
"""

from __future__ import annotations

import pytest
import torch

from parallel.mesh import build_mesh
from parallel.runtime import ParallelRuntime
from tests.dist import run_distributed
from tests.parallel_fixtures import concat_batches, make_batch, tiny_config
from train.model import build_model, init_weights
from train.model.lm import token_losses

CATEGORIES = 6


def _with_categories(batch: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    cat = torch.randint(0, CATEGORIES, batch["loss_mask"].shape, generator=g)
    return {**batch, "token_category": cat.masked_fill(~batch["loss_mask"].bool(), -1)}


def _steps(cfg, n):
    dp, rows = cfg.parallel.dp, cfg.data.global_batch_size // cfg.parallel.dp
    return [[_with_categories(make_batch(rows, cfg.data.seq_len, seed=10 * s + d), 10 * s + d)
             for d in range(dp)] for s in range(n)]


def _global(per_replica):
    out = concat_batches(per_replica)
    out["token_category"] = torch.cat([b["token_category"] for b in per_replica])
    return out


def _reference_sums(cfg, global_batch):
    """Loss sum, token count and per-category sums of the untrained model, one process."""
    model = build_model(cfg)
    init_weights(model, 0)
    b = global_batch
    with torch.no_grad():
        logits = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"],
                       pixel_patches=b["pixel_patches"], grid_thw=b["grid_thw"])
    losses = token_losses(logits, b["labels"], b["loss_mask"]).double()
    cat = b["token_category"].reshape(-1)
    sums = torch.zeros(CATEGORIES, 2, dtype=torch.float64)
    for c in range(CATEGORIES):  # a plain loop, not the runtime's index_add
        sums[c, 0] = losses[cat == c].sum()
        sums[c, 1] = (cat == c).sum()
    return float(losses.sum()), int(b["loss_mask"].sum()), sums


def _runtime(cfg):
    mesh = build_mesh(cfg)
    model = build_model(cfg)
    init_weights(model, 0)
    adamw = lambda named: torch.optim.AdamW([t for _, t in named], lr=1e-3)  # noqa: E731
    return mesh, ParallelRuntime(cfg, model, mesh, adamw)


def _state(rt):
    """Everything training changes on this rank: params (with router biases) and optimizer."""
    out = {k: v.clone() for m in rt.stage_modules for k, v in m.state_dict().items()}
    if rt.dep is not None:
        out.update({f"vision.{k}": v.clone() for k, v in rt.dep.encoder.state_dict().items()})
    opt = rt.zero.optimizer
    if opt is not None:
        for i, st in enumerate(opt.state.values()):
            out.update({f"optim.{i}.{k}": v.clone() for k, v in st.items()
                        if isinstance(v, torch.Tensor)})
    return out


def _eval_and_train(rank, world, cfg, steps, evaluate_between):
    mesh, rt = _runtime(cfg)
    first = rt.evaluate(steps[0][mesh.dp_rank], CATEGORIES)
    again = rt.evaluate(steps[0][mesh.dp_rank], CATEGORIES)
    results, evals = [], []
    for per_replica in steps:
        results.append(rt.step(per_replica[mesh.dp_rank], CATEGORIES))
        if evaluate_between:
            evals.append(rt.evaluate(steps[0][mesh.dp_rank], CATEGORIES))
    grads = [n for n, p in rt.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    return first, again, results, evals, _state(rt), grads


@pytest.mark.parametrize("layout", [
    dict(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=2, dep=True),
    dict(pp=2, virtual_stages=1, dp=1, ep=1, microbatches=2, dep=False, schedule="1f1b"),
], ids=["pp2-v2-dp2-ep2-dep-interleaved", "pp2-1f1b"])
def test_evaluation_matches_one_process_and_leaves_training_untouched(layout):
    cfg = tiny_config(**layout)
    world = cfg.parallel.pp * cfg.parallel.dp
    steps = _steps(cfg, 3)
    ref_sum, ref_tokens, ref_cats = _reference_sums(cfg, _global(steps[0]))

    with_eval = run_distributed(_eval_and_train, world, cfg, steps, True, timeout=240)
    without = run_distributed(_eval_and_train, world, cfg, steps, False, timeout=240)
    for rank, ((first, again, res, evals, state, grads),
               (_, _, res0, _, state0, _)) in enumerate(zip(with_eval, without)):
        # Forward-only evaluation = the single-process sums; counts exactly.
        assert first.loss_tokens == ref_tokens
        assert first.loss_sum == pytest.approx(ref_sum, rel=1e-6)
        assert torch.equal(first.category_loss[:, 1], ref_cats[:, 1])
        torch.testing.assert_close(first.category_loss[:, 0], ref_cats[:, 0], rtol=1e-6, atol=1e-6)
        assert first.category_loss[:, 0].sum().item() == pytest.approx(first.loss_sum, rel=1e-6)
        # The same batch gives the same result each time, bit for bit.
        assert again.loss_sum == first.loss_sum
        assert torch.equal(again.category_loss, first.category_loss)
        # Training: the category sums add up to the step's loss (float64 sums of the float32
        # per-token losses vs the float32 loss: 1e-6).
        c = res[0].category_loss
        assert c[:, 0].sum().item() / c[:, 1].sum().item() == pytest.approx(res[0].loss, rel=1e-6)
        assert torch.equal(c[:, 1], ref_cats[:, 1])
        # Evaluations between steps change nothing in training, bit for bit.
        assert [r.loss for r in res] == [r.loss for r in res0], rank
        assert [r.grad_norm for r in res] == [r.grad_norm for r in res0]
        assert [r.expert_load for r in res] == [r.expert_load for r in res0]
        assert state.keys() == state0.keys()
        assert all(torch.equal(state[k], state0[k]) for k in state), rank
        assert not grads  # no gradient left behind
        # Later evaluations see the trained weights: the loss moves.
        assert evals[-1].loss_sum != first.loss_sum

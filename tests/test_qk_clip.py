"""QK-Clip on the real MLA: forced large logits are clipped to tau, other heads untouched."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from tests.dist import run_distributed
from train.config import ModelConfig
from train.model import init_weights
from train.model.attention import DocMask
from train.model.lm import DecoderLM
from train.optim.muon import build_optimizer
from train.optim.qk_clip import QKClip, clip_factors, q_weight, qk_clip_

TAU = 100.0
OPTIM = types.SimpleNamespace(lr=0.02, adamw_lr=3e-3, weight_decay=0.1, momentum=0.95,
                              betas=(0.9, 0.95), eps=1e-8)
BOOSTED = (0, 2)  # heads of layer 0 pushed far above tau
FACTORS = {0: 100.0, 2: 100.0, 1: 40.0}  # head 1 grows too but stays below tau


def _model(q_lora_rank: int = 16, seed: int = 0) -> DecoderLM:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, first_k_dense=1,
                      intermediate_size=48, num_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=16)
    model = DecoderLM(cfg)
    init_weights(model, seed)
    attn = model.layers["0"].attn
    with torch.no_grad():  # scale q and k rows: logits grow by factor^2
        for h, factor in FACTORS.items():
            q_weight(attn)[h * 12:(h + 1) * 12] *= factor
            attn.kv_b_proj.weight[h * 16:h * 16 + 8] *= factor
    return model


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (2, 24), generator=gen)
    doc_ids = torch.zeros_like(ids)
    doc_ids[:, 14:] = 1
    pos = torch.cat([torch.arange(14), torch.arange(10)]).expand(2, -1)
    return ids, pos, doc_ids


def _loss(model, batch):
    ids, pos, doc = batch
    logits = model(ids, position_ids=pos, doc_ids=doc)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))


def _max_logits(model, batch) -> torch.Tensor:
    attns = [layer.attn for layer in model.layers.values()]
    for a in attns:
        a.record_max_logits = True
    with torch.no_grad():
        _loss(model, batch)
    return torch.stack([a.last_max_logits for a in attns])


def _train_step(model, batch, lr: float, clip: QKClip | None):
    opt = build_optimizer(model, OPTIM, ns_dtype=torch.float32)
    for g in opt.param_groups:
        g["lr"] = lr
    _loss(model, batch).backward()
    opt.step()
    return clip.step() if clip is not None else None


@pytest.mark.parametrize("q_lora_rank", [16, 0])
def test_clip_brings_every_head_to_tau_and_leaves_others_bitwise(q_lora_rank):
    model, batch = _model(q_lora_rank), _batch()
    before = _max_logits(model, batch)
    assert (before[0, list(BOOSTED)] > 1.2 * TAU).all()
    low = before <= TAU
    assert low.sum() == 6 and before[0, 1] > 10  # the other heads stay below tau
    weights0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    clip = QKClip(model, TAU)
    stats = _train_step(model, batch, lr=0.0, clip=clip)  # lr 0: what changes is the clip alone
    assert stats.clipped_heads == len(BOOSTED)
    assert stats.max_logit == pytest.approx(before.max().item())

    after = _max_logits(model, batch)
    assert (after <= TAU * (1 + 1e-5)).all(), after
    torch.testing.assert_close(after[0, list(BOOSTED)], torch.full((2,), TAU), rtol=1e-5, atol=0)
    # Unclipped heads of the clipped layer: bit for bit (later layers see a changed input; their
    # weights are checked bit for bit below).
    assert torch.equal(after[0][low[0]], before[0][low[0]])

    attn = model.layers["0"].attn
    wq, wkv = q_weight(attn).detach(), attn.kv_b_proj.weight.detach()
    wq0 = weights0[[n for n, p in model.named_parameters() if p is q_weight(attn)][0]]
    wkv0 = weights0["layers.0.attn.kv_b_proj.weight"]
    gamma = clip_factors(before[0], TAU)
    for h in range(4):
        q_nope, q_rope = slice(h * 12, h * 12 + 8), slice(h * 12 + 8, (h + 1) * 12)
        k_nope, v_rows = slice(h * 16, h * 16 + 8), slice(h * 16 + 8, (h + 1) * 16)
        if h in BOOSTED:
            torch.testing.assert_close(wq[q_nope], wq0[q_nope] * gamma[h].sqrt())
            torch.testing.assert_close(wq[q_rope], wq0[q_rope] * gamma[h])
            torch.testing.assert_close(wkv[k_nope], wkv0[k_nope] * gamma[h].sqrt())
        else:
            assert torch.equal(wq[h * 12:(h + 1) * 12], wq0[h * 12:(h + 1) * 12])
            assert torch.equal(wkv[k_nope], wkv0[k_nope])
        assert torch.equal(wkv[v_rows], wkv0[v_rows])  # values never scaled
    for name, p in model.named_parameters():  # the shared rope key and every other weight
        if p is not q_weight(attn) and p is not attn.kv_b_proj.weight:
            assert torch.equal(p, weights0[name]), name


def test_clip_after_a_real_step_scales_exactly_the_clipped_rows():
    """lr > 0: versus the same step without QK-Clip, only the boosted heads' q/k rows differ,
    by exactly the gamma factors, and the fp32 masters passed along get the same scaling."""
    batch = _batch()
    plain, clipped = _model(), _model()
    before = _max_logits(clipped, batch)
    _train_step(plain, batch, lr=0.01, clip=None)
    clip = QKClip(clipped, TAU)
    masters = {"layers.0.attn.q_b_proj.weight": torch.ones(48, 16),
               "layers.0.attn.kv_b_proj.weight": torch.ones(64, 16)}
    opt = build_optimizer(clipped, OPTIM, ns_dtype=torch.float32)
    for g in opt.param_groups:
        g["lr"] = 0.01
    _loss(clipped, batch).backward()
    opt.step()
    clip.step(masters=masters)

    attn_p, attn_c = plain.layers["0"].attn, clipped.layers["0"].attn
    gamma = clip_factors(before[0], TAU)
    expect_q = attn_p.q_b_proj.weight.detach().clone()
    expect_kv = attn_p.kv_b_proj.weight.detach().clone()
    expect_mq, expect_mkv = torch.ones(48, 16), torch.ones(64, 16)
    for h in BOOSTED:
        for w in (expect_q, expect_mq):
            w[h * 12:h * 12 + 8] *= gamma[h].sqrt()
            w[h * 12 + 8:(h + 1) * 12] *= gamma[h]
        for w in (expect_kv, expect_mkv):
            w[h * 16:h * 16 + 8] *= gamma[h].sqrt()
    assert torch.equal(attn_c.q_b_proj.weight, expect_q)
    assert torch.equal(attn_c.kv_b_proj.weight, expect_kv)
    assert torch.equal(masters["layers.0.attn.q_b_proj.weight"], expect_mq)
    assert torch.equal(masters["layers.0.attn.kv_b_proj.weight"], expect_mkv)
    # The logits of the clipped model are the unclipped model's times gamma, head by head.
    torch.testing.assert_close(_max_logits(clipped, batch)[0],
                               _max_logits(plain, batch)[0] * gamma, rtol=1e-5, atol=1e-5)


def test_max_is_folded_over_microbatches():
    model = _model()
    clip = QKClip(model, TAU)
    b1, b2 = _batch(1), _batch(2)
    with torch.no_grad():
        _loss(model, b1)
        _loss(model, b2)
    expected = torch.maximum(_max_logits(model, b1), _max_logits(model, b2))
    assert torch.equal(clip.reduced_max_logits(), expected)


def test_qk_clip_rejects_wrong_shape():
    attn = _model().layers["0"].attn
    with pytest.raises(ValueError, match="one per head"):
        qk_clip_(attn, torch.ones(3), TAU)


def _dist_body(rank, world):
    model = _model()
    clip = QKClip(model, TAU, group=None)
    batch = _batch(12 + rank)  # each rank sees different tokens
    with torch.no_grad():
        _loss(model, batch)
    clip.step()
    # numpy arrays travel by value (torch tensors would go through shared-memory handles).
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters() if "attn" in n}


def test_max_logits_are_max_reduced_over_ranks():
    """Two ranks see different tokens; both clip with the MAX of their maxima: identical weights,
    equal to a single process that ran both batches."""
    results = run_distributed(_dist_body, 2)
    s0, s1 = _max_logits(_model(), _batch(12)), _max_logits(_model(), _batch(13))
    # Each rank alone would clip some boosted head by a different factor than the MAX gives.
    assert (s0[0, list(BOOSTED)] < s1[0, list(BOOSTED)]).any()
    assert (s1[0, list(BOOSTED)] < s0[0, list(BOOSTED)]).any()
    ref = _model()
    clip = QKClip(ref, TAU)
    with torch.no_grad():
        _loss(ref, _batch(12))
        _loss(ref, _batch(13))
    stats = clip.step()
    assert stats.clipped_heads >= len(BOOSTED)
    for name, p in ref.named_parameters():
        if "attn" in name:
            assert torch.equal(torch.from_numpy(results[0][name]), p.detach()), name
            assert torch.equal(torch.from_numpy(results[1][name]), p.detach()), name


def test_pipeline_chunks_are_tracked_together():
    """A rank's pipeline chunks (pieces of the model, full-model names) form one QKClip."""
    whole, split = _model(), _model()
    first, second = copy.deepcopy(split), copy.deepcopy(split)
    del first.layers["1"]
    del second.layers["0"]
    clip = QKClip([first, second], TAU)
    assert [name for name, _ in clip.layers] == ["layers.0.attn", "layers.1.attn"]
    ref = QKClip(whole, TAU)
    batch = _batch()
    with torch.no_grad():
        _loss(whole, batch)
        h = first.embed_tokens(batch[0], None)
        cos, sin = first.rope(batch[1])
        mask = DocMask(batch[2])
        h = first.layers["0"](h, cos, sin, mask)
        second.layers["1"](h, cos, sin, mask)
    assert torch.equal(clip.reduced_max_logits(), ref.reduced_max_logits())
    with pytest.raises(ValueError, match="share a name"):
        QKClip([first, first], TAU)

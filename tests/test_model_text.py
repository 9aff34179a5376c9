"""Text model: packing isolation, positions, loss mask, fusion, dropless routing, router bias,
max logits, attention backends, init determinism."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from train.config import ModelConfig
from train.model import build_lm, init_weights
from train.model.attention import DocMask, attention, max_logits
from train.model.lm import doc_ids_from_cu_seqlens, lm_loss_sum, position_ids_from_doc_ids
from train.model.moe import MoE, collect_expert_loads, update_router_bias
from train.model.rope import apply_rope

CFG = dict(vocab_size=256, hidden_size=64, num_layers=3, first_k_dense=1, intermediate_size=96,
           num_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
           moe_intermediate_size=32, n_group=2, topk_group=1, image_token_id=3, video_token_id=4)


def make_lm(seed: int = 0, **overrides):
    cfg = ModelConfig(**{**CFG, **overrides})
    model = build_lm(cfg)
    init_weights(model, seed)
    return model


def text_ids(gen: torch.Generator, *shape: int, vocab: int = 256) -> torch.Tensor:
    """Random ids that avoid the placeholder ids 3 and 4."""
    return torch.randint(5, vocab, shape, generator=gen)


def test_packed_documents_match_documents_run_alone():
    model = make_lm().eval()
    gen = torch.Generator().manual_seed(1)
    lengths = [7, 12, 5]
    docs = [text_ids(gen, 1, n) for n in lengths]
    cu = torch.tensor([0, 7, 19, 24])
    doc_ids = doc_ids_from_cu_seqlens(cu, 24)
    pos = position_ids_from_doc_ids(doc_ids)
    packed = model(torch.cat(docs, 1), position_ids=pos, doc_ids=doc_ids)
    for d, (start, end) in zip(docs, zip(cu[:-1].tolist(), cu[1:].tolist())):
        n = end - start
        alone = model(d, position_ids=torch.arange(n)[None], doc_ids=torch.zeros(1, n, dtype=torch.long))
        torch.testing.assert_close(packed[:, start:end], alone, rtol=1e-5, atol=1e-5)
    # Without the document mask the later documents do change (the test can fail).
    leaky = model(torch.cat(docs, 1), position_ids=pos, doc_ids=torch.zeros_like(doc_ids))
    assert not torch.allclose(leaky[:, 7:], packed[:, 7:], atol=1e-3)


def test_doc_and_position_ids():
    doc = doc_ids_from_cu_seqlens(torch.tensor([0, 3, 4, 8]), 8)
    assert doc.tolist() == [[0, 0, 0, 1, 2, 2, 2, 2]]
    assert position_ids_from_doc_ids(doc).tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    two_rows = torch.tensor([[5, 5, 7, 7, 7], [1, 2, 2, 9, 9]])
    assert position_ids_from_doc_ids(two_rows).tolist() == [[0, 1, 0, 1, 2], [0, 0, 1, 0, 1]]
    with pytest.raises(ValueError, match="cu_seqlens"):
        doc_ids_from_cu_seqlens(torch.tensor([0, 5, 3, 8]), 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        doc_ids_from_cu_seqlens(torch.tensor([0, 5]), 8)


def test_position_ids_enter_through_rope():
    """Rope is relative: shifting a document's positions keeps its logits, spacing changes them."""
    model = make_lm().eval()
    ids = text_ids(torch.Generator().manual_seed(2), 1, 6)
    doc = torch.zeros(1, 6, dtype=torch.long)
    a = model(ids, position_ids=torch.arange(6)[None], doc_ids=doc)
    shifted = model(ids, position_ids=torch.arange(6)[None] + 5, doc_ids=doc)
    stretched = model(ids, position_ids=2 * torch.arange(6)[None], doc_ids=doc)
    torch.testing.assert_close(shifted, a, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stretched, a, atol=1e-3)
    relabelled = model(ids, position_ids=torch.arange(6)[None], doc_ids=doc + 3)
    torch.testing.assert_close(relabelled, a)  # doc id values themselves do not matter


def test_loss_sum_and_mask():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=gen, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=gen)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    labels_with_junk = labels.masked_fill(~mask, -100)  # masked labels may be anything
    total, count = lm_loss_sum(logits, labels_with_junk, mask)
    ref = sum(F.cross_entropy(logits[b, s], labels[b, s], reduction="sum")
              for b in range(2) for s in range(5) if mask[b, s])
    assert count.item() == 7
    torch.testing.assert_close(total, ref)
    total.backward()
    assert torch.all(logits.grad[~mask] == 0) and torch.all(logits.grad[mask].abs().sum(-1) > 0)


def test_vision_embeds_replace_placeholders_row_major():
    model = make_lm().eval()
    ids = torch.tensor([[10, 3, 3, 11], [4, 12, 3, 13]])
    vis = torch.randn(4, 64)
    h = model.embed_tokens(ids, vis)
    torch.testing.assert_close(h[0, 1], vis[0])
    torch.testing.assert_close(h[0, 2], vis[1])
    torch.testing.assert_close(h[1, 0], vis[2])
    torch.testing.assert_close(h[1, 2], vis[3])
    torch.testing.assert_close(h[0, 0], model.embed.weight[10])
    with pytest.raises(ValueError, match="placeholder"):
        model.embed_tokens(ids, vis[:3])
    with pytest.raises(ValueError, match="placeholder"):
        model.embed_tokens(ids, None)


def _moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token loop: the plain definition of the routed + shared output."""
    flat = x.reshape(-1, x.shape[-1])
    r = moe.router
    out = []
    for t in range(flat.shape[0]):
        s = torch.sigmoid(flat[t] @ r.weight.T)
        biased = s + r.e_score_correction_bias
        groups = biased.view(r.n_group, -1)
        gscore = groups.topk(2).values.sum(-1)
        keep = gscore.topk(r.topk_group).indices
        allowed = torch.full_like(biased, float("-inf")).view(r.n_group, -1)
        allowed[keep] = 0
        chosen = (biased + allowed.view(-1)).topk(r.top_k).indices
        w = s[chosen] / s[chosen].sum() * r.scaling
        y = sum(w[j] * F.linear(F.silu(F.linear(flat[t], moe.experts.w_gate[e])) *
                                F.linear(flat[t], moe.experts.w_up[e]), moe.experts.w_down[e])
                for j, e in enumerate(chosen.tolist()))
        out.append(y + moe.shared_experts(flat[t]))
    return torch.stack(out).view_as(x)


def test_moe_is_dropless_and_matches_token_loop():
    model = make_lm()
    moe = model.layers["1"].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4))
    y = moe(x)
    torch.testing.assert_close(y, _moe_reference(moe, x), rtol=1e-5, atol=1e-6)
    _, idx, _ = moe.router(x.reshape(-1, 64))
    assert all(len(set(row)) == 2 for row in idx.tolist())  # exactly top-k distinct experts
    assert moe.last_expert_load.sum().item() == 2 * 9 * 2  # every token copy was processed
    torch.testing.assert_close(moe.last_expert_load, torch.bincount(idx.flatten(), minlength=8))


def test_moe_backward_reaches_all_expert_weights():
    model = make_lm()
    moe = model.layers["1"].mlp
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    moe(x).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0  # through the combine weights
    used = moe.last_expert_load > 0
    assert 0 < int(used.sum()) < 8  # 3 tokens x top-2: some experts get none
    for w in (moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down):
        assert torch.all(w.grad[used].abs().sum((1, 2)) > 0)
        assert torch.all(w.grad[~used] == 0)


def test_grouped_mm_experts_equal_the_expert_loop():
    experts = make_lm().layers["1"].mlp.experts
    gen = torch.Generator().manual_seed(14)
    counts = torch.tensor([3, 0, 5, 1, 0, 7, 2, 4])  # empty experts included
    x = torch.randn(int(counts.sum()), 64, generator=gen, requires_grad=True)
    outs, grads = [], []
    for grouped in (True, False):
        experts.use_grouped_mm = grouped
        experts.zero_grad()
        x.grad = None
        y = experts(x, counts)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(15))).sum().backward()
        outs.append(y)
        grads.append([x.grad] + [p.grad for p in experts.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.all(grads[0][1][1] == 0)  # the empty expert's weights get zero gradient
    experts.use_grouped_mm = True
    experts(x, counts).sum().backward()  # an expanded (stride 0) output gradient is accepted


def test_router_bias_changes_selection_not_weights():
    model = make_lm(n_group=1, topk_group=1)
    moe = model.layers["1"].mlp
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(6))
    scores, idx0, w0 = moe.router(x)
    moe.router.e_score_correction_bias[5] = 10.0  # expert 5 now wins every selection
    _, idx1, w1 = moe.router(x)
    assert torch.all((idx1 == 5).any(-1))
    assert not torch.equal(idx0, idx1)
    # weights are the unbiased scores of the chosen experts, normalised and scaled
    chosen = scores.gather(1, idx1)
    torch.testing.assert_close(w1, chosen / chosen.sum(-1, keepdim=True) * 2.5)


def test_update_router_bias_sign_rule_and_load_collection():
    model = make_lm(num_layers=3)
    ids = text_ids(torch.Generator().manual_seed(7), 2, 10)
    doc = torch.zeros(2, 10, dtype=torch.long)
    pos = position_ids_from_doc_ids(doc)
    model(ids, position_ids=pos, doc_ids=doc)
    model(ids, position_ids=pos, doc_ids=doc)
    loads = collect_expert_loads(model)
    assert sorted(loads) == ["layers.1.mlp", "layers.2.mlp"]
    assert loads["layers.1.mlp"].sum().item() == 2 * (2 * 10 * 2)  # two forwards summed
    assert collect_expert_loads(model) == {}  # reset after collecting
    weights_before = {k: v.clone() for k, v in model.named_parameters()}
    load = torch.tensor([10, 0, 5, 5, 5, 5, 5, 5])
    update_router_bias(model, {"layers.1.mlp": load}, rate=0.01)
    bias = model.layers["1"].mlp.router.e_score_correction_bias
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]) + 0.0,
                               atol=1e-7, rtol=0)  # mean 5: over -> down, under -> up, equal -> 0
    assert all(torch.equal(v, weights_before[k]) for k, v in model.named_parameters())
    with pytest.raises(KeyError):
        update_router_bias(model, {"layers.0.mlp": load}, rate=0.01)


def test_balancing_is_aux_loss_free_only():
    """The recipe balances experts by the selection bias alone; there is no aux-loss option
    (an old config that sets one is rejected, naming the key)."""
    from train.config import load_config
    from train.errors import ConfigError

    with pytest.raises(ConfigError, match="seq_aux_loss_coef"):
        load_config("configs/tiny.toml", ["--model.seq_aux_loss_coef=0.01"])
    moe = make_lm().layers["1"].mlp
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(8))
    out = moe(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not hasattr(moe, "last_aux_loss")


def _eager_logits_max(q, k, doc_ids, scale):
    seq = q.shape[2]
    logits = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool)) & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return logits.masked_fill(~allowed[:, None], float("-inf")).amax(dim=(0, 2, 3))


def test_max_logits_exact_with_chunking():
    gen = torch.Generator().manual_seed(9)
    q, k = torch.randn(2, 3, 17, 8, generator=gen), torch.randn(2, 3, 17, 8, generator=gen)
    doc = torch.tensor([[0] * 9 + [1] * 8, [0] * 4 + [2] * 13])
    ref = _eager_logits_max(q, k, doc, 0.3)
    for budget in (1, 2 * 3 * 17 * 5, 1 << 24):  # 1 row, 5 rows, everything at once
        assert torch.equal(max_logits(q, k, DocMask(doc, "sdpa"), 0.3, max_elements=budget), ref)
    # A huge logit on a forbidden (future) pair must not be reported.
    k2 = k.clone()
    k2[:, :, -1] = q[:, :, 0] * 1000
    assert torch.equal(max_logits(q, k2, DocMask(doc, "sdpa"), 0.3),
                       _eager_logits_max(q, k2, doc, 0.3))


def test_mla_records_max_logits_of_its_forward():
    model = make_lm().eval()
    ids = text_ids(torch.Generator().manual_seed(10), 2, 12)
    doc = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    pos = position_ids_from_doc_ids(doc)
    captured = {}
    attn = model.layers["1"].attn
    attn.record_max_logits = True
    handle = attn.register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
    model(ids, position_ids=pos, doc_ids=doc)
    handle.remove()
    # Recompute q and k from the captured input with the same module pieces and compare.
    x = captured["x"]
    q = attn.q_b_proj(attn.q_a_norm(attn.q_a_proj(x))).view(2, 12, 4, -1).transpose(1, 2)
    kv_latent, k_rope = attn.kv_a_proj_with_mqa(x).split([16, 8], -1)
    k_nope = attn.kv_b_proj(attn.kv_a_norm(kv_latent)).view(2, 12, 4, -1).transpose(1, 2)[..., :16]
    cos, sin = model.rope(pos)
    qf = torch.cat([q[..., :16], apply_rope(q[..., 16:], cos, sin)], -1)
    kr = apply_rope(k_rope.view(2, 1, 12, 8), cos, sin).expand(-1, 4, -1, -1)
    kf = torch.cat([k_nope, kr], -1)
    ref = _eager_logits_max(qf, kf, doc, attn.scale)
    torch.testing.assert_close(attn.last_max_logits, ref, rtol=1e-6, atol=1e-6)
    assert attn.last_max_logits.shape == (4,) and attn.last_max_logits.dtype == torch.float32
    assert model.layers["2"].attn.last_max_logits is None  # only where asked


def test_sdpa_and_flex_backends_agree_on_cpu():
    gen = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, 4, 40, 24, generator=gen), torch.randn(2, 4, 40, 24, generator=gen)
    v = torch.randn(2, 4, 40, 16, generator=gen)
    doc = torch.tensor([[0] * 13 + [1] * 27, [3] * 30 + [4] * 10])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is unfused
        flex = attention(q, k, v, DocMask(doc, "flex"), 0.2)
    sdpa = attention(q, k, v, DocMask(doc, "sdpa"), 0.2)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)
    assert DocMask(doc, "auto").backend == "sdpa"  # CPU default
    with pytest.raises(ValueError, match="attention_backend"):
        DocMask(doc, "flash")


def test_whole_model_same_logits_with_flex_backend():
    model = make_lm().eval()
    ids = text_ids(torch.Generator().manual_seed(12), 2, 16)
    doc = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    pos = position_ids_from_doc_ids(doc)
    sdpa = model(ids, position_ids=pos, doc_ids=doc)
    model.attention_backend = "flex"
    with warnings.catch_warnings(), torch.no_grad():  # flex has no backward on CPU
        warnings.simplefilter("ignore")
        flex = model(ids, position_ids=pos, doc_ids=doc)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_init_is_deterministic_meta_safe_and_split_stable():
    a = make_lm(seed=3)
    b = make_lm(seed=3)
    c = make_lm(seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.layers["1"].attn.o_proj.weight, c.layers["1"].attn.o_proj.weight)
    with torch.device("meta"):
        m = build_lm(ModelConfig(**CFG))
    del m.layers["0"]  # a pipeline stage without the first layer and the embedding
    m.embed = None
    ep = m.layers["2"].mlp.experts  # expert parallelism: this rank owns experts 4..7
    for name in ("w_gate", "w_up", "w_down"):
        setattr(ep, name, torch.nn.Parameter(getattr(ep, name)[4:]))
    ep.first_expert = 4
    m.to_empty(device="cpu")
    init_weights(m, 3)
    full = dict(a.named_parameters())
    for name, p in m.named_parameters():
        ref = full[name][4:] if ".experts." in name and name.startswith("layers.2") else full[name]
        assert torch.equal(p, ref), name
    assert torch.all(m.layers["1"].attn_norm.weight == 1)
    assert torch.all(m.layers["1"].mlp.router.e_score_correction_bias == 0)
    std = a.layers["1"].mlp.experts.w_gate.std().item()
    assert math.isclose(std, 0.02, rel_tol=0.05)


def test_hidden_state_pieces_compose_like_the_whole():
    """Pipeline-style use: embed-only piece then layers-only piece gives the same logits."""
    model = make_lm().eval()
    ids = text_ids(torch.Generator().manual_seed(13), 1, 8)
    doc = torch.zeros(1, 8, dtype=torch.long)
    pos = position_ids_from_doc_ids(doc)
    whole = model(ids, position_ids=pos, doc_ids=doc)
    import copy
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["2"]
    first.norm = first.head = None
    del second.layers["0"], second.layers["1"]
    second.embed = None
    h = first(ids, position_ids=pos, doc_ids=doc)
    assert h.shape == (1, 8, 64)
    torch.testing.assert_close(second(h, position_ids=pos, doc_ids=doc), whole)

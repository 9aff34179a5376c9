"""Per-rank construction (parallel/pieces.py): each rank builds only its own pieces.

1. Bit-equality: at PP1, PP2 x V2 and PP2 x V2 x DP2 with EP2 (DEP on and off), every rank's
   pieces, built on the meta device and materialised, hold exactly the values of the whole tiny
   model's initialisation (torch.equal on every parameter and buffer; expert stacks against the
   rows of the whole stack), the ranks together hold every tensor of the whole model, and a rank
   holds nothing else.
2. The runtime from the pieces trains bit-identically to the runtime given the whole model
   (PP2 x V2 x DP2, EP2, DEP; losses and all final state).
3. K2.5 at its shipped layout (PP16 x V2 x DP16, EP16, DEP) and at 2048 GPUs (DP128): the pieces
   of the first, a middle and the last pipeline position, built in this process on the meta
   device, have exactly the parameter count and bytes computed independently from the config
   (and `mmpt rank-memory` reports those counts).
"""

import json

import pytest
import torch

from parallel.mesh import build_mesh
from parallel.pieces import RankCoords, build_rank_pieces, materialize_pieces, take_rank_pieces
from parallel.rank_memory import rank_memory
from parallel.runtime import ParallelRuntime
from tests.dist import run_distributed
from tests.parallel_fixtures import make_batch, rank_view, tiny_config
from train.config import load_config, replace
from train.errors import ConfigError
from train.model import build_model, init_weights
from train.step import training_step

SEED = 0
EXPERT_STACKS = ("w_gate", "w_up", "w_down")

LAYOUTS = {
    "pp1": dict(),
    "pp2_v2": dict(pp=2, virtual_stages=2, microbatches=4),
    "pp2_v2_dp2_ep2": dict(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=4),
}


def _whole(cfg) -> dict[str, torch.Tensor]:
    model = build_model(cfg)
    init_weights(model, SEED)
    return dict(model.state_dict())


def _expert_offsets(pieces) -> dict[str, int]:
    """Full name of each expert stack -> global index of its local expert 0."""
    out = {}
    for prefix, module in pieces.named_modules():
        for mname, sub in module.named_modules():
            if hasattr(sub, "first_expert"):
                out.update({f"{prefix}{mname}.{w}": sub.first_expert for w in EXPERT_STACKS})
    return out


@pytest.mark.parametrize("dep", [True, False], ids=["dep", "no_dep"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rank_pieces_equal_whole_model_init_bit_for_bit(layout, dep):
    cfg = tiny_config(**LAYOUTS[layout], dep=dep)
    ref = _whole(cfg)
    p = cfg.parallel
    held: dict[str, list[int]] = {}  # name -> expert rows covered (all rows for other tensors)
    for rank in range(p.pp * p.dp):
        coords = RankCoords.of_rank(cfg, rank)
        pieces = build_rank_pieces(cfg, coords)
        assert pieces.on_meta()
        assert all(t.is_meta for _, t in pieces.named_parameters() + pieces.named_buffers())
        materialize_pieces(pieces, "cpu", seed=SEED, init_std=cfg.model.init_std)
        assert not pieces.on_meta()
        tensors = pieces.named_parameters() + pieces.named_buffers()
        assert len({n for n, _ in tensors}) == len(tensors)  # no name twice on a rank
        assert (pieces.encoder is not None) == dep
        offsets = _expert_offsets(pieces)
        for name, t in tensors:
            want = ref[name]
            if name in offsets:
                first = offsets[name]
                n = cfg.model.n_routed_experts // p.ep
                assert first == coords.ep_rank * n and t.shape[0] == n
                want = want[first:first + n]
                held.setdefault(name, []).extend(range(first, first + n))
            else:
                held.setdefault(name, []).append(-1)
            assert t.dtype == want.dtype and torch.equal(t, want), f"rank {rank}: {name}"
    assert set(held) == set(ref)  # together the ranks hold the whole model ...
    for name, rows in held.items():  # ... each expert row once per expert replica
        if name.rsplit(".", 1)[-1] in EXPERT_STACKS:
            assert sorted(set(rows)) == list(range(cfg.model.n_routed_experts))
            assert len(rows) == cfg.model.n_routed_experts * p.dp // p.ep
        elif not (dep and name.startswith("vision.")):
            assert len(rows) == p.dp, name  # one copy per data-parallel replica
        else:
            assert len(rows) == p.pp * p.dp, name  # DEP: the encoder on every rank


def test_tied_embeddings_across_chunks_are_rejected():
    cfg = replace(tiny_config(pp=2, virtual_stages=2, microbatches=4),
                  model=dict(tie_word_embeddings=True))
    with pytest.raises(ConfigError, match="model.tie_word_embeddings"):
        build_rank_pieces(cfg, RankCoords.of_rank(cfg, 0))


def test_tied_embeddings_in_one_chunk_stay_tied():
    cfg = replace(tiny_config(), model=dict(tie_word_embeddings=True))
    pieces = materialize_pieces(build_rank_pieces(cfg, RankCoords.of_rank(cfg, 0)), "cpu",
                                seed=SEED, init_std=cfg.model.init_std)
    lm = pieces.stages[0][1].lm
    assert lm.head.weight is lm.embed.weight
    assert torch.equal(lm.head.weight, _whole(cfg)["lm.head.weight"])


# -- the runtime from the pieces ------------------------------------------------------------------


def _state(rt) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in ([("", m) for m in rt.stage_modules]
                           + ([("vision.", rt.dep.encoder)] if rt.dep else [])):
        out.update({prefix + k: v.clone() for k, v in module.state_dict().items()})
    return out


def _train_both(rank, world, cfg, steps):
    mesh = build_mesh(cfg)
    opt = lambda named: torch.optim.AdamW([t for _, t in named], lr=1e-3)  # noqa: E731
    results = []
    for from_pieces in (True, False):
        if from_pieces:
            model = materialize_pieces(build_rank_pieces(cfg, RankCoords.of_mesh(mesh)), "cpu",
                                       seed=SEED, init_std=cfg.model.init_std)
        else:
            model = build_model(cfg)
            init_weights(model, SEED)
        rt = ParallelRuntime(cfg, model, mesh, opt)
        losses = [training_step(rt, rank_view(cfg, mesh, per_replica)).loss
                  for per_replica in steps]
        results.append((losses, _state(rt)))
    return results


def test_runtime_from_pieces_trains_like_the_whole_model_world4():
    cfg = tiny_config(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=4, dep=True)
    steps = [[make_batch(8, 32, seed=10 * s + d) for d in range(2)] for s in range(2)]
    for (losses, state), (ref_losses, ref_state) in run_distributed(_train_both, 4, cfg, steps,
                                                                    timeout=300):
        assert losses == ref_losses
        assert state.keys() == ref_state.keys()
        for name in state:
            assert torch.equal(state[name], ref_state[name]), name


def _runtime_of_meta_pieces(rank, world, cfg):
    mesh = build_mesh(cfg)
    pieces = build_rank_pieces(cfg, RankCoords.of_mesh(mesh))
    with pytest.raises(ValueError, match="meta device"):
        ParallelRuntime(cfg, pieces, mesh, lambda named: None)
    return True


def test_runtime_rejects_meta_pieces():
    assert run_distributed(_runtime_of_meta_pieces, 1, tiny_config()) == [True]


def test_take_rank_pieces_leaves_other_layers_out():
    cfg = tiny_config(pp=2, virtual_stages=2, microbatches=4, dep=True)
    with torch.device("meta"):
        model = build_model(cfg)
    pieces = take_rank_pieces(model, cfg, RankCoords.of_rank(cfg, 1))
    assert [i for i, _ in pieces.stages] == [1, 3]
    assert [list(m.lm.layers) for _, m in pieces.stages] == [["1"], ["3"]]
    assert pieces.stages[1][1].lm.head is not None and pieces.stages[0][1].lm.embed is None
    assert len(model.lm.layers) == 4  # the model is not modified


# -- K2.5 at its real size, on the meta device ----------------------------------------------------


def _lm_layer_params(m, moe: bool, local_experts: int) -> int:
    """One decoder layer's parameters from the config alone (MLA + norms + MLP or MoE)."""
    h, heads = m.hidden_size, m.num_heads
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    attn = (h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * heads * qk
            + h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
            + m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
            + heads * m.v_head_dim * h)
    norms = 2 * h
    if not moe:
        return attn + norms + 3 * h * m.intermediate_size
    router = m.n_routed_experts * h
    experts = local_experts * 3 * h * m.moe_intermediate_size
    shared = 3 * h * m.moe_intermediate_size * m.n_shared_experts
    return attn + norms + router + experts + shared


def _encoder_params(v, lm_hidden: int) -> int:
    d, i = v.hidden_size, v.intermediate_size
    block = 4 * (d * d + d) + 2 * 2 * d + (d * i + i) + (i * d + d)
    merged = d * v.merge_size ** 2
    hidden = v.projector_hidden_size or merged
    projector = 2 * d + (merged * hidden + hidden) + (hidden * lm_hidden + lm_hidden)
    return (v.in_channels * v.patch_size ** 2 * d + d + v.pos_emb_height * v.pos_emb_width * d
            + v.num_layers * block + 2 * d + projector)


# K2.5 (61 layers) over 16 x 2 = 32 chunks: chunk 0 and the last two hold one layer, the others two
# (extra layers go to the middle chunks). Pipeline rank r holds chunks r and r + 16.
K25_LAYERS = {0: [0, 31, 32], 7: [13, 14, 45, 46], 15: [29, 30, 60]}


@pytest.mark.parametrize("dp", [16, 128], ids=["shipped_256_gpus", "2048_gpus"])
def test_k25_rank_pieces_counted_on_meta(dp):
    cfg = load_config("configs/k2.5.toml", [f"--parallel.dp={dp}"])
    m, p = cfg.model, cfg.parallel
    assert (p.pp, p.virtual_stages, p.ep, p.dep) == (16, 2, 16, True)
    local = m.n_routed_experts // p.ep
    encoder = _encoder_params(cfg.vision, m.hidden_size)
    for pp_rank, layers in K25_LAYERS.items():
        for dp_rank in (0, dp - 1):
            coords = RankCoords.of_rank(cfg, pp_rank * dp + dp_rank)
            pieces = build_rank_pieces(cfg, coords)
            assert pieces.on_meta()
            got_layers = [int(k) for _, s in pieces.stages for k in s.lm.layers]
            assert got_layers == layers
            want = sum(_lm_layer_params(m, i >= m.first_k_dense, local) for i in layers)
            want += m.vocab_size * m.hidden_size * (pp_rank == 0)  # embedding
            want += (m.hidden_size + m.vocab_size * m.hidden_size) * (pp_rank == p.pp - 1)
            want += encoder
            params = sum(q.numel() for _, q in pieces.named_parameters())
            assert params == want, (pp_rank, dp_rank)
            buffers = pieces.named_buffers()  # the routers' selection bias, float32
            n_bias = m.n_routed_experts * sum(i >= m.first_k_dense for i in layers)
            assert sum(b.numel() for _, b in buffers) == n_bias
            held = rank_memory(cfg, pp_rank * dp + dp_rank)  # what `mmpt rank-memory` prints
            assert held.parameters == want
            assert held.weights_bytes == 2 * want + 4 * n_bias  # bf16 weights, fp32 biases
            assert held.main_grad_bytes == 4 * want
            assert held.expert_parameters == sum(
                local * 3 * m.hidden_size * m.moe_intermediate_size
                for i in layers if i >= m.first_k_dense)
            firsts = {mod.first_expert for _, s in pieces.stages for mod in s.modules()
                      if hasattr(mod, "first_expert")}
            assert firsts == {coords.ep_rank * local}
    # A middle rank: four MoE layers (24 local experts each, 4.2B expert parameters) and the
    # 0.4B encoder: 5.3B parameters, 10.6 GB of bf16 weights.
    mid = build_rank_pieces(cfg, RankCoords.of_rank(cfg, 7 * dp))
    assert 5.2e9 < sum(q.numel() for _, q in mid.named_parameters()) < 5.4e9


def test_rank_memory_command_prints_first_middle_last(capsys):
    from train.cli import main

    assert main(["rank-memory", "--config", "configs/tiny.toml", "--parallel.pp=2",
                 "--parallel.virtual_stages=2", "--parallel.dp=2", "--parallel.ep=2",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [0, 2]  # pp 2: the first and last positions
    assert all(r["peak_state_bytes"] > r["weights_bytes"] > 0 for r in rows)
    assert main(["rank-memory", "--config", "configs/tiny.toml", "--rank", "0"]) == 0
    assert "| parameters |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["rank-memory", "--config", "configs/tiny.toml", "--rank", "1"])
    assert "--rank 1 is outside the world" in capsys.readouterr().err

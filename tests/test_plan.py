"""`mmpt plan` (parallel/plan.py): state bytes equal the built pieces, activation bytes match a
saved-tensor measurement, the schedule is torch's, the replay gives the known bubbles, and a
layout that cannot run or fit says why and what fixes it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from parallel.pieces import RankCoords, build_rank_pieces
from parallel.plan import layout_of, plan
from parallel.plan_cli import main
from parallel.plan_costs import layer_saved_per_token
from parallel.plan_search import search
from parallel.step_time import GPUS, Hardware
from parallel.schedule_replay import peak_in_flight, replay, schedule_actions
from parallel.rank_memory import rank_memory
from train.config import ActivationConfig, load_config, replace
from train.model import flops

HW = Hardware(GPUS["h100"], attention="sdpa")


def _tiny(**parallel):
    cfg = load_config("configs/tiny.toml")
    return replace(cfg, parallel=parallel) if parallel else cfg


@pytest.mark.parametrize("layout", [dict(pp=2, virtual_stages=2, dp=2, ep=1, microbatches=2),
                                    dict(pp=2, virtual_stages=1, dp=2, ep=2, microbatches=2)])
def test_state_bytes_equal_the_built_pieces_tiny(layout):
    """Weights and fp32 main grads are the pieces' own bytes; the owned masters of all ranks add
    up to one fp32 copy of the whole model (each piece has exactly one ZeRO-1 owner)."""
    cfg = replace(_tiny(**layout), train={"dtype": "bfloat16"})
    p = cfg.parallel
    r = plan(cfg, HW, vision_items=([], []))
    assert r.runs
    total_master = 0
    for rank in range(p.pp * p.dp):
        total_master += rank_memory(cfg, rank).master_bytes
    for st in r.per_stage:
        pieces = build_rank_pieces(cfg, RankCoords.of_rank(cfg, st.rank))
        params = [q for _, q in pieces.named_parameters()]
        buffers = sum(b.numel() * b.element_size() for _, b in pieces.named_buffers())
        n = sum(q.numel() for q in params)
        assert st.bytes["weights"] == 2 * n + buffers
        assert st.bytes["main_grads"] == 4 * n
        mem = rank_memory(cfg, st.rank)
        assert st.bytes["masters"] == mem.master_bytes
        assert st.bytes["optimizer_state"] == mem.optimizer_state_bytes
    from train.model import build_model
    with torch.device("meta"):
        whole = build_model(cfg)
    assert total_master == 4 * sum(q.numel() for q in whole.parameters())


def test_state_bytes_k25_ranks_on_meta():
    """k2.5 on 2048 GPUs: each planned stage's weights and main grads are its pieces' bytes."""
    cfg = layout_of(load_config("configs/k2.5.toml"), 2048)
    for rank in (0, 8 * cfg.parallel.dp, 15 * cfg.parallel.dp):
        pieces = build_rank_pieces(cfg, RankCoords.of_rank(cfg, rank))
        n = sum(q.numel() for _, q in pieces.named_parameters())
        buffers = sum(b.numel() * b.element_size() for _, b in pieces.named_buffers())
        mem = rank_memory(cfg, rank)
        assert mem.weights_bytes == 2 * n + buffers
        assert mem.main_grad_bytes == 4 * n
    assert mem.master_bytes > 0 and mem.optimizer_state_bytes > 0


@pytest.mark.parametrize("hidden,heads", [(128, 4), (256, 8)])
@pytest.mark.parametrize("act", [ActivationConfig(),
                                 ActivationConfig(recompute="selective", fp8_storage=True)])
def test_activation_bytes_within_5pct_of_measurement(hidden, heads, act):
    """The planner's per-token bytes (one layer, top-k local experts, zero weights, probed at
    128 and 256 tokens on the sdpa path) predict the saved-tensor count of a real MoE layer with
    all its local experts and random weights at 512 tokens (bench/activation_memory.py's
    measurement) within 5%."""
    from train.model.activation_probe import layer_weights, moe_layer_config, saved_bytes

    m = dataclasses.replace(load_config("configs/tiny.toml").model, hidden_size=hidden,
                            num_heads=heads)
    k = layer_saved_per_token(m, act, "moe", "sdpa", "bfloat16")
    tokens = 512
    predicted = (k["device"] + k["device_per_seq"] * tokens) * tokens
    layer_cfg = moe_layer_config(m, m.n_routed_experts)
    measured = saved_bytes(layer_cfg, layer_weights(layer_cfg, torch.bfloat16), act, tokens,
                           torch.bfloat16)["device_bytes"]
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


@pytest.mark.parametrize("pp,v,m", [(2, 1, 4), (2, 2, 4), (4, 2, 8), (4, 2, 16), (16, 2, 32)])
def test_interleaved_schedule_in_flight_and_bubble(pp, v, m):
    """From torch's action list: rank r keeps (v-1)*pp + 2*(pp-1-r) + 1 chunk forwards alive
    (its warm-up forwards plus the first steady one), and the replay with backward = 2 x
    forward gives the interleaved bubble (p-1)/(v*m)."""
    order = schedule_actions("interleaved_1f1b", pp, v, m)
    ones = {s: 1.0 for s in range(pp * v)}
    for r in range(pp):
        assert peak_in_flight(order[r], ones, False)[1] == min((v - 1) * pp + 2 * (pp - 1 - r) + 1,
                                                               v * m)
    out = replay(order, lambda s, kind, mb: 1.0 if kind == "F" else 2.0, 0.0, pp * v, pp)
    assert out["bubble_fraction"] == pytest.approx((pp - 1) / (v * m))


def test_1f1b_schedule():
    order = schedule_actions("1f1b", 4, 1, 8)
    assert [peak_in_flight(order[r], {s: 1 for s in range(4)}, False)[1] for r in range(4)] == \
        [4, 3, 2, 1]
    out = replay(order, lambda s, kind, mb: 1.0 if kind == "F" else 2.0, 0.0, 4, 4)
    assert out["bubble_fraction"] == pytest.approx(3 / 8)


def test_layer_flops_add_up_to_the_model_flops():
    from parallel.plan_costs import layer_training_flops_per_token

    m = load_config("configs/k2.5.toml").model
    total = sum(layer_training_flops_per_token(m, 4096, i < m.first_k_dense)
                for i in range(m.num_layers)) + 6 * m.hidden_size * m.vocab_size
    assert total == pytest.approx(flops.training_flops_per_token(m, 4096))


def test_plan_json_and_a_layout_that_cannot_run(capsys):
    rc = main(["--config", "configs/tiny.toml", "--gpus", "4", "--gpu", "h100", "--json",
               "--parallel.pp=2", "--parallel.virtual_stages=2", "--parallel.ep=2",
               "--parallel.microbatches=2", "--tokens", "1B"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] is True
    for key in ("per_stage", "step_time_s", "tokens_per_s_per_gpu", "mfu", "bubble_fraction",
                "dep_max_over_mean", "gpu_days"):
        assert key in out
    assert [s["stage"] for s in out["per_stage"]] == ["first", "last"]
    assert all(s["total_bytes"] == pytest.approx(sum(s["bytes"].values())) for s in out["per_stage"])
    # 4 layers cannot fill PP4 x V2 = 8 chunks: the reason, and one virtual stage fixes it
    rc = main(["--config", "configs/tiny.toml", "--gpus", "8", "--gpu", "h100",
               "--parallel.pp=4", "--parallel.virtual_stages=2", "--data.global_batch_size=16"])
    text = capsys.readouterr().out
    assert rc == 1 and "num_layers" in text and "--parallel.virtual_stages=1" in text


def test_a_layout_that_does_not_fit_names_the_fix():
    """Tiny on a GPU with room for its states and half its activations."""
    from parallel.step_time import GPU
    from parallel.plan_search import smallest_fix

    cfg = replace(_tiny(pp=2, virtual_stages=1, dp=1, ep=1, microbatches=2),
                  vision={"enabled": False})
    base = plan(cfg, HW)
    need = max(s.total_bytes for s in base.per_stage)
    states = max(s.total_bytes - s.bytes["activations"] for s in base.per_stage)
    hw = dataclasses.replace(HW, gpu=GPU("small", (states + need) / 2, 1e12, 1e10, 1e12))
    r = plan(cfg, hw)
    assert not r.fits and "needs" in r.reasons[0]
    fix = smallest_fix(cfg, hw, r)
    assert fix is not None and fix.startswith("--")


def test_search_ranks_layouts_that_fit():
    cfg = replace(_tiny(), parallel=dict(pp=2, virtual_stages=1, dp=8, ep=1, microbatches=2),
                  data={"global_batch_size": 64}, vision={"enabled": False})
    found = search(cfg, HW, 16, limit=5)
    assert found and all(r.fits for r in found)
    tps = [r.tokens_per_s_per_gpu for r in found]
    assert tps == sorted(tps, reverse=True)


def test_processor_sharing_replay_hand_computed():
    """Two pipeline ranks on one core, F = 1 and B = 2 CPU seconds: while both compute each runs
    at half speed, so the step is the total work, 12 s (traced by hand: F0 0-1; F1 and the last
    stage's F0 1-3; its B0 3-5; the first stage's B0 5-9 beside the last stage's F1 5-7 and B1
    7-10; the first stage's B1 10-12).
    On two cores it is the unshared replay's 9 s; a wait uses no core."""
    from parallel.schedule_replay import replay_shared

    order = {0: [(0, "F", 0), (0, "F", 1), (0, "B", 0), (0, "B", 1)],
             1: [(1, "F", 0), (1, "B", 0), (1, "F", 1), (1, "B", 1)]}
    unit = {"F": 1.0, "B": 2.0}
    shared = replay_shared(order, lambda s, k, mb: (unit[k], 0.0), 0.0, 2, cores=1)
    assert shared["makespan_s"] == pytest.approx(12.0)
    assert replay(order, lambda s, k, mb: unit[k], 0.0, 2, 2)["makespan_s"] == pytest.approx(9.0)
    assert replay_shared(order, lambda s, k, mb: (unit[k], 0.0), 0.0, 2,
                         cores=2)["makespan_s"] == pytest.approx(9.0)
    # one stage, two replicas on one core: 1 s of CPU each at half speed, then a 1 s wait
    one = {0: [(0, "F", 0)]}
    assert replay_shared(one, lambda s, k, mb: (1.0, 1.0), 0.0, 1, cores=1,
                         copies=2)["makespan_s"] == pytest.approx(3.0)
    # four replicas on two cores: 1 s of CPU each at half speed
    assert replay_shared(one, lambda s, k, mb: (1.0, 0.0), 0.0, 1, cores=2,
                         copies=4)["makespan_s"] == pytest.approx(2.0)


@pytest.mark.parametrize("schedule,pp,v,m", [("interleaved_1f1b", 4, 2, 8), ("1f1b", 4, 1, 8),
                                             ("interleaved_zero_bubble", 2, 2, 4)])
def test_processor_sharing_replay_with_enough_cores_is_the_replay(schedule, pp, v, m):
    from parallel.schedule_replay import replay_shared

    order = schedule_actions(schedule, pp, v, m)
    cost = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}
    ref = replay(order, lambda s, k, mb: cost[k] + 0.25, 0.5, pp * v, pp)
    got = replay_shared(order, lambda s, k, mb: (cost[k], 0.25), 0.5, pp * v, cores=pp)
    assert got["makespan_s"] == pytest.approx(ref["makespan_s"])
    assert got["bubble_fraction"] == pytest.approx(ref["bubble_fraction"])


def test_gpu_plans_do_not_share_and_enough_cores_give_the_gpu_replay(monkeypatch):
    """A GPU plan (hw.cores None) replays without processor sharing; a CPU plan with a core
    for every rank, no other groups and no per-operation CPU cost gives the same step."""
    import parallel.step_time as step_time_mod

    cfg = _tiny(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=4)
    ref = plan(cfg, HW, vision_items=([], [])).step
    with monkeypatch.context() as m:
        m.setattr(step_time_mod, "replay_shared",
                  lambda *a, **k: pytest.fail("shared replay on GPU"))
        assert plan(cfg, HW, vision_items=([], [])).step == ref
    cpu = plan(cfg, dataclasses.replace(HW, cores=4, overlap_ep=False), vision_items=([], [])).step
    gpu = plan(cfg, dataclasses.replace(HW, overlap_ep=False), vision_items=([], [])).step
    assert cpu["step_s"] == pytest.approx(gpu["step_s"])
    # two cores for the four ranks: every CPU part of the step at least doubles
    two = plan(cfg, dataclasses.replace(HW, cores=2, overlap_ep=False,
                                        layer_overhead_s=1e-3), vision_items=([], [])).step
    four = plan(cfg, dataclasses.replace(HW, cores=4, overlap_ep=False,
                                         layer_overhead_s=1e-3), vision_items=([], [])).step
    assert two["pipeline_s"] > 1.5 * four["pipeline_s"]


def test_cpu_event_counts_hand_counted():
    """Per pipeline rank, the events the per-event CPU costs are charged for (tiny: 4 layers,
    the first dense; PP2 x V2 puts one layer on each chunk, rank 0 holds chunks 0 and 2)."""
    from parallel.step_time import cpu_event_counts

    def zero(cfg, rank, dense, expert, encoder):
        mem = rank_memory(cfg, rank)
        parts = {"dense": mem.parameters - mem.expert_parameters - mem.encoder_parameters,
                 "expert": mem.expert_parameters, "encoder": mem.encoder_parameters}
        assert all(parts.values())
        return 2 * (parts["dense"] * dense + parts["expert"] * expert
                    + parts["encoder"] * encoder)

    # interleaved 1F1B, 2 micro-batches: every action of a PP2 rank sends or receives; rank 0's
    # MoE layer is chunk 2's (F and B, 2 micro-batches), rank 1's chunks 1 and 3; ZeRO-1
    # reduces and broadcasts the dense pieces over DP2, the experts not (DP / EP = 1), the
    # encoder over the world; DEP's 6 exchanges
    cfg = _tiny(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=2, dep=True)
    assert cpu_event_counts(cfg) == [
        dict(pp_actions=8, ep_layer_passes=4, zero_parameters=zero(cfg, 0, 1, 0, 1),
             dep_exchanges=6),
        dict(pp_actions=8, ep_layer_passes=8, zero_parameters=zero(cfg, 2, 1, 0, 1),
             dep_exchanges=6)]
    # zero bubble: W sends nothing and exchanges no tokens (12 actions per rank, 4 of them W)
    cfg = _tiny(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=2, dep=False,
                schedule="interleaved_zero_bubble")
    counts = cpu_event_counts(cfg)
    assert [(c["pp_actions"], c["ep_layer_passes"], c["dep_exchanges"]) for c in counts] == [
        (8, 4, 0), (8, 8, 0)]
    # DP4 x EP2 without PP: 3 MoE layers x (F, B) x 2 micro-batches; ZeRO-1 over DP4 for the
    # dense pieces and over DP / EP = 2 for the experts
    cfg = _tiny(pp=1, virtual_stages=1, dp=4, ep=2, microbatches=2, dep=True, schedule="1f1b")
    assert cpu_event_counts(cfg) == [
        dict(pp_actions=0, ep_layer_passes=12, zero_parameters=zero(cfg, 0, 1, 1, 1),
             dep_exchanges=6)]
    # one rank: nothing moves
    cfg = _tiny(pp=1, virtual_stages=1, dp=1, ep=1, microbatches=2, dep=True, schedule="1f1b")
    assert cpu_event_counts(cfg) == [
        dict(pp_actions=0, ep_layer_passes=0, zero_parameters=0, dep_exchanges=0)]


def test_cpu_event_costs_add_count_times_cost():
    """On CPU ranks with a core each and no pipeline, each per-event cost adds exactly its
    count times the cost to the step; a GPU plan ignores them."""
    from parallel.step_time import cpu_event_counts

    cfg = _tiny(pp=1, virtual_stages=1, dp=2, ep=2, microbatches=2, dep=True, schedule="1f1b")
    items = ([64, 48, 16], [0, 1, 1])
    cpu = dataclasses.replace(HW, cores=64.0)
    base = plan(cfg, cpu, vision_items=items).step_time_s
    (counts,) = cpu_event_counts(cfg)
    for field_, count in (("zero_param_cpu_s", "zero_parameters"),
                          ("ep_layer_cpu_s", "ep_layer_passes"),
                          ("dep_exchange_cpu_s", "dep_exchanges")):
        got = plan(cfg, dataclasses.replace(cpu, **{field_: 1e-7}),
                   vision_items=items).step_time_s
        assert counts[count] > 0
        assert got - base == pytest.approx(counts[count] * 1e-7, rel=1e-9), field_
    gpu = plan(cfg, HW, vision_items=items).step_time_s
    assert plan(cfg, dataclasses.replace(HW, zero_param_cpu_s=1.0, ep_layer_cpu_s=1.0,
                                         pp_action_cpu_s=1.0, dep_exchange_cpu_s=1.0),
                vision_items=items).step_time_s == gpu


def test_pipeline_actions_under_ep_cost_their_own_constant():
    """On CPU ranks a communicating pipeline action costs ep_pp_action_cpu_s under EP and
    pp_action_cpu_s without (or when the former is None): each pipeline rank's CPU grows by its
    action count times the one that applies."""
    from parallel.step_time import cpu_event_counts

    items = ([64, 48, 16], [0, 1, 1])
    cpu = dataclasses.replace(HW, cores=64.0)

    def rank_cpu(cfg, **costs):
        got = plan(cfg, dataclasses.replace(cpu, **costs), vision_items=items)
        return got.step["cpu_s_per_rank"]

    for ep in (1, 2):
        cfg = _tiny(pp=2, virtual_stages=1, dp=2, ep=ep, microbatches=2, dep=False,
                    schedule="1f1b")
        actions = [c["pp_actions"] for c in cpu_event_counts(cfg)]
        assert actions == [4, 4]  # 2 micro-batches x (F, B), each sends or receives
        base = rank_cpu(cfg)
        plain = rank_cpu(cfg, pp_action_cpu_s=1e-6)
        split = rank_cpu(cfg, pp_action_cpu_s=1e-6, ep_pp_action_cpu_s=3e-7)
        per_action = 3e-7 if ep > 1 else 1e-6
        for r in range(2):
            assert plain[r] - base[r] == pytest.approx(actions[r] * 1e-6, rel=1e-9)
            assert split[r] - base[r] == pytest.approx(actions[r] * per_action, rel=1e-9), ep


def test_crowded_operation_costs_hand_counted():
    """Each communication operation of CPU ranks waits op_wait_s; ranks outnumbering their
    cores: also crowded_op_cpu_s of CPU and crowded_op_wait_s of wait, times the crowding
    1 - cores / ranks. Tiny DP2 x EP2, no PP, 2 micro-batches, DEP: per rank 3 MoE layers x (3
    all-to-alls forward + 2 backward) x 2 micro-batches = 30, the step's 2 x DP2 ZeRO-1
    collectives (experts: DP / EP = 1, none) + 5 small all-reduces = 9, DEP's 6 + 2 x world =
    10: 49 operations. With a core per rank the crowded costs are nothing; on a GPU all
    three."""
    cfg = _tiny(pp=1, virtual_stages=1, dp=2, ep=2, microbatches=2, dep=True, schedule="1f1b")
    items = ([64, 48, 16], [0, 1, 1])

    def step(cores, **costs):
        return plan(cfg, dataclasses.replace(HW, cores=cores, overlap_ep=False, **costs),
                    vision_items=items).step

    one = step(1.0)
    with_cpu = step(1.0, crowded_op_cpu_s=1e-4)
    assert with_cpu["cpu_s_per_rank"][0] - one["cpu_s_per_rank"][0] == pytest.approx(
        0.5 * 49 * 1e-4, rel=1e-9)
    # both replicas wait at once: the wait adds to the step as it is
    assert step(1.0, crowded_op_wait_s=1e-4)["step_s"] - one["step_s"] == pytest.approx(
        0.5 * 49 * 1e-4, rel=1e-9)
    assert step(2.0, crowded_op_cpu_s=1.0, crowded_op_wait_s=1.0) == step(2.0)
    # a core each: the wait per operation adds to the step as it is
    assert step(2.0, op_wait_s=1e-4)["step_s"] - step(2.0)["step_s"] == pytest.approx(
        49 * 1e-4, rel=1e-9)
    gpu = plan(cfg, HW, vision_items=items).step_time_s
    assert plan(cfg, dataclasses.replace(HW, crowded_op_cpu_s=1.0, crowded_op_wait_s=1.0,
                                         op_wait_s=1.0), vision_items=items).step_time_s == gpu


def test_cpu_plan_counts_each_pipeline_rank_cpu():
    """cpu_s_per_rank is each pipeline rank's CPU, whatever the cores: the sum of its actions'
    CPU and its work after the pipeline; on one core per rank and without waits, a one-rank
    layout's step is its CPU."""
    cfg = _tiny(pp=2, virtual_stages=2, dp=1, ep=1, microbatches=4, dep=False)
    hw = dataclasses.replace(HW, overlap_ep=False, layer_overhead_s=1e-3,
                             optimizer_s_per_param=1e-8, pp_action_cpu_s=2e-3)
    few = plan(cfg, dataclasses.replace(hw, cores=1.0), vision_items=([], [])).step
    many = plan(cfg, dataclasses.replace(hw, cores=8.0), vision_items=([], [])).step
    assert few["cpu_s_per_rank"] == pytest.approx(many["cpu_s_per_rank"], rel=1e-12)
    assert few["step_s"] > many["step_s"]
    single = _tiny(pp=1, virtual_stages=1, dp=1, ep=1, microbatches=2, dep=False, schedule="1f1b")
    quiet = dataclasses.replace(hw, cores=1.0, p2p_latency_s=0.0, collective_latency_s=0.0)
    got = plan(single, quiet, vision_items=([], [])).step
    assert got["step_s"] == pytest.approx(got["cpu_s_per_rank"][0], rel=1e-9)

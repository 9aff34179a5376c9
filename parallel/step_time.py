"""The step-time half of the planner: the hardware a plan is for, the CPU events a CPU rank's
runtime pays for, and `step_time`, which replays torch's action list for the configured schedule
with per-action costs (compute from the model's FLOPs at a calibrated efficiency, EP all-to-all
over NVLink and RoCE, sends and receives), then adds ZeRO-1's reduce and gather, the step's small
collectives, DEP's encoder work and the optimizer step. On GPUs each rank has its own device; CPU
ranks (gloo) share the cores the machine's other users leave them, replayed with processor
sharing, and pay the runtime's calibrated CPU per event (bench/plan_check.py fits them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.pipeline import chunk_layer_keys, layer_counts
from parallel.plan_costs import (layer_training_flops_per_token, recompute_flops_per_token,
                                 vision_flops_per_patch)
from parallel.rank_memory import RankMemory, rank_memory_of
from parallel.schedule_replay import replay, replay_shared, schedule_actions
from train.config import Config, ModelConfig


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float
    bf16_flops: float  # dense bf16 peak
    nvlink_bytes_per_s: float  # per GPU, one direction
    host_bytes: float  # host memory per GPU (offload target)


GPUS = {
    # NVLink per direction: H800 400 GB/s bidirectional, H100/H200 900, A100 600.
    "h800": GPU("H800", 80e9, 989e12, 200e9, 2e12 / 8),
    "h100": GPU("H100", 80e9, 989e12, 450e9, 2e12 / 8),
    "h200": GPU("H200", 141e9, 989e12, 450e9, 2e12 / 8),
    "a100": GPU("A100", 80e9, 312e12, 300e9, 1e12 / 8),
}


@dataclass
class Hardware:
    gpu: GPU
    gpus_per_node: int = 8
    roce_bytes_per_s_per_node: float = 8 * 400e9 / 8  # 8 x 400 Gb/s
    efficiency: float = 0.5  # achieved fraction of peak for the model's math
    p2p_latency_s: float = 20e-6
    attention: str = "flash"  # what the attention core saves: "flash" (GPU) or "sdpa" (CPU)
    overlap_ep: bool = True  # EP all-to-all hidden behind compute (K2's extra warm-up)
    # Fixed costs that FLOPs do not see (0 / small on a GPU; calibrated on CPU): per decoder
    # layer and forward (a backward counts twice), per collective, per owned parameter of the
    # optimizer step.
    layer_overhead_s: float = 0.0
    collective_latency_s: float = 20e-6
    optimizer_s_per_param: float = 0.0
    dep_overhead_s: float = 0.0  # per step under DEP, beyond its FLOPs and collectives
    # CPU ranks (gloo): the ranks share `cores` cores (those the machine's other users leave
    # them), so compute is replayed with processor sharing (schedule_replay.replay_shared);
    # every collective also costs the rank collective_cpu_s of CPU, every send or receive
    # p2p_cpu_s, beside their latencies (waits, which use no CPU). None: one device per rank,
    # nothing shared.
    cores: float | None = None
    collective_cpu_s: float = 0.0
    p2p_cpu_s: float = 0.0
    # CPU per EP all-to-all with the dispatcher's own work around it (splits, permutation);
    # None: collective_cpu_s
    ep_all_to_all_cpu_s: float | None = None
    # CPU ranks: the runtime's Python work around its communication, per event beyond the
    # operations' own CPU above (fitted on CPU runs, bench/plan_check.py; counted by
    # cpu_event_counts): per parameter through a ZeRO-1 reduce or broadcast (the buckets'
    # concatenation, the reduction's sums, the copies back), per MoE layer and micro-batch pass
    # under EP (forward; backward: dispatch + combine with their bookkeeping and token
    # permutation), per pipeline action that sends or receives, per DEP exchange (metadata,
    # embeddings out, gradients back).
    zero_param_cpu_s: float = 0.0
    ep_layer_cpu_s: float = 0.0
    pp_action_cpu_s: float = 0.0
    # a communicating pipeline action on a rank under EP (None: pp_action_cpu_s). Measured
    # lower: virtual stages' extra actions add less CPU under EP (bench/pp_ep_cpu.py), and
    # nine of ten fits put it at 0-25% of pp_action_cpu_s (bench/plan_check.py)
    ep_pp_action_cpu_s: float | None = None
    dep_exchange_cpu_s: float = 0.0
    # CPU ranks that outnumber their cores: a rank blocking in a communication operation
    # (send, receive, collective, all-to-all) sleeps and is woken when its peer gets a core:
    # per operation, CPU for the switches and a wait for a core, each times the crowding
    # max(0, 1 - cores / ranks) (0 with a core per rank)
    crowded_op_cpu_s: float = 0.0
    crowded_op_wait_s: float = 0.0
    # CPU ranks: per communication operation, a wait beyond the pinged latency even with a
    # core per rank (the peer arrives late, a blocked rank is woken)
    op_wait_s: float = 0.0

    @property
    def roce_per_gpu(self) -> float:
        return self.roce_bytes_per_s_per_node / self.gpus_per_node

    @property
    def flops(self) -> float:
        return self.gpu.bf16_flops * self.efficiency


def chunk_layers(cfg: Config) -> list[list[int]]:
    """Each model chunk's decoder layer ids (chunk c runs on pipeline rank c % pp)."""
    p = cfg.parallel
    n = p.pp * p.virtual_stages
    return [[int(k) for k in keys]
            for keys in chunk_layer_keys(cfg.model.num_layers, layer_counts(cfg.model.num_layers, n))]


def _p2p_ops(p, n_stages: int, stage: int, kind: str) -> int:
    """Sends and receives of one pipeline action: a forward receives its input (not on the
    first chunk) and sends its output (not on the last); a backward the reverse; W none."""
    if p.pp == 1 or kind == "W":
        return 0
    return (stage > 0) + (stage < n_stages - 1)


# parallel/expert.py's all-to-alls per MoE layer and micro-batch: token counts, dispatch and
# combine forward, dispatch and combine backward (a split backward runs them in its I)
EP_ALL_TO_ALLS = {"F": 3, "B": 2, "I": 2, "W": 0}


def _moe_layers(m: ModelConfig, layers: list[int]) -> int:
    return sum(1 for i in layers if i >= m.first_k_dense)


def action_events(cfg: Config, chunks, stage: int, kind: str) -> dict[str, int]:
    """CPU events of one pipeline action (see Hardware): whether it sends or receives, and
    its MoE layer passes under EP (a zero-bubble backward's exchanges are in its I half)."""
    p = cfg.parallel
    return {"pp_actions": int(_p2p_ops(p, len(chunks), stage, kind) > 0),
            "ep_layer_passes": (_moe_layers(cfg.model, chunks[stage])
                                if p.ep > 1 and kind != "W" else 0)}


def step_events(cfg: Config, dep_on: bool, mem: RankMemory) -> dict[str, int]:
    """CPU events of a rank (whose pieces `mem` counts) once per step: the parameters ZeRO-1
    moves, each once reduced and once broadcast, in the shard groups of more than one rank
    (DP for dense pieces, DP / EP for experts, the world for the DEP encoder's state), and
    DEP's exchanges."""
    p = cfg.parallel
    world, edp = p.pp * p.dp, p.dp // p.ep
    dense = mem.parameters - mem.expert_parameters - mem.encoder_parameters
    moved = ((dense if p.dp > 1 else 0) + (mem.expert_parameters if edp > 1 else 0)
             + (mem.encoder_parameters if dep_on and world > 1 else 0))
    return {"zero_parameters": 2 * moved, "dep_exchanges": 6 if dep_on and world > 1 else 0}


def cpu_event_counts(cfg: Config) -> list[dict[str, int]]:
    """Per pipeline rank, the CPU events of one step (Hardware's per-event costs): actions
    that send or receive, MoE layer passes under EP, parameters through ZeRO-1's collectives,
    DEP exchanges."""
    p = cfg.parallel
    chunks = chunk_layers(cfg)
    order = schedule_actions(p.schedule, p.pp, p.virtual_stages, p.microbatches)
    dep_on = p.dep and cfg.vision.enabled and cfg.data.vision_fraction > 0
    out = []
    for r in range(p.pp):
        counts = dict(step_events(cfg, dep_on, rank_memory_of(cfg, r * p.dp)), pp_actions=0,
                      ep_layer_passes=0)
        for stage, kind, _mb in order[r]:
            for k, v in action_events(cfg, chunks, stage, kind).items():
                counts[k] += v
        out.append(counts)
    return out


def step_time(cfg: Config, hw: Hardware, order, chunks, tokens_mb: int, dep_max_patches: int,
              replica_max_patches: int, vision_on: bool) -> dict:
    """Seconds per optimizer step: the pipeline replayed along torch's actions with per-action
    compute (+ exposed EP all-to-all), then the ZeRO-1 reduce/gather and DEP's encoder work."""
    p, m, act = cfg.parallel, cfg.model, cfg.activations
    seq = cfg.data.seq_len
    wsize = torch.empty(0, dtype=getattr(torch, cfg.train.dtype)).element_size()
    h = m.hidden_size
    n_stages = len(chunks)
    world = p.pp * p.dp

    def ep_bytes_in_node_and_out(nbytes: float) -> tuple[float, float]:
        """Split what one rank sends in an EP all-to-all into NVLink and RoCE parts: EP groups
        are consecutive ranks (parallel/mesh.py), so min(ep, gpus per node) share a node."""
        if p.ep == 1:
            return 0.0, 0.0
        in_node = min(p.ep, hw.gpus_per_node)
        away = nbytes * (p.ep - 1) / p.ep
        near = away * (in_node - 1) / (p.ep - 1)
        return near, away - near

    moe_tokens = tokens_mb * m.num_experts_per_tok * h * wsize  # dispatch volume per layer
    near, far = ep_bytes_in_node_and_out(moe_tokens)
    a2a_s = near / hw.gpu.nvlink_bytes_per_s + far / hw.roce_per_gpu  # one all-to-all
    if p.ep > 1:
        a2a_s += hw.collective_latency_s

    fwd, bwd = {}, {}
    fwd_cpu, bwd_cpu, fwd_wait, bwd_wait = {}, {}, {}, {}
    moe_of = {s: _moe_layers(m, layers) for s, layers in enumerate(chunks)}
    for s, layers in enumerate(chunks):
        f = sum(layer_training_flops_per_token(m, seq, i < m.first_k_dense) for i in layers) / 3
        rc = sum(recompute_flops_per_token(m, act, i < m.first_k_dense, seq) for i in layers)
        if s == n_stages - 1:
            f += 2 * h * m.vocab_size
        n_moe = moe_of[s]
        f_s = f * tokens_mb / hw.flops + len(layers) * hw.layer_overhead_s
        b_s = (2 * f + rc) * tokens_mb / hw.flops + 2 * len(layers) * hw.layer_overhead_s
        f_comm, b_comm = 2 * n_moe * a2a_s, (2 + (2 if act.recompute == "full" else 0)) * n_moe * a2a_s
        if s == 0 and vision_on and not p.dep:
            enc = replica_max_patches / p.microbatches * vision_flops_per_patch(cfg.vision) / hw.flops
            f_s, b_s = f_s + enc, b_s + 2 * enc
        fwd[s] = max(f_s, f_comm) if hw.overlap_ep else f_s + f_comm
        bwd[s] = max(b_s, b_comm) if hw.overlap_ep else b_s + b_comm
        # CPU ranks: each all-to-all (EP_ALL_TO_ALLS) has its CPU cost; the transfers are waits
        a2a_cpu = 0.0 if p.ep == 1 else (hw.collective_cpu_s if hw.ep_all_to_all_cpu_s is None
                                         else hw.ep_all_to_all_cpu_s)
        fwd_cpu[s] = f_s + EP_ALL_TO_ALLS["F"] * n_moe * a2a_cpu
        bwd_cpu[s] = b_s + EP_ALL_TO_ALLS["B"] * n_moe * a2a_cpu
        fwd_wait[s], bwd_wait[s] = f_comm, b_comm

    def p2p_ops(stage: int, kind: str) -> int:
        return _p2p_ops(p, n_stages, stage, kind)

    def event_cpu(stage: int, kind: str) -> float:
        ev = action_events(cfg, chunks, stage, kind)
        action_s = (hw.ep_pp_action_cpu_s if p.ep > 1 and hw.ep_pp_action_cpu_s is not None
                    else hw.pp_action_cpu_s)
        return ev["pp_actions"] * action_s + ev["ep_layer_passes"] * hw.ep_layer_cpu_s

    def cost(stage, kind, mb):
        extra = p2p_ops(stage, kind) * hw.p2p_cpu_s
        if kind == "F":
            return fwd[stage] + extra
        if kind == "B":
            return bwd[stage] + extra
        return bwd[stage] / 2 + extra  # I and W split the backward

    crowding = max(0.0, 1.0 - hw.cores / world) if hw.cores is not None else 0.0

    def blocking_ops(stage: int, kind: str) -> int:
        """Communication operations of one action: its sends and receives, and under EP its
        all-to-alls."""
        a2a = 0 if p.ep == 1 else EP_ALL_TO_ALLS[kind] * moe_of[stage]
        return p2p_ops(stage, kind) + a2a

    def cpu_cost(stage, kind, mb) -> tuple[float, float]:
        crowd = crowding * blocking_ops(stage, kind)
        extra = (p2p_ops(stage, kind) * hw.p2p_cpu_s + event_cpu(stage, kind)
                 + crowd * hw.crowded_op_cpu_s)
        wait = crowd * hw.crowded_op_wait_s + blocking_ops(stage, kind) * hw.op_wait_s
        if kind == "F":
            return fwd_cpu[stage] + extra, fwd_wait[stage] + wait
        if kind == "B":
            return bwd_cpu[stage] + extra, bwd_wait[stage] + wait
        return bwd_cpu[stage] / 2 + extra, bwd_wait[stage] / 2 + wait

    hop = (tokens_mb * h * wsize / hw.roce_per_gpu + hw.p2p_latency_s) if p.pp > 1 else 0.0
    if hw.cores is None:
        r = replay(order, cost, hop, n_stages, p.pp)
    else:
        r = replay_shared(order, cpu_cost, hop, n_stages, hw.cores, copies=p.dp)
    pipeline_s = r["makespan_s"]

    # ZeRO-1 (parallel/runtime.py): fp32 gradients reduced to their owners, bf16 parameters
    # gathered back, over DP for dense pieces and over DP / EP for experts.
    mem = rank_memory_of(cfg, (p.pp // 2) * p.dp)
    expert = mem.expert_parameters
    dense = mem.parameters - expert - mem.encoder_parameters

    def ring_s(nbytes: float, group: int, stride: int) -> float:
        if group <= 1:
            return 0.0
        spans_nodes = group * stride > hw.gpus_per_node
        bw = hw.roce_per_gpu if spans_nodes else hw.gpu.nvlink_bytes_per_s
        return nbytes * (group - 1) / group / bw

    # parallel/zero.py reduces each owner's fp32 gradient bucket to it and broadcasts its fp32
    # masters back: two collectives per owner of each shard group, fp32 both ways.
    edp = p.dp // p.ep
    dp_wait = (ring_s(dense * 8, p.dp, 1) + ring_s(expert * 8, edp, p.ep))
    dp_wait += 2 * hw.collective_latency_s * ((p.dp if p.dp > 1 else 0) + (edp if edp > 1 else 0))
    # the step's small all-reduces: loss-token count, loss, grad norm, expert loads, stats
    dp_wait += 5 * hw.collective_latency_s
    n_dp = 2 * ((p.dp if p.dp > 1 else 0) + (edp if edp > 1 else 0)) + 5
    dep_on = vision_on and p.dep
    enc_ring, enc_latency, n_enc = 0.0, 0.0, 0
    if dep_on:  # metadata gather, embeddings out, gradients back; the encoder's ZeRO-1 group is the world
        n_enc = 6 + (2 * world if world > 1 else 0)
        enc_ring = ring_s(mem.encoder_parameters * 8, p.pp * p.dp, 1)
        enc_latency = n_enc * hw.collective_latency_s

    def after_pipeline_cpu(rank_mem: RankMemory) -> dict[str, float]:
        """A rank's CPU seconds (on a core of its own) after the pipeline: ZeRO-1 and the
        step's collectives, DEP's encoder (forward without autograd, recompute forward,
        backward: 4 forwards), the optimizer step."""
        dp_cpu = n_dp * hw.collective_cpu_s
        if hw.cores is not None:  # the runtime's work per event (CPU ranks)
            ev = step_events(cfg, dep_on, rank_mem)
            dp_cpu += (ev["zero_parameters"] * hw.zero_param_cpu_s
                       + ev["dep_exchanges"] * hw.dep_exchange_cpu_s
                       + crowding * (n_dp + n_enc) * hw.crowded_op_cpu_s)
        enc_cpu = 0.0
        if dep_on:
            enc_cpu = 4 * dep_max_patches * vision_flops_per_patch(cfg.vision) / hw.flops
            enc_cpu += 4 * cfg.vision.num_layers * hw.layer_overhead_s
            enc_cpu += n_enc * hw.collective_cpu_s + hw.dep_overhead_s
        return {"dp": dp_cpu, "enc": enc_cpu,
                "opt": rank_mem.master_bytes / 4 * hw.optimizer_s_per_param}

    extra = {}
    if hw.cores is None:
        post = after_pipeline_cpu(mem)
        dp_s, optimizer_s = dp_wait + post["dp"], post["opt"]
        enc_s = post["enc"] + enc_ring + enc_latency
    else:
        # every rank computes at once after the pipeline (processor sharing of independent
        # work: the longest rank's CPU, or all of it over the cores), then the waits
        posts = [after_pipeline_cpu(rank_memory_of(cfg, pr * p.dp)) for pr in range(p.pp)]
        sums = [sum(x.values()) for x in posts]
        longest = max(range(p.pp), key=lambda pr: sums[pr])
        wall = max(sums[longest], p.dp * sum(sums) / hw.cores)
        stretch = wall / sums[longest] if sums[longest] > 0 else 0.0
        post = posts[longest]
        ops_wait = (n_dp + n_enc) * (crowding * hw.crowded_op_wait_s + hw.op_wait_s)
        dp_s = post["dp"] * stretch + dp_wait + ops_wait
        enc_s = post["enc"] * stretch + enc_ring + enc_latency
        optimizer_s = post["opt"] * stretch
        extra["cpu_s_per_rank"] = [r["cpu_s"][pr] + sums[pr] for pr in range(p.pp)]
    total = pipeline_s + dp_s + enc_s + optimizer_s
    return {"step_s": total, "pipeline_s": pipeline_s, "dp_reduce_gather_s": dp_s,
            "dep_encoder_s": enc_s, "optimizer_s": optimizer_s,
            "bubble_fraction": r["bubble_fraction"],
            "ep_all_to_all_s_per_layer": a2a_s, "pp_hop_s": hop,
            "forward_s_per_chunk": {str(k): v for k, v in fwd.items()}, **extra}

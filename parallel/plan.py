"""The planner: per-GPU memory and step time of a layout, counted from the real modules
(`mmpt plan`, parallel/plan_cli.py; the fixes and the layout search: parallel/plan_search.py).

For each distinct pipeline position (first, middle, last) it counts:
- states: weights, fp32 main gradients, owned masters and optimizer state, the ZeRO-1 reduce
  buffers: exactly those of the rank's pieces built on the meta device (parallel/rank_memory.py);
- activations: the bytes autograd saves per token for each layer kind (dense, MoE), measured by
  a real forward of one layer at the model's full width under the `[activations]` settings
  (train/model/activations.py, counted by train/model/activation_probe.py's store, with the
  flash-style attention core a GPU runs or the CPU sdpa path), times the tokens of a
  micro-batch, times the largest number of micro-batches alive on the rank at once, read off
  torch's own action list for the configured schedule;
- the last stage's chunked loss (saved hidden states, one chunk of fp32 logits and their
  gradient, the head's fp32 gradient), communication buffers (PP send/recv, EP dispatch), and
  the DEP encoder's recompute activations.
Step time: per-action compute from the model's FLOPs (train/model/flops.py) at a calibrated
efficiency, EP all-to-all and ZeRO-1 reduce/gather volumes over NVLink and RoCE, replayed along
torch's action list to get the step and its bubble; DEP's encoder load from the real planner
(parallel/dep_plan.py) on sampled image/video sizes (parallel/dep_workload.py's sampler). A layout
that cannot run or fit carries the reasons.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from parallel import dep_workload
from parallel.dep_plan import plan_encoder_work, stage0_only_load
from parallel.mesh import check_parallel_config
from parallel.pipeline import chunk_layer_keys, layer_counts
from parallel.plan_costs import (layer_saved_per_token, layer_training_flops_per_token,
                                 loss_saved_per_token, memoise_by_repr, recompute_flops_per_token,
                                 vision_flops_per_patch, vision_saved_per_patch)
from parallel.rank_memory import RankMemory, rank_memory
from parallel.schedule_replay import peak_in_flight, replay, replay_shared, schedule_actions
from train.config import Config, ConfigError, ModelConfig, replace
from train.model import flops

GB = 1e9


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


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass
class StagePlan:
    stage: str  # "first" | "middle" | "last"
    pp_rank: int
    rank: int
    layers: list[int]
    bytes: dict[str, float]
    total_bytes: float
    host_bytes: float
    microbatches_in_flight: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Plan:
    layout: dict
    gpu: str
    fits: bool
    runs: bool
    reasons: list[str] = field(default_factory=list)
    fix: str | None = None
    per_stage: list[StagePlan] = field(default_factory=list)
    step_time_s: float = 0.0
    step: dict = field(default_factory=dict)
    tokens_per_s_per_gpu: float = 0.0
    mfu: float = 0.0
    bubble_fraction: float = 0.0
    dep_max_over_mean: float = 1.0
    multimodal_over_text_step: dict = field(default_factory=dict)
    gpu_days: float | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d


def layout_of(cfg: Config, gpus: int) -> Config:
    """cfg with parallel.dp = gpus / parallel.pp (ConfigError when that does not divide)."""
    p = cfg.parallel
    if gpus % p.pp:
        raise ConfigError(f"--gpus {gpus} is not divisible by parallel.pp={p.pp}")
    return replace(cfg, parallel={"dp": gpus // p.pp})


def positions(pp: int) -> list[tuple[str, int]]:
    out = [("first", 0)]
    if pp > 2:
        out.append(("middle", pp // 2))
    if pp > 1:
        out.append(("last", pp - 1))
    return out


def _chunk_layers(cfg: Config) -> list[list[int]]:
    p = cfg.parallel
    n = p.pp * p.virtual_stages
    return [[int(k) for k in keys]
            for keys in chunk_layer_keys(cfg.model.num_layers, layer_counts(cfg.model.num_layers, n))]


@memoise_by_repr
def rank_memory_of(cfg: Config, rank: int) -> RankMemory:
    """parallel/rank_memory.py's count of a rank's pieces, once per config and rank."""
    return rank_memory(cfg, rank)


@memoise_by_repr
def _dep_loads(patches: tuple[int, ...], replica_of: tuple[int, ...], pp: int, dp: int
               ) -> tuple[float, int, int]:
    """(DEP max/mean, DEP's largest per-rank patches, the largest replica's patches when
    stage 0 encodes its own replica's items)."""
    dep = plan_encoder_work(patches, pp * dp)
    return dep.max_over_mean, max(dep.load), max(stage0_only_load(patches, replica_of, pp, dp))


@memoise_by_repr
def _sampled_items(data, vision, dp: int, seed: int) -> tuple[list[int], list[int]]:
    db = dep_workload
    old = db.VISION_FRACTION
    db.VISION_FRACTION = data.vision_fraction
    try:
        return db.build_step(data.global_batch_size * data.seq_len, dp, seed)
    finally:
        db.VISION_FRACTION = old


def sample_vision_items(cfg: Config, seed: int = 0) -> tuple[list[int], list[int]]:
    """(patches per encoder item, data-parallel replica of each) for one step, sampled by
    parallel/dep_workload.py (native-resolution images, 4-frame video chunks) at the config's
    vision fraction, each item capped at the pixel budget data/vision.py resizes to
    (data.image_max_pixels per image, data.video_max_pixels per frame)."""
    d, v = cfg.data, cfg.vision
    patches, replica_of = _sampled_items(d, v, cfg.parallel.dp, seed)
    cap = max(d.image_max_pixels, v.frames_per_chunk * d.video_max_pixels) // v.patch_size ** 2
    return [min(x, cap) for x in patches], replica_of


def plan(cfg: Config, hw: Hardware, token_budget: float | None = None,
         vision_items: tuple[list[int], list[int]] | None = None) -> Plan:
    """The memory and step-time plan of cfg's layout on hw (see the module docstring)."""
    p, m, act = cfg.parallel, cfg.model, cfg.activations
    world = p.pp * p.dp
    layout = {"pp": p.pp, "virtual_stages": p.virtual_stages, "dp": p.dp, "ep": p.ep,
              "microbatches": p.microbatches, "schedule": p.schedule, "dep": p.dep,
              "gpus": world, "recompute": act.recompute, "recompute_moe_down": act.recompute_moe_down,
              "fp8_storage": act.fp8_storage, "offload": act.offload,
              "loss_chunk_tokens": act.loss_chunk_tokens}
    try:
        check_parallel_config(cfg, world)
    except ConfigError as e:
        return Plan(layout, hw.gpu.name, fits=False, runs=False, reasons=[str(e)])
    dtype = cfg.train.dtype
    wsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    seq = cfg.data.seq_len
    rows = cfg.data.global_batch_size // (p.dp * p.microbatches)
    tokens_mb = rows * seq
    chunks = _chunk_layers(cfg)
    n_stages = len(chunks)
    vision_on = cfg.vision.enabled and cfg.data.vision_fraction > 0

    kinds = {"dense": layer_saved_per_token(m, act, "dense", hw.attention, dtype)
             if m.first_k_dense else None,
             "moe": layer_saved_per_token(m, act, "moe", hw.attention, dtype)
             if m.first_k_dense < m.num_layers else None}

    def kind(layer: int) -> str:
        return "dense" if layer < m.first_k_dense else "moe"

    def per_mb(layers: list[int], key: str) -> float:
        out = 0.0
        for i in layers:
            k = kinds[kind(i)]
            base = k[key] + k[f"{key}_per_seq"] * seq
            out += base * tokens_mb
        return out

    stage_dev = {s: per_mb(ls, "device") for s, ls in enumerate(chunks)}
    stage_host = {s: per_mb(ls, "host") for s, ls in enumerate(chunks)}
    order = schedule_actions(p.schedule, p.pp, p.virtual_stages, p.microbatches)
    split = p.schedule == "interleaved_zero_bubble"

    # Vision: sampled items, DEP plan, per-patch saved bytes
    items = vision_items or (sample_vision_items(cfg) if vision_on else ([], []))
    patches, replica_of = items
    vis_patch_bytes = (vision_saved_per_patch(cfg.vision, m.hidden_size, dtype)
                       if vision_on and patches else 0.0)
    if patches:
        dep_ratio, dep_max_patches, replica_max_patches = _dep_loads(
            tuple(patches), tuple(replica_of), p.pp, p.dp)
    else:
        dep_ratio, dep_max_patches, replica_max_patches = 1.0, 0, 0

    reasons: list[str] = []
    stages: list[StagePlan] = []
    for name, pp_rank in positions(p.pp):
        rank = pp_rank * p.dp
        mem: RankMemory = rank_memory_of(cfg, rank)
        mine = [s for s in range(pp_rank, n_stages, p.pp)]
        bytes_of = dict(stage_dev)
        if vision_on and not p.dep and 0 in mine:  # the tower runs inside chunk 0's forward
            bytes_of[0] = bytes_of[0] + vis_patch_bytes * replica_max_patches / p.microbatches
        act_bytes, in_flight = peak_in_flight(order[pp_rank], bytes_of, split)
        host_peak, _ = peak_in_flight(order[pp_rank], stage_host, split)
        # One layer's whole saved set is on the device while it runs: under offload, the
        # layer being offloaded and the one prefetched for backward; under full recomputation,
        # the layer being recomputed.
        layer_set = max(per_mb([i], "host") for s in mine for i in chunks[s])
        if act.recompute == "full":
            layer_set = max(((kinds[kind(i)]["none_device"]
                              + kinds[kind(i)]["none_device_per_seq"] * seq) * tokens_mb)
                            for s in mine for i in chunks[s])
            transient = layer_set
        else:
            transient = 2 * layer_set if act.offload else 0.0
        b = {"weights": float(mem.weights_bytes), "main_grads": float(mem.main_grad_bytes),
             "masters": float(mem.master_bytes), "optimizer_state": float(mem.optimizer_state_bytes),
             "reduce_buffers": float(mem.owned_grad_bytes + mem.transient_reduce_bytes),
             "activations": act_bytes + transient}
        h = m.hidden_size
        # PP: a send and a receive buffer for activations and for their gradients
        comm = 4.0 * tokens_mb * h * wsize if p.pp > 1 else 0.0
        if p.ep > 1:  # EP dispatch: k copies of each token sent and received
            comm += 2.0 * tokens_mb * m.num_experts_per_tok * h * wsize
        b["communication"] = comm
        if n_stages - 1 in mine:
            chunk = act.loss_chunk_tokens or tokens_mb
            # saved (measured): the final norm's fp32 internals and output, labels and mask, per
            # micro-batch alive on the last chunk; transient: one chunk of logits (working
            # dtype + fp32) and its fp32 softmax gradient, the head's fp32 gradient + its cast
            saved = loss_saved_per_token(h, dtype) * tokens_mb
            transient_loss = min(chunk, tokens_mb) * m.vocab_size * (wsize + 4 + 4) \
                + m.vocab_size * h * (4 + wsize)
            if act.loss_chunk_tokens == 0:  # whole logits, fp32 copy and log-softmax kept
                transient_loss = tokens_mb * m.vocab_size * (wsize + 4 + 4)
            last_alive, _ = peak_in_flight(order[pp_rank], {s_: float(s_ == n_stages - 1)
                                                            for s_ in range(n_stages)}, split)
            b["logits_and_loss"] = saved * last_alive + transient_loss
        else:
            b["logits_and_loss"] = 0.0
        b["dep_encoder"] = (vis_patch_bytes * dep_max_patches if vision_on and p.dep else 0.0)
        total = sum(b.values())
        host = host_peak
        stages.append(StagePlan(name, pp_rank, rank, mem.layers, b, total, host, in_flight))
        if total > hw.gpu.memory_bytes:
            reasons.append(f"{name} stage (pp rank {pp_rank}) needs {total / GB:.1f} GB > "
                           f"{hw.gpu.memory_bytes / GB:.0f} GB of {hw.gpu.name} memory")
        if host > hw.gpu.host_bytes:
            reasons.append(f"{name} stage offloads {host / GB:.0f} GB > "
                           f"{hw.gpu.host_bytes / GB:.0f} GB of host memory per GPU")

    step = step_time(cfg, hw, order, chunks, tokens_mb, dep_max_patches, replica_max_patches,
                     vision_on)
    tokens_step = cfg.data.global_batch_size * seq
    tps = tokens_step / step["step_s"] / world
    out = Plan(layout, hw.gpu.name, fits=not reasons, runs=True, reasons=reasons,
               per_stage=stages, step_time_s=step["step_s"], step=step,
               tokens_per_s_per_gpu=tps,
               mfu=flops.mfu(tps, m, seq, hw.gpu.bf16_flops),
               bubble_fraction=step["bubble_fraction"], dep_max_over_mean=dep_ratio)
    if vision_on and patches:
        text = step_time(cfg, hw, order, chunks, tokens_mb, 0, 0, False)["step_s"]
        with_dep = step_time(replace(cfg, parallel={"dep": True}), hw, order, chunks, tokens_mb,
                             dep_max_patches, replica_max_patches, True)["step_s"]
        stage0 = step_time(replace(cfg, parallel={"dep": False}), hw, order, chunks, tokens_mb,
                           dep_max_patches, replica_max_patches, True)["step_s"]
        out.multimodal_over_text_step = {"dep": with_dep / text, "encoder_on_stage0": stage0 / text}
    if token_budget:
        out.gpu_days = token_budget / tps / 86400
    return out


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
    chunks = _chunk_layers(cfg)
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

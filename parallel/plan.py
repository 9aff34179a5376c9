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
Step time (parallel/step_time.py): per-action compute from the model's FLOPs
(train/model/flops.py) at a calibrated efficiency, EP all-to-all and ZeRO-1 reduce/gather
volumes over NVLink and RoCE, replayed along torch's action list to get the step and its
bubble; DEP's encoder load from the real planner
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
from parallel.plan_costs import (layer_saved_per_token, loss_saved_per_token, memoise_by_repr,
                                 vision_saved_per_patch)
from parallel.rank_memory import RankMemory, rank_memory_of
from parallel.schedule_replay import peak_in_flight, schedule_actions
from parallel.step_time import Hardware, chunk_layers, step_time
from train.config import Config, replace
from train.errors import ConfigError
from train.model import flops

GB = 1e9


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
    chunks = chunk_layers(cfg)
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

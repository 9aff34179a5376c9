"""One training step over PP x DP (EP inside DP), ZeRO-1 and DEP: what the trainer calls.

    mesh = build_mesh(cfg)                     # validates the layout first
    rt = ParallelRuntime(cfg, model, mesh, make_optimizer=muonclip_factory(cfg.optim))
    out = rt.step(batch)                       # batch: this DP replica's packed batch
    out.loss, out.grad_norm, out.expert_load   # identical on every rank

`model` is this rank's pieces (parallel/pieces.py: built for the rank alone and materialised),
or a plain, materialised KimiK25 with the same weights on every rank, from which the runtime takes
this rank's pieces (pipeline chunks, its expert slice, the encoder under DEP; they share the
model's modules, so the model is not for further use). The fp32 masters of ZeRO-1 are taken from
the parameters as given; the parameters are then cast to `dtype`.
A step: micro-batch split -> DEP phase 1 -> pipeline schedule (EP all-to-alls inside) -> DEP
phase 3 -> router-bias update from loads summed over the DP group -> ZeRO-1 step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel.batch import split_microbatches
from parallel.dep import DecoupledEncoder
from parallel.expert import (apply_router_bias_update, is_expert_param, load_stats,
                             reduce_expert_loads, shard_experts)
from parallel.mesh import ParallelMesh
from parallel.pieces import RankCoords, RankPieces, take_rank_pieces
from parallel.pipeline import PipelineRunner
from parallel.zero import MakeOptimizer, ShardGroup, ZeroOptimizer
from train.config import Config, ConfigError
from train.model.activations import apply_activation_memory


@dataclass
class StepResult:
    loss: float  # mean loss over the global batch's loss tokens
    grad_norm: float  # before clipping
    expert_load: dict[str, dict[str, float]]  # MoE layer -> min/mean/max tokens per expert
    loss_tokens: int
    encoder_load: tuple[int, ...] = ()  # DEP: patches each rank encoded this step (the plan)


def muonclip_factory(optim_cfg) -> MakeOptimizer:
    """MuonClip (train/optim) over the pieces a rank owns; roles from the parameter names."""
    from train.optim.muon import optimizer_for

    return lambda named: optimizer_for(named, optim_cfg)


class ParallelRuntime:
    def __init__(self, cfg: Config, model: nn.Module | RankPieces, mesh: ParallelMesh,
                 make_optimizer: MakeOptimizer, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        p = cfg.parallel
        if cfg.model.seq_aux_loss_coef > 0 and p.pp > 1:
            raise ConfigError(f"model.seq_aux_loss_coef={cfg.model.seq_aux_loss_coef}: the "
                              "sequence-level aux loss is not wired through the pipeline yet; "
                              "use 0 (aux-loss-free balancing) with parallel.pp > 1")
        self.cfg, self.mesh = cfg, mesh
        pieces = (model if isinstance(model, RankPieces)
                  else take_rank_pieces(model, cfg, RankCoords.of_mesh(mesh)))
        if pieces.on_meta():
            raise ValueError("the model pieces are on the meta device: materialise them first "
                             "(parallel.pieces.materialize_pieces)")
        self.dep = None
        stages = pieces.stages
        for _, module in stages:
            shard_experts(module, mesh.ep_group, mesh.ep_rank, mesh.ep)
            apply_activation_memory(module, cfg.activations, device)
        self.stage_modules = [m for _, m in stages]
        self.runner = PipelineRunner(stages, p.pp * p.virtual_stages, mesh.pp_group,
                                     p.microbatches, p.schedule, cfg.model.hidden_size,
                                     cfg.model.vocab_size, dtype=dtype, device=device,
                                     loss_chunk_tokens=cfg.activations.loss_chunk_tokens)
        named = [(n, q) for m in self.stage_modules for n, q in m.named_parameters()]
        groups = [ShardGroup(mesh.dp_group, [(n, q) for n, q in named if not is_expert_param(n)]),
                  ShardGroup(mesh.edp_group, [(n, q) for n, q in named if is_expert_param(n)],
                             split_dim0=is_expert_param)]
        if pieces.encoder is not None:
            encoder = pieces.encoder
            self.dep = DecoupledEncoder(encoder, mesh, cfg.vision.merge_size,
                                        cfg.model.hidden_size)
            groups.append(ShardGroup(mesh.world_group,
                                     [(f"vision.{n}", q) for n, q in encoder.named_parameters()]))
        self.zero = ZeroOptimizer(groups, make_optimizer, max_grad_norm=cfg.optim.grad_clip,
                                  norm_group=mesh.world_group)
        for _, q in pieces.named_parameters():  # buffers (router selection bias) stay float32
            q.data = q.data.to(dtype)
        self.dtype = dtype

    def modules(self) -> list[nn.Module]:
        """This rank's model pieces: pipeline chunks, plus the encoder under DEP."""
        return self.stage_modules + ([self.dep.encoder] if self.dep is not None else [])

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        """(full-model FQN, param) of everything this rank holds (expert params are slices)."""
        out = [(n, q) for m in self.stage_modules for n, q in m.named_parameters()]
        if self.dep is not None:
            out += [(f"vision.{n}", q) for n, q in self.dep.encoder.named_parameters()]
        return out

    def step(self, batch: Mapping[str, Tensor | None]) -> StepResult:
        cfg, m = self.cfg, self.mesh
        mbs = split_microbatches(batch, cfg.parallel.microbatches,
                                 image_token_id=cfg.model.image_token_id,
                                 video_token_id=cfg.model.video_token_id,
                                 merge_size=cfg.vision.merge_size)
        n_tokens = batch["loss_mask"].sum().reshape(1).long()
        dist.all_reduce(n_tokens, group=m.dp_group)
        n_tokens = int(n_tokens)
        if n_tokens == 0:
            raise ValueError("the global batch has no loss tokens (loss_mask is all zero)")

        leaves = self.dep.forward(mbs, self.dtype) if self.dep is not None else []
        kwargs = []
        for k, mb in enumerate(mbs):
            kw = dict(position_ids=mb.position_ids, doc_ids=mb.doc_ids)
            if self.dep is not None:
                if leaves and leaves[k] is not None:
                    kw["vision_embeds"] = leaves[k]
            elif mb.pixel_patches is not None:
                kw.update(pixel_patches=mb.pixel_patches, grid_thw=mb.grid_thw)
            kwargs.append(kw)
        losses = self.runner.run([mb.input_ids for mb in mbs], kwargs, [mb.target for mb in mbs],
                                 n_tokens)
        if self.dep is not None:
            self.dep.backward()

        loads = reduce_expert_loads(self.stage_modules, m.dp_group)
        grad_norm = self.zero.step()
        self.zero.zero_grad()
        # A non-finite grad norm means ZeRO-1 skipped the step; the router bias stays too.
        if torch.isfinite(grad_norm):
            apply_router_bias_update(self.stage_modules, loads, cfg.model.bias_update_rate)

        total = torch.zeros(1, dtype=torch.float64)
        for x in losses:  # only the last stage has losses; other ranks add zero
            total += x.detach().double().cpu()
        dist.all_reduce(total)
        stats = _gather_stats(loads, m, cfg.model.num_layers, cfg.model.n_routed_experts)
        plan = self.dep.plan if self.dep is not None else None
        return StepResult(loss=float(total), grad_norm=float(grad_norm), expert_load=stats,
                          loss_tokens=n_tokens, encoder_load=plan.load if plan else ())


def _gather_stats(loads: dict[str, Tensor], mesh: ParallelMesh, num_layers: int,
                  num_experts: int) -> dict[str, dict[str, float]]:
    """Every rank gets every MoE layer's stats: each pipeline rank fills the rows of its layers
    (already summed over its DP group), one all-reduce over the PP group adds the rest."""
    table = torch.zeros(num_layers, num_experts, dtype=torch.long)
    present = torch.zeros(num_layers, dtype=torch.long)
    for name, v in loads.items():
        i = _layer_index(name)
        table[i], present[i] = v, 1
    dist.all_reduce(table, group=mesh.pp_group)
    dist.all_reduce(present, group=mesh.pp_group)
    return load_stats({f"layers.{i}": table[i] for i in range(num_layers) if present[i]})


def _layer_index(name: str) -> int:
    """'lm.layers.7.mlp' -> 7."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])

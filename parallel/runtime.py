"""The pieces of a training step over PP x DP (EP inside DP), ZeRO-1 and DEP.

    mesh = build_mesh(cfg)                     # validates the layout first
    rt = ParallelRuntime(cfg, model, mesh, make_optimizer)  # e.g. train.optim.muon's MuonClip
    fb = rt.forward_backward(batch)            # batch: this DP replica's packed batch
    rt.zero.reduce_grads(); rt.zero.clip_grad_norm(); rt.zero.optimizer_step(); ...
    rt.update_router_bias(fb.expert_loads)
    rt.expert_load_stats(fb.expert_loads)      # identical on every rank
    ev = rt.evaluate(batch)                    # forward only: no gradient, optimizer or bias change

The training step that calls these in order, and decides whether a step updates anything, is
`train.step.training_step`; the runtime holds no policy of its own (learning rate, bad steps,
QK-Clip live above it).

`model` is this rank's pieces (parallel/pieces.py: built for the rank alone and materialised),
or a plain, materialised KimiK25 with the same weights on every rank, from which the runtime takes
this rank's pieces (pipeline chunks, its expert slice, the encoder under DEP; they share the
model's modules, so the model is not for further use). The fp32 masters of ZeRO-1 are taken from
the parameters as given; the parameters are then cast to `dtype`.
`forward_backward`: micro-batch split -> DEP phase 1 -> pipeline schedule (EP all-to-alls
inside) -> DEP phase 3, then the loss over the global batch and the expert loads summed over the
DP group.
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
from train.config import Config
from train.model.activations import apply_activation_memory
from train.model.moe import moe_layers


@dataclass
class ForwardBackward:
    """What one step's forward and backward leave besides the fp32 gradients."""

    loss: float  # mean loss over the global batch's loss tokens, identical on every rank
    loss_tokens: int
    # this rank's MoE layers -> tokens per expert this step, summed over the stage's DP group
    expert_loads: dict[str, Tensor]
    encoder_load: tuple[int, ...] = ()  # DEP: patches each rank encoded this step (the plan)
    # [C, 2] float64 (loss sum, loss tokens) per token category over the global batch (the
    # batch's token_category; empty without one), identical on every rank
    category_loss: Tensor | None = None


@dataclass
class EvalResult:
    loss_sum: float  # summed token loss over the global batch's loss tokens
    loss_tokens: int
    category_loss: Tensor | None = None  # as in ForwardBackward


class ParallelRuntime:
    def __init__(self, cfg: Config, model: nn.Module | RankPieces, mesh: ParallelMesh,
                 make_optimizer: MakeOptimizer, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        p = cfg.parallel
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

    def _microbatches(self, batch: Mapping[str, Tensor | None]) -> tuple[list, int]:
        """The replica's micro-batches and the loss-token count of the global batch."""
        cfg, m = self.cfg, self.mesh
        mbs = split_microbatches(batch, cfg.parallel.microbatches,
                                 image_token_id=cfg.model.image_token_id,
                                 video_token_id=cfg.model.video_token_id,
                                 merge_size=cfg.vision.merge_size)
        # The last pipeline stage holds the loss mask (the others may not have read it): one
        # all-reduce over the world adds each replica's last-stage count once.
        last = m.pp_rank == cfg.parallel.pp - 1
        if last and batch.get("loss_mask") is None:
            raise ValueError("the last pipeline stage needs the batch's labels and loss_mask")
        if m.pp_rank == 0 and batch.get("input_ids") is None:
            raise ValueError("pipeline stage 0 needs the batch's input_ids")
        n_tokens = (batch["loss_mask"].sum().reshape(1).long() if last
                    else torch.zeros(1, dtype=torch.long, device=self.runner.device))
        dist.all_reduce(n_tokens, group=m.world_group)
        n_tokens = int(n_tokens)
        if n_tokens == 0:
            raise ValueError("the global batch has no loss tokens (loss_mask is all zero)")
        return mbs, n_tokens

    def _dep_forward(self, batch: Mapping[str, Tensor | None], mbs: list) -> list:
        """DEP phase 1 from the batch's global item list and the pixels of this rank's items
        (parallel/dep.py); [] without DEP."""
        if self.dep is None:
            return []
        if batch.get("global_items") is None:
            raise ValueError("with parallel.dep = true a batch carries the pixels of the items "
                             "this rank encodes (global_items, pixel_items): read it with the "
                             "stage-aware loader or build it with parallel.dep.rank_batch")
        return self.dep.forward(mbs, self.dtype, batch.get("global_items"),
                                batch.get("pixel_items"), batch.get("pixel_patches"))

    def _stage_kwargs(self, mbs: list, leaves: list) -> list[dict]:
        kwargs = []
        for k, mb in enumerate(mbs):
            kw = dict(position_ids=mb.position_ids, doc_ids=mb.doc_ids)
            if self.dep is not None:
                if leaves and leaves[k] is not None:
                    kw["vision_embeds"] = leaves[k]
            elif mb.pixel_patches is not None:
                kw.update(pixel_patches=mb.pixel_patches, grid_thw=mb.grid_thw)
            elif mb.grid_thw is not None and self.mesh.pp_rank == 0:
                raise ValueError("pipeline stage 0 encodes its replica's images (parallel.dep = "
                                 "false) but the batch has no pixel_patches")
            kwargs.append(kw)
        return kwargs

    @staticmethod
    def _inputs(mbs: list) -> list[Tensor]:
        """Stage 0's input ids; other ranks' schedules never read their inputs (hidden states
        come from the previous stage), so any tensor of the micro-batch's shape will do."""
        return [mb.input_ids if mb.input_ids is not None else mb.position_ids for mb in mbs]

    def _reduce_losses(self, losses: list[Tensor], num_categories: int
                       ) -> tuple[float, Tensor | None]:
        """Sum of the last stage's losses and its category sums over the world: one
        all-reduce (only the last stage holds them; other ranks add zeros)."""
        total = torch.zeros(1 + 2 * num_categories, dtype=torch.float64,
                            device=self.runner.device)
        for x in losses:
            total[0] += x.detach().double()
        sums = self.runner.category_sums
        if num_categories and sums is not None and losses:
            total[1:] = sums.reshape(-1)
        dist.all_reduce(total)
        total = total.cpu()
        cats = total[1:].reshape(num_categories, 2) if num_categories else None
        return float(total[0]), cats

    def _categories(self, batch: Mapping[str, Tensor | None], num_categories: int) -> int:
        """num_categories, or 0 for a batch without token categories (a rank that did not
        read the targets has none and follows the caller's count: the loss all-reduce must
        have one size on every rank)."""
        last = self.mesh.pp_rank == self.cfg.parallel.pp - 1
        return num_categories if batch.get("token_category") is not None or not last else 0

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def forward_backward(self, batch: Mapping[str, Tensor | None], num_categories: int = 0
                         ) -> ForwardBackward:
        """DEP vision forward, the pipeline schedule (EP all-to-alls inside), DEP recompute and
        backward: every parameter's fp32 gradient summed over this rank's micro-batches, for
        ZeroOptimizer.reduce_grads. Then the loss over the global batch (num_categories > 0,
        with a batch token_category: also per category) and the step's expert loads summed over
        the stage's DP group (the MoEs' counters restart)."""
        mbs, n_tokens = self._microbatches(batch)
        num_categories = self._categories(batch, num_categories)
        leaves = self._dep_forward(batch, mbs)
        kwargs = self._stage_kwargs(mbs, leaves)
        losses = self.runner.run(self._inputs(mbs), kwargs, [mb.target for mb in mbs],
                                 n_tokens, num_categories)
        if self.dep is not None:
            self.dep.backward()
        total, cats = self._reduce_losses(losses, num_categories)
        loads = reduce_expert_loads(self.stage_modules, self.mesh.dp_group)
        plan = self.dep.plan if self.dep is not None else None
        return ForwardBackward(loss=total, loss_tokens=n_tokens, expert_loads=loads,
                               encoder_load=plan.load if plan else (), category_loss=cats)

    def update_router_bias(self, loads: dict[str, Tensor]) -> None:
        """The auxiliary-loss-free balancing step of this rank's MoE layers, from loads that
        are the same on every rank of the stage's DP group (so the biases stay equal)."""
        apply_router_bias_update(self.stage_modules, loads, self.cfg.model.bias_update_rate)

    def expert_load_stats(self, loads: dict[str, Tensor]) -> dict[str, dict[str, float]]:
        """Every MoE layer's min/mean/max tokens per expert, identical on every rank (one
        all-reduce over the PP group)."""
        m = self.cfg.model
        return _gather_stats(loads, self.mesh, m.num_layers, m.n_routed_experts,
                             self.runner.device)

    def evaluate(self, batch: Mapping[str, Tensor | None], num_categories: int = 0
                 ) -> EvalResult:
        """Forward only over the same PP/EP/DP/DEP layout: DEP encodes without autograd, the
        schedule runs in eval mode under no_grad. Parameters, gradients, optimizer state and
        router bias are untouched, and the MoEs' expert-load counters are restored, so the
        next training step is what it would have been without this call."""
        mbs, n_tokens = self._microbatches(batch)
        num_categories = self._categories(batch, num_categories)
        moes = [moe for module in self.stage_modules for moe in moe_layers(module).values()]
        counters = [(moe.expert_load_total, moe.last_expert_load) for moe in moes]
        try:
            with torch.no_grad():
                leaves = self._dep_forward(batch, mbs)
                kwargs = self._stage_kwargs(mbs, leaves)
                losses = self.runner.evaluate(self._inputs(mbs), kwargs,
                                              [mb.target for mb in mbs], num_categories)
        finally:
            for moe, (total, last) in zip(moes, counters):
                moe.expert_load_total, moe.last_expert_load = total, last
        total, cats = self._reduce_losses(losses, num_categories)
        return EvalResult(loss_sum=total, loss_tokens=n_tokens, category_loss=cats)


def _gather_stats(loads: dict[str, Tensor], mesh: ParallelMesh, num_layers: int,
                  num_experts: int, device) -> dict[str, dict[str, float]]:
    """Every rank gets every MoE layer's stats: each pipeline rank fills the rows of its layers
    (already summed over its DP group) and marks them present in the last column; one
    all-reduce over the PP group (on the device) adds the rest."""
    table = torch.zeros(num_layers, num_experts + 1, dtype=torch.long, device=device)
    for name, v in loads.items():
        i = _layer_index(name)
        table[i, :num_experts], table[i, num_experts] = v, 1
    dist.all_reduce(table, group=mesh.pp_group)
    table = table.cpu()
    table, present = table[:, :num_experts], table[:, num_experts]
    return load_stats({f"layers.{i}": table[i] for i in range(num_layers) if present[i]})


def _layer_index(name: str) -> int:
    """'lm.layers.7.mlp' -> 7."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])

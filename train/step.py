"""One training step, in the recipe's order: the one place that decides what a step does.

    out = training_step(rt, batch, lr_multiplier=schedule_multiplier(step, cfg.optim, total),
                     qk_clip=QKClip(rt.stage_modules, tau, group=mesh.dp_group))
    out.loss, out.grad_norm, out.good, out.expert_load, out.max_logit  # same on every rank

The runtime (parallel/runtime.py) and its ZeRO-1 optimizer (parallel/zero.py) offer the pieces;
this function calls them top to bottom and owns the policy between them:

  1. the learning rate of the step (a multiplier on every group's base lr);
  2. DEP vision forward, the pipeline schedule (fwd/bwd, EP all-to-alls inside), DEP recompute
     and backward: fp32 gradients summed over the micro-batches, the loss over the global batch,
     the expert loads over each stage's DP group;
  3. gradients summed onto their ZeRO-1 owners;
  4. the global grad norm (and clip), then the bad-step decision: a non-finite loss or grad norm
     (the same on every rank) skips the update, QK-Clip and the router-bias update, so
     parameters, fp32 masters, optimizer state and router biases stay as they were;
  5. the owners' optimizer step on their fp32 masters, broadcast into the live parameters;
  6. QK-Clip of the MLA layers every rank holds (per-head maxima MAXed over the stage's DP
     group; after the broadcast, so the replicas stay equal; live weights and owned masters);
  7. the router-bias update from the step's loads (equal over the DP group, so biases agree);
  8. metrics identical on every rank: expert-load stats, the max logit and clipped heads of
     the whole model (over the PP group).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.runtime import ParallelRuntime
from train.optim.qk_clip import QKClip, QKClipStats
from train.optim.schedule import scale_lr


@dataclass
class StepResult:
    loss: float  # mean loss over the global batch's loss tokens
    grad_norm: float  # before clipping
    good: bool  # loss and grad norm finite: the update, QK-Clip and router bias were applied
    expert_load: dict[str, dict[str, float]]  # MoE layer -> min/mean/max tokens per expert
    loss_tokens: int
    encoder_load: tuple[int, ...] = ()  # DEP: patches each rank encoded this step (the plan)
    # [C, 2] float64 (loss sum, loss tokens) per token category over the global batch
    category_loss: Tensor | None = None
    max_logit: float = float("nan")  # QK-Clip: largest attention logit of the model, pre-clip
    clipped_heads: int = 0  # QK-Clip: heads above tau over the whole model


def training_step(rt: ParallelRuntime, batch: Mapping[str, Tensor | None], *,
                  lr_multiplier: float | None = None, qk_clip: QKClip | None = None,
                  num_categories: int = 0) -> StepResult:
    """One step of this DP replica's `batch` on every rank (module docstring). lr_multiplier:
    the schedule's factor on the base lr (None: the lr stays as it is); qk_clip: None runs no
    QK-Clip; num_categories > 0 (with a batch token_category): the loss per category too."""
    zero = rt.zero
    # 1. the learning rate of the step
    if lr_multiplier is not None and zero.optimizer is not None:
        scale_lr(zero.optimizer, lr_multiplier)
    # 2. DEP vision forward -> pipeline schedule (EP inside) -> DEP recompute + backward
    fb = rt.forward_backward(batch, num_categories)
    # 3. gradients summed onto their ZeRO-1 owners
    zero.reduce_grads()
    # 4. global grad norm (and clip); a non-finite loss or norm changes nothing
    grad_norm = zero.clip_grad_norm()
    good = math.isfinite(fb.loss) and bool(torch.isfinite(grad_norm))
    clip = None
    if good:
        # 5. the owners' optimizer step on their fp32 masters, broadcast to every replica
        zero.optimizer_step()
        zero.broadcast()
        # 6. QK-Clip on every rank, after the broadcast: live weights and owned masters
        if qk_clip is not None:
            clip = qk_clip.step(masters=zero.masters())
        # 7. the router-bias update from the step's expert loads
        rt.update_router_bias(fb.expert_loads)
    elif qk_clip is not None:
        qk_clip.reset()  # the skipped step's maxima must not clip the next one
    zero.zero_grad()
    # 8. statistics identical on every rank
    out = StepResult(loss=fb.loss, grad_norm=float(grad_norm), good=good,
                     expert_load=rt.expert_load_stats(fb.expert_loads),
                     loss_tokens=fb.loss_tokens, encoder_load=fb.encoder_load,
                     category_loss=fb.category_loss)
    if qk_clip is not None:
        out.max_logit, out.clipped_heads = _whole_model_clip_stats(clip, rt)
    return out


def _whole_model_clip_stats(clip: QKClipStats | None, rt: ParallelRuntime) -> tuple[float, int]:
    """Every pipeline position clips its own layers: the max logit and the clipped heads over
    the PP group (NaN and 0 on a skipped step)."""
    stats = ([clip.max_logit, float(clip.clipped_heads)] if clip is not None
             else [float("nan"), 0.0])
    both = torch.tensor(stats, device=rt.device)
    top, heads = both[:1].clone(), both[1:].clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=rt.mesh.pp_group)
    dist.all_reduce(heads, group=rt.mesh.pp_group)
    return float(top), int(heads)

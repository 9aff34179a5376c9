"""Learning-rate schedule and global gradient-norm clipping across pipeline stages and shards.

Schedule: a pure function of the step (nothing to checkpoint besides the step itself):
linear warm-up over `warmup_steps` (step 0 already gets lr/warmup), then
  cosine:   from 1 down to min_lr_ratio at the last step;
  wsd:      warmup-stable-decay: 1 until the last `decay_fraction` of the steps, then linear
            down to min_lr_ratio at the last step;
  constant: 1.
`set_lr(optimizer, step, ...)` writes group["lr"] = group["base_lr"] * multiplier (`scale_lr`
with a given multiplier), so Muon and AdamW groups keep their own base rates.

Gradient clipping contract (`clip_grad_norm_`): every rank of `group` passes the gradients it
holds; `copies(p)` says on how many ranks of `group` an identical copy of p's gradient lives
(default 1). Each rank sums ||g||^2 / copies(p) locally, one all-reduce(SUM) over `group` adds
the ranks up, so every distinct gradient counts exactly once. Example, PP x DP with EP carved out
of DP, group = WORLD: a dense parameter of stage s is held by the dp ranks of that stage
(copies = dp, after the data-parallel gradient reduction); a routed expert slice by dp/ep ranks
(copies = dp // ep). The vision encoder under DEP is replicated on every rank (copies = world).
The returned norm is identical on every rank, so every rank scales its grads alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str,
                  min_lr_ratio: float, decay_fraction: float = 0.2) -> float:
    """The factor on the base lr for 0-based `step` of a run of `total_steps` steps."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    last = max(total_steps - 1, warmup_steps)
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, last - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total_steps))
        decay_start = max(warmup_steps, last - decay_steps)
        if step <= decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, last - decay_start))
        return 1.0 - (1 - min_lr_ratio) * progress
    raise ValueError(f"optim.schedule={schedule!r}: choose cosine, wsd or constant")


def schedule_multiplier(step: int, optim_cfg, total_steps: int) -> float:
    """lr_multiplier with the fields of cfg.optim."""
    return lr_multiplier(step, total_steps=total_steps, warmup_steps=optim_cfg.warmup_steps,
                         schedule=optim_cfg.schedule, min_lr_ratio=optim_cfg.min_lr_ratio,
                         decay_fraction=optim_cfg.decay_fraction)


def set_lr(optimizer: torch.optim.Optimizer, step: int, optim_cfg, total_steps: int) -> float:
    """Set every group's lr for `step` from its base_lr; returns the multiplier."""
    mult = schedule_multiplier(step, optim_cfg, total_steps)
    scale_lr(optimizer, mult)
    return mult


def scale_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """group["lr"] = group["base_lr"] * multiplier (base_lr: the group's lr when first set)."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * multiplier


def global_grad_norm(params: Iterable[Tensor], *, group: dist.ProcessGroup | None = None,
                     copies: Callable[[Tensor], int] | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """The L2 norm of all distinct gradients over `group` (module docstring); float32 scalar.

    The sum lives on `device` (default: the first gradient's, else CPU): NCCL reduces only
    device tensors, and a rank that holds no gradient must still join the all-reduce."""
    params = [p for p in params if p.grad is not None]
    if device is None:
        device = params[0].grad.device if params else "cpu"
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        n = 1 if copies is None else copies(p)
        if n < 1:
            raise ValueError(f"copies(p)={n} for a parameter of shape {tuple(p.shape)}: must be >= 1")
        total += p.grad.detach().double().pow(2).sum() / n
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, group=group)
    return total.sqrt().float()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[Tensor], max_norm: float, *,
                    group: dist.ProcessGroup | None = None,
                    copies: Callable[[Tensor], int] | None = None,
                    device: torch.device | str | None = None) -> Tensor:
    """Scale grads in place so the global norm is at most max_norm; returns the norm before.

    max_norm 0 only measures. A non-finite norm leaves the grads alone (the trainer skips the
    step). The coefficient max_norm / (norm + 1e-6), capped at 1, is torch's.
    """
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, group=group, copies=copies, device=device)
    if max_norm > 0 and torch.isfinite(norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
    return norm

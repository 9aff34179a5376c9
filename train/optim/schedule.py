"""Learning-rate schedule (the global gradient-norm clip is in train/optim/grad_norm.py).

Schedule: a pure function of the step (nothing to checkpoint besides the step itself):
linear warm-up over `warmup_steps` (step 0 already gets lr/warmup), then
  cosine:   from 1 down to min_lr_ratio at the last step;
  wsd:      warmup-stable-decay: 1 until the last `decay_fraction` of the steps, then linear
            down to min_lr_ratio at the last step;
  constant: 1.
`set_lr(optimizer, step, ...)` writes group["lr"] = group["base_lr"] * multiplier (`scale_lr`
with a given multiplier), so Muon and AdamW groups keep their own base rates.
"""

from __future__ import annotations

import math

import torch


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


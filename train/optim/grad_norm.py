"""Global gradient-norm clipping across pipeline stages and shards.

Contract (`clip_grad_norm_`): every rank of `group` passes the gradients it holds; `copies(p)`
says on how many ranks of `group` an identical copy of p's gradient lives (default 1). Each rank sums ||g||^2 / copies(p) locally, one all-reduce(SUM) over `group` adds
the ranks up, so every distinct gradient counts exactly once. Example, PP x DP with EP carved out
of DP, group = WORLD: a dense parameter of stage s is held by the dp ranks of that stage
(copies = dp, after the data-parallel gradient reduction); a routed expert slice by dp/ep ranks
(copies = dp // ep). The vision encoder under DEP is replicated on every rank (copies = world).
The returned norm is identical on every rank, so every rank scales its grads alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor


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

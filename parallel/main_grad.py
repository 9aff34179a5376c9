"""fp32 gradient accumulation for low-precision compute weights (the recipe's main gradients).

With bf16 weights, autograd accumulates `.grad` in bf16: summing the gradients of many
micro-batches there rounds every partial sum to 8 mantissa bits. Instead, after each micro-batch's
backward (`MainGradStage`: the full backward, and the weight pass of the zero-bubble schedules),
every bf16 `.grad` is added into an fp32 `param.main_grad` and freed, so the step's gradient is the
fp32 sum of the per-micro-batch gradients. ZeRO-1 (parallel/zero.py) reduces these fp32 main
gradients to the owners of the fp32 masters. (Why the stage and not
`register_post_accumulate_grad_hook`: the zero-bubble weight pass of torch.distributed.pipelining
assigns and adds `.grad` itself, outside autograd's accumulation, so such hooks never fire there.)

A float32 parameter accumulates in `.grad` itself, which is already fp32: nothing is moved, so
fp32 runs are unchanged bit for bit. The DEP encoder runs one backward per step over all the
items a rank encodes (parallel/dep.py), so its gradient is collected by `main_grad` at the
reduction.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage


def accumulate_main_grads(params: Iterable[nn.Parameter]) -> None:
    """Add each low-precision `.grad` into the parameter's fp32 `main_grad`, then free it."""
    for p in params:
        g = p.grad
        if g is None or g.dtype == torch.float32:
            continue
        acc = getattr(p, "main_grad", None)
        if acc is None:
            p.main_grad = g.float()
        else:
            acc.add_(g)  # computed in fp32: the bf16 values are exact in fp32
        p.grad = None


def main_grad(p: nn.Parameter) -> Tensor | None:
    """The fp32 gradient accumulated in this step (None when the parameter got none)."""
    accumulate_main_grads([p])
    return p.grad if p.grad is not None else getattr(p, "main_grad", None)


def clear_main_grads(params: Iterable[nn.Parameter]) -> None:
    for p in params:
        p.grad = None
        p.main_grad = None


class MainGradStage(PipelineStage):
    """A PipelineStage whose parameters accumulate their gradients in fp32 main grads, moved
    there after every backward of a micro-batch (whichever schedule calls it)."""

    def backward_one_chunk(self, *args, **kwargs):
        out = super().backward_one_chunk(*args, **kwargs)
        accumulate_main_grads(self.submod.parameters())
        return out

    def backward_weight_one_chunk(self, *args, **kwargs):
        out = super().backward_weight_one_chunk(*args, **kwargs)
        accumulate_main_grads(self.submod.parameters())
        return out

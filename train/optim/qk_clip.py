"""QK-Clip for Multi-head Latent Attention (Kimi K2), applied after each optimizer step.

For each head h with S_h = the largest pre-softmax logit q.k*scale seen in the step's forward
passes (every micro-batch, MAX over every rank that ran that layer), gamma_h = min(1, tau / S_h):

    q-nope rows of q_b_proj (or q_proj)  *= sqrt(gamma_h)
    k-nope rows of kv_b_proj              *= sqrt(gamma_h)     => nope logit  * gamma_h
    q-rope rows of q_b_proj               *= gamma_h           => rope logit  * gamma_h
    the shared rope key (kv_a_proj_with_mqa) and the v rows are left untouched.

Both factors reach the logits linearly (the norms sit before these projections), so after the
clip the same input gives logits scaled by gamma_h: max logit <= tau. Heads with S_h <= tau are
multiplied by exactly 1.0, i.e. untouched bit for bit.

Usage in a trainer (each pipeline stage clips its own layers):

    clip = QKClip(stage_modules, tau=cfg.optim.qk_clip_tau, group=dp_group_of_this_stage)
    ... forward/backward of all micro-batches; optimizer.step(); ZeRO-1 broadcast ...
    stats = clip.step(masters=None)  # on EVERY rank of the group, after the params agree

`clip.step` all-reduces the per-head maxima with MAX over `group` once (so every rank computes
the same gamma), scales the live weights in place and, when given, the optimizer's fp32 master
copies (`masters`: param FQN -> tensor, e.g. only the ones this rank owns under ZeRO-1). Doing it
after the ZeRO-1 broadcast on every rank keeps replicas identical without a second broadcast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_mla(module: nn.Module) -> bool:
    """An MLA module as in the model contract (record_max_logits + the projection layout)."""
    return hasattr(module, "record_max_logits") and hasattr(module, "kv_b_proj")


def clip_factors(max_logits: Tensor, tau: float) -> Tensor:
    """gamma_h = min(1, tau / S_h), float32; exactly 1.0 where S_h <= tau."""
    s = max_logits.float()
    return torch.where(s > tau, tau / s, torch.ones_like(s))


def q_weight(mla: nn.Module) -> Tensor:
    return (mla.q_proj if getattr(mla, "q_proj", None) is not None else mla.q_b_proj).weight


def row_scales(mla: nn.Module, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row factors for the q weight [H*(nope+rope)] and the kv_b weight [H*(nope+v)]."""
    root = gamma.sqrt()
    q = torch.cat([root[:, None].expand(-1, mla.nope_dim),
                   gamma[:, None].expand(-1, mla.rope_dim)], dim=1).reshape(-1)
    kv = torch.cat([root[:, None].expand(-1, mla.nope_dim),
                    gamma.new_ones(mla.num_heads, mla.v_dim)], dim=1).reshape(-1)
    return q, kv


@torch.no_grad()
def qk_clip_(mla: nn.Module, max_logits: Tensor, tau: float,
             extra: Iterable[tuple[Tensor | None, Tensor | None]] = ()) -> Tensor:
    """Clip one MLA module in place from its per-head max logits; returns gamma [num_heads].

    `extra`: more (q_weight, kv_b_weight) pairs with the same row layout (fp32 master copies)
    that get the identical scaling; either may be None (under ZeRO-1 the two weights can have
    different owners: each is scaled by its own factors). Pass max logits reduced over ranks.
    """
    if max_logits.shape != (mla.num_heads,):
        raise ValueError(f"max_logits has shape {tuple(max_logits.shape)}, expected "
                         f"({mla.num_heads},) = one per head")
    gamma = clip_factors(max_logits, tau)
    if bool((gamma < 1).any()):
        q_rows, kv_rows = row_scales(mla, gamma)
        for wq, wkv in [(q_weight(mla), mla.kv_b_proj.weight), *extra]:
            if wq is not None:
                wq.mul_(q_rows.to(wq.dtype)[:, None])
            if wkv is not None:
                wkv.mul_(kv_rows.to(wkv.dtype)[:, None])
    return gamma


@dataclass
class QKClipStats:
    max_logit: float  # the largest logit over this module's MLA layers and the group, pre-clip
    clipped_heads: int  # heads with S_h > tau in this step


class QKClip:
    """Tracks each MLA layer's per-head max logit over a step's forwards and clips after it."""

    def __init__(self, model: nn.Module | Sequence[nn.Module], tau: float,
                 group: dist.ProcessGroup | None = None):
        """`model`: the module, or this rank's pipeline chunks (names as in the full model)."""
        if tau <= 0:
            raise ValueError(f"qk_clip_tau={tau!r} must be > 0")
        self.tau = tau
        self.group = group
        chunks = [model] if isinstance(model, nn.Module) else list(model)
        self.layers = [(name, m) for chunk in chunks for name, m in chunk.named_modules()
                       if is_mla(m)]
        names = [name for name, _ in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("two MLA modules share a name across the given chunks")
        self._running: dict[str, Tensor | None] = {name: None for name, _ in self.layers}
        self._hooks = []
        self._paused = False
        for name, m in self.layers:
            m.record_max_logits = True
            self._hooks.append(m.register_forward_hook(self._fold(name)))

    def _fold(self, name: str):
        def hook(module, args, output):
            if self._paused:
                return
            s = module.last_max_logits
            prev = self._running[name]
            self._running[name] = s.clone() if prev is None else torch.maximum(prev, s)
        return hook

    def reduced_max_logits(self) -> Tensor:
        """[num_layers, num_heads] maxima since the last step, MAX-reduced over the group."""
        if not self.layers:
            return torch.zeros(0, 0)
        device = q_weight(self.layers[0][1]).device
        rows = []
        for name, m in self.layers:
            s = self._running[name]
            # A layer this rank never ran (no tokens) contributes nothing to the MAX.
            rows.append(torch.full((m.num_heads,), float("-inf"), device=device) if s is None
                        else s.float())
        stacked = torch.stack(rows)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX, group=self.group)
        return stacked

    def step(self, masters: Mapping[str, Tensor] | None = None) -> QKClipStats:
        """Reduce, clip every tracked layer (live weights + given masters), reset the maxima."""
        maxima = self.reduced_max_logits()
        clipped = 0
        for (name, m), s in zip(self.layers, maxima):
            extra = []
            if masters:
                q_name = "q_proj" if getattr(m, "q_proj", None) is not None else "q_b_proj"
                extra.append((masters.get(f"{name}.{q_name}.weight"),
                              masters.get(f"{name}.kv_b_proj.weight")))
            gamma = qk_clip_(m, s, self.tau, extra)
            clipped += int((gamma < 1).sum())
        self._running = {name: None for name, _ in self.layers}
        top = float(maxima.max()) if maxima.numel() else float("-inf")
        return QKClipStats(max_logit=top, clipped_heads=clipped)

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside (evaluation) neither compute nor fold attention-logit maxima."""
        self._paused = True
        flags = [(m, m.record_max_logits) for _, m in self.layers]
        for m, _ in flags:
            m.record_max_logits = False
        try:
            yield
        finally:
            self._paused = False
            for m, flag in flags:
                m.record_max_logits = flag

    def reset(self) -> None:
        """Forget the maxima seen since the last step without clipping (a skipped step)."""
        self._running = {name: None for name, _ in self.layers}

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for _, m in self.layers:
            m.record_max_logits = False

"""Expert parallelism: experts sharded over the EP group, tokens moved by uneven all-to-all.

`slice_experts(module, ep_rank, ep)` slices every MoE's stacked expert weights along dim 0 (EP
rank e keeps experts [e*E/ep, (e+1)*E/ep)); `shard_experts(module, group, ep_rank, ep)` does that
and swaps the MoE's dispatcher for `AllToAllDispatcher`; the model code is unchanged. Dropless:
every token copy reaches its expert, however uneven the split.

Balancing: each MoE counts tokens per expert over all its forwards (`expert_load_total`); after
the step `reduce_expert_loads` sums those counts over the DP group of the stage (= EP x EDP, all
tokens of the global batch that pass this layer), so `update_router_bias` applies the same
integer loads, hence the same bias, on every rank. `load_stats` gives min/mean/max per layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from train.model.moe import collect_expert_loads, moe_layers, update_router_bias

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven all_to_all_single: backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class AllToAllDispatcher:
    """Sends token copies (sorted by global expert id) to the EP rank owning each expert and
    brings the expert outputs back in the original order."""

    def __init__(self, group, num_experts: int, ep_size: int):
        self.group, self.num_experts, self.ep = group, num_experts, ep_size
        self.local = num_experts // ep_size
        self._pending: list[tuple] = []

    def dispatch(self, x_sorted: torch.Tensor, counts: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        counts = counts.to(torch.long)
        recv = torch.empty_like(counts)  # recv[s*L + j]: tokens from EP rank s for local expert j
        dist.all_to_all_single(recv, counts, group=self.group)
        send_splits = counts.view(self.ep, self.local).sum(1).tolist()
        recv_2d = recv.view(self.ep, self.local)
        recv_splits = recv_2d.sum(1).tolist()
        x_recv = all_to_all(x_sorted, recv_splits, send_splits, self.group)
        # Received rows are grouped by (source s, expert j); the experts want (j, s) order.
        src = torch.arange(self.ep).repeat_interleave(self.local)
        group_key = torch.arange(self.local).repeat(self.ep) * self.ep + src  # (s, j) -> j*ep + s
        perm = torch.repeat_interleave(group_key, recv.cpu()).argsort(stable=True)
        perm = perm.to(x_sorted.device)
        self._pending.append((perm, send_splits, recv_splits))
        return x_recv[perm], recv_2d.sum(0)

    def combine(self, y_local: torch.Tensor) -> torch.Tensor:
        perm, send_splits, recv_splits = self._pending.pop()
        y_recv = torch.empty_like(y_local).index_copy(0, perm, y_local) if perm.numel() else y_local
        return all_to_all(y_recv, send_splits, recv_splits, self.group)


def slice_experts(module: nn.Module, ep_rank: int, ep_size: int) -> None:
    """Keep EP rank ep_rank's experts [e*E/ep, (e+1)*E/ep) of every MoE (only those rows are
    copied; on the meta device nothing is). A stack already sliced for this rank is kept."""
    for moe in moe_layers(module).values():
        if moe.num_experts % ep_size:
            raise ValueError(f"{moe.num_experts} experts cannot be split over EP={ep_size}")
        n = moe.num_experts // ep_size
        experts = moe.experts
        held = experts.w_gate.shape[0]
        if held == n and experts.first_expert == ep_rank * n:
            continue
        if held != moe.num_experts:
            raise ValueError(f"experts {experts.first_expert}..{experts.first_expert + held - 1} "
                             f"are not EP rank {ep_rank}'s slice of {moe.num_experts} over "
                             f"EP={ep_size}")
        for name in EXPERT_WEIGHTS:
            full = getattr(experts, name)
            part = full.detach()[ep_rank * n:(ep_rank + 1) * n].clone()
            setattr(experts, name, nn.Parameter(part, requires_grad=full.requires_grad))
        experts.first_expert = ep_rank * n


def shard_experts(module: nn.Module, ep_group, ep_rank: int, ep_size: int) -> None:
    """Keep this EP rank's slice of every MoE's experts and route tokens by all-to-all."""
    if ep_size == 1:
        return
    slice_experts(module, ep_rank, ep_size)
    for moe in moe_layers(module).values():
        moe.dispatcher = AllToAllDispatcher(ep_group, moe.num_experts, ep_size)


def is_expert_param(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] == "experts" and parts[-1] in EXPERT_WEIGHTS


def reduce_expert_loads(modules: list[nn.Module], group) -> dict[str, torch.Tensor]:
    """Tokens per expert of this step, summed over `group` (the stage's DP group), by layer name;
    resets the MoEs' counters. Layers that ran no forward count zero tokens."""
    names, loads = [], []
    for module in modules:
        got = collect_expert_loads(module)
        for name, moe in moe_layers(module).items():
            names.append(name)
            device = moe.router.e_score_correction_bias.device
            loads.append(got.get(name, torch.zeros(moe.num_experts, dtype=torch.long,
                                                   device=device)))
    if not loads:
        return {}
    flat = torch.stack([x.to(torch.long) for x in loads])  # on the device, for NCCL
    dist.all_reduce(flat, group=group)
    return dict(zip(names, flat.unbind(0)))


def apply_router_bias_update(modules: list[nn.Module], loads: dict[str, torch.Tensor],
                             rate: float) -> None:
    for module in modules:
        mine = {n: v for n, v in loads.items() if n in moe_layers(module)}
        if mine:
            update_router_bias(module, mine, rate)


def load_stats(loads: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """min / mean / max tokens per expert, per MoE layer (for logging)."""
    return {name: dict(min=float(v.min()), mean=float(v.float().mean()), max=float(v.max()))
            for name, v in loads.items()}

"""SwiGLU MLP and the dropless mixture-of-experts layer (DeepSeek-V3 / Kimi K2 routing).

Routing: sigmoid scores; a per-expert bias (a buffer, not trained by autograd) is added for the
choice of experts only; group-limited top-k; the combine weights come from the unbiased scores,
normalised over the chosen k when `norm_topk_prob`, times `routed_scaling_factor`.
Token copies are sorted by expert and handed to a dispatcher; `LocalDispatcher` is the
identity, expert parallelism swaps in an all-to-all one and slices the stacked expert weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.config import ModelConfig


class SwiGLU(nn.Module):
    """silu(gate) * up. A module (without parameters) so activation-memory settings can
    recompute it or store its inputs compactly."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


class MLP(nn.Module):
    """Dense SwiGLU feed-forward (dense layers and shared experts)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = SwiGLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    """Scores tokens against experts in float32 (also under autocast) and picks the top k."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> scores [T, E], expert ids [T, k], combine weights [T, k] (float32)."""
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        with torch.no_grad():
            biased = scores + self.e_score_correction_bias
            if self.n_group > 1:
                grouped = biased.view(-1, self.n_group, self.num_experts // self.n_group)
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
                keep = group_scores.topk(self.topk_group, dim=-1).indices
                group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
                expert_mask = group_mask.repeat_interleave(self.num_experts // self.n_group, dim=1)
                biased = biased.masked_fill(~expert_mask, float("-inf"))
            idx = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return scores, idx, weights * self.scaling


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: _grouped_mm's backward
    rejects expanded (stride 0) gradients such as the one `out.sum().backward()` sends."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class GroupedExperts(nn.Module):
    """Routed experts with stacked weights; dim 0 is the expert (the EP shard dimension).

    `first_expert` is the global index of local expert 0 (expert parallelism sets it when it
    slices the stack); weight init uses it so a shard gets the values of the full model.
    The per-expert matmuls run as one `torch._grouped_mm` where this torch has it (CPU in any
    float dtype, CUDA in bfloat16), else as a loop over experts; both give the same numbers
    (tested) and `use_grouped_mm = False` forces the loop.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.act = SwiGLU()
        self.first_expert = 0
        self.use_grouped_mm = hasattr(torch, "_grouped_mm")

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, H] sorted by local expert, counts [E_local] -> [N, H] in the same order."""
        if counts.numel() != self.w_gate.shape[0]:
            raise ValueError(f"{counts.numel()} expert counts for {self.w_gate.shape[0]} local experts")
        dtype = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                 else x.dtype)
        grouped = self.use_grouped_mm and (x.device.type == "cpu" or dtype == torch.bfloat16)
        if grouped:
            x = x.to(dtype)
        gate, up = self.up_project(x, counts, grouped)
        out = self.down_project(gate, up, counts, grouped)
        return _ContiguousGrad.apply(out) if grouped else out

    def up_project(self, x: torch.Tensor, counts: torch.Tensor,
                   grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up projections of every token copy, [N, I] each."""
        if grouped:
            return self._mm(x, self.w_gate, counts), self._mm(x, self.w_up, counts)
        # Every expert runs, even on zero rows, so all weights are in the graph (zero grads).
        parts = x.split(counts.tolist())
        return (torch.cat([F.linear(xs, self.w_gate[e]) for e, xs in enumerate(parts)]),
                torch.cat([F.linear(xs, self.w_up[e]) for e, xs in enumerate(parts)]))

    def down_project(self, gate: torch.Tensor, up: torch.Tensor, counts: torch.Tensor,
                     grouped: bool) -> torch.Tensor:
        """SwiGLU, then the down projection, [N, H]."""
        h = self.act(gate, up)
        if grouped:
            return self._mm(h, self.w_down, counts)
        return torch.cat([F.linear(hs, self.w_down[e]) for e, hs in enumerate(h.split(counts.tolist()))])

    @staticmethod
    def _mm(inp: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(inp, w.to(inp.dtype).transpose(-2, -1), offs=offsets)


class LocalDispatcher:
    """All experts live here: dispatch and combine are the identity."""

    def dispatch(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_sorted, counts

    def combine(self, y_local: torch.Tensor) -> torch.Tensor:
        return y_local


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.num_experts = cfg.n_routed_experts
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts > 0 else None)
        self.dispatcher = LocalDispatcher()
        self.seq_aux_loss_coef = cfg.seq_aux_loss_coef
        self.last_expert_load: torch.Tensor | None = None  # tokens per expert, last forward
        self.expert_load_total: torch.Tensor | None = None  # summed since the last collect
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        scores, idx, weights = self.router(flat)

        flat_idx = idx.reshape(-1)
        order = flat_idx.argsort(stable=True)  # token copies grouped by expert, stable
        counts = torch.bincount(flat_idx, minlength=self.num_experts)
        x_sorted = flat[order // self.top_k]
        x_local, counts_local = self.dispatcher.dispatch(x_sorted, counts)
        y_sorted = self.dispatcher.combine(self.experts(x_local, counts_local))
        y = y_sorted[torch.argsort(order)].view(-1, self.top_k, hidden)
        out = (y.float() * weights.unsqueeze(-1)).sum(1).to(x.dtype).view(batch, seq, hidden)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        load = counts.detach()
        self.last_expert_load = load
        self.expert_load_total = load if self.expert_load_total is None else self.expert_load_total + load
        self.last_aux_loss = (self._sequence_aux_loss(scores, idx, batch, seq)
                              if self.seq_aux_loss_coef > 0 else None)
        return out

    def _sequence_aux_loss(self, scores: torch.Tensor, idx: torch.Tensor, batch: int,
                           seq: int) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss, coef * mean over rows of sum_i f_i * P_i."""
        probs = scores / scores.sum(-1, keepdim=True)
        p_mean = probs.view(batch, seq, -1).mean(1)  # [B, E]
        picked = torch.zeros(batch, seq * self.top_k, self.num_experts, device=scores.device)
        picked = picked.scatter_(2, idx.view(batch, -1, 1), 1.0).sum(1)  # [B, E] counts
        frac = picked * self.num_experts / (self.top_k * seq)
        return self.seq_aux_loss_coef * (frac * p_mean).sum(-1).mean()


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """MoE modules by qualified name (stable across pipeline splits: layer keys are kept)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def collect_expert_loads(model: nn.Module, reset: bool = True) -> dict[str, torch.Tensor]:
    """Tokens per expert summed over the forwards since the last collect, by MoE layer name."""
    loads = {}
    for name, moe in moe_layers(model).items():
        if moe.expert_load_total is not None:
            loads[name] = moe.expert_load_total
        if reset:
            moe.expert_load_total = None
    return loads


@torch.no_grad()
def update_router_bias(model: nn.Module, loads_by_layer: dict[str, torch.Tensor], rate: float) -> None:
    """Aux-loss-free balancing: bias += rate * sign(mean load - load), per MoE layer.

    Overloaded experts become less likely to be chosen; the combine weights are unaffected
    (the bias enters the selection only).
    """
    layers = moe_layers(model)
    for name, load in loads_by_layer.items():
        if name not in layers:
            raise KeyError(f"no MoE layer named {name!r}; have {sorted(layers)}")
        bias = layers[name].router.e_score_correction_bias
        load = load.to(device=bias.device, dtype=torch.float32)
        bias.add_(rate * torch.sign(load.mean() - load))

"""The training state as one flat dict of tensors with layout-independent keys.

    model/<fqn>                         a parameter or persistent buffer of the unsplit model
    model/<fqn>/expert-<e>              routed expert e (global index) of a stacked [E, r, c] weight
    optim/<fqn>/<state>                 optimizer state of that parameter (momentum_buffer,
    optim/<fqn>/expert-<e>/<state>        exp_avg, exp_avg_sq, step), same expert split
    master/<fqn>[/expert-<e>]           ZeRO-1's fp32 master copy, saved by its owner
    rng/rank-<r>/cpu, rng/rank-<r>/cuda-<d>   generator states (per rank: optional on load)

On storage, the per-expert keys of one stack are chunks of one logical tensor (layout.py).

Keys never mention a pipeline stage, a data-parallel rank or an expert-parallel shard, so a
checkpoint saved at one layout loads at another: each rank simply asks for the keys it holds
now (its stage's layers, its experts, the optimizer state of the params it owns under ZeRO-1).
Model and optimizer entries are the live tensors (views), so loading writes straight into them;
RNG entries are copies, put back with `restore_rng` after loading.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from train.optim.muon import is_expert_stack, split_piece_name


Modules = nn.Module | Sequence[nn.Module | tuple[str, nn.Module]]


def _pieces(model: Modules) -> list[tuple[str, nn.Module]]:
    """(name prefix, module) pairs: a whole model, or a rank's pieces with full-model names
    (pipeline chunks as they are, the DEP encoder as ("vision.", encoder))."""
    if isinstance(model, nn.Module):
        return [("", model)]
    return [m if isinstance(m, tuple) else ("", m) for m in model]


def _expert_offsets(model: Modules) -> dict[str, int]:
    """FQN of each stacked expert weight -> global index of its local expert 0."""
    out = {}
    for prefix, piece in _pieces(model):
        for mname, module in piece.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                fqn = prefix + (f"{mname}.{pname}" if mname else pname)
                if is_expert_stack(fqn, p):
                    out[fqn] = int(getattr(module, "first_expert", 0))
    return out


def _split(key: str, t: Tensor, first_expert: int | None) -> dict[str, Tensor]:
    if first_expert is None:
        return {key: t}
    return {f"{key}/expert-{first_expert + i}": t[i] for i in range(t.shape[0])}


def model_tensors(model: Modules) -> dict[str, Tensor]:
    """Parameters and persistent buffers of `model` (or of a rank's pieces, see _pieces)."""
    offsets = _expert_offsets(model)
    out: dict[str, Tensor] = {}
    for prefix, piece in _pieces(model):
        for name, t in piece.state_dict(keep_vars=True).items():
            fqn = prefix + name
            if f"model/{fqn}" in out:
                raise ValueError(f"two model pieces both hold {fqn}")
            out.update(_split(f"model/{fqn}", t.detach(), offsets.get(fqn)))
    return out


def optimizer_tensors(optimizer, model: Modules) -> dict[str, Tensor]:
    """State of every param the optimizer holds, keyed by FQN (groups need `param_names`).

    `optimizer` is a MuonClip (or any torch optimizer with named groups) over the model's
    params, or a parallel.zero.ZeroOptimizer: then its inner optimizer steps fp32 masters named
    "fqn" or "fqn@a:b" (rows a..b of an expert stack), and each master is saved by its owner as
    master/<fqn>[/expert-<e>]. Load with optional=("rng/", "master/") to accept checkpoints
    without masters (then copy each master from its loaded parameter: what `fill_masters` does).
    """
    zero = hasattr(optimizer, "owned")
    inner = optimizer.optimizer if zero else optimizer
    out: dict[str, Tensor] = {}
    if inner is None:  # a ZeRO rank that owns nothing
        return out
    if hasattr(inner, "init_state"):
        inner.init_state()  # so a fresh optimizer has tensors to load into
    offsets = _expert_offsets(model)
    for group in inner.param_groups:
        if "param_names" not in group:
            raise ValueError("optimizer param groups need 'param_names' (build_optimizer and "
                             "optimizer_for set them) to key the state by parameter name")
        for name, p in zip(group["param_names"], group["params"]):
            fqn, rows = split_piece_name(name)
            first = offsets[fqn] + (rows or 0) if fqn in offsets else None
            if zero:
                out.update(_split(f"master/{fqn}", p.detach(), first))
            for sname, value in inner.state.get(p, {}).items():
                if not isinstance(value, Tensor):
                    raise TypeError(f"optimizer state {name}/{sname} is {type(value).__name__}, "
                                    "not a tensor")
                parts = _split(f"optim/{fqn}", value, first if value.shape == p.shape else None)
                out.update({f"{key}/{sname}": t for key, t in parts.items()})
    return out


@torch.no_grad()
def fill_masters(zero, missing: list[str]) -> int:
    """After a load that found no master/ entries (a checkpoint from a plain optimizer), set
    those ZeRO-1 masters from the loaded parameters; returns how many were filled."""
    filled = 0
    for piece in getattr(zero, "owned", []):
        key = f"master/{piece.name}"
        if any(k == key or k.startswith(f"{key}/expert-") for k in missing):
            piece.master.copy_(piece.view(piece.param.detach()))
            filled += 1
    return filled


def rng_tensors(rank: int) -> dict[str, Tensor]:
    out = {f"rng/rank-{rank}/cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for d in range(torch.cuda.device_count()):
            out[f"rng/rank-{rank}/cuda-{d}"] = torch.cuda.get_rng_state(d)
    return out


def restore_rng(tensors: dict[str, Tensor], rank: int, missing: list[str] = ()) -> bool:
    """Put the loaded generator states of `rank` back; False when the checkpoint had none."""
    key = f"rng/rank-{rank}/cpu"
    if key not in tensors or key in missing:
        return False
    torch.set_rng_state(tensors[key])
    for name, t in tensors.items():
        prefix = f"rng/rank-{rank}/cuda-"
        if name.startswith(prefix) and name not in missing:
            torch.cuda.set_rng_state(t, int(name[len(prefix):]))
    return True


def training_state(model: Modules, optimizer, rank: int = 0) -> dict[str, Tensor]:
    """model + optimizer + RNG tensors of this rank, ready for CheckpointManager.save/load.

    Under parallel.runtime.ParallelRuntime: training_state(
        rt.stage_modules + ([("vision.", rt.dep.encoder)] if rt.dep else []), rt.zero, rank)."""
    state = model_tensors(model)
    if optimizer is not None:
        state.update(optimizer_tensors(optimizer, model))
    state.update(rng_tensors(rank))
    return state

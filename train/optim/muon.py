"""MuonClip's optimizer part: Muon for weight matrices, AdamW for everything else, in one optimizer.

Muon, per matrix W with gradient G (as in "Muon is Scalable for LLM Training"):

    M  <- mu * M + G                          momentum buffer (fp32 like the parameter)
    U  <- G + mu * M   (nesterov, default)    or U <- M without nesterov
    O  <- NewtonSchulz5(U)                    Frobenius-normalised, transposed when rows > cols,
                                              coefficients (3.4445, -4.7750, 2.0315), bf16 by default
    W  <- W * (1 - lr * wd)                   decoupled weight decay
    W  <- W - lr * 0.2 * sqrt(max(rows, cols)) * O     RMS matched to AdamW

Nesterov is on by default, as in `torch.optim.Muon` and Moonlight. `torch.optim.Muon` keeps its
buffer as an exponential average, B = (1 - mu) * M; Newton-Schulz divides by the Frobenius norm
first, so the orthogonalised update is the same up to round-off (our parity test checks it). A
3-D parameter [E, rows, cols] (stacked routed experts) is E independent matrices: one batched
Newton-Schulz, scale from (rows, cols).

Parameter roles (`param_groups`): Muon takes every 2-D matrix (attention and MLP projections, the
MoE router weight, vision linears) and the 3-D stacked expert weights; AdamW (torch's functional
adamw, bit-identical to `torch.optim.AdamW`) takes embeddings (any parameter with "embed" in its
name: token, patch and position embeddings), the output head, norms, biases and any other shape.
The router weight goes to Muon as in Moonlight / DeepSeek-style Muon setups (it is a hidden
matrix); the router's selection bias is a buffer updated by the balancing rule, not a parameter.

The optimizer is per-parameter (each update reads only its own gradient and state), so ZeRO-1 by
whole-parameter ownership can run it on the owned subset: `build_optimizer(..., owned=pred)`,
or `optimizer_for(named_tensors, cfg.optim)` over the fp32 master copies it owns.
Groups carry `param_names` (fully qualified names), which checkpoints use as state keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as _adamw_functional

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7

_EXPERT_STACKS = ("w_gate", "w_up", "w_down")


def newton_schulz5(g: Tensor, *, steps: int = NS_STEPS, dtype: torch.dtype = torch.bfloat16,
                   coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                   eps: float = NS_EPS) -> Tensor:
    """Approximate orthogonalisation of g ([r, c] or batched [E, r, c]) by quintic Newton-Schulz.

    The op order (cast, transpose, Frobenius normalisation, addmm chain) is the one of
    torch.optim.Muon, so a 2-D bf16 call is bit-identical to it. Returns a tensor of `dtype`.
    """
    if g.ndim not in (2, 3):
        raise ValueError(f"newton_schulz5 needs a 2-D or 3-D tensor, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    if x.ndim == 2:
        x = x.div(x.norm().clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.T
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, poly, x, beta=a)
    else:
        x = x.div(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.mT
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if tall else x


def muon_lr_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """0.2 * sqrt(max(rows, cols)) of one matrix (the last two dims): AdamW RMS matching."""
    rows, cols = shape[-2], shape[-1]
    return 0.2 * math.sqrt(max(rows, cols))


class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW in one optimizer; each param group says which with `algo`.

    Group keys: algo ("muon" | "adamw"), lr, weight_decay; muon: momentum, nesterov, ns_steps,
    ns_dtype; adamw: betas, eps. QK-Clip is a separate call after `step()` (see qk_clip.py).
    """

    def __init__(self, params: Iterable, *, lr: float = 2e-3, adamw_lr: float = 2e-3,
                 weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 ns_steps: int = NS_STEPS, ns_dtype: torch.dtype = torch.bfloat16) -> None:
        self._adamw_lr = adamw_lr
        defaults = dict(algo="muon", lr=lr, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype, betas=betas,
                        eps=eps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["algo"] not in ("muon", "adamw"):
                raise ValueError(f"param group algo={group['algo']!r}: use 'muon' or 'adamw'")
            if group["algo"] == "muon":
                for p in group["params"]:
                    if p.ndim not in (2, 3):
                        raise ValueError(f"Muon needs 2-D or stacked 3-D parameters, got "
                                         f"shape {tuple(p.shape)}")
            # The schedule scales lr from base_lr, so resuming never compounds multipliers.
            group.setdefault("base_lr", group["lr"])

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("algo") == "adamw" and "lr" not in param_group:
            param_group["lr"] = self._adamw_lr
        super().add_param_group(param_group)

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every parameter's (zero) state now instead of at its first step, so a fresh
        optimizer has tensors a checkpoint can be loaded into. Stepping from these zeros is
        bit-identical to stepping from lazily created ones."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if group["algo"] == "muon" and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["algo"] == "adamw" and "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["algo"] == "muon":
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(g)
            update = g.add(buf, alpha=mu) if group["nesterov"] else buf
            o = newton_schulz5(update, steps=group["ns_steps"], dtype=group["ns_dtype"])
            p.mul_(1 - lr * wd)
            p.add_(o.to(p.dtype), alpha=-lr * muon_lr_scale(p.shape))

    def _adamw_group(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        # foreach=False: the single-tensor path, the same arithmetic on every device count.
        _adamw_functional(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=False,
                          amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                          weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


# ---------------------------------------------------------------------------------------------
# Parameter roles
# ---------------------------------------------------------------------------------------------


def split_piece_name(name: str) -> tuple[str, int | None]:
    """"fqn@a:b" (rows a..b of a stacked expert weight, as ZeRO-1 pieces are named) ->
    (fqn, a); a plain FQN -> (fqn, None)."""
    fqn, sep, rows = name.partition("@")
    return (fqn, int(rows.partition(":")[0])) if sep else (fqn, None)


def is_expert_stack(name: str, p: Tensor) -> bool:
    """A stacked routed-expert weight [E, rows, cols]: `...experts.w_gate|w_up|w_down`."""
    parts = split_piece_name(name)[0].split(".")
    return p.ndim == 3 and len(parts) >= 2 and parts[-2] == "experts" and parts[-1] in _EXPERT_STACKS


def uses_muon(name: str, p: Tensor, module: nn.Module | None = None) -> bool:
    """The role rule (module docstring): True for hidden matrices and stacked expert weights."""
    if isinstance(module, nn.Embedding):
        return False
    parts = split_piece_name(name)[0].split(".")
    if any("embed" in part for part in parts):
        return False
    if len(parts) >= 2 and parts[-2] == "head":  # the output projection (lm.head.weight)
        return False
    return p.ndim == 2 or is_expert_stack(name, p)


def param_groups(model: nn.Module, owned: Callable[[str, Tensor], bool] | None = None,
                 ) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """(muon, adamw) lists of (fqn, param) for the trainable params (those `owned` accepts)."""
    modules = dict(model.named_modules())
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or (owned is not None and not owned(name, p)):
            continue
        module = modules.get(name.rpartition(".")[0])
        (muon if uses_muon(name, p, module) else adamw).append((name, p))
    return muon, adamw


def build_optimizer(model: nn.Module, optim_cfg, *, owned: Callable[[str, Tensor], bool] | None = None,
                    ns_dtype: torch.dtype = torch.bfloat16) -> MuonClip:
    """MuonClip over `model`'s params (or the `owned` subset), hyper-parameters from cfg.optim."""
    muon, adamw = param_groups(model, owned)
    return _muonclip(muon, adamw, optim_cfg, ns_dtype)


def optimizer_for(named: Sequence[tuple[str, Tensor]], optim_cfg, *,
                  ns_dtype: torch.dtype = torch.bfloat16) -> MuonClip:
    """MuonClip over (name, tensor) pairs, roles from the names and shapes alone: the
    `make_optimizer` of parallel.zero.ZeroOptimizer (names may be "fqn@a:b" expert pieces)."""
    muon = [(n, t) for n, t in named if uses_muon(n, t)]
    adamw = [(n, t) for n, t in named if not uses_muon(n, t)]
    return _muonclip(muon, adamw, optim_cfg, ns_dtype)


def muonclip_factory(optim_cfg) -> Callable[[Sequence[tuple[str, Tensor]]], MuonClip]:
    """The `make_optimizer` the trainer hands to ZeRO-1: MuonClip with cfg.optim's settings
    over the pieces a rank owns."""
    return lambda named: optimizer_for(named, optim_cfg)


def _muonclip(muon, adamw, optim_cfg, ns_dtype) -> MuonClip:
    groups = []
    for algo, named, lr in (("muon", muon, optim_cfg.lr), ("adamw", adamw, optim_cfg.adamw_lr)):
        if named:
            groups.append(dict(algo=algo, lr=lr, params=[p for _, p in named],
                               param_names=[n for n, _ in named]))
    if not groups:  # a rank that owns nothing still gets a valid (empty) optimizer
        groups.append(dict(algo="muon", params=[], param_names=[]))
    return MuonClip(groups, lr=optim_cfg.lr, adamw_lr=optim_cfg.adamw_lr,
                    weight_decay=optim_cfg.weight_decay, momentum=optim_cfg.momentum,
                    betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, ns_dtype=ns_dtype)

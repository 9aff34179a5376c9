"""Activation memory: what a model's backward pass keeps, and where (Kimi K2's techniques).

`apply_activation_memory(module, cfg, device)` changes how a plain model (or one pipeline
chunk of it) saves tensors for backward; the numbers it computes do not change:

- recompute "selective": RMSNorm, SwiGLU and the MLA up-projections are recomputed in
  backward. For MLA, the per-head q, k, v that attention saves are dropped after the forward
  and rebuilt from the latents (which the up-projections keep anyway) when attention's
  backward first needs them. `recompute_moe_down` also recomputes the routed experts' SwiGLU +
  down-projection, so their SwiGLU output is not kept.
- recompute "full": each decoder layer keeps only its inputs and reruns in backward.
- fp8_storage: the saved inputs of the routed experts' up-projections and of every SwiGLU
  are kept as FP8-E4M3 in 1x128 tiles along the last dim with one float32 scale per tile
  (amax / 448); they are decoded to the working dtype when backward needs them.
- offload: every tensor a decoder layer saves (parameters aside) is copied to host memory: on
  CUDA into pinned buffers on a side stream, overlapped with compute, and copied back when
  backward needs it; on CPU into a separate host buffer, so the same code runs in CI.

Forwards are wrapped on the module instances, so parameter names, init, checkpoints and
optimizer sharding see the unchanged model. Recomputation replays a forward: the attributes a
forward records (expert loads, the aux loss, QK-Clip's max logits) keep the original values.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from train.config import ActivationConfig
from train.errors import ConfigError
from train.model.lm import DecoderLayer
from train.model.mla import MLA
from train.model.moe import MLP, GroupedExperts
from train.model.norm import RMSNorm

FP8_TILE = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def check_support(cfg: ActivationConfig, device: torch.device | str) -> None:
    """Start-up check of what the torch build and the device must support; ConfigError names
    the field."""
    device = torch.device(device)
    if cfg.fp8_storage and not hasattr(torch, "float8_e4m3fn"):
        raise ConfigError(f"activations.fp8_storage=true needs a torch with float8 dtypes; "
                          f"torch {torch.__version__} has no torch.float8_e4m3fn")
    if cfg.offload and device.type == "cuda":
        try:
            ok = torch.cuda.is_available() and torch.empty(1, pin_memory=True).is_pinned()
        except RuntimeError:
            ok = False
        if not ok:
            raise ConfigError("activations.offload=true on CUDA needs pinned host memory, which "
                              "this machine or torch build does not provide")


# --------------------------------------------------------------------------------------------
# Where saved tensors live: kept as they are, or copied to host memory
# --------------------------------------------------------------------------------------------


class KeepStore:
    """Saved tensors stay where they are (the default)."""

    def pack(self, t: torch.Tensor):
        return t

    def unpack(self, packed) -> torch.Tensor:
        return packed


class _Offloaded:
    __slots__ = ("host", "device", "event")

    def __init__(self, host: torch.Tensor, device: torch.device, event):
        self.host, self.device, self.event = host, device, event


class HostStore:
    """Saved tensors copied to host memory. On CUDA: pinned buffers filled on a side stream
    (the device tensor is kept alive for that stream until the copy is done) and copied back
    on the compute stream after the copy's event; elsewhere a plain host copy."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def pack(self, t: torch.Tensor):
        on_cuda = t.device.type == "cuda"
        host = torch.empty_like(t, device="cpu", pin_memory=on_cuda)  # strides kept if dense
        if not on_cuda:
            host.copy_(t)
            return _Offloaded(host, t.device, None)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        t.record_stream(self.stream)
        return _Offloaded(host, t.device, event)

    def unpack(self, packed: _Offloaded) -> torch.Tensor:
        if packed.event is None:
            return packed.host.to(packed.device)
        torch.cuda.current_stream(packed.device).wait_event(packed.event)
        return packed.host.to(packed.device, non_blocking=True)


class _Saver:
    """The front of a store: parameters are never stored (returned as they are), and within
    one decoder layer's forward (`scope`) each tensor is stored once however many ops save it
    (the input of the gate and the up projection, for one). A scope holds the original tensors
    until it ends, so a freed tensor's address cannot alias a later one."""

    def __init__(self, store):
        self.store = store
        self.param_ptrs: set[int] = set()
        self._seen: dict[tuple, tuple[torch.Tensor, object]] | None = None

    @contextlib.contextmanager
    def scope(self, module: nn.Module):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._seen = {}
        try:
            yield
        finally:
            self._seen = None

    def pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() in self.param_ptrs:
            return ("param", t)
        if self._seen is None:
            return ("stored", self.store.pack(t))
        key = _tensor_key(t)
        hit = self._seen.get(key)
        if hit is None:
            hit = self._seen[key] = (t, ("stored", self.store.pack(t)))
        return hit[1]

    def unpack(self, packed) -> torch.Tensor:
        kind, value = packed
        return value if kind == "param" else self.store.unpack(value)


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype, t._version)


# --------------------------------------------------------------------------------------------
# FP8-E4M3 storage in 1x128 tiles
# --------------------------------------------------------------------------------------------


def fp8_quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [..., D] -> (codes float8_e4m3fn [..., D rounded up to 128], scales float32
    [..., tiles]); each 1x128 tile along the last dim has scale amax / 448."""
    d = t.shape[-1]
    tiles = -(-d // FP8_TILE)
    x = t.detach().float().reshape(-1, d)
    if tiles * FP8_TILE != d:
        x = torch.nn.functional.pad(x, (0, tiles * FP8_TILE - d))
    x = x.view(x.shape[0], tiles, FP8_TILE)
    scale = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / FP8_MAX
    codes = (x / scale).to(torch.float8_e4m3fn)
    return (codes.view(*t.shape[:-1], tiles * FP8_TILE), scale.view(*t.shape[:-1], tiles))


def fp8_dequantize(codes: torch.Tensor, scale: torch.Tensor, d: int,
                   dtype: torch.dtype) -> torch.Tensor:
    lead = codes.shape[:-1]
    x = codes.float().view(-1, scale.shape[-1], FP8_TILE) * scale.reshape(-1, scale.shape[-1], 1)
    return x.view(*lead, -1)[..., :d].to(dtype)


class _Fp8Saved:
    __slots__ = ("codes", "scale", "d", "dtype")


def _fp8_region(forward: Callable, saver: _Saver) -> Callable:
    """forward(*args) with the saved tensors that are (views of) its floating-point tensor
    arguments stored as FP8 tiles (once per tensor); other saved tensors go to the saver."""

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        targets = {a.untyped_storage().data_ptr() for a in args
                   if isinstance(a, torch.Tensor) and a.is_floating_point()}
        seen: dict[tuple, tuple[torch.Tensor, object]] = {}

        def pack(t: torch.Tensor):
            if t.untyped_storage().data_ptr() not in targets or not t.is_floating_point():
                return saver.pack(t)
            key = _tensor_key(t)
            if key not in seen:
                out = _Fp8Saved()
                codes, scale = fp8_quantize(t)
                out.codes, out.scale = saver.pack(codes), saver.pack(scale)
                out.d, out.dtype = t.shape[-1], t.dtype
                seen[key] = (t, out)
            return seen[key][1]

        def unpack(packed):
            if isinstance(packed, _Fp8Saved):
                return fp8_dequantize(saver.unpack(packed.codes), saver.unpack(packed.scale),
                                      packed.d, packed.dtype)
            return saver.unpack(packed)

        with saved_tensors_hooks(pack, unpack):
            return forward(*args, **kwargs)

    return wrapped


# --------------------------------------------------------------------------------------------
# Recomputation
# --------------------------------------------------------------------------------------------


def _recomputed(forward: Callable, restore_state_of: nn.Module | None = None) -> Callable:
    """forward checkpointed (non-reentrant): keeps its inputs, reruns in backward. The text
    model draws no random numbers, so no RNG state is saved and restored around it."""
    context_fn = (functools.partial(_state_restoring_contexts, restore_state_of)
                  if restore_state_of is not None else None)

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False,
                          **kwargs, **extra)

    return wrapped


@contextlib.contextmanager
def _restore_attributes(module: nn.Module):
    saved = [(m, dict(m.__dict__)) for m in module.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            for k, v in attrs.items():
                if m.__dict__.get(k) is not v:
                    m.__dict__[k] = v


def _state_restoring_contexts(module: nn.Module):
    return contextlib.nullcontext(), _restore_attributes(module)


class _UpProjectionRecompute:
    """MLA's q, k, v are dropped once attention has saved what it needs and rebuilt, from the
    latents, the first time attention's backward unpacks one of them (under no_grad: the
    gradient still flows through the original graph of the up-projections)."""

    def __init__(self, mla: MLA, saver: _Saver):
        self.up_project, self.attend = mla.up_project, mla.attend
        self.saver = saver
        self.pending = None
        mla.up_project = self.wrapped_up_project
        mla.attend = self.wrapped_attend

    def wrapped_up_project(self, *args):
        outputs = self.up_project(*args)
        self.pending = (args, outputs) if torch.is_grad_enabled() else None
        return outputs

    def wrapped_attend(self, q, k, v, mask):
        pending, self.pending = self.pending, None
        if pending is None or any(a is not b for a, b in zip(pending[1], (q, k, v))):
            return self.attend(q, k, v, mask)
        args, outputs = pending
        saver = self.saver
        inputs = [("t", saver.pack(a)) if isinstance(a, torch.Tensor) else ("v", a) for a in args]
        device_type = q.device.type
        autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ptrs = {o.untyped_storage().data_ptr(): i for i, o in enumerate(outputs)}
        dtypes = [o.dtype for i, o in enumerate(outputs)]
        del outputs  # only attention's own references keep them until it returns
        rebuilt: list[tuple[torch.Tensor, ...]] = []

        def pack(t: torch.Tensor):
            i = ptrs.get(t.untyped_storage().data_ptr())
            if i is None or t.dtype != dtypes[i]:
                return ("keep", saver.pack(t))
            return ("rebuild", i, tuple(t.shape), t.stride(), t.storage_offset())

        def unpack(packed):
            if packed[0] == "keep":
                return saver.unpack(packed[1])
            if not rebuilt:
                real = [saver.unpack(a) if kind == "t" else a for kind, a in inputs]
                with torch.no_grad(), torch.autocast(device_type, dtype=autocast[1],
                                                     enabled=autocast[0]):
                    rebuilt.append(self.up_project(*real))
            _, i, shape, stride, offset = packed
            return rebuilt[0][i].as_strided(shape, stride, offset)

        with saved_tensors_hooks(pack, unpack):
            return self.attend(q, k, v, mask)


# --------------------------------------------------------------------------------------------
# Applying the settings
# --------------------------------------------------------------------------------------------


def _layer_forward(layer: nn.Module, forward: Callable, saver: _Saver) -> Callable:
    """The outermost wrapper of a decoder layer: everything it saves goes through the saver."""

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with saver.scope(layer), saved_tensors_hooks(saver.pack, saver.unpack):
            return forward(*args, **kwargs)

    return wrapped


def apply_activation_memory(module: nn.Module, cfg: ActivationConfig,
                            device: torch.device | str = "cpu", store=None) -> nn.Module:
    """Apply the settings to every decoder layer in module (in place; returns module). Apply
    them last: a deep copy of a wrapped module would call the original's forwards.

    store: where the layers' saved tensors go (pack(t) -> object, unpack(object) -> t);
    default HostStore(device) with offload, else KeepStore. Measurements pass a counting one.
    """
    check_support(cfg, device)
    if cfg.recompute == "none" and not cfg.fp8_storage and not cfg.offload and store is None:
        return module
    if getattr(module, "_activation_memory", None) is not None:
        raise RuntimeError("activation-memory settings are already applied to this module")
    if store is None:
        store = HostStore(device) if cfg.offload else KeepStore()
    module._activation_memory = cfg
    for layer in [m for m in module.modules() if isinstance(m, DecoderLayer)]:
        saver = _Saver(store)
        forward = layer.forward
        if cfg.recompute == "full":
            forward = _recomputed(forward, restore_state_of=layer)
        else:
            _apply_in_layer(layer, cfg, saver)
        if not isinstance(store, KeepStore):
            forward = _layer_forward(layer, forward, saver)
        layer.forward = forward
    return module


def _apply_in_layer(layer: nn.Module, cfg: ActivationConfig, saver: _Saver) -> None:
    selective = cfg.recompute == "selective"
    for m in layer.modules():
        if selective and isinstance(m, RMSNorm):
            m.forward = _recomputed(m.forward)
        elif isinstance(m, GroupedExperts):
            if selective and cfg.recompute_moe_down:  # SwiGLU is part of the recomputed region
                m.down_project = _recomputed(m.down_project)
            elif selective:
                m.act.forward = _recomputed(m.act.forward)
            if cfg.fp8_storage:
                m.up_project = _fp8_region(m.up_project, saver)
                m.down_project = _fp8_region(m.down_project, saver)
        elif isinstance(m, MLP):
            if selective:
                m.act.forward = _recomputed(m.act.forward)
            if cfg.fp8_storage:
                m.act.forward = _fp8_region(m.act.forward, saver)
        elif selective and isinstance(m, MLA):
            _UpProjectionRecompute(m, saver)

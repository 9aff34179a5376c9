"""Measure what autograd saves for one decoder layer, per activation-memory setting.

Every tensor the layer's forward saves passes through a counting store
(`apply_activation_memory(..., store=...)`); storages are counted once, parameters not at all,
offloaded tensors as their host copies. `FlashSaves` swaps in an attention core that keeps what
FlashAttention / flex attention keep on a GPU (q, k, v, out, log-sum-exp) instead of the CPU
sdpa path's float32 probabilities. Used by bench/activation_memory.py (the measured table) and
by the planner (parallel/plan.py), whose activation bytes are these measurements.
"""

from __future__ import annotations

import dataclasses
import gc
import time

import torch

from train.config import ActivationConfig, ModelConfig
from train.model.activations import HostStore, apply_activation_memory
from train.model.attention import DocMask
from train.model.lm import DecoderLayer
from train.model.rope import RotaryEmbedding

SETTINGS = {
    "none": ActivationConfig(),
    "selective": ActivationConfig(recompute="selective"),
    "selective+fp8": ActivationConfig(recompute="selective", fp8_storage=True),
    "selective+fp8+offload": ActivationConfig(recompute="selective", fp8_storage=True,
                                              offload=True),
    "selective+moe_down+fp8": ActivationConfig(recompute="selective", recompute_moe_down=True,
                                               fp8_storage=True),
    "full": ActivationConfig(recompute="full"),
}


class CountingStore:
    """Counts the bytes of each distinct storage it is handed (device), or of the host copies
    it makes (offload); keeps what it counts alive until `clear`, so addresses cannot repeat."""

    def __init__(self, offload: bool):
        self.host = HostStore("cpu") if offload else None
        self.device_bytes = self.host_bytes = 0
        self._held: dict[int, torch.Tensor] = {}

    def pack(self, t: torch.Tensor):
        if self.host is not None:
            out = self.host.pack(t)
            self.host_bytes += out.host.untyped_storage().nbytes()
            return out
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self._held:
            self._held[ptr] = t
            self.device_bytes += t.untyped_storage().nbytes()
        return t

    def unpack(self, packed):
        return self.host.unpack(packed) if self.host is not None else packed

    def clear(self) -> None:
        self._held.clear()


def moe_layer_config(model: ModelConfig, local_experts: int) -> ModelConfig:
    """The model config of one rank's MoE layer: `local_experts` experts, top-k among them."""
    return dataclasses.replace(model, n_routed_experts=local_experts, n_group=1, topk_group=1,
                               num_layers=model.first_k_dense + 1, attention_backend="sdpa")


def layer_weights(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (normal, init_std) for one MoE layer, made once and shared by settings."""
    with torch.device("meta"):
        layer = DecoderLayer(cfg, cfg.first_k_dense)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in layer.state_dict().items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(t.shape, dtype=dtype)
        elif t.dtype == torch.float32 and name.endswith("bias"):
            out[name] = torch.zeros(t.shape, dtype=torch.float32)
        else:
            out[name] = torch.empty(t.shape, dtype=dtype).normal_(0.0, cfg.init_std, generator=gen)
    return out


class FlashSaves(torch.autograd.Function):
    """Attention that keeps what a flash kernel keeps (q, k, v, out, log-sum-exp) and
    recomputes the probabilities in backward."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        with torch.no_grad():
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.dense(), scale=scale)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=ctx.mask.dense(), scale=ctx.scale)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        return dq, dk, dv, None, None


def saved_bytes(cfg: ModelConfig, weights: dict[str, torch.Tensor], act: ActivationConfig,
                tokens: int, dtype: torch.dtype, attention: str = "sdpa") -> dict[str, int]:
    """Device and host bytes autograd keeps for one forward of the MoE layer on `tokens`
    tokens (one packed row)."""
    with torch.device("meta"):
        layer = DecoderLayer(cfg, cfg.first_k_dense)
    layer.load_state_dict(weights, assign=True)
    if attention == "flash":
        mla = layer.attn
        mla.attend = lambda q, k, v, mask: FlashSaves.apply(q, k, v, mask, mla.scale)
    for p in layer.parameters():
        p.requires_grad_(True)
    store = CountingStore(act.offload)
    apply_activation_memory(layer, act, "cpu", store=store)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(1, tokens, cfg.hidden_size, generator=gen).to(dtype).requires_grad_(True)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(tokens).unsqueeze(0))
    mask = DocMask(torch.zeros(1, tokens, dtype=torch.long), "sdpa")
    out = layer(h, cos.to(dtype), sin.to(dtype), mask)
    result = {"device_bytes": store.device_bytes, "host_bytes": store.host_bytes}
    del out, layer
    store.clear()
    gc.collect()
    return result


def per_token_table(cfg: ModelConfig, tokens: list[int], dtype: torch.dtype,
                    settings: dict[str, ActivationConfig] = SETTINGS,
                    attention: str = "sdpa") -> dict[str, dict]:
    """Per setting: bytes per token at each length, and the parts that do not grow with the
    sequence (per_token) and that do (per_token_per_seq: the sdpa attention probabilities),
    fitted from the first and last length."""
    weights = layer_weights(cfg, dtype)
    table = {}
    for name, act in settings.items():
        t0 = time.perf_counter()
        rows = {n: saved_bytes(cfg, weights, act, n, dtype, attention) for n in tokens}
        entry = {"by_tokens": {str(n): r for n, r in rows.items()},
                 "seconds": round(time.perf_counter() - t0, 2)}
        for kind in ("device_bytes", "host_bytes"):
            per = [rows[n][kind] / n for n in tokens]
            slope = (per[-1] - per[0]) / (tokens[-1] - tokens[0]) if len(tokens) > 1 else 0.0
            entry[f"{kind}_per_token"] = per[0] - slope * tokens[0]
            entry[f"{kind}_per_token_per_seq"] = slope
        table[name] = entry
    del weights
    gc.collect()
    return table

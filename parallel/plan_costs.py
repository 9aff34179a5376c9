"""What one token costs a layout, counted from the real modules: the bytes autograd saves per
token of each layer kind (a real forward of one layer at the model's full width, through the
trainer's wrappers and train/model/activation_probe.py's counting store), of the last stage's
chunked loss and per patch of the vision encoder; and the FLOPs per token of each layer kind
(train/model/flops.py's terms, split by where they run), with recomputation's extra forward.
parallel/plan.py multiplies them out per pipeline position and schedule.
"""

from __future__ import annotations

import dataclasses
import functools
import gc

import torch

from train.config import ActivationConfig, ModelConfig
from train.model import activation_probe, flops
from train.model.lm import DecoderLayer

# --------------------------------------------------------------------------------------------
# Activations: saved bytes per token of each layer kind, measured on a real forward
# --------------------------------------------------------------------------------------------


# Probe lengths per attention core: hundreds of tokens (the CPU sdpa path picks its kernel by
# size, and a few dozen tokens miss a small part that grows with the length).
PROBE_TOKENS = {"flash": (128, 256), "sdpa": (128, 256)}


def memoise_by_repr(fn):
    """Memoise on the arguments' reprs (the config dataclasses are not hashable)."""
    memo: dict[str, object] = {}

    @functools.wraps(fn)
    def wrapped(*args):
        key = repr(args)
        if key not in memo:
            memo[key] = fn(*args)
        return memo[key]

    return wrapped


@memoise_by_repr
def _layer_weights(cfg: ModelConfig, layer_id: int, dtype: torch.dtype) -> dict:
    """Random weights for one decoder layer. The saved bytes depend on the values a little
    (zero weights save less than trained-like ones at hundreds of tokens), so the probe uses
    train/model/activation_probe.py's initialisation; a dense layer is filled the same way."""
    am = activation_probe
    if layer_id >= cfg.first_k_dense:
        return am.layer_weights(cfg, dtype)
    with torch.device("meta"):
        layer = DecoderLayer(cfg, layer_id)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, t in layer.state_dict().items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(t.shape, dtype=dtype)
        else:
            out[name] = torch.empty(t.shape, dtype=dtype).normal_(0.0, cfg.init_std, generator=gen)
    return out


@memoise_by_repr
def layer_saved_per_token(model: ModelConfig, act: ActivationConfig, kind: str, attention: str,
                          dtype: str) -> dict[str, float]:
    """Bytes autograd keeps per token for one decoder layer of `kind` ("dense" or "moe") at
    model's width under `act`: {"device", "device_per_seq", "host", "none_device",
    "none_device_per_seq"} (per_seq: the part that grows with the sequence, sdpa only; none_*:
    the same layer without any setting, which full recomputation rebuilds in backward).

    A real forward of one layer on PROBE_TOKENS[attention] tokens, every saved tensor counted once
    (train/model/activation_probe.py's CountingStore through apply_activation_memory). A MoE layer
    is probed with top-k local experts: each token copy is then processed here, as the k copies
    of a rank's tokens are on average under EP; the router's [tokens, experts] scores are the
    only part that depends on the expert count (a few hundred bytes per token at 24 experts)."""
    am = activation_probe
    from train.model.activations import apply_activation_memory
    from train.model.attention import DocMask
    from train.model.rope import RotaryEmbedding

    torch_dtype = getattr(torch, dtype)
    k = model.num_experts_per_tok
    if kind == "moe":
        cfg = dataclasses.replace(am.moe_layer_config(model, k), attention_backend="sdpa")
        layer_id = cfg.first_k_dense
    else:
        cfg = dataclasses.replace(model, first_k_dense=1, num_layers=1, attention_backend="sdpa")
        layer_id = 0

    weights = _layer_weights(cfg, layer_id, torch_dtype)

    def measure(a: ActivationConfig, tokens: int) -> tuple[int, int]:
        with torch.device("meta"):
            layer = DecoderLayer(cfg, layer_id)
        layer.load_state_dict(weights, assign=True)
        for q in layer.parameters():
            q.requires_grad_(True)
        if attention == "flash":
            mla = layer.attn
            mla.attend = lambda q_, k_, v_, mask: am.FlashSaves.apply(q_, k_, v_, mask, mla.scale)
        store = am.CountingStore(a.offload)
        apply_activation_memory(layer, a, "cpu", store=store)
        gen = torch.Generator().manual_seed(1)
        h = torch.randn(1, tokens, cfg.hidden_size, generator=gen).to(torch_dtype)
        h.requires_grad_(True)
        cos, sin = RotaryEmbedding(cfg)(torch.arange(tokens).unsqueeze(0))
        mask = DocMask(torch.zeros(1, tokens, dtype=torch.long), "sdpa")
        out = layer(h, cos.to(torch_dtype), sin.to(torch_dtype), mask)
        result = (store.device_bytes, store.host_bytes)
        del out, layer
        store.clear()
        gc.collect()
        return result

    def fit(a: ActivationConfig) -> tuple[float, float, float, float]:
        """bytes(n) = a*n + b*n^2 (b: the sdpa probabilities); two lengths give a and b, for
        the device and for the host part."""
        (n0, (d0, h0)), (n1, (d1, h1)) = ((n, measure(a, n)) for n in PROBE_TOKENS[attention])
        out = []
        for x0, x1 in ((d0, d1), (h0, h1)):
            if attention == "flash":  # nothing grows with the length: bytes per token at n1
                out += [x1 / n1, 0.0]  # (a fitted slope would only carry routing noise)
                continue
            b = (x1 / n1 - x0 / n0) / (n1 - n0)
            out += [x0 / n0 - b * n0, b]
        return tuple(out)

    dev, dev_seq, host, host_seq = fit(act)
    base = ActivationConfig(loss_chunk_tokens=act.loss_chunk_tokens)
    if act != base:
        none = layer_saved_per_token(model, base, kind, attention, dtype)
        none_dev, none_seq = none["device"], none["device_per_seq"]
    else:
        none_dev, none_seq = dev, dev_seq
    return {"device": dev, "device_per_seq": dev_seq, "host": host, "host_per_seq": host_seq,
            "none_device": none_dev, "none_device_per_seq": none_seq}


@memoise_by_repr
def loss_saved_per_token(hidden: int, dtype: str) -> float:
    """Bytes the last chunk's final norm and chunked loss keep per token (the head's weight is
    a parameter, so the vocabulary does not enter): measured on 256 tokens."""
    am = activation_probe
    from torch.autograd.graph import saved_tensors_hooks

    from train.model.lm import lm_head_loss_sum
    from train.model.norm import RMSNorm

    torch_dtype, tokens, vocab = getattr(torch, dtype), 256, 256
    norm = RMSNorm(hidden).to(torch_dtype)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(torch_dtype)
    params = {q.untyped_storage().data_ptr() for q in [*norm.parameters(), *head.parameters()]}
    store = am.CountingStore(False)

    def pack(t):
        return t if t.untyped_storage().data_ptr() in params else store.pack(t)

    x = torch.randn(1, tokens, hidden).to(torch_dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens))
    with saved_tensors_hooks(pack, lambda t: t):
        out = lm_head_loss_sum(norm(x), head.weight, labels, torch.ones_like(labels).bool(), 64)
    n = store.device_bytes
    del out
    store.clear()
    return n / tokens


@memoise_by_repr
def vision_saved_per_patch(vision, lm_hidden: int, dtype: str) -> float:
    """Bytes the vision encoder keeps per patch when its forward runs with autograd (DEP's
    recompute), measured on a 1- and a 2-layer tower (the layers are alike) and scaled to
    vision.num_layers; one 8x8-patch image, so the per-image attention term is small."""
    am = activation_probe
    from torch.autograd.graph import saved_tensors_hooks

    from train.model.vision import VisionTower

    torch_dtype = getattr(torch, dtype)

    def measure(layers: int) -> int:
        cfg = dataclasses.replace(vision, num_layers=layers)
        tower = VisionTower(cfg, lm_hidden).to(torch_dtype)
        grid = torch.tensor([[1, 8, 8]])
        patches = torch.randn(64, cfg.in_channels * cfg.patch_size ** 2).to(torch_dtype)
        store = am.CountingStore(False)
        params = {q.untyped_storage().data_ptr() for q in tower.parameters()}

        def pack(t):
            return t if t.untyped_storage().data_ptr() in params else store.pack(t)

        with saved_tensors_hooks(pack, lambda t: t):
            out = tower(patches, grid)
        n = store.device_bytes
        del out, tower
        store.clear()
        return n

    one, two = measure(1), measure(2)
    per_layer = two - one
    return (one - per_layer + per_layer * vision.num_layers) / 64


# --------------------------------------------------------------------------------------------
# FLOPs per layer (train/model/flops.py's terms, split by where they run)
# --------------------------------------------------------------------------------------------


def layer_training_flops_per_token(m: ModelConfig, seq_len: int, dense: bool) -> float:
    h = m.hidden_size
    mlp = 3 * h * m.intermediate_size if dense else (
        m.n_routed_experts * h
        + 3 * h * m.moe_intermediate_size * (m.n_shared_experts + m.num_experts_per_tok))
    return 6 * (flops.mla_matmul_params(m) + mlp) + flops.attention_flops_per_token(m, seq_len) \
        / m.num_layers


def recompute_flops_per_token(m: ModelConfig, act: ActivationConfig, dense: bool,
                              seq_len: int) -> float:
    """Extra forward FLOPs per token the backward spends recomputing (matmuls only)."""
    if act.recompute == "full":
        return layer_training_flops_per_token(m, seq_len, dense) / 3
    if act.recompute == "selective":
        heads, qk = m.num_heads, m.qk_nope_head_dim + m.qk_rope_head_dim
        up = 2 * ((m.q_lora_rank or m.hidden_size) * heads * qk
                  + m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim))
        down = (2 * m.hidden_size * m.moe_intermediate_size * m.num_experts_per_tok
                if act.recompute_moe_down and not dense else 0)
        return up + down
    return 0.0


def vision_flops_per_patch(v) -> float:
    """Forward FLOPs per patch of the encoder's blocks (matmuls; attention within an item is
    small next to them at native-resolution sizes)."""
    h = v.hidden_size
    return 2 * v.num_layers * (4 * h * h + 2 * h * v.intermediate_size)

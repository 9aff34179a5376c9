"""The Kimi K2.5 model: MoE decoder (lm.py and friends) + MoonViT-3D encoder (vision.py).

`build_lm(model_cfg)` builds the text model, `build_model(cfg)` the whole KimiK25 (both work
under `torch.device("meta")`); `init_weights(model, seed)` fills every parameter
deterministically, also after `to_empty()` of a meta model.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from train.config import Config, ModelConfig
from train.model.lm import DecoderLM
from train.model.moe import GroupedExperts, Router
from train.model.norm import RMSNorm


def build_lm(cfg: ModelConfig) -> DecoderLM:
    return DecoderLM(cfg)


def build_model(cfg: Config):
    """The whole model (KimiK25, in kimi.py): the language model plus the vision tower."""
    from train.model.kimi import KimiK25

    return KimiK25(cfg)


def _generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator seeded from (seed, key) by a stable hash, never Python's hash()."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _normal_(param: torch.Tensor, std: float, gen: torch.Generator) -> None:
    values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    param.copy_(values)


def _init_std(model: nn.Module) -> float:
    for m in model.modules():
        if isinstance(m, DecoderLM):
            return m.cfg.init_std
    return 0.02


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, *, prefix: str = "",
                 std: float | None = None) -> None:
    """normal(0, init_std) for matrices and embeddings, ones for norm weights, zeros for biases
    and the router's selection bias.

    Every parameter draws from its own generator keyed by (seed, qualified name), and each
    routed expert by (seed, name, global expert index): a model with pieces removed (pipeline
    stages) or experts sliced (expert parallelism, `GroupedExperts.first_expert`) gets exactly
    the values those pieces have in the whole model. A piece initialised on its own passes
    its name in the whole model as `prefix` (the vision tower alone: "vision.") and the
    model's `init_std` as `std` (otherwise taken from the DecoderLM inside `model`, else 0.02).
    """
    std = _init_std(model) if std is None else std
    for mod_name, module in model.named_modules():
        mod_prefix = prefix + (f"{mod_name}." if mod_name else "")
        for pname, param in module.named_parameters(recurse=False):
            name = mod_prefix + pname
            if isinstance(module, (RMSNorm, nn.LayerNorm)) and pname == "weight":
                param.fill_(1.0)
            elif pname == "bias" or pname.endswith("_bias"):
                param.zero_()
            elif isinstance(module, GroupedExperts):
                for e in range(param.shape[0]):
                    _normal_(param[e], std, _generator(seed, f"{name}[{module.first_expert + e}]"))
            else:
                _normal_(param, std, _generator(seed, name))
        if isinstance(module, Router):
            module.e_score_correction_bias.zero_()


__all__ = ["DecoderLM", "build_lm", "build_model", "init_weights"]

"""MuonClip: Muon + AdamW (muon.py), QK-Clip (qk_clip.py), LR schedule (schedule.py) and the
global grad-norm clip (grad_norm.py)."""

from train.optim.grad_norm import clip_grad_norm_, global_grad_norm
from train.optim.muon import (MuonClip, build_optimizer, newton_schulz5, optimizer_for,
                              param_groups, uses_muon)
from train.optim.qk_clip import QKClip, QKClipStats, qk_clip_
from train.optim.schedule import lr_multiplier, set_lr

__all__ = ["MuonClip", "QKClip", "QKClipStats", "build_optimizer", "clip_grad_norm_",
           "global_grad_norm", "lr_multiplier", "newton_schulz5", "optimizer_for",
           "param_groups", "qk_clip_", "set_lr", "uses_muon"]

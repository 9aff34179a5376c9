"""MuonClip: Muon + AdamW (muon.py), QK-Clip (qk_clip.py), LR schedule and grad clipping."""

from train.optim.muon import MuonClip, build_optimizer, newton_schulz5, param_groups, uses_muon

__all__ = ["MuonClip", "build_optimizer", "newton_schulz5", "param_groups", "uses_muon"]

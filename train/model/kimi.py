"""Kimi K2.5: the MoE decoder with the MoonViT-3D tower feeding its image/video placeholders.

Fusion: the tower turns every image / video chunk into (h/m)*(w/m) LM-width rows; the decoder
embeds the text tokens and writes those rows, in order, over the placeholder positions
(`image_token_id` / `video_token_id`) taken row-major over the batch. So `grid_thw` must list
the items in the order their placeholder runs appear in `input_ids`.

Pipeline and DEP runtimes use the two pieces separately (`vision` on every rank, `lm` split into
stages, vision embeddings handed to stage 0); `forward` here is the plain single-process path.
"""

from __future__ import annotations

import torch
from torch import nn

from train.config import Config
from train.model.lm import DecoderLM
from train.model.vision import VisionTower


class KimiK25(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.lm = DecoderLM(cfg.model)
        self.vision: VisionTower | None = (
            VisionTower(cfg.vision, cfg.model.hidden_size) if cfg.vision.enabled else None)

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor, doc_ids: torch.Tensor,
                pixel_patches: torch.Tensor | None = None,
                grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids/position_ids/doc_ids [B, S]; pixel_patches [N, C*p*p] with grid_thw [M, 3]
        (items in placeholder order) or both None. Returns logits [B, S, V]."""
        vision_embeds = None
        if (pixel_patches is None) != (grid_thw is None):
            raise ValueError("pixel_patches and grid_thw must be given together")
        if pixel_patches is not None:
            if self.vision is None:
                raise ValueError("pixel_patches given but the model has no vision tower "
                                 "(vision.enabled = false)")
            vision_embeds = self.vision(pixel_patches, grid_thw)
        return self.lm(input_ids, position_ids=position_ids, doc_ids=doc_ids,
                       vision_embeds=vision_embeds)

"""The packed batch one data-parallel replica trains on per step, and its micro-batch split.

Fields (the data loader produces them; every pipeline rank of a replica gets the same batch):
  input_ids, position_ids, doc_ids, labels: [B, S] long; loss_mask: [B, S] bool/int
  pixel_patches: [N, C*p*p] float and grid_thw: [M, 3] long, or both absent (text only).
  token_category: [B, S] long, optional: what per-category losses are summed by (-1: none).
Vision items are listed in the order their placeholder runs appear in input_ids (row-major), each
item fills (h/merge)*(w/merge) placeholder positions of one row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

TEXT_FIELDS = ("input_ids", "position_ids", "doc_ids", "labels", "loss_mask")


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    items: range  # indices of this micro-batch's vision items in the replica's grid_thw
    pixel_patches: torch.Tensor | None = None
    grid_thw: torch.Tensor | None = None
    token_category: torch.Tensor | None = None

    @property
    def target(self) -> torch.Tensor:
        """[B, S, 2] labels and loss mask, the pipeline loss target; [B, S, 3] with the token
        category as the third column when the batch has one."""
        cols = [self.labels.long(), self.loss_mask.long()]
        if self.token_category is not None:
            cols.append(self.token_category.long())
        return torch.stack(cols, dim=-1)


def item_patches(grid_thw: torch.Tensor | None) -> list[int]:
    if grid_thw is None:
        return []
    return [int(t * h * w) for t, h, w in grid_thw.tolist()]


def item_tokens(grid_thw: torch.Tensor | None, merge_size: int) -> list[int]:
    if grid_thw is None:
        return []
    return [int((h // merge_size) * (w // merge_size)) for _, h, w in grid_thw.tolist()]


def check_batch(batch: Mapping[str, torch.Tensor | None]) -> None:
    for name in TEXT_FIELDS:
        if name not in batch or batch[name] is None:
            raise ValueError(f"batch field {name!r} is missing")
    shape = tuple(batch["input_ids"].shape)
    for name in TEXT_FIELDS + ("token_category",):
        if batch.get(name) is not None and tuple(batch[name].shape) != shape:
            raise ValueError(f"batch field {name!r} has shape {tuple(batch[name].shape)}, "
                             f"input_ids has {shape}")
    if (batch.get("pixel_patches") is None) != (batch.get("grid_thw") is None):
        raise ValueError("batch fields 'pixel_patches' and 'grid_thw' must be given together")


def split_microbatches(batch: Mapping[str, torch.Tensor | None], n: int, *, image_token_id: int,
                       video_token_id: int, merge_size: int) -> list[MicroBatch]:
    """Cut a replica's batch into n micro-batches of B/n rows, each with its own vision items."""
    check_batch(batch)
    rows = batch["input_ids"].shape[0]
    if rows % n:
        raise ValueError(f"batch of {rows} rows cannot be split into {n} micro-batches")
    per = rows // n
    grid = batch.get("grid_thw")
    pixels = batch.get("pixel_patches")
    tokens = item_tokens(grid, merge_size)
    patches = item_patches(grid)
    ids = batch["input_ids"]
    placeholders = ((ids == image_token_id) | (ids == video_token_id)).sum(dim=1).tolist()
    if sum(placeholders) != sum(tokens):
        raise ValueError(f"batch has {sum(placeholders)} placeholder tokens but its grid_thw "
                         f"items need {sum(tokens)}")
    out, item, patch = [], 0, 0
    for m in range(n):
        rs = slice(m * per, (m + 1) * per)
        want = sum(placeholders[rs])
        first, got = item, 0
        while got < want:
            got += tokens[item]
            item += 1
        if got != want:
            raise ValueError(f"vision item {item - 1} crosses the boundary of micro-batch {m} "
                             "(an item's placeholder run must lie within one row)")
        n_patch = sum(patches[first:item])
        mb = MicroBatch(*(batch[f][rs] for f in TEXT_FIELDS), items=range(first, item))
        if batch.get("token_category") is not None:
            mb.token_category = batch["token_category"][rs]
        if item > first:
            mb.grid_thw = grid[first:item]
            mb.pixel_patches = pixels[patch:patch + n_patch]
        patch += n_patch
        out.append(mb)
    return out

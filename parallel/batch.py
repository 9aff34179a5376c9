"""The packed batch one data-parallel replica trains on per step, and its micro-batch split.

Fields (the data loader produces them):
  position_ids, doc_ids: [B, S] long, on every rank
  input_ids: [B, S] long, needed on pipeline stage 0 only
  labels: [B, S] long; loss_mask: [B, S] bool/int, needed on the last pipeline stage only
  grid_thw: [M, 3] long (absent: text only), on every rank
  vision_spans: [M, 3] (row, first placeholder, count) per item, optional: which row (so which
      micro-batch) holds each item; without it the placeholder runs of input_ids say so
  pixel_patches: [N, C*p*p], this replica's items' patches (the encoder on stage 0, or DEP
      with the whole replica batch), needed on stage 0 without DEP
  pixel_items: [K, 2] (replica, item) and global_items: [M_all, 4] (replica, t, h, w), DEP:
      pixel_patches then holds the items this rank encodes (parallel/dep.py), of any replica
  token_category: [B, S] long, optional: what per-category losses are summed by (-1: none).
Stage-aware reading gives a rank None for what its stage does not need (data/stream.py ReadRole).
Vision items are listed in the order their placeholder runs appear in input_ids (row-major), each
item fills (h/merge)*(w/merge) placeholder positions of one row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

TEXT_FIELDS = ("input_ids", "position_ids", "doc_ids", "labels", "loss_mask")
LAYOUT_FIELDS = ("position_ids", "doc_ids")  # every rank needs these


@dataclass
class MicroBatch:
    input_ids: torch.Tensor | None
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    labels: torch.Tensor | None
    loss_mask: torch.Tensor | None
    items: range  # indices of this micro-batch's vision items in the replica's grid_thw
    pixel_patches: torch.Tensor | None = None
    grid_thw: torch.Tensor | None = None
    token_category: torch.Tensor | None = None

    @property
    def target(self) -> torch.Tensor | None:
        """[B, S, 2] labels and loss mask, the pipeline loss target; [B, S, 3] with the token
        category as the third column when the batch has one; None without labels."""
        if self.labels is None:
            return None
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
    for name in LAYOUT_FIELDS:
        if name not in batch or batch[name] is None:
            raise ValueError(f"batch field {name!r} is missing")
    if (batch.get("labels") is None) != (batch.get("loss_mask") is None):
        raise ValueError("batch fields 'labels' and 'loss_mask' must be given together")
    shape = tuple(batch["position_ids"].shape)
    for name in TEXT_FIELDS + ("token_category",):
        if batch.get(name) is not None and tuple(batch[name].shape) != shape:
            raise ValueError(f"batch field {name!r} has shape {tuple(batch[name].shape)}, "
                             f"position_ids has {shape}")
    if (batch.get("pixel_patches") is not None and batch.get("grid_thw") is None
            and batch.get("global_items") is None):
        raise ValueError("batch field 'pixel_patches' is given without 'grid_thw'")
    if batch.get("vision_spans") is None and batch.get("grid_thw") is not None \
            and batch.get("input_ids") is None:
        raise ValueError("a batch without input_ids needs 'vision_spans' to place its items")


def split_microbatches(batch: Mapping[str, torch.Tensor | None], n: int, *, image_token_id: int,
                       video_token_id: int, merge_size: int) -> list[MicroBatch]:
    """Cut a replica's batch into n micro-batches of B/n rows, each with its own vision items."""
    check_batch(batch)
    rows = batch["position_ids"].shape[0]
    if rows % n:
        raise ValueError(f"batch of {rows} rows cannot be split into {n} micro-batches")
    per = rows // n
    grid = batch.get("grid_thw")
    pixels = batch.get("pixel_patches")
    if batch.get("global_items") is not None:
        pixels = None  # DEP's own items of any replica, not this replica's rows (parallel/dep.py)
    tokens = item_tokens(grid, merge_size)
    patches = item_patches(grid)
    ids, spans = batch.get("input_ids"), batch.get("vision_spans")
    if ids is not None:
        placeholders = ((ids == image_token_id) | (ids == video_token_id)).sum(dim=1).tolist()
    else:  # placeholder counts per row from the items' spans (metadata)
        placeholders = [0] * rows
        for r, _, count in (spans.tolist() if grid is not None else []):
            placeholders[r] += count
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
        mb = MicroBatch(*(None if batch.get(f) is None else batch[f][rs] for f in TEXT_FIELDS),
                        items=range(first, item))
        if batch.get("token_category") is not None:
            mb.token_category = batch["token_category"][rs]
        if item > first:
            mb.grid_thw = grid[first:item]
            if pixels is not None:
                mb.pixel_patches = pixels[patch:patch + n_patch]
        patch += n_patch
        out.append(mb)
    return out

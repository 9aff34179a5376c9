"""The one typed batch the loader yields and the model consumes.

Text side, all [B, S]:
    input_ids     token ids; vision placeholders are the tokenizer's image/video ids, one per LM
                  vision token (a merged 2x2 patch; a video chunk's frames are averaged into it)
    labels        next token of the same document; IGNORE (-100) wherever loss_mask is False
    loss_mask     True where the loss is taken: not on padding, not at a document's last token,
                  not where the label is a vision placeholder or a media_end marker (both are
                  implied by what precedes them). media_begin IS a target: the model learns
                  where media appear.
    position_ids  0, 1, ... restarting in every document piece (and in the padding tail)
    doc_ids       0, 1, ... per document piece within a row; the padding tail has its own id,
                  so attention causal within equal ids never mixes documents or padding
Vision side, items ordered as their placeholder runs appear (row-major):
    pixel_patches [N, 3*p*p] uint8 patch rows (layout of data/vision.py / VisionTower), raw
                  pixel values: data.vision.normalize_patches makes the encoder's float32 input
                  where it is encoded (on the device; a quarter of the bytes to copy there)
    grid_thw      [M, 3] (frames, patch rows, patch cols) per item (an image or a video chunk)
    vision_spans  [M, 3] (row, first placeholder position, placeholder count) per item
Packing / provenance:
    cu_seqlens    [K+1] int32 boundaries of all segments (pieces and padding tails) of the
                  flattened [B*S] batch, for varlen attention kernels
    sample_ids    [P, 7] per document piece: (row, source, shard, member, epoch, start, end);
                  start/end are token offsets in the document
    sequence_ids  [B] global sequence numbers of the rows
    token_category [B, S] where a loss is taken: source * len(ROLES) + role of the target token
                  (source: index in the dataset's manifest; role: ROLES), -1 elsewhere; what
                  the per-modality / per-source losses are summed by
    skipped       [(source name, shard, member, reason)] documents dropped while building this
                  batch (unreadable media): their tokens became padding, counted, deterministic
Stage-aware reading (data/stream.py ReadRole): a rank that does not read a field gets None for
it (input_ids off pipeline stage 0; labels, loss_mask, token_category off the last stage;
pixel_patches where no media is decoded). Under DEP the batch carries the pixels this rank
encodes, of any replica:
    pixel_items   [K, 2] (replica, item index in that replica's grid_thw) of pixel_patches' items
    global_items  [M, 4] (replica, t, h, w) of every item of the global batch, replica-major
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields

import torch

IGNORE = -100
# Roles of a target token within its document: plain text (no media before it), caption (text
# after the document's first image or video), a media_begin marker.
ROLES = ("text", "caption", "marker")
ROLE_TEXT, ROLE_CAPTION, ROLE_MARKER = range(len(ROLES))


@dataclass
class Batch:
    input_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    pixel_patches: torch.Tensor | None = None
    grid_thw: torch.Tensor | None = None
    vision_spans: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None
    token_category: torch.Tensor | None = None
    skipped: list = field(default_factory=list)
    pixel_items: torch.Tensor | None = None
    global_items: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.position_ids.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this batch holds (fields a role did not read are left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "skipped" and getattr(self, f.name) is not None}

    def to(self, device, non_blocking: bool = False) -> "Batch":
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()}
        return Batch(**moved, skipped=list(self.skipped))

    def pin_memory(self) -> "Batch":
        """Host tensors in page-locked memory, for asynchronous copies to the GPU (torch's
        DataLoader calls this with pin_memory=True)."""
        return Batch(**{k: v.pin_memory() for k, v in self.tensors().items()},
                     skipped=list(self.skipped))

    def digest(self) -> str:
        """sha256 over every tensor's dtype, shape and bytes: equal digests = byte-identical batches."""
        h = hashlib.sha256()
        for name, t in self.tensors().items():
            t = t.contiguous().cpu()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        h.update(repr(self.skipped).encode())
        return h.hexdigest()

    def non_padding_tokens(self) -> int:
        """Tokens that belong to a document (the rest of the B*S slots are padding)."""
        return int((self.sample_ids[:, 6] - self.sample_ids[:, 5]).sum()) if len(self.sample_ids) else 0

    def select_rows(self, lo: int, hi: int) -> "Batch":
        """Rows [lo, hi) with their own vision items and patches (e.g. for micro-batches)."""
        if self.global_items is not None:
            raise ValueError("a DEP batch holds the pixels this rank encodes, not its rows': "
                             "it cannot be cut into rows")
        keep = (self.vision_spans[:, 0] >= lo) & (self.vision_spans[:, 0] < hi)
        per_item = self.grid_thw.prod(dim=1)
        starts = torch.cumsum(per_item, 0) - per_item
        patch_rows = [torch.arange(int(s), int(s + n)) for s, n, k in zip(starts, per_item, keep) if k]
        patches = (None if self.pixel_patches is None
                   else self.pixel_patches[torch.cat(patch_rows)] if patch_rows
                   else self.pixel_patches[:0])
        spans = self.vision_spans[keep].clone()
        spans[:, 0] -= lo
        sids = self.sample_ids[(self.sample_ids[:, 0] >= lo) & (self.sample_ids[:, 0] < hi)].clone()
        sids[:, 0] -= lo
        seq = self.position_ids.shape[1]
        bounds = self.cu_seqlens.long()
        inside = bounds[(bounds >= lo * seq) & (bounds <= hi * seq)] - lo * seq
        def rows(t):
            return None if t is None else t[lo:hi]
        return Batch(rows(self.input_ids), rows(self.labels), rows(self.loss_mask),
                     self.position_ids[lo:hi], self.doc_ids[lo:hi], inside.to(torch.int32),
                     patches, self.grid_thw[keep], spans, sids, self.sequence_ids[lo:hi],
                     rows(self.token_category), [s for s in self.skipped])

    def split(self, n: int) -> list["Batch"]:
        """n equal micro-batches of rows (n must divide the row count)."""
        if n <= 0 or self.rows % n:
            raise ValueError(f"cannot split {self.rows} rows into {n} equal micro-batches")
        step = self.rows // n
        return [self.select_rows(i * step, (i + 1) * step) for i in range(n)]

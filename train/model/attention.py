"""The one attention interface of the text model: causal attention inside each packed document.

`DocMask` describes which pairs may attend (key position <= query position and the same doc
id); it is built once per forward and shared by every layer. Two backends compute the same
numbers:
- "sdpa": `scaled_dot_product_attention` with a dense boolean mask [B, 1, S, S] (CPU default);
- "flex": `flex_attention` with a block-sparse mask (compiled on CUDA, where it skips fully
  masked blocks; eager on CPU, used there only to test it against sdpa).
"auto" picks flex on CUDA when it is available, sdpa otherwise.

`max_logits` gives, per head, the exact maximum pre-softmax logit over allowed pairs (QK-Clip
needs it), computed in query chunks so memory stays O(chunk * S) instead of O(S^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # flex_attention ships with torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    flex_attention = create_block_mask = None

BACKENDS = ("auto", "sdpa", "flex")
_compiled_flex = None


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"model.attention_backend={backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        return "flex" if (device.type == "cuda" and flex_attention is not None) else "sdpa"
    if backend == "flex" and flex_attention is None:
        raise ValueError("model.attention_backend='flex' but this torch has no flex_attention")
    return backend


def _flex(device: torch.device):
    """flex_attention compiled on CUDA (its fast path); eager elsewhere (slow but exact)."""
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class DocMask:
    """Causal, same-document attention pattern for doc_ids [B, S]."""

    def __init__(self, doc_ids: torch.Tensor, backend: str = "auto"):
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be [batch, seq], got shape {tuple(doc_ids.shape)}")
        self.doc_ids = doc_ids
        self.backend = resolve_backend(backend, doc_ids.device)
        self._dense: torch.Tensor | None = None
        self._block = None

    def dense(self, rows: slice | None = None) -> torch.Tensor:
        """Boolean [B, 1, S_q, S] (True = may attend); rows selects a range of query positions."""
        if rows is None and self._dense is not None:
            return self._dense
        seq = self.doc_ids.shape[1]
        q_pos = torch.arange(seq, device=self.doc_ids.device)
        q_doc = self.doc_ids
        if rows is not None:
            q_pos, q_doc = q_pos[rows], q_doc[:, rows]
        k_pos = torch.arange(seq, device=self.doc_ids.device)
        allowed = (q_pos[:, None] >= k_pos[None, :]) & (q_doc[:, :, None] == self.doc_ids[:, None, :])
        allowed = allowed[:, None]
        if rows is None:
            self._dense = allowed
        return allowed

    def block(self):
        if self._block is None:
            doc = self.doc_ids

            def same_doc_causal(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

            batch, seq = doc.shape
            # Compiled mask construction on CUDA avoids materialising the S x S mask.
            self._block = create_block_mask(same_doc_causal, batch, None, seq, seq,
                                            device=doc.device, _compile=doc.is_cuda)
        return self._block


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocMask,
              scale: float) -> torch.Tensor:
    """q, k [B, H, S, Dqk], v [B, H, S, Dv] -> [B, H, S, Dv]."""
    if mask.backend == "flex":
        return _flex(q.device)(q, k, v, block_mask=mask.block(), scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), scale=scale)


@torch.no_grad()
def max_logits(q: torch.Tensor, k: torch.Tensor, mask: DocMask, scale: float,
               max_elements: int = 1 << 24) -> torch.Tensor:
    """Per-head max over batch and allowed pairs of (q . k) * scale, float32 [H].

    Queries are processed in chunks of rows sized so a chunk's logits hold at most
    `max_elements` values; a chunk only needs keys up to its last row (causality).
    """
    batch, heads, seq, _ = q.shape
    rows = max(1, min(seq, max_elements // max(1, batch * heads * seq)))
    out = torch.full((heads,), float("-inf"), dtype=torch.float32, device=q.device)
    for start in range(0, seq, rows):
        end = min(seq, start + rows)
        logits = torch.matmul(q[:, :, start:end].float(), k[:, :, :end].float().transpose(-1, -2))
        logits = logits * scale
        allowed = mask.dense(slice(start, end))[..., :end]
        logits = logits.masked_fill(~allowed, float("-inf"))
        out = torch.maximum(out, logits.amax(dim=(0, 2, 3)))
    return out

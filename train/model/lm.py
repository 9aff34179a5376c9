"""The decoder-only language model (DeepSeek-V3 / Kimi K2 layout) and its loss.

Pieces a pipeline can remove (set to None): `embed`, entries of `layers` (a ModuleDict keyed
"0".."L-1", so names stay stable), `norm` and `head`. The model knows nothing about
parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.config import ModelConfig
from train.model.attention import DocMask
from train.model.mla import MLA
from train.model.moe import MLP, MoE
from train.model.norm import RMSNorm
from train.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: MLP | MoE = (MLP(cfg.hidden_size, cfg.intermediate_size)
                               if layer_id < cfg.first_k_dense else MoE(cfg))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: DocMask) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), cos, sin, mask)
        return h + self.mlp(self.mlp_norm(h))


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head: nn.Linear | None = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.rope = RotaryEmbedding(cfg)
        self.attention_backend = cfg.attention_backend
        # When set, forward stops after the final norm and the loss applies the head
        # (`lm_head_loss_sum`), so whole logits are never materialised.
        self.head_in_loss = False

    def embed_tokens(self, input_ids: torch.Tensor,
                     vision_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with placeholder positions replaced, row-major, by vision_embeds."""
        placeholder = (input_ids == self.cfg.image_token_id) | (input_ids == self.cfg.video_token_id)
        n_placeholders = int(placeholder.sum())
        n_vision = 0 if vision_embeds is None else vision_embeds.shape[0]
        if n_placeholders != n_vision:
            raise ValueError(f"input_ids hold {n_placeholders} image/video placeholder tokens "
                             f"(ids {self.cfg.image_token_id}/{self.cfg.video_token_id}) but "
                             f"{n_vision} vision embeddings were given")
        h = self.embed(input_ids.masked_fill(placeholder, 0))
        if n_vision:
            h = h.masked_scatter(placeholder.unsqueeze(-1), vision_embeds.to(h.dtype))
        return h

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor, doc_ids: torch.Tensor,
                vision_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """x: input_ids [B, S] when `embed` is present, else hidden states [B, S, H].

        Returns logits [B, S, V] when `head` is present (and `head_in_loss` is off), else
        hidden states [B, S, H].
        """
        h = self.embed_tokens(x, vision_embeds) if self.embed is not None else x
        cos, sin = self.rope(position_ids)
        mask = DocMask(doc_ids, self.attention_backend)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        if self.norm is not None:
            h = self.norm(h)
        if self.head is not None and not self.head_in_loss:
            h = self.head(h)
        return h


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor,
                loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 cross-entropy summed over tokens where loss_mask is true, and their count.

    labels [B, S] are the targets already aligned with logits [B, S, V] (next-token shift is
    the data pipeline's job). Returning the sum lets pipelines normalise by a global count.
    """
    mask = loss_mask.bool().reshape(-1)
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                             labels.reshape(-1).masked_fill(~mask, 0), reduction="none")
    return (losses * mask).sum(), mask.sum()


class _ChunkedHeadLoss(torch.autograd.Function):
    """Summed masked cross-entropy of head(hidden), chunk_tokens rows at a time.

    Forward keeps only (hidden, weight, labels, mask); backward recomputes each chunk's logits
    and turns them into the logits' gradient softmax - onehot in place. Per chunk, the numbers
    follow the plain path: the matmul in the working dtype, the softmax in float32, the logits'
    gradient cast back to the working dtype; the head's gradient is summed over chunks in
    float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, chunk_tokens):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = F.linear(hidden[rows], weight).float()
            picked = logits.gather(1, labels[rows, None]).squeeze(1)
            total += ((logits.logsumexp(-1) - picked) * mask[rows]).sum()
        ctx.save_for_backward(hidden, weight, labels, mask)
        ctx.chunk_tokens = chunk_tokens
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels, mask = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if ctx.needs_input_grad[1] else None)
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            grad = F.linear(hidden[rows], weight).float().softmax(-1)
            grad.scatter_add_(1, labels[rows, None],
                              torch.full_like(labels[rows, None], -1, dtype=grad.dtype))
            grad = (grad * (mask[rows] * grad_total)[:, None]).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.t() @ hidden[rows]).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def lm_head_loss_sum(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                     loss_mask: torch.Tensor, chunk_tokens: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`lm_loss_sum(head(hidden), labels, loss_mask)` without whole logits: the head and the
    float32 softmax run chunk_tokens tokens at a time, in forward and again in backward, so at
    most [chunk_tokens, V] float32 logits exist at once. hidden [B, S, H] (after the final
    norm), head_weight [V, H]."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be > 0")
    mask = loss_mask.bool().reshape(-1)
    labels = labels.reshape(-1).masked_fill(~mask, 0)
    total = _ChunkedHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), head_weight, labels,
                                   mask.float(), chunk_tokens)
    return total, mask.sum()


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Doc ids [1, seq_len] from cumulative lengths [0, l0, l0+l1, ..., seq_len] of one row."""
    cu = cu_seqlens.long()
    if cu.numel() < 2 or cu[0] != 0 or cu[-1] != seq_len or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to seq_len={seq_len}, got {cu.tolist()}")
    positions = torch.arange(seq_len, device=cu.device)
    return (torch.searchsorted(cu[1:], positions, right=True)).unsqueeze(0)


def position_ids_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every change of doc id within a row, [B, S]."""
    batch, seq = doc_ids.shape
    idx = torch.arange(seq, device=doc_ids.device).expand(batch, seq)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_pos = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_pos

"""DEP, the decoupled encoder process: the vision encoder's work spread over ALL ranks.

Per step, exactly the three phases of the recipe (Kimi K2.5):

1. `forward(microbatches)`: every rank learns every replica's vision items (an all-gather of
   grid_thw over its DP group), and all compute the same plan (`plan_encoder_work`, by patch
   count over the whole world). Pixels move to the encoding rank: rank (pp a, replica d') gets
   the items it encodes of replica d from rank (a, d), the member of d at its own pipeline
   position, so this all-to-all stays in the DP group. Each rank encodes its items without
   autograd, and a world all-to-all sends the embeddings to pipeline stage 0 of the owning
   replica, which returns them per micro-batch as leaf tensors with requires_grad.
2. The normal PP/EP schedule runs; stage 0 feeds each micro-batch's leaf as `vision_embeds`, and
   a hook on the leaf keeps its gradient (torch.distributed.pipelining resets `.grad` of stage
   inputs after each backward, so `.grad` alone would be lost).
3. `backward()`: stage 0 returns each item's gradient rows to its encoding rank (the reverse
   all-to-all), which re-runs the encoder forward with autograd on the same items and calls
   backward. The encoder's parameter gradients are then summed over the world by ZeRO-1 (the
   encoder is its own shard group over all ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel.batch import MicroBatch, item_patches, item_tokens
from parallel.dep_plan import EncoderPlan, plan_encoder_work
from parallel.mesh import ParallelMesh


def all_gather_rows(rows: torch.Tensor, group, device=None) -> list[torch.Tensor]:
    """All-gather [n_r, k] long tensors of different n_r over group (padded to the max); the
    collectives run on `device` (NCCL takes device tensors only), the results come back on
    the CPU."""
    size = dist.get_world_size(group)
    n = torch.tensor([rows.shape[0]], dtype=torch.long, device=device)
    ns = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(size)]
    dist.all_gather(ns, n, group=group)
    counts = torch.cat(ns).tolist()
    padded = torch.zeros(max(counts), rows.shape[1], dtype=torch.long, device=device)
    padded[:rows.shape[0]] = rows.to(device)
    out = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(out, padded, group=group)
    return [o[:k].cpu() for o, k in zip(out, counts)]


def _exchange(chunks: list[torch.Tensor], recv_rows: list[int], width: int, group,
              dtype: torch.dtype, device) -> list[torch.Tensor]:
    """all_to_all_single of per-peer row blocks [n, width]; returns the blocks received."""
    send = torch.cat(chunks) if chunks else torch.zeros(0, width, dtype=dtype, device=device)
    recv = torch.empty(sum(recv_rows), width, dtype=dtype, device=device)
    dist.all_to_all_single(recv, send.contiguous(), recv_rows, [c.shape[0] for c in chunks],
                           group=group)
    return list(recv.split(recv_rows))


class DecoupledEncoder:
    """Runs the vision tower replicated on every rank, with DEP's balanced plan."""

    def __init__(self, encoder: nn.Module, mesh: ParallelMesh, merge_size: int, hidden_size: int):
        self.encoder = encoder
        self.hidden = hidden_size  # the LM width the encoder's projector emits
        self.mesh = mesh
        self.merge = merge_size
        self.plan: EncoderPlan | None = None
        self._reset()

    def _reset(self) -> None:
        self._items: list[tuple[int, int]] = []  # (replica, item) this rank encodes, in order
        self._pixels: torch.Tensor | None = None
        self._grid: torch.Tensor | None = None
        self._leaf_grads: dict[int, torch.Tensor] = {}
        self._mb_items: list[range] = []
        self._flat: list[tuple[int, int]] = []  # every (replica, item) of the step
        self._owner: dict[tuple[int, int], int] = {}
        self._rows_of: dict[tuple[int, int], int] = {}

    # -- phase 1 ----------------------------------------------------------------------------

    def forward(self, mbs: list[MicroBatch], dtype: torch.dtype) -> list[torch.Tensor | None]:
        """Plan, move pixels, encode without autograd, deliver embeddings. Returns one leaf per
        micro-batch on pipeline stage 0 (None for micro-batches without vision), [] elsewhere."""
        self._reset()
        m = self.mesh
        device = next(self.encoder.parameters()).device
        grids = [mb.grid_thw for mb in mbs if mb.grid_thw is not None]
        local = torch.cat(grids).long().cpu() if grids else torch.zeros(0, 3, dtype=torch.long)
        per_replica = all_gather_rows(local, m.dp_group, device)  # replica d's grid_thw
        patches = [item_patches(g) for g in per_replica]
        tokens = [item_tokens(g, self.merge) for g in per_replica]
        flat = [(d, i) for d in range(m.dp) for i in range(len(patches[d]))]
        self.plan = plan_encoder_work([patches[d][i] for d, i in flat], m.world_size)
        owner = {key: self.plan.owner[k] for k, key in enumerate(flat)}
        self._mb_items = [mb.items for mb in mbs]
        if not flat:
            return [None] * len(mbs) if m.pp_rank == 0 else []

        # Pixels: within the DP group at this pipeline position.
        pixels = [mb.pixel_patches for mb in mbs if mb.pixel_patches is not None]
        width = (pixels[0].shape[1] if pixels else self.encoder.patch_embed.in_features)
        my_pixels = (torch.cat(pixels) if pixels else torch.zeros(0, width)).to(device)
        starts = [0]
        for p in patches[m.dp_rank]:
            starts.append(starts[-1] + p)
        send, recv_rows = [], []
        for peer in range(m.dp):
            dest = m.global_rank(m.pp_rank, peer)
            mine = [i for i in range(len(patches[m.dp_rank])) if owner[m.dp_rank, i] == dest]
            send.append(torch.cat([my_pixels[starts[i]:starts[i + 1]] for i in mine])
                        if mine else my_pixels.new_zeros(0, width))
            recv_rows.append(sum(patches[peer][i] for i in range(len(patches[peer]))
                                 if owner[peer, i] == m.rank))
        got = _exchange(send, recv_rows, width, m.dp_group, my_pixels.dtype, device)
        self._items = [(d, i) for d, i in flat if owner[d, i] == m.rank]
        self._pixels = torch.cat(got) if got else my_pixels.new_zeros(0, width)
        self._grid = (torch.stack([per_replica[d][i] for d, i in self._items]).to(device)
                      if self._items else None)

        with torch.no_grad():
            embeds = self._encode()
        hidden = embeds.shape[1]

        # Embeddings: to stage 0 of each owning replica (world all-to-all).
        rows_of = {(d, i): tokens[d][i] for d, i in flat}
        out_blocks = [[] for _ in range(m.world_size)]
        for (d, i), e in zip(self._items, embeds.split([rows_of[k] for k in self._items])):
            out_blocks[m.global_rank(0, d)].append(e)
        send = [torch.cat(b) if b else embeds.new_zeros(0, hidden) for b in out_blocks]
        recv_rows = [0] * m.world_size
        if m.pp_rank == 0:
            for d, i in flat:
                if d == m.dp_rank:
                    recv_rows[owner[d, i]] += rows_of[d, i]
        got = _exchange(send, recv_rows, hidden, m.world_group, embeds.dtype, device)
        self._rows_of, self._owner, self._flat = rows_of, owner, flat
        if m.pp_rank != 0:
            return []
        # Reassemble in item order: from each source, its items of this replica come in order.
        per_item: dict[int, torch.Tensor] = {}
        for src in range(m.world_size):
            mine = [i for d, i in flat if d == m.dp_rank and owner[d, i] == src]
            for i, e in zip(mine, got[src].split([rows_of[m.dp_rank, i] for i in mine])):
                per_item[i] = e
        leaves = []
        for k, items in enumerate(self._mb_items):
            if len(items) == 0:
                leaves.append(None)
                continue
            leaf = torch.cat([per_item[i] for i in items]).to(dtype).requires_grad_(True)
            leaf.register_hook(self._keep_grad(k))
            leaves.append(leaf)
        return leaves

    def _encode(self) -> torch.Tensor:
        if not self._items:
            return torch.zeros(0, self.hidden, device=self._pixels.device)
        return self.encoder(self._pixels, self._grid)

    def _keep_grad(self, k: int):
        def hook(grad: torch.Tensor) -> None:
            prev = self._leaf_grads.get(k)
            self._leaf_grads[k] = grad.detach().clone() if prev is None else prev + grad
        return hook

    # -- phase 3 ----------------------------------------------------------------------------

    def backward(self) -> None:
        """Return embedding gradients to the encoding ranks; recompute and back-propagate."""
        m = self.mesh
        if not self._flat:
            return
        flat, owner, rows_of = self._flat, self._owner, self._rows_of
        device = next(self.encoder.parameters()).device
        hidden = self.hidden
        send_blocks = [[] for _ in range(m.world_size)]
        if m.pp_rank == 0:
            grads_by_item: dict[int, torch.Tensor] = {}
            for k, items in enumerate(self._mb_items):
                if len(items) == 0:
                    continue
                g = self._leaf_grads.get(k)
                if g is None:  # the leaf reached no loss token: zero gradient
                    g = torch.zeros(sum(rows_of[m.dp_rank, i] for i in items), hidden,
                                    device=device)
                for i, gi in zip(items, g.split([rows_of[m.dp_rank, i] for i in items])):
                    grads_by_item[i] = gi
            for i in sorted(grads_by_item):
                send_blocks[owner[m.dp_rank, i]].append(grads_by_item[i].float())
        send = [torch.cat(b) if b else torch.zeros(0, hidden, device=device) for b in send_blocks]
        recv_rows = [0] * m.world_size
        for d, i in self._items:
            recv_rows[m.global_rank(0, d)] += rows_of[d, i]
        got = _exchange(send, recv_rows, hidden, m.world_group, torch.float32, device)
        if not self._items:
            return
        # From stage 0 of replica d come, in item order, the gradients of d's items I encoded.
        per_source = {src: iter(g.split([rows_of[k] for k in self._items
                                         if m.global_rank(0, k[0]) == src]))
                      for src, g in enumerate(got)}
        grads = torch.cat([next(per_source[m.global_rank(0, d)]) for d, _ in self._items])
        out = self._encode()
        out.backward(grads.to(out.dtype))
        self._leaf_grads = {}

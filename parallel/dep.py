"""DEP, the decoupled encoder process: the vision encoder's work spread over ALL ranks.

Per step, exactly the three phases of the recipe (Kimi K2.5):

1. `forward(microbatches, items)`: every rank knows every vision item of the global batch from
   the data's metadata (`global_items`: the loader plans the whole global batch on every rank),
   and all compute the same plan (`plan_encoder_work`, by patch count over the whole world)
   without talking to each other. Each rank was given the pixels of exactly the items it
   encodes, of any replica (the stage-aware loader reads and decodes them with `EncoderItems`,
   parallel/dep_plan.py; `rank_batch` cuts them from whole replica batches): no pixel moves
   between ranks. Each rank encodes its items without autograd, and a world all-to-all sends
   the embeddings to pipeline stage 0 of the owning replica, which returns them per
   micro-batch as leaf tensors with requires_grad.
2. The normal PP/EP schedule runs; stage 0 feeds each micro-batch's leaf as `vision_embeds`, and
   a hook on the leaf keeps its gradient (torch.distributed.pipelining resets `.grad` of stage
   inputs after each backward, so `.grad` alone would be lost).
3. `backward()`: stage 0 returns each item's gradient rows to its encoding rank (the reverse
   all-to-all), which re-runs the encoder forward with autograd on the same items and calls
   backward. The encoder's parameter gradients are then summed over the world by ZeRO-1 (the
   encoder is its own shard group over all ranks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from parallel.batch import MicroBatch, item_patches, item_tokens
from parallel.dep_plan import EncoderItems, EncoderPlan, plan_encoder_work
from parallel.mesh import ParallelMesh


def global_items(per_replica_grids: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """[M, 4] (replica, t, h, w) of every vision item of the global batch, replica-major."""
    rows = [torch.cat([torch.full((len(g), 1), d, dtype=torch.long), g.long().cpu()], 1)
            for d, g in enumerate(per_replica_grids) if g is not None and len(g)]
    return torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.long)


def rank_batch(per_replica: Sequence[Mapping], mesh: ParallelMesh) -> dict:
    """This rank's DEP batch from every replica's whole batch: its replica's batch, with
    pixel_patches replaced by the patches of the items this rank encodes (of any replica) and
    their pixel_items and the step's global_items. The stage-aware loader builds the same from
    metadata, reading only those pixels (data/stream.py ReadRole with EncoderItems)."""
    grids = [b.get("grid_thw") for b in per_replica]
    mine = EncoderItems(mesh.rank, mesh.world_size)([item_patches(g) for g in grids])
    parts = []
    for d, i in mine:
        per = item_patches(grids[d])
        start = sum(per[:i])
        parts.append(per_replica[d]["pixel_patches"][start:start + per[i]])
    width = next((b["pixel_patches"].shape[1] for b in per_replica
                  if b.get("pixel_patches") is not None), 0)
    pixels = torch.cat(parts) if parts else torch.zeros(0, width)
    return {**per_replica[mesh.dp_rank], "pixel_patches": pixels,
            "pixel_items": torch.tensor(mine, dtype=torch.long).reshape(-1, 2),
            "global_items": global_items(grids)}


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

    def forward(self, mbs: list[MicroBatch], dtype: torch.dtype, items: torch.Tensor | None,
                pixel_items: torch.Tensor | None, pixels: torch.Tensor | None
                ) -> list[torch.Tensor | None]:
        """Plan, encode this rank's items without autograd, deliver embeddings. `items`: the
        batch's global_items [M, 4] (replica, t, h, w), the same on every rank; `pixels` the
        patches of this rank's items, listed in `pixel_items` [K, 2] (replica, item). Returns
        one leaf per micro-batch on pipeline stage 0 (None for micro-batches without vision),
        [] elsewhere."""
        self._reset()
        m = self.mesh
        device = next(self.encoder.parameters()).device
        items = (items.long().cpu() if items is not None
                 else torch.zeros(0, 4, dtype=torch.long))
        per_replica = [items[items[:, 0] == d, 1:] for d in range(m.dp)]
        grids = [mb.grid_thw for mb in mbs if mb.grid_thw is not None]
        local = torch.cat(grids).long().cpu() if grids else torch.zeros(0, 3, dtype=torch.long)
        if not torch.equal(local, per_replica[m.dp_rank]):
            raise ValueError("the batch's global_items do not list this replica's grid_thw "
                             f"(replica {m.dp_rank}): the ranks would plan different steps")
        patches = [item_patches(g) for g in per_replica]
        tokens = [item_tokens(g, self.merge) for g in per_replica]
        flat = [(d, i) for d in range(m.dp) for i in range(len(patches[d]))]
        self.plan = plan_encoder_work([patches[d][i] for d, i in flat], m.world_size)
        owner = {key: self.plan.owner[k] for k, key in enumerate(flat)}
        self._mb_items = [mb.items for mb in mbs]
        if not flat:
            return [None] * len(mbs) if m.pp_rank == 0 else []

        self._items = [(d, i) for d, i in flat if owner[d, i] == m.rank]
        given = ([] if pixel_items is None else [tuple(x) for x in pixel_items.tolist()])
        if given != self._items:
            raise ValueError(f"rank {m.rank} was given the pixels of items {given[:8]}, the DEP "
                             f"plan has it encode {self._items[:8]} (parallel.dep.rank_batch)")
        width = self.encoder.patch_embed.in_features
        want = sum(patches[d][i] for d, i in self._items)
        if pixels is None or pixels.shape[0] != want:
            raise ValueError(f"rank {m.rank} encodes {want} patches, the batch holds "
                             f"{None if pixels is None else pixels.shape[0]}")
        self._pixels = pixels.to(device) if pixels.shape[0] else torch.zeros(0, width,
                                                                            device=device)
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
        owner, rows_of = self._owner, self._rows_of
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

"""Tiny model config and synthetic packed batches (text + images + video chunks) for the parallel
tests. The fields are those parallel/batch.py documents (the data loader produces the same)."""

from __future__ import annotations

import torch

from train.config import Config, replace

IMAGE, VIDEO = 3, 4


def tiny_config(**parallel) -> Config:
    p = dict(pp=1, virtual_stages=1, dp=1, ep=1, microbatches=1)
    p.update(parallel)
    return replace(
        Config(),
        model=dict(vocab_size=64, hidden_size=32, num_layers=4, first_k_dense=1,
                   intermediate_size=48, num_heads=2, q_lora_rank=16, kv_lora_rank=16,
                   qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                   num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                   bias_update_rate=0.01, image_token_id=IMAGE, video_token_id=VIDEO,
                   attention_backend="sdpa"),
        vision=dict(patch_size=2, hidden_size=16, num_layers=1, num_heads=2,
                    intermediate_size=32, pos_emb_height=4, pos_emb_width=4, pos_emb_time=4,
                    merge_size=2, frames_per_chunk=4),
        data=dict(seq_len=32, global_batch_size=p["dp"] * p["microbatches"] * 2),
        parallel=p)


def make_batch(rows: int, seq_len: int, seed: int, vision: bool = True, vocab: int = 64,
               patch_dim: int = 12) -> dict:
    """Rows of 1-3 documents; a vision row holds one image (1, 2h, 2w) or video chunk (t, 4, 4)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, seq_len), generator=g)
    doc = torch.zeros(rows, seq_len, dtype=torch.long)
    grids = []
    for r in range(rows):
        cuts = sorted(torch.randint(4, seq_len - 4, (int(torch.randint(0, 3, (1,), generator=g)),),
                                    generator=g).tolist())
        for c in cuts:
            doc[r, c:] += 1
        if vision and torch.rand(1, generator=g).item() < 0.7:
            if torch.rand(1, generator=g).item() < 0.6:
                h, w = (int(torch.randint(1, 3, (1,), generator=g)) * 2 for _ in range(2))
                grid, tok, token_id = (1, h, w), (h // 2) * (w // 2), IMAGE
            else:
                t = int(torch.randint(2, 5, (1,), generator=g))
                grid, tok, token_id = (t, 4, 4), 4, VIDEO
            start = int(torch.randint(1, seq_len - tok - 1, (1,), generator=g))
            ids[r, start:start + tok] = token_id
            grids.append(grid)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    idx = torch.arange(seq_len).expand(rows, seq_len)
    pos = idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values
    labels = torch.roll(ids, -1, dims=1)
    same_doc = torch.zeros_like(starts)
    same_doc[:, :-1] = doc[:, 1:] == doc[:, :-1]
    is_text = (labels != IMAGE) & (labels != VIDEO) & (ids != IMAGE) & (ids != VIDEO)
    loss_mask = same_doc & is_text
    labels = labels.masked_fill(~loss_mask, 0)
    batch = dict(input_ids=ids, position_ids=pos, doc_ids=doc, labels=labels, loss_mask=loss_mask,
                 pixel_patches=None, grid_thw=None)
    if grids:
        grid_thw = torch.tensor(grids, dtype=torch.long)
        n = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
        batch["grid_thw"] = grid_thw
        batch["pixel_patches"] = torch.randn(n, patch_dim, generator=g)
    return batch


def concat_batches(batches: list[dict]) -> dict:
    """The global batch: replicas' batches stacked along rows (vision items in that order)."""
    out = {k: torch.cat([b[k] for b in batches]) for k in
           ("input_ids", "position_ids", "doc_ids", "labels", "loss_mask")}
    with_vision = [b for b in batches if b["grid_thw"] is not None]
    out["grid_thw"] = torch.cat([b["grid_thw"] for b in with_vision]) if with_vision else None
    out["pixel_patches"] = (torch.cat([b["pixel_patches"] for b in with_vision])
                            if with_vision else None)
    return out


def zero1_replica(model, make_optimizer, ep: int, max_grad_norm: float = 0.0):
    """A data-parallel replica of `model` over the whole world with the real ZeRO-1
    (parallel/zero.py): experts sharded over EP = `ep` consecutive ranks (ep 1: none, or the
    world), dense optimizer state over the world, expert state over each shard's replicas."""
    import torch.distributed as dist

    from parallel.expert import is_expert_param, shard_experts
    from parallel.zero import ShardGroup, ZeroOptimizer

    rank, world = dist.get_rank(), dist.get_world_size()
    if ep not in (1, world):
        raise ValueError(f"ep={ep}: this fixture shards experts over 1 rank or all {world}")
    if ep > 1:
        shard_experts(model, dist.group.WORLD, rank, ep)
    singles = [dist.new_group([r]) for r in range(world)]  # expert-data-parallel groups at EP=world
    named = list(model.named_parameters())
    dense = [(n, p) for n, p in named if not (ep > 1 and is_expert_param(n))]
    groups = [ShardGroup(dist.group.WORLD, dense, split_dim0=is_expert_param)]
    if ep > 1:
        groups.append(ShardGroup(singles[rank], [(n, p) for n, p in named if is_expert_param(n)]))
    return ZeroOptimizer(groups, make_optimizer, max_grad_norm=max_grad_norm,
                         norm_group=dist.group.WORLD)


def zero_update(zero):
    """The ZeRO-1 update of the training step (train/step.py) for a test of ZeroOptimizer on its
    own: reduce to owners, norm and clip, the owners' step and broadcast (skipped on a
    non-finite norm), master grads dropped; returns the grad norm before clipping."""
    import torch

    zero.reduce_grads()
    norm = zero.clip_grad_norm()
    if torch.isfinite(norm):
        zero.optimizer_step()
        zero.broadcast()
    zero.zero_grad()
    return norm


def rank_view(cfg, mesh, per_replica: list[dict]) -> dict:
    """This rank's batch of a step from every replica's whole batch, as the stage-aware loader
    gives it (data/stream.py ReadRole): under DEP the pixels of exactly the items it encodes
    (parallel.dep.rank_batch), without DEP pixels on pipeline stage 0 only; input_ids on stage
    0 only, labels, loss_mask and token_category on the last stage only."""
    from parallel.dep import rank_batch

    batch = rank_batch(per_replica, mesh) if cfg.parallel.dep else dict(per_replica[mesh.dp_rank])
    first, last = mesh.pp_rank == 0, mesh.pp_rank == cfg.parallel.pp - 1
    drop = (() if first else ("input_ids",)) + (() if last else ("labels", "loss_mask",
                                                                  "token_category"))
    if not cfg.parallel.dep and not first:
        drop += ("pixel_patches",)
    if batch.get("grid_thw") is not None and batch.get("vision_spans") is None:
        batch["vision_spans"] = vision_spans(batch["input_ids"], cfg.model.image_token_id,
                                             cfg.model.video_token_id,
                                             cfg.vision.merge_size, batch["grid_thw"])
    return {k: (None if k in drop else v) for k, v in batch.items()}


def vision_spans(ids, image_id: int, video_id: int, merge: int, grid_thw) -> "torch.Tensor":
    """[M, 3] (row, first placeholder, count) of each item, from its placeholder runs (each
    item's run is contiguous; adjacent items in a row are cut by their token counts)."""
    import torch

    counts = [(h // merge) * (w // merge) for _, h, w in grid_thw.tolist()]
    spans, k = [], 0
    for r, row in enumerate(((ids == image_id) | (ids == video_id)).tolist()):
        j = 0
        while j < len(row):
            if row[j]:
                spans.append((r, j, counts[k]))
                j += counts[k]
                k += 1
            else:
                j += 1
    return torch.tensor(spans, dtype=torch.long).reshape(-1, 3)

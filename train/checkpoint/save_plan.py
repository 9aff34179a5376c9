"""The global save plan of a checkpoint, and the weights rebuilt from their fp32 masters.

Rank 0 turns every rank's chunk list into a plan: which rank writes which chunk (a replicated
chunk by its least loaded holder), the table of logical tensors, and which weights are not
stored because every chunk of their master has a holder that also holds the weight's rows
(ZeRO-1's owner). That decision is layout only, so a plan can be reused save after save. The
values are checked later, off the training thread: the owner compares its host copy of the
weight rows with the master rounded, bit for bit, and rows that differ are written as chunks
laid over the rebuilt weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from train.checkpoint.storage import Staged, master_key

_FLOATS = ("float64", "float32", "float16", "bfloat16")
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}
_BLOCK = 4 << 20  # elements cast at a time: a small reused buffer instead of a full-size copy


def master_pairs(local: list[tuple]) -> dict[int, tuple[int, int]]:
    """For one rank's chunk list: master chunk index -> (index of the weight chunk on the same
    rank that holds its rows, the first of those rows in that chunk). Layout only: which
    weights can be rebuilt from masters never depends on the values."""
    weights: dict[str, list[int]] = {}
    for j, (key, _, _, dtype, _, _) in enumerate(local):
        if key.startswith("model/") and dtype in _FLOATS:
            weights.setdefault(key, []).append(j)
    out = {}
    for i, (key, offsets, sizes, dtype, _, _) in enumerate(local):
        if not key.startswith("master/") or dtype not in _FLOATS:
            continue
        for j in weights.get("model/" + key.removeprefix("master/"), []):
            w_offsets, w_sizes = local[j][1], local[j][2]
            if len(w_sizes) != len(sizes) or w_sizes[1:] != sizes[1:] \
                    or w_offsets[1:] != offsets[1:]:
                continue
            lo = offsets[0] - w_offsets[0] if sizes else 0
            if sizes and not (0 <= lo and lo + sizes[0] <= w_sizes[0]):
                continue
            out[i] = (j, lo)
            break
    return out


def global_plan(plans: list[list[tuple]]) -> tuple[list[tuple[list[int], list[tuple]]], dict]:
    """Rank 0: from every rank's chunk list, per rank (the chunk indices it writes, its row
    checks (master index, weight index, first row)), and the table of logical tensors (dtype,
    size, chunks), the `from_master` weights and their dtype and size (`weights`)."""
    tensors: dict[str, dict] = {}
    holders: dict[tuple, list[tuple[int, int, int]]] = {}
    for rank, local in enumerate(plans):
        for i, (key, offsets, sizes, dtype, nbytes, stacked) in enumerate(local):
            t = tensors.setdefault(key, {"dtype": dtype, "stacked": stacked, "boxes": {}})
            if t["dtype"] != dtype or t["stacked"] != stacked:
                raise ValueError(f"ranks disagree about the dtype of checkpoint entry {key!r}")
            box = (tuple(offsets), tuple(sizes))
            t["boxes"][box] = None
            holders.setdefault((key, box), []).append((rank, i, nbytes))
    for key, t in tensors.items():
        boxes = sorted(t["boxes"])
        if not t["stacked"]:
            if len(boxes) != 1:
                raise ValueError(f"ranks hold checkpoint entry {key!r} with different shapes")
            t["size"] = list(boxes[0][1])
            continue
        t["size"] = [max(o[0] + z[0] for o, z in boxes), *boxes[0][1][1:]]
        end = 0
        for o, z in boxes:  # the chunks tile [0, E): no gap, no overlap
            if o[0] != end or list(z[1:]) != t["size"][1:]:
                raise ValueError(f"the ranks' chunks of {key!r} do not tile it: {boxes}")
            end = o[0] + z[0]
    pairs = [master_pairs(local) for local in plans]
    from_master, checked = [], set()  # checked: master keys whose writers check weight rows
    for key, t in tensors.items():
        mkey = master_key(key)
        if not key.startswith("model/") or mkey not in tensors or t["dtype"] not in _FLOATS:
            continue
        m = tensors[mkey]
        if m["size"] != t["size"] or m["dtype"] not in _FLOATS:
            continue
        # every master chunk has a holder that holds the weight's rows too (ZeRO-1's owner)
        if all(any(i in pairs[r] for r, i, _ in holders[(mkey, box)]) for box in m["boxes"]):
            from_master.append(key)
            checked.add(mkey)
    picks: list[list[int]] = [[] for _ in plans]
    checks: list[list[tuple[int, int, int]]] = [[] for _ in plans]
    load = [0] * len(plans)
    order = sorted(holders.items(), key=lambda kv: (-kv[1][0][2], kv[0][0], kv[0][1]))
    for (key, _), hs in order:
        if key in from_master:
            continue
        if key in checked:  # written by a holder that can check the weight's rows
            hs = [h for h in hs if h[1] in pairs[h[0]]]
        rank, i, nbytes = min(hs, key=lambda h: (load[h[0]], h[0]))  # replicas: least loaded
        picks[rank].append(i)
        load[rank] += nbytes
        if key in checked:
            checks[rank].append((i, *pairs[rank][i]))
    table = {k: {"dtype": t["dtype"], "size": t["size"],
                 "chunks": [{"offsets": list(o), "sizes": list(z)} for o, z in sorted(t["boxes"])]}
             for k, t in tensors.items() if k not in from_master}
    weights = {k: {"dtype": tensors[k]["dtype"], "size": tensors[k]["size"]} for k in from_master}
    return ([(sorted(p), sorted(c)) for p, c in zip(picks, checks)],
            {"tensors": table, "from_master": from_master, "weights": weights})


@dataclass
class RowCheck:
    """Host copies of one master chunk and of the weight rows it covers, compared in the
    background: rows that are not exactly the master rounded are written as chunks of the
    weight (`key`, at the master chunk's `offsets`)."""

    key: str
    offsets: tuple[int, ...]
    master: torch.Tensor
    weight: torch.Tensor


def differing_rows(master: torch.Tensor, weight: torch.Tensor) -> list[tuple[int, int]]:
    """[a, b) runs of rows (dim 0) where weight is not bit for bit master.to(weight.dtype)
    (bits, not ==: -0.0 and NaN payloads must come back as they were)."""
    if weight.dim() == 0:
        same = torch.equal(master.to(weight.dtype).view(_BITS[weight.dtype]),
                           weight.view(_BITS[weight.dtype]))
        return [] if same else [(0, 1)]
    if weight.numel() == 0:
        return []
    n, width = weight.shape[0], max(1, weight[0].numel())
    step = max(1, _BLOCK // width)
    bits = _BITS[weight.dtype]
    scratch = torch.empty((min(step, n), *weight.shape[1:]), dtype=weight.dtype)
    differs = torch.zeros(n + 2, dtype=torch.int8)  # padded by one row each side
    for a in range(0, n, step):
        b = min(n, a + step)
        cast = scratch[:b - a]
        cast.copy_(master[a:b])
        differs[a + 1:b + 1] = (cast.view(bits) != weight[a:b].view(bits)).reshape(b - a, -1) \
            .any(1)
    edges = torch.diff(differs)
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def override_chunks(checks: list[RowCheck]) -> list[Staged]:
    """The weight rows that do not round from their masters, as chunks of the weight."""
    out = []
    with torch.no_grad():
        for c in checks:
            for a, b in differing_rows(c.master, c.weight):
                if c.weight.dim() == 0:
                    out.append(Staged(c.key, c.offsets, c.weight))
                else:
                    out.append(Staged(c.key, (c.offsets[0] + a, *c.offsets[1:]), c.weight[a:b]))
    return out


def with_overrides(table: dict, overrides: list[dict]) -> tuple[dict, list[str]]:
    """The stored tensors and `from_master` weights once the ranks' override chunks are known:
    a weight with some rows stored is rebuilt from its master, then those rows are laid over
    it; a weight with all rows stored is an ordinary tensor."""
    tensors, from_master = dict(table["tensors"]), list(table["from_master"])
    chunks: dict[str, list[dict]] = {}
    for o in overrides:
        chunks.setdefault(o["key"], []).append({"offsets": o["offsets"], "sizes": o["sizes"]})
    for key, cs in chunks.items():
        w = table["weights"][key]
        tensors[key] = {"dtype": w["dtype"], "size": w["size"],
                        "chunks": sorted(cs, key=lambda c: c["offsets"])}
        if sum(math.prod(c["sizes"]) for c in cs) == math.prod(w["size"]):
            from_master.remove(key)
    return tensors, from_master

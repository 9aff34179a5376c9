"""Compare the reduced gradient of every parameter, before the optimizer step, with a reference.

Parameters after a step hide which gradient is wrong (and AdamW's and Muon's updates barely
change when a gradient is scaled), so the parallel equivalence tests also compare gradients:

    grads = capture_reduced_grads(rt.zero, rank_pieces(rt))  # in each rank, before training
    ... train; return grads (one dict per step) ...
    assert_grads_match(merge_ranks([g[step] for g in per_rank]), reference_grads[step])

`capture_reduced_grads` wraps `clip_grad_norm` of this ZeroOptimizer instance (from the test, not in the
library): at every step it copies `zero.reduced_grads()`, the owner's summed gradients before
the global-norm clip scales them, under full-model names with expert slices at their global
rows ("fqn@a:b"). Every piece has exactly one owner in the world, so the ranks' dicts merge
without overlap and together cover the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from train.checkpoint.state import _expert_offsets
from train.optim.muon import split_piece_name

Grads = dict[str, Tensor | None]


def capture_reduced_grads(zero, model=None) -> list[Grads]:
    """Record this rank's reduced grads at each zero.clip_grad_norm() (before the clip); returns the list
    that fills, one dict per step. `model`: what the rank holds (a module, or its pieces as
    checkpoints name them, e.g. train.trainer.rank_pieces(rt)), for the experts' offsets; None
    when no expert stack is sharded (rows are then global already)."""
    offsets = _expert_offsets(model) if model is not None else {}
    steps: list[Grads] = []
    clip = zero.clip_grad_norm

    def record_then_clip():
        got: Grads = {}
        for key, g in zero.reduced_grads().items():
            fqn, start = split_piece_name(key)
            if fqn in offsets:  # an expert stack: name its rows in the whole model
                piece = next(p for p in zero.owned if p.key == key)
                a = offsets[fqn] + piece.start
                key = f"{fqn}@{a}:{a + piece.stop - piece.start}"
            got[key] = None if g is None else g.detach().clone()
        steps.append(got)
        return clip()

    zero.clip_grad_norm = record_then_clip
    return steps


def merge_ranks(per_rank: list[Grads]) -> Grads:
    """One dict from every rank's owned pieces (each piece has one owner in the world)."""
    out: Grads = {}
    for rank, grads in enumerate(per_rank):
        for key, g in grads.items():
            if key in out:
                raise AssertionError(f"{key} is owned by two ranks (rank {rank} and another)")
            out[key] = g
    return out


def model_grads(model: nn.Module) -> Grads:
    """The single-process reference: every parameter's .grad by name (copied)."""
    return {n: None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters()}


def assert_grads_match(got: Grads, ref: Grads, *, atol: float, rtol: float = 0.0,
                       context: str = "") -> None:
    """Every reference gradient is covered exactly once (expert rows included) and each piece
    equals its reference within atol + rtol * |ref|; the message names the parameter."""
    where = f"{context}: " if context else ""
    rows: dict[str, list[tuple[int, int]]] = {}
    for key, g in sorted(got.items()):
        fqn, start = split_piece_name(key)
        if fqn not in ref:
            raise AssertionError(f"{where}gradient of {key}, which the reference does not have")
        want = ref[fqn]
        if start is not None:
            stop = int(key.rpartition(":")[2])
            rows.setdefault(fqn, []).append((start, stop))
            want = None if want is None else want[start:stop]
        else:
            rows.setdefault(fqn, []).append((0, -1))
        if (g is None) != (want is None):
            raise AssertionError(f"{where}gradient of {key} is "
                                 f"{'None' if g is None else 'set'} but the reference's is "
                                 f"{'None' if want is None else 'set'}")
        if g is None:
            continue
        if g.shape != want.shape:
            raise AssertionError(f"{where}gradient of {key} has shape {tuple(g.shape)}, the "
                                 f"reference {tuple(want.shape)}")
        diff = (g.float() - want.float()).abs()
        bound = atol + rtol * want.float().abs()
        if bool((diff > bound).any()):
            i = int((diff - bound).argmax())
            raise AssertionError(
                f"{where}gradient of {key} differs from the reference: max |diff| "
                f"{float(diff.max()):.3e} (allowed atol {atol:g} + rtol {rtol:g}*|ref|); at flat "
                f"index {i}: {float(g.reshape(-1)[i]):.6e} vs {float(want.reshape(-1)[i]):.6e}; "
                f"reference max |grad| {float(want.abs().max()):.3e}")
    for fqn, want in ref.items():
        spans = sorted(rows.get(fqn, []))
        if not spans:
            raise AssertionError(f"{where}no rank reported the gradient of {fqn}")
        if spans == [(0, -1)]:
            continue
        n = want.shape[0] if want is not None else None
        edges = [a for a, _ in spans] + [spans[-1][1]]
        if (0, -1) in spans or edges[0] != 0 or any(b != a2 for (_, b), (a2, _)
                                                   in zip(spans, spans[1:])) \
                or (n is not None and edges[-1] != n):
            raise AssertionError(f"{where}the expert rows of {fqn} are covered as {spans}, "
                                 f"not exactly once over [0, {n})")


def assemble(grads: Grads) -> Grads:
    """Expert-row pieces ("fqn@a:b") joined into whole tensors, to serve as a reference (e.g.
    a one-process run's reduced grads against a many-rank run's)."""
    out: Grads = {}
    parts: dict[str, list[tuple[int, Tensor | None]]] = {}
    for key, g in grads.items():
        fqn, start = split_piece_name(key)
        if start is None:
            out[fqn] = g
        else:
            parts.setdefault(fqn, []).append((start, g))
    for fqn, pieces in parts.items():
        pieces.sort(key=lambda x: x[0])
        gs = [g for _, g in pieces]
        out[fqn] = None if all(g is None for g in gs) else torch.cat(gs)
    return out

"""Packing documents into fixed-length sequences inside fixed global windows (metadata only).

A *window* is S consecutive sequences of the global sequence stream (S = data.window_sequences):
window k holds global sequences [k*S, (k+1)*S). It takes units (documents, or pieces of documents
longer than seq_len; see data/catalog.py) from the mixed stream (data/mix.py) in order, the
units deferred by the previous window first. A unit is admitted if its pieces still fit (checked
by placing them best-fit into the window's free space); otherwise it is deferred to the next
window. Once `lookahead` units are held back, or the capacity S*seq_len is used up, the window
closes. The admitted units are then laid out by best-fit-decreasing. A window therefore depends
only on the plan state at its start: the mixer state (a few integers per source) and at most
`lookahead` deferred units.

Units:
- A unit's token layout is known from metadata: its length and its *atoms*, the spans that
  must stay in one sequence (a vision item with its start/end markers).
- A unit longer than seq_len is cut into pieces of at most seq_len tokens, each cut at the
  last position <= seq_len that is not inside an atom (`piece_cuts`; None if impossible).
- Best-fit-decreasing: pieces sorted by length (longest first, ties in stream order), each put in
  the sequence with the least free space that still holds it (ties: lowest sequence number).
  Within a sequence, pieces are laid out in stream order.

Row layout (`pack_rows`): labels are the next token of the same document (also across a cut: the
last token of a piece predicts the first of the next piece), position ids restart at 0 in every
piece, doc ids count the row's pieces from 0 and padding gets the next id of its own.
"""

from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from data.mix import Draw, MixState, TokenMixer

IGNORE = -100  # label where no loss is taken


def piece_cuts(length: int, atoms: tuple[tuple[int, int], ...], seq_len: int,
               max_pieces: int) -> list[tuple[int, int]] | None:
    """Split [0, length) into pieces of <= seq_len tokens without cutting an atom; None if impossible."""
    pieces, start = [], 0
    while length - start > seq_len:
        cut = start + seq_len
        for a, b in atoms:  # move the cut back to the start of an atom it would split
            if a < cut < b:
                cut = a
        if cut <= start:
            return None
        pieces.append((start, cut))
        start = cut
    pieces.append((start, length))
    if len(pieces) > max_pieces or any(b - a > seq_len for a, b in atoms):
        return None
    return pieces


def best_fit_decreasing(lengths: list[int], num_bins: int, capacity: int) -> list[int]:
    """Bin of each item by best-fit-decreasing; -1 for an item that fits in no bin."""
    # longest first, ties in item order (a reversed sort keeps equal items in their order)
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    # bins sorted by (free space, bin), each as the one integer space * num_bins + bin
    free = [capacity * num_bins + b for b in range(num_bins)]
    where = [-1] * len(lengths)
    bisect_left, insort = bisect.bisect_left, bisect.insort
    for i in order:
        n = lengths[i] * num_bins
        slot = bisect_left(free, n)
        if slot == len(free):
            continue
        slot = free.pop(slot)
        where[i] = slot % num_bins
        insort(free, slot - n)
    return where


class Piece(NamedTuple):
    """Tokens [start, end) of the window's unit `doc` (an index into Window.docs)."""

    doc: int
    start: int
    end: int


@dataclass
class PlanState:
    """Where planning stands at a window start: the mixer state and the deferred units."""

    mix: MixState
    carry: list[Draw]

    def copy(self) -> "PlanState":
        return PlanState(self.mix.copy(), list(self.carry))

    def to_dict(self) -> dict:
        return {"mix": self.mix.to_dict(), "carry": [d.to_list() for d in self.carry]}

    @classmethod
    def from_dict(cls, d: dict) -> "PlanState":
        return cls(MixState.from_dict(d["mix"]), [Draw(*map(int, x)) for x in d["carry"]])


@dataclass
class Window:
    index: int
    docs: list[Draw]  # in stream order
    sequences: list[list[Piece]]  # S sequences of pieces in layout order
    start_state: PlanState
    end_state: PlanState

    def tokens(self) -> int:
        return sum(d.tokens for d in self.docs)


class WindowPlanner:
    """Plans windows in order from a mixer; `layout(draw)` gives (length, atoms) of a unit.

    A window takes units in stream order, the deferred ones first: a unit that does not fit the
    remaining token budget is deferred to the next window (at most `lookahead` deferrals are
    held; then the window closes), and units that best-fit-decreasing cannot place are deferred
    too. Planning is sequential, metadata only, and resumable from (k, PlanState at window k's
    start) without replaying earlier windows.
    """

    def __init__(self, mixer: TokenMixer, layout, seq_len: int, window_sequences: int,
                 lookahead: int = 8, batch_sequences: int | None = None):
        if seq_len <= 0 or window_sequences <= 0 or lookahead < 0:
            raise ValueError("seq_len and window_sequences must be > 0, lookahead >= 0")
        if batch_sequences is not None and batch_sequences <= 0:
            raise ValueError(f"batch_sequences must be > 0, got {batch_sequences}")
        self.batch_sequences = batch_sequences
        self.mixer, self.layout, self.lookahead = mixer, layout, lookahead
        self.seq_len, self.num_seqs = seq_len, window_sequences
        self.capacity = seq_len * window_sequences
        self.next_index = 0
        self.next_state = PlanState(mixer.state.copy(), [])

    def seek(self, index: int, state: PlanState) -> None:
        self.next_index, self.next_state = index, state.copy()

    def _pieces(self, draw: Draw) -> list[tuple[int, int]]:
        if draw.tokens <= self.seq_len:  # one piece, whatever the atoms (no layout needed)
            return [(0, draw.tokens)]
        length, atoms = self.layout(draw)
        if length == draw.tokens <= self.seq_len:  # one piece (what piece_cuts gives)
            return [(0, length)]
        cuts = piece_cuts(length, atoms, self.seq_len, self.num_seqs)
        if cuts is None or length != draw.tokens:
            raise ValueError(f"unit {draw} cannot be packed (length {length}); the catalog "
                             "should have left it out")
        return cuts

    def next(self) -> Window:
        start = self.next_state.copy()
        self.mixer.state = start.mix.copy()
        # Online best fit, for admission: sequences sorted by (free space, sequence), each as the
        # one integer space * S + sequence (cheaper to search than pairs, the same order).
        S, seq_len = self.num_seqs, self.seq_len
        free = [seq_len * S + b for b in range(S)]
        docs, carry, cuts, total = [], [], {}, 0
        bisect_left, insort = bisect.bisect_left, bisect.insort

        def admit(d: Draw) -> bool:
            n = d.tokens
            if n <= seq_len:  # the common case, one piece placed in place (as the trial would)
                slot = bisect_left(free, n * S)
                if slot == len(free):
                    return False
                insort(free, free.pop(slot) - n * S)
                docs.append(d)
                cuts[d.index] = [(0, n)]
                return True
            pieces = self._pieces(d)
            trial = list(free)
            for a, b in sorted(pieces, key=lambda p: (p[0] - p[1], p[0])):
                slot = bisect_left(trial, (b - a) * S)
                if slot == len(trial):
                    return False
                insort(trial, trial.pop(slot) - (b - a) * S)
            free[:] = trial
            docs.append(d)
            cuts[d.index] = pieces
            return True

        for d in start.carry:  # deferred units first, oldest first
            if admit(d):
                total += d.tokens
            else:
                carry.append(d)
        draw, capacity, lookahead = self.mixer.next, self.capacity, self.lookahead
        while total < capacity:
            d = draw()
            n = d.tokens
            if n <= seq_len:  # admit's common case inline (this loop runs once per draw)
                slot = bisect_left(free, n * S)
                if slot < len(free):
                    insort(free, free.pop(slot) - n * S)
                    docs.append(d)
                    cuts[d.index] = [(0, n)]
                    total += n
                    continue
            elif admit(d):
                total += n
                continue
            if len(carry) < lookahead:
                carry.append(d)
            else:
                self.mixer.undo(d)  # not drawn after all: the next window draws it
                break
        # The admitted set fits (admission placed it); lay it out by best-fit-decreasing, which
        # almost always places it too, else keep the admission layout.
        docs.sort(key=_stream_index)
        flat = [(i, a, b) for i, d in enumerate(docs) for a, b in cuts[d.index]]
        where = best_fit_decreasing([b - a for _, a, b in flat], self.num_seqs, self.seq_len)
        if -1 in where:
            where = _online_best_fit([b - a for _, a, b in flat], [cuts[d.index] for d in docs],
                                     self.num_seqs, self.seq_len)
        sequences: list[list[Piece]] = [[] for _ in range(self.num_seqs)]
        for (i, a, b), s in zip(flat, where):  # flat is in stream order
            sequences[s].append(Piece(i, a, b))
        if self.batch_sequences is not None and self.batch_sequences < self.num_seqs:
            sequences = self._spread_vision(sequences, docs, cuts)
        window = Window(self.next_index, docs, sequences, start, PlanState(self.mixer.state.copy(), carry))
        self.next_index, self.next_state = self.next_index + 1, window.end_state.copy()
        return window


    def _piece_vision(self, d: Draw, a: int, b: int, pieces: list) -> float:
        """Vision tokens of piece [a, b) of unit d: exact for a one-piece unit, else the unit's
        vision tokens shared out by the atom tokens inside the piece."""
        if len(pieces) == 1 or d.vision == 0:
            return float(d.vision)
        atoms = self.layout(d)[1]
        inside = sum(e - s for s, e in atoms if a <= s and e <= b)
        return d.vision * inside / (sum(e - s for s, e in atoms) or 1)

    def _spread_vision(self, sequences: list[list[Piece]], docs: list[Draw],
                       cuts: dict) -> list[list[Piece]]:
        """Reorder a window's sequences so that each global batch's part of it gets vision tokens
        in proportion to its number of sequences (global batch j is sequences [j*B, (j+1)*B)).

        Sequences go in decreasing vision content (ties: lower number first) to the part with free
        rows whose vision is furthest below its proportional target (ties: the earlier part); each
        part keeps its sequences in their layout order. Greedy by largest item, so every part ends
        within one sequence's vision tokens (<= seq_len) of its target."""
        S, B = self.num_seqs, self.batch_sequences
        first = self.next_index * S
        bounds = sorted({0, S} | {j * B - first for j in range(-(-first // B), (first + S) // B + 1)
                                  if 0 < j * B - first < S})
        parts = list(zip(bounds[:-1], bounds[1:]))
        vision = [sum(self._piece_vision(docs[p.doc], p.start, p.end, cuts[docs[p.doc].index])
                      for p in seq) for seq in sequences]
        total = sum(vision)
        got = [0.0] * len(parts)
        members: list[list[int]] = [[] for _ in parts]
        for i in sorted(range(S), key=lambda i: (-vision[i], i)):
            best, best_gap = None, None
            for k, (lo, hi) in enumerate(parts):
                if len(members[k]) < hi - lo:
                    gap = total * (hi - lo) / S - got[k]
                    if best_gap is None or gap > best_gap:
                        best, best_gap = k, gap
            members[best].append(i)
            got[best] += vision[i]
        return [sequences[i] for m in members for i in sorted(m)]


_stream_index = operator.attrgetter("index")


def _online_best_fit(lengths: list[int], groups: list[list], num_bins: int, capacity: int) -> list[int]:
    """Best fit unit by unit (each unit's pieces longest first), as admission placed them."""
    free = [(capacity, b) for b in range(num_bins)]
    where, at = [], 0
    for pieces in groups:
        idx = list(range(at, at + len(pieces)))
        out = {}
        for i in sorted(idx, key=lambda i: (-lengths[i], i)):
            space, s = free.pop(bisect.bisect_left(free, (lengths[i], -1)))
            out[i] = s
            bisect.insort(free, (space - lengths[i], s))
        where += [out[i] for i in idx]
        at += len(pieces)
    return where


@dataclass
class Row:
    """Packed sequences as numpy arrays: [seq_len] from pack_row, [rows, seq_len] from pack_rows."""

    input_ids: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    doc_ids: np.ndarray
    seqlens: list[int]  # lengths of the segments (pieces, then padding if any), row after row


def pack_row(pieces: list[tuple[np.ndarray, int, int]], seq_len: int, pad_id: int,
             no_loss_ids: np.ndarray) -> Row:
    """Lay out pieces (document tokens, start, end) into one row; see the module docstring."""
    rows = pack_rows([pieces], seq_len, pad_id, no_loss_ids)
    return Row(rows.input_ids[0], rows.labels[0], rows.loss_mask[0], rows.position_ids[0],
               rows.doc_ids[0], rows.seqlens)


def pack_rows(rows: list[list[tuple[np.ndarray, int, int]]], seq_len: int, pad_id: int,
              no_loss_ids: np.ndarray) -> Row:
    """Lay out each row's pieces (document tokens, start, end) into [len(rows), seq_len] arrays.

    No loss is taken where the label is IGNORE, a padding position, or a token in no_loss_ids
    (vision placeholders and the vision end markers, which are implied by what precedes them).
    The arrays are written in place, once per batch (no per-row arrays to stack afterwards).
    """
    shape = (len(rows), seq_len)
    ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE, dtype=np.int64)
    pos = np.empty(shape, dtype=np.int64)
    doc = np.empty(shape, dtype=np.int64)
    ramp = np.arange(seq_len, dtype=np.int64)
    seqlens: list[int] = []
    for r, pieces in enumerate(rows):
        total = sum(b - a for _, a, b in pieces)
        if total > seq_len:
            raise ValueError(f"pieces hold {total} tokens, more than seq_len={seq_len}")
        row_ids, row_labels, row_pos, row_doc = ids[r], labels[r], pos[r], doc[r]
        at = 0
        for d, (tokens, a, b) in enumerate(pieces):
            n = b - a
            row_ids[at:at + n] = tokens[a:b]
            nxt = tokens[a + 1:b + 1]  # next tokens of the document (one fewer at its end)
            row_labels[at:at + len(nxt)] = nxt
            row_pos[at:at + n] = ramp[:n]
            row_doc[at:at + n] = d
            seqlens.append(n)
            at += n
        if at < seq_len:
            row_doc[at:] = len(pieces)
            row_pos[at:] = ramp[:seq_len - at]
            seqlens.append(seq_len - at)
    no_loss = np.zeros(shape, dtype=bool)
    for t in np.unique(no_loss_ids).tolist():  # a few ids: one compare each beats np.isin's setup
        no_loss |= labels == t
    labels[no_loss] = IGNORE
    return Row(ids, labels, labels != IGNORE, pos, doc, seqlens)

"""Packing documents into fixed-length sequences inside fixed global windows (metadata only).

A *window* is S consecutive sequences of the global sequence stream (S = data.window_sequences):
window k holds global sequences [k*S, (k+1)*S). It takes a contiguous run of documents from the
mixed stream (data/mix.py): as many as fit its token capacity S*seq_len, fewer when
best-fit-decreasing cannot place them all (then the last documents move to the next window). A
window therefore depends only on the mixer state at its start, which is a few integers.

Documents:
- A document's token layout is known from metadata: its length and its *atoms*, the spans that
  must stay in one sequence (a vision item with its start/end markers).
- A document longer than seq_len is cut into pieces of at most seq_len tokens, each cut at the
  last position <= seq_len that is not inside an atom. A document with an atom longer than
  seq_len, or with more pieces than a window has sequences, can never be packed: `piece_cuts`
  returns None and the catalog leaves it out (a counted skip).
- Best-fit-decreasing: pieces sorted by length (longest first, ties in stream order), each put in
  the sequence with the least free space that still holds it (ties: lowest sequence number).
  Within a sequence, pieces are laid out in stream order.

Row layout (`pack_row`): labels are the next token of the same document (also across a cut: the
last token of a piece predicts the first of the next piece), position ids restart at 0 in every
piece, doc ids count the row's pieces from 0 and padding gets the next id of its own.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

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


def best_fit_decreasing(lengths: list[int], num_bins: int, capacity: int) -> list[int] | None:
    """Bin of each item (best-fit-decreasing), or None when some item fits nowhere."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free = [(capacity, b) for b in range(num_bins)]  # sorted by (free space, bin)
    where = [0] * len(lengths)
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            return None
        space, b = free.pop(slot)
        where[i] = b
        bisect.insort(free, (space - lengths[i], b))
    return where


@dataclass(frozen=True)
class Piece:
    """Tokens [start, end) of the window's document `doc` (an index into Window.docs)."""

    doc: int
    start: int
    end: int


@dataclass
class Window:
    index: int
    docs: list[Draw]
    sequences: list[list[Piece]]  # S sequences of pieces in layout order
    start_state: MixState
    end_state: MixState

    def tokens(self) -> int:
        return sum(d.tokens for d in self.docs)


class WindowPlanner:
    """Plans windows in order from a mixer; `layout(draw)` gives (length, atoms) of a document.

    Planning is sequential (window k+1 starts where window k stopped), metadata only, and
    resumable from (k, mixer state at the start of window k) without replaying earlier windows.
    """

    def __init__(self, mixer: TokenMixer, layout, seq_len: int, window_sequences: int):
        if seq_len <= 0 or window_sequences <= 0:
            raise ValueError("seq_len and window_sequences must be > 0")
        self.mixer, self.layout = mixer, layout
        self.seq_len, self.num_seqs = seq_len, window_sequences
        self.capacity = seq_len * window_sequences
        self.next_index = 0
        self.next_state = mixer.state.copy()

    def seek(self, index: int, state: MixState) -> None:
        self.next_index, self.next_state = index, state.copy()

    def _pieces(self, draw: Draw) -> list[tuple[int, int]]:
        length, atoms = self.layout(draw)
        cuts = piece_cuts(length, atoms, self.seq_len, self.num_seqs)
        if cuts is None or length != draw.tokens:
            raise ValueError(f"document {draw} cannot be packed (length {length}); the catalog "
                             "should have left it out")
        return cuts

    def next(self) -> Window:
        start = self.next_state.copy()
        self.mixer.state = start.copy()
        docs, cuts, snapshots, total = [], [], [], 0
        while True:
            before = self.mixer.state.copy()
            draw = self.mixer.next()
            if docs and total + draw.tokens > self.capacity:
                self.mixer.state = before
                break
            snapshots.append(before)
            docs.append(draw)
            cuts.append(self._pieces(draw))
            total += draw.tokens
        while True:
            flat = [(d, a, b) for d, pcs in enumerate(cuts) for a, b in pcs]
            where = best_fit_decreasing([b - a for _, a, b in flat], self.num_seqs, self.seq_len)
            if where is not None:
                break
            self.mixer.state = snapshots.pop()  # the last document moves to the next window
            docs.pop()
            cuts.pop()
        sequences: list[list[Piece]] = [[] for _ in range(self.num_seqs)]
        for (d, a, b), s in zip(flat, where):
            sequences[s].append(Piece(d, a, b))  # flat is in stream order already
        window = Window(self.next_index, docs, sequences, start, self.mixer.state.copy())
        self.next_index, self.next_state = self.next_index + 1, window.end_state.copy()
        return window


@dataclass
class Row:
    """One packed sequence as numpy arrays of length seq_len."""

    input_ids: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    doc_ids: np.ndarray
    seqlens: list[int]  # lengths of the row's segments (pieces, then padding if any)


def pack_row(pieces: list[tuple[np.ndarray, int, int]], seq_len: int, pad_id: int,
             no_loss_ids: np.ndarray) -> Row:
    """Lay out pieces (document tokens, start, end) into one row; see the module docstring.

    No loss is taken where the label is IGNORE, a padding position, or a token in no_loss_ids
    (vision placeholders and the vision end markers, which are implied by what precedes them).
    """
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    pos = np.zeros(seq_len, dtype=np.int64)
    doc = np.zeros(seq_len, dtype=np.int64)
    total = sum(b - a for _, a, b in pieces)
    if total > seq_len:
        raise ValueError(f"pieces hold {total} tokens, more than seq_len={seq_len}")
    seqlens, at = [], 0
    for d, (tokens, a, b) in enumerate(pieces):
        n = b - a
        ids[at:at + n] = tokens[a:b]
        nxt = tokens[a + 1:b + 1]  # next tokens of the document (one fewer at its end)
        labels[at:at + len(nxt)] = nxt
        pos[at:at + n] = np.arange(n)
        doc[at:at + n] = d
        seqlens.append(n)
        at += n
    if at < seq_len:
        doc[at:] = len(pieces)
        pos[at:] = np.arange(seq_len - at)
        seqlens.append(seq_len - at)
    labels[np.isin(labels, no_loss_ids)] = IGNORE
    mask = labels != IGNORE
    return Row(ids, labels, mask, pos, doc, seqlens)

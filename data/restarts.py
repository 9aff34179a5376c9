"""Tokenizer restart points: tokenize a span of a long text, get exactly the whole text's ids there.

A *restart point* of a text segment is a pair (character offset into the text, token index) such
that the text between consecutive points (from the start, to the end) tokenizes on its own to
exactly the ids the whole text has at those token positions. Then the ids of any token span are
the ids of the pieces that cover it, each tokenized alone: the loader (data/stream.py) reads a
unit of a long document by tokenizing about the unit's own text instead of the whole document.

Found at ingest (`restart_points`), about every `every` tokens, for each text segment of more
than 2 * `every` tokens (a shorter one would get at most one point; and a document of a few
thousand tokens is one unit for any seq_len used in practice, so it never benefits). Candidates
are the tokens that start on a character boundary (byte-level tokens can hold part of a UTF-8
character; Tokenizer.encode_with_starts); every piece is tokenized and compared with the whole
text's ids, and a candidate whose piece differs is dropped for the next token boundary (BPE
merges and the split pattern look across a cut: a run of spaces before a word, digits, a
newline run). Verification is generic, so it holds for either tokenizer backend, whatever it does.

Stored per source in `<source>/restarts.cols` (format mmpt-restarts/1, a column file of
data/columnar.py): a row per text segment with points (sample number, text segment number within
the sample, first point row), and the points (character offset, token index), sorted by sample.
The file is derived data, like the column catalogs: the manifest lists it with its size and
sha256 in the source's catalog entry, and it does not enter the dataset fingerprint (which
covers the shard indexes and the tokenizer), so adding restart points changes neither the
fingerprint nor the data order. Its header names the tokenizer; a dataset without the file
(written before restart points, or with `--restart-every 0`) tokenizes whole documents.
"""

from __future__ import annotations

import numpy as np

from data.shards import ShardError

RESTART_FORMAT = "mmpt-restarts/1"
RESTART_EVERY = 512  # tokens between restart points (the span a unit reads is its own + < 2x this)
MAX_TRIES = 8  # failed candidates in a row before the search moves on by `every` tokens


def min_tokens(every: int) -> int:
    """Segments of more tokens than this get restart points."""
    return 2 * every


def _same(tok, text: str, ids: np.ndarray) -> bool:
    got = tok.encode_array(text)
    return len(got) == len(ids) and bool(np.array_equal(got, ids))


def restart_points(tok, text: str, every: int = RESTART_EVERY) -> list[tuple[int, int]]:
    """The verified interior restart points (character offset, token index) of `text`, about
    every `every` tokens; [] for a text of at most min_tokens(every) tokens."""
    if every <= 0 or len(text.encode("utf-8", "surrogatepass")) <= min_tokens(every):
        return []  # (a token holds at least one byte)
    ids, starts = tok.encode_with_starts(text)
    n = len(ids)
    if n <= min_tokens(every):
        return []
    points: list[tuple[int, int]] = []
    c0 = t0 = 0
    # `confirmed`: the piece from (c0, t0) is known to start right (the text's start, or a point
    # followed by a verified piece). A cut can tokenize right on its left and wrong on its right
    # (inside a run of spaces, say): then every piece after it fails, and it is dropped.
    t, fails, confirmed = every, 0, True
    while t < n:
        c = int(starts[t])
        if c > c0:
            if _same(tok, text[c0:c], ids[t0:t]):
                points.append((c, t))
                c0, t0, t, fails, confirmed = c, t, t + every, 0, False
                continue
            fails += 1
            if fails >= MAX_TRIES:
                fails = 0
                if not confirmed:  # drop the last point; the piece before it grows instead
                    points.pop()
                    c0, t0 = points[-1] if points else (0, 0)
                    confirmed = True
                    continue
                t += every  # no cut near here tokenizes right (a long run of one kind)
                continue
        t += 1
    # The last piece runs to the end: drop points until it tokenizes right.
    while points and not _same(tok, text[c0:], ids[t0:]):
        points.pop()
        c0, t0 = points[-1] if points else (0, 0)
    return points


def covering(chars: np.ndarray, tokens: np.ndarray, n_tokens: int, n_chars: int, a: int,
             b: int) -> list[tuple[int, int, int, int]]:
    """(first char, end char, first token, end token) of the pieces between restart points
    (the text's start and end included) that cover tokens [a, b) of the segment."""
    bt = np.concatenate([[0], tokens, [n_tokens]])
    bc = np.concatenate([[0], chars, [n_chars]])
    i = int(np.searchsorted(bt, a, side="right")) - 1
    j = int(np.searchsorted(bt, b, side="left"))
    return [(int(bc[k]), int(bc[k + 1]), int(bt[k]), int(bt[k + 1])) for k in range(i, j)]


def restart_columns(source: str, tokenizer_fingerprint: str, num_samples: int, every: int,
                    rows: list[tuple[int, int, list[tuple[int, int]]]]) -> tuple[dict, dict]:
    """(columns, meta) of one source's restart file from (sample, text segment, points) rows in
    sample order (the same rows give the same bytes, however they were gathered)."""
    rows = [r for r in rows if r[2]]
    pts = [p for _, _, ps in rows for p in ps]
    chars = [c for c, _ in pts]
    first = np.cumsum([0] + [len(ps) for _, _, ps in rows]).astype(np.int64)
    narrow = (lambda v: np.array(v, np.uint32 if max(v, default=0) < 2**32 else np.int64))
    cols = {"g_sample": np.array([r[0] for r in rows], np.int32 if num_samples < 2**31 else np.int64),
            "g_text": np.array([r[1] for r in rows], np.int32), "g_first": first,
            "p_char": narrow(chars), "p_token": narrow([t for _, t in pts])}
    meta = {"format": RESTART_FORMAT, "source": source, "tokenizer": tokenizer_fingerprint,
            "num_samples": num_samples, "every": every, "min_tokens": min_tokens(every),
            "segments": len(rows), "points": len(pts)}
    return cols, meta


class Restarts:
    """One source's restart points over a mapped column file: a lookup touches its rows only."""

    def __init__(self, cols, source: str, tokenizer_fingerprint: str, num_samples: int):
        meta = cols.meta
        if meta.get("format") != RESTART_FORMAT:
            raise ShardError(f"{cols.name}: format {meta.get('format')!r}, expected {RESTART_FORMAT!r}")
        if (meta.get("source"), meta.get("tokenizer"), meta.get("num_samples")) != (
                source, tokenizer_fingerprint, num_samples):
            raise ShardError(f"{cols.name}: restart points of source {meta.get('source')!r} "
                             f"({meta.get('num_samples')} samples, tokenizer "
                             f"{str(meta.get('tokenizer'))[:16]}), the manifest has {source!r} "
                             f"({num_samples} samples, tokenizer {tokenizer_fingerprint[:16]})")
        self.cols = cols
        c = cols.cols
        self._sample, self._text, self._first = c["g_sample"], c["g_text"], c["g_first"]
        self._chars, self._tokens = c["p_char"], c["p_token"]

    def points(self, sample: int, text_index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(character offsets, token indexes) of a text segment's points; None if it has none."""
        key = np.asarray(sample, dtype=self._sample.dtype)
        lo = int(np.searchsorted(self._sample, key, side="left"))
        hi = int(np.searchsorted(self._sample, key, side="right"))
        for g in range(lo, hi):
            if int(self._text[g]) == text_index:
                a, b = int(self._first[g]), int(self._first[g + 1])
                return self._chars[a:b].astype(np.int64), self._tokens[a:b].astype(np.int64)
        return None

    def rows(self, offset: int = 0) -> list[tuple[int, int, list[tuple[int, int]]]]:
        """Every (sample + offset, text segment, points) row (merging parts of an ingest)."""
        first = self._first.tolist()
        chars, tokens = self._chars.tolist(), self._tokens.tolist()
        return [(s + offset, t, list(zip(chars[first[g]:first[g + 1]], tokens[first[g]:first[g + 1]])))
                for g, (s, t) in enumerate(zip(self._sample.tolist(), self._text.tolist()))]

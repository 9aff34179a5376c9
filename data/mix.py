"""Deterministic blending: keyed permutations per source and a token-count mixer.

Everything here is index arithmetic on metadata; nothing is read or decoded.

- `derive_key(seed, fingerprint, *purpose)`: a 64-bit key from blake2b, never Python's `hash`.
- `KeyedPermutation(n, key)`: a bijection of [0, n) (Feistel network on the next even bit width,
  cycle walking back into range). Counter based: perm(i) needs only (key, i).
- `SourceStream`: the endless sample order of one source. Stream position p lies in epoch
  p // n and maps to unit perm_epoch(p % n); every epoch has its own key.
- `TokenMixer`: picks which source gives the next document. Two levels, both error-minimising on
  token counts, never random draws:
    1. modality: with E = (vision tokens so far) - f * (all tokens so far), it takes the next
       document from the vision group or the text group, whichever leaves |E| smaller (ties go
       to text), and it takes the vision group's next unit whenever E < 0 and that unit carries
       at most a fraction f vision tokens (a text-only piece of a long interleaved document:
       without this rule such a unit at the head of the vision group would never leave |E|
       smaller than a text unit, and would hold back all vision). So |E| stays within one
       unit's tokens (<= seq_len) at every prefix of the stream, as long as vision units carry
       more than a fraction f vision tokens (image-caption pairs do; a test checks the bound on
       the real corpus); each low-vision unit drawn in a row while E < 0 can lower E by up to
       f times its tokens more.
    2. source within the group: the source whose realised token share is furthest below its
       weight share (largest weight * group_tokens - weight_sum * source_tokens; ties: lowest index).
  Its state is a few integers per source (`state()` / `from_state`), so a resume never replays.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

_M64 = (1 << 64) - 1
_ROUNDS = 6


def derive_key(seed: int, fingerprint: str, *purpose: object) -> int:
    """A 64-bit key for one purpose (e.g. ("order", "text", epoch)); stable across processes."""
    text = "\x1f".join([str(int(seed)), fingerprint, *(str(p) for p in purpose)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap avalanche on uint64 lanes (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class KeyedPermutation:
    """A keyed bijection of [0, n): apply with perm(indices) (int or integer array)."""

    def __init__(self, n: int, key: int):
        if n <= 0:
            raise ValueError(f"permutation domain must be non-empty, got n={n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.round_keys = [np.uint64(derive_key(key, "feistel", r)) for r in range(_ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << half) | right

    def __call__(self, idx):
        scalar = np.isscalar(idx)
        x = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"permutation index out of [0, {self.n})")
        with np.errstate(over="ignore"):
            y = self._encrypt(x.astype(np.uint64))
            out = y >= np.uint64(self.n)
            while out.any():  # cycle walking: the domain is < 4n, so few steps are needed
                y[out] = self._encrypt(y[out])
                out = y >= np.uint64(self.n)
        y = y.astype(np.int64)
        return int(y[0]) if scalar else y


class RowsWithout:
    """The rows [0, n) without the sorted rows `removed`, as a lazy index map: position i of the
    rest is row i + #{k : removed[k] - k <= i} (one binary search in a table of len(removed))."""

    def __init__(self, n: int, removed: np.ndarray):
        removed = np.asarray(removed, dtype=np.int64)
        self.n = n - len(removed)
        self._shift = removed - np.arange(len(removed), dtype=np.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        i = np.asarray(i, dtype=np.int64)
        return i + np.searchsorted(self._shift, i, side="right")


class RowView:
    """Rows `rows` of a column, read only where indexed (a split of a mapped plan table)."""

    def __init__(self, column: np.ndarray, rows):
        self.column, self.rows = column, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.column[self.rows[i]]

    def __iter__(self):
        for lo in range(0, len(self), 1 << 16):
            yield from self[np.arange(lo, min(len(self), lo + (1 << 16)))].tolist()

    def __array__(self, dtype=None, copy=None):
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)

    def sum(self) -> int:
        return int(sum(int(self[np.arange(lo, min(len(self), lo + (1 << 20)))].sum())
                       for lo in range(0, len(self), 1 << 20)))


@dataclass
class SourceSpec:
    """What the mixer needs to know about one source: per-sample token counts from metadata.

    The mixer orders *units*: a document, or a part of a document too long for one packing
    window. `tokens[i]` is the packed length of unit i (text + vision placeholders + special
    tokens), `vision[i]` its vision placeholder tokens, `samples[i]` the source's sample number
    it belongs to and `offsets[i]` its first token in that document. Samples that can never be
    packed have no unit (the catalog counts them).

    `rows` (optional) selects the units of a split: unit i is row rows[i] of the columns (an
    index array, or a lazy map such as RowsWithout), so a split of a mapped table costs no copy;
    the four fields then read through it (RowView) and `size` counts the split's units.
    """

    name: str
    group: str  # "text" or "vision"
    weight: float
    tokens: np.ndarray
    vision: np.ndarray
    samples: np.ndarray | None = None
    offsets: np.ndarray | None = None
    rows: object = None

    def __post_init__(self):
        if self.group not in ("text", "vision"):
            raise ValueError(f"source {self.name!r}: group must be 'text' or 'vision', got {self.group!r}")
        if not self.weight > 0:
            raise ValueError(f"source {self.name!r}: weight must be > 0, got {self.weight}")
        n = len(self.tokens)
        if self.samples is None:
            self.samples = np.arange(n, dtype=np.int64)
        if self.offsets is None:
            self.offsets = np.zeros(n, dtype=np.int64)
        self._columns = (self.tokens, self.vision, self.samples, self.offsets)
        if self.rows is not None:
            self.tokens, self.vision, self.samples, self.offsets = (
                RowView(c, self.rows) for c in self._columns)
        self.size = len(self.tokens)
        if self.size == 0:
            raise ValueError(f"source {self.name!r} has no usable samples")

    def gather(self, units: np.ndarray) -> tuple[np.ndarray, ...]:
        """(tokens, vision, samples, offsets) of the given units (one gather per column)."""
        rows = units if self.rows is None else self.rows[units]
        return tuple(c[rows] for c in self._columns)


class SourceStream:
    """Endless keyed order of one source's units; cached a block at a time."""

    BLOCK = 4096

    def __init__(self, spec: SourceSpec, seed: int, fingerprint: str, index: int):
        self.spec, self.seed, self.fingerprint, self.index = spec, seed, fingerprint, index
        self.n = spec.size
        self._perm_epoch = -1
        self._perm: KeyedPermutation | None = None
        # the cached block: stream positions [lo, hi) of one epoch, rows (unit, tokens, vision,
        # sample, offset) in position order
        self.lo = self.hi = self.epoch = -1
        self.block: list[tuple[int, int, int, int, int]] = []

    def _permutation(self, epoch: int) -> KeyedPermutation:
        if epoch != self._perm_epoch:
            key = derive_key(self.seed, self.fingerprint, "order", self.index, self.spec.name, epoch)
            self._perm, self._perm_epoch = KeyedPermutation(self.n, key), epoch
        return self._perm

    def unit_at(self, position: int) -> int:
        """Unit number at stream position `position` (any epoch)."""
        return self.info_at(position)[0]

    def info_at(self, position: int) -> tuple[int, int, int, int, int]:
        """(unit, tokens, vision tokens, sample, offset) at stream position `position`: read for a
        whole block at once (one gather per column instead of four scalar reads per draw)."""
        if not self.lo <= position < self.hi:
            self.load(position)
        return self.block[position - self.lo]

    def load(self, position: int) -> None:
        """Cache the block holding stream position `position`."""
        epoch, offset = divmod(position, self.n)
        start = offset - offset % self.BLOCK
        stop = min(start + self.BLOCK, self.n)
        units = self._permutation(epoch)(np.arange(start, stop))
        tokens, vision, samples, offsets = self.spec.gather(units)
        self.block = list(zip(units.tolist(), tokens.tolist(), vision.tolist(),
                              samples.tolist(), offsets.tolist()))
        self.lo, self.hi, self.epoch = epoch * self.n + start, epoch * self.n + stop, epoch


class Draw(NamedTuple):
    """One document of the mixed stream (a named tuple: one is made per draw, in the planner's
    inner loop, and a tuple is several times cheaper to build than a frozen dataclass)."""

    source: int  # index into the mixer's sources
    sample: int  # the source's sample number
    epoch: int
    tokens: int
    vision: int
    offset: int = 0  # first token of this unit in the document
    index: int = 0  # position in the mixed stream (0, 1, 2, ...)

    def to_list(self) -> list[int]:
        return [self.source, self.sample, self.epoch, self.tokens, self.vision, self.offset, self.index]


_new_tuple = tuple.__new__  # builds a Draw without the call through its generated __new__


@dataclass
class MixState:
    """Mixer state after some draws: a few integers per source (JSON-friendly)."""

    positions: list[int]
    tokens: list[int]
    vision: list[int]
    draws: int = 0

    def copy(self) -> "MixState":
        return MixState(list(self.positions), list(self.tokens), list(self.vision), self.draws)

    def to_dict(self) -> dict:
        return {"positions": list(self.positions), "tokens": list(self.tokens),
                "vision": list(self.vision), "draws": self.draws}

    @classmethod
    def from_dict(cls, d: dict) -> "MixState":
        return cls(list(d["positions"]), list(d["tokens"]), list(d["vision"]), int(d["draws"]))


@dataclass
class TokenMixer:
    """Error-minimising token-count blending of several sources (see the module docstring)."""

    sources: list[SourceSpec]
    vision_fraction: float
    seed: int
    fingerprint: str
    state: MixState = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        f = self.vision_fraction
        if not 0.0 <= f < 1.0:
            raise ValueError(f"vision_fraction must be in [0, 1), got {f}")
        self.groups = {g: [i for i, s in enumerate(self.sources) if s.group == g]
                       for g in ("text", "vision")}
        if not self.groups["text"]:
            raise ValueError("the mix needs at least one text source")
        if f > 0 and not self.groups["vision"]:
            raise ValueError(f"vision_fraction={f} but no source has images or video")
        self.streams = [SourceStream(s, self.seed, self.fingerprint, i)
                        for i, s in enumerate(self.sources)]
        # the one source of a group that has one (no choice to make within it), else None
        self._text_only, self._vision_only = (m[0] if len(m) == 1 else None
                                              for m in (self.groups["text"], self.groups["vision"]))
        if self.state is None:
            n = len(self.sources)
            self.state = MixState([0] * n, [0] * n, [0] * n)

    def _pick_in_group(self, group: str) -> int:
        members = self.groups[group]
        if len(members) == 1:
            return members[0]
        weight_sum = sum(self.sources[i].weight for i in members)
        group_tokens = sum(self.state.tokens[i] for i in members)
        best, best_deficit = members[0], None
        for i in members:
            deficit = self.sources[i].weight * group_tokens - weight_sum * self.state.tokens[i]
            if best_deficit is None or deficit > best_deficit:
                best, best_deficit = i, deficit
        return best

    def next(self) -> Draw:
        # The planner's inner loop: the candidates are read from the streams' cached blocks
        # inline (info_at's work without its call), the rest is the rule of the module docstring.
        st, f = self.state, self.vision_fraction
        positions = st.positions
        source = self._text_only
        if source is None:
            source = self._pick_in_group("text")
        stream = self.streams[source]
        p = positions[source]
        if not stream.lo <= p < stream.hi:
            stream.load(p)
        candidate = stream.block[p - stream.lo]
        if f > 0:
            vsource = self._vision_only
            if vsource is None:
                vsource = self._pick_in_group("vision")
            error = sum(st.vision) - f * sum(st.tokens)
            vstream = self.streams[vsource]
            p = positions[vsource]
            if not vstream.lo <= p < vstream.hi:
                vstream.load(p)
            vcandidate = vstream.block[p - vstream.lo]
            gain = vcandidate[2] - f * vcandidate[1]
            if (abs(error + gain) < abs(error + candidate[2] - f * candidate[1])
                    or (error < 0 and gain <= 0)):
                source, candidate, stream = vsource, vcandidate, vstream
        _, n, v, sample, offset = candidate
        positions[source] += 1
        st.tokens[source] += n
        st.vision[source] += v
        index = st.draws
        st.draws = index + 1
        return _new_tuple(Draw, (source, sample, stream.epoch, n, v, offset, index))

    def undo(self, draw: Draw) -> None:
        """Take back the last draw (the state is as if it had not been drawn)."""
        st = self.state
        st.positions[draw.source] -= 1
        st.tokens[draw.source] -= draw.tokens
        st.vision[draw.source] -= draw.vision
        st.draws -= 1

    def report(self) -> dict:
        """Realised mix so far: token shares per source and the vision token share."""
        total = sum(self.state.tokens) or 1
        return {
            "documents": self.state.draws,
            "tokens": sum(self.state.tokens),
            "vision_share": sum(self.state.vision) / total,
            "target_vision_share": self.vision_fraction,
            "sources": {s.name: {"tokens": self.state.tokens[i], "share": self.state.tokens[i] / total,
                                 "documents": self.state.positions[i],
                                 "epochs": self.state.positions[i] / len(s.tokens)}
                        for i, s in enumerate(self.sources)},
        }

"""Units per planning key: the document token layout, the plan table's columns and the
hold-out split (data/catalog.py maps the tables built here).

Document token layout (the same arithmetic the loader uses to build rows):
    text segment           its tokens under the dataset tokenizer
    image                  <|media_begin|> <|image|> x n <|media_end|>
    video                  per chunk of up to 4 frames: <|media_begin|> <|video|> x n <|media_end|>
    end of document        <|eos|>
Image and video samples put the media first, then the caption (captioning direction);
interleaved samples keep their reading order. A whole image or video (all its chunks, markers
included) is one *atom*: it is never cut across sequences.

Units: a document is cut into consecutive pieces (data/pack.py: <= seq_len tokens, never inside
an atom), and consecutive pieces into units of at most U pieces (unit_pieces; UNIT_RULE names
the rule, and U enters the planning key): U = S (window_sequences) when a window holds at most
one global batch of B sequences (S <= B), U = max(1, S // B) when it holds several. The mixer
orders units, so a long document's units are shuffled like separate documents (they could not
attend to each other anyway). The loader builds a unit by tokenizing only the text of its own
tokens (and the next one, its last label), widened to the enclosing tokenizer restart points
recorded at ingest (data/restarts.py), with the same ids as the whole document's tokenization;
without restart points (short texts, older datasets) it tokenizes each text segment the unit
meets whole, once per unit. Why U: the mixer's every-prefix bound holds within
one unit's tokens, so units of at most a batch's worth of pieces (S // B) keep it at the scale
that lets every global batch of a window carry the vision share (units of a whole window let a
window hold one long text unit and no vision); where a window holds at most one batch that
bound is not asked for, and units of a whole window need fewer lookups and restarts. A unit's
last token still predicts the next unit's first token: the loader labels in document
coordinates.
Samples that can never be packed (an atom longer than seq_len) are left out of the order and
counted in `skipped` by reason.

Hold-out (`holdout_fraction` f > 0): a sample is held out for validation when a keyed hash of its
identity (source name, shard number within the source, member key) falls below f, plus, in a
source where no hash does, the sample with the smallest hash (every source has validation data).
The choice depends only on the sample's identity, never on the order, the seed, resume or DP
size. `split="train"` keeps the other samples, `split="val"` only the held-out ones; with f = 0
the catalog (and so the training stream) is exactly what it is without hold-out.
A plan table written by ingest carries the split as a column `holdout`: a row per unit (its
sample's hash as a number in [0, 1), the unit, its tokens) sorted by that score; its header names
the sample with the smallest score. The held-out units for any f are then a prefix found by one
binary search, and the training split reads the table through them (data/mix.py's RowsWithout),
so start-up reads the held-out prefix (about f * 16 bytes per unit), not every sample. A plan
table without these columns (written before them) gets the split computed on load from the
samples' identities (a pass over the source, logged above a million samples).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np

from data.columnar import Columns
from data.pack import piece_cuts
from data.shards import ShardError

PLAN_FORMAT = "mmpt-plan/2"  # /2: units cut by UNIT_RULE (in the key); /1 had units of S pieces
# A unit is at most unit_pieces(S, B) pieces (enters the planning key with U). "piece" (a unit per
# piece, whatever S and B) was the rule of some mmpt-plan/2 tables: their key never matches this one.
UNIT_RULE = "pieces-per-batch"
SEG_TEXT, SEG_IMAGE, SEG_VIDEO = 0, 1, 2  # segment kinds as the sample catalog's rows code them
SEG_KINDS = ("text", "image", "video")
MEDIA_MARKERS = 2  # media_begin + media_end around each image / video chunk
_HOLDOUT_KEY = b"mmpt-holdout/1"


def holdout_score(source: str, shard: int, member: str) -> float:
    """A uniform number in [0, 1) fixed by a sample's identity (keyed blake2b, not `hash`)."""
    text = f"{source}\x1f{shard}\x1f{member}".encode()
    digest = hashlib.blake2b(text, digest_size=8, key=_HOLDOUT_KEY).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def holdout_scores(source: str, identities) -> np.ndarray:
    """holdout_score of each of a source's samples (shard number, member key), as float64 (one
    keyed state copied per sample: the same digests, without the key set-up every time)."""
    keyed = hashlib.blake2b(digest_size=8, key=_HOLDOUT_KEY)
    digests = bytearray()
    for k, key in identities:
        h = keyed.copy()
        h.update(f"{source}\x1f{k}\x1f{key}".encode())
        digests += h.digest()
    return np.frombuffer(bytes(digests), dtype="<u8").astype(np.float64) / 2.0 ** 64


def held_out(source: str, identities: list[tuple[int, str]], fraction: float) -> np.ndarray:
    """Which of a source's samples (shard number, member key) are held out (see the docstring)."""
    scores = holdout_scores(source, identities)
    out = scores < fraction
    if fraction > 0 and len(scores) and not out.any():
        out[int(np.argmin(scores))] = True
    return out


@dataclass(frozen=True)
class Segment:
    """One piece of a document in reading order."""

    kind: str  # "text" | "image" | "video"
    tokens: int  # text: its token count; media: all placeholders + markers
    member: str = ""  # tar member extension holding the text / media ("" for interleaved text)
    text_index: int = 0  # interleaved: which text segment of the JSON member
    chunks: tuple = ()  # media: placeholder tokens per chunk
    meta: dict | None = None  # media: index metadata (height, width, frames, fps)


def unit_pieces(window_sequences: int, global_batch: int) -> int:
    """U, the most pieces a unit holds (UNIT_RULE, see the module docstring): S when a window
    holds at most one global batch (S <= B), else max(1, S // B)."""
    if window_sequences < 1 or global_batch < 1:
        raise ValueError(f"window_sequences={window_sequences} and global_batch={global_batch} "
                         "must be positive")
    if window_sequences <= global_batch:
        return window_sequences
    return max(1, window_sequences // global_batch)


def plan_key(media, seq_len: int, window_sequences: int, global_batch: int) -> str:
    """Names what fixes the units' token counts: packing sizes, the unit rule with its pieces per
    unit (the global batch enters only through U) and the vision token arithmetic."""
    p = media.pre
    fields = {"seq_len": seq_len, "window_sequences": window_sequences, "units": UNIT_RULE,
              "unit_pieces": unit_pieces(window_sequences, global_batch),
              "patch_size": p.patch_size,
              "merge_size": p.merge_size, "min_pixels": p.min_pixels, "max_pixels": p.max_pixels,
              "video_max_pixels": p.video_max_pixels, "frames_per_chunk": p.frames_per_chunk,
              "sample_fps": p.sample_fps, "max_frames": p.max_frames}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class Layout:
    """Document layout arithmetic of one media setting and packing size (see the module docstring)."""

    def __init__(self, media, seq_len: int, window_sequences: int, global_batch: int):
        self.media, self.seq_len, self.window_sequences = media, seq_len, window_sequences
        self.unit_pieces = unit_pieces(window_sequences, global_batch)
        self._atom_tokens: dict[tuple, int] = {}

    def atom_tokens(self, kind_code: int, height: int, width: int, frames: int, fps: float) -> int:
        """Tokens of one whole image / video with its markers (memoised: sizes repeat)."""
        key = (kind_code, height, width, frames, fps)
        n = self._atom_tokens.get(key)
        if n is None:
            meta = {"member": "", "height": height, "width": width, "frames": frames, "fps": fps}
            n = self._atom_tokens[key] = self._media(SEG_KINDS[kind_code], meta).tokens
        return n

    def _media(self, kind: str, meta: dict) -> Segment:
        chunks = tuple(self.media.chunk_tokens(kind, meta))
        return Segment(kind, sum(chunks) + MEDIA_MARKERS * len(chunks), meta["member"], chunks=chunks,
                       meta=meta)

    def segments(self, kind: str, entry: dict) -> list[Segment]:
        text = Segment("text", int(entry["text_tokens"]), "txt")
        if kind == "text":
            return [text]
        if kind == "image":
            return [self._media("image", m) for m in entry["images"]] + [text]
        if kind == "video":
            return [self._media("video", m) for m in entry["videos"]] + [text]
        layout = entry.get("layout")
        if layout is None:
            raise ShardError(f"interleaved sample {entry['key']} has no 'layout' (per-segment token "
                             "counts); re-ingest with a current mmpt ingest")
        images = {m["member"]: m for m in entry["images"]}
        segs, t = [], 0
        for item in layout:
            if "image" in item:
                segs.append(self._media("image", images[item["image"]]))
            else:
                segs.append(Segment("text", int(item["text_tokens"]), "json", text_index=t))
                t += 1
        return segs

    def units(self, segs: list[Segment], sample: int) -> list[tuple[int, int, int, int]]:
        """(sample, offset, tokens, vision tokens) of each unit of one document."""
        length, atoms = sum(s.tokens for s in segs) + 1, atoms_of(segs)
        pieces = piece_cuts(length, atoms, self.seq_len, max_pieces=length)
        if pieces is None:
            raise ShardError(f"cannot pack: media longer than seq_len={self.seq_len}")
        placeholders = [(a, sum(s.chunks)) for (a, _), s in zip(atoms, [s for s in segs if s.kind != "text"])]
        units, u = [], self.unit_pieces  # up to U consecutive pieces per unit (UNIT_RULE)
        for first in range(0, len(pieces), u):
            start, end = pieces[first][0], pieces[min(first + u, len(pieces)) - 1][1]
            units.append((sample, start, end - start,
                          sum(n for a, n in placeholders if start <= a < end)))
        return units


def atoms_of(segs: list[Segment]) -> tuple[tuple[int, int], ...]:
    atoms, at = [], 0
    for s in segs:
        if s.kind != "text":
            atoms.append((at, at + s.tokens))
        at += s.tokens
    return tuple(atoms)


def unit_dtype(num_samples: int) -> np.dtype:
    """One plan-table row: a drawn unit's fields sit together, so a draw touches one page."""
    return np.dtype([("tokens", "<i4"), ("vision", "<i4"),
                     ("sample", "<i4" if num_samples < 2**31 else "<i8"), ("offset", "<i4")])


def holdout_dtype(num_units: int) -> np.dtype:
    """One row of a plan table's hold-out column: a unit's score, the unit, its tokens."""
    return np.dtype([("score", "<f8"), ("unit", "<i4" if num_units < 2**31 else "<i8"),
                     ("tokens", "<i4")])


def holdout_columns(scores: np.ndarray, unit_samples: np.ndarray,
                    unit_tokens: np.ndarray) -> tuple[dict, dict]:
    """(columns, meta) of a plan table's hold-out split from the samples' scores: a row per unit
    (its sample's score, the unit, its tokens) sorted by score (ties: unit order), so that the
    held-out prefix is read contiguously; the meta names the sample with the smallest score
    (over all samples, packable or not)."""
    unit_scores = scores[np.asarray(unit_samples)]
    order = np.argsort(unit_scores, kind="stable")
    rows = np.empty(len(order), holdout_dtype(len(order)))
    rows["score"], rows["unit"], rows["tokens"] = unit_scores[order], order, np.asarray(unit_tokens)[order]
    cols = {"holdout": rows}
    first = int(np.argmin(scores)) if len(scores) else -1
    meta = {"holdout_min_sample": first,
            "holdout_min_score": float(scores[first]) if len(scores) else 1.0}
    return cols, meta


def held_out_units(plan: Columns, fraction: float) -> tuple[np.ndarray, int]:
    """(plan table rows, sorted; their tokens) of the samples held out at `fraction` > 0, from the
    hold-out column: a binary search and the held-out prefix (see the module docstring)."""
    meta = plan.meta
    if meta["holdout_min_score"] >= fraction:  # no score below f: the smallest one's sample
        units = plan["units"]
        key = np.asarray(meta["holdout_min_sample"], dtype=units["sample"].dtype)
        lo = int(np.searchsorted(units["sample"], key, "left"))
        hi = int(np.searchsorted(units["sample"], key, "right"))
        return np.arange(lo, hi, dtype=np.int64), int(units["tokens"][lo:hi].sum())
    rows = plan["holdout"]
    m = int(np.searchsorted(rows["score"], fraction, side="left"))
    return np.sort(rows["unit"][:m].astype(np.int64)), int(rows["tokens"][:m].sum(dtype=np.int64))


def plan_columns(source, layout: Layout, key: str, holdout: bool = True) -> tuple[dict, dict]:
    """(columns, meta) of one source's plan table: every sample's units, in sample order, and
    (`holdout`) the hold-out columns, which hash every sample's identity once. `source`: the
    source's sample catalog (data/catalog.py SourceCatalog: its name, kind, sample count n,
    columns, entry(i) and identities())."""
    skipped: Counter = Counter()
    if source.kind == "text":  # no atoms: units are consecutive runs of U pieces of seq_len tokens
        length = source.cols["s_text_tokens"].astype(np.int64) + 1
        per_unit = layout.seq_len * layout.unit_pieces
        count = -(-length // per_unit)
        sample = np.repeat(np.arange(source.n, dtype=np.int64), count)
        first = np.repeat(np.cumsum(count) - count, count)
        offset = (np.arange(len(sample), dtype=np.int64) - first) * per_unit
        tokens = np.minimum(per_unit, length[sample] - offset)
        vision = np.zeros_like(tokens)
    else:
        units = []
        for i in range(source.n):
            try:
                units += layout.units(layout.segments(source.kind, source.entry(i)), i)
            except ShardError as e:
                skipped[str(e)] += 1
        sample, offset, tokens, vision = np.array(units, dtype=np.int64).reshape(-1, 4).T
    units = np.empty(len(tokens), unit_dtype(source.n))
    units["tokens"], units["vision"], units["sample"], units["offset"] = tokens, vision, sample, offset
    cols = {"units": units}
    meta = {"format": PLAN_FORMAT, "source": source.name, "plan_key": key, "units": int(len(tokens)),
            "tokens": int(tokens.sum()), "vision_tokens": int(vision.sum()),
            "seq_len": layout.seq_len, "window_sequences": layout.window_sequences,
            "unit_pieces": layout.unit_pieces, "skipped": dict(sorted(skipped.items()))}
    if holdout:
        hcols, hmeta = holdout_columns(holdout_scores(source.name, source.identities()), sample,
                                       tokens)
        cols.update(hcols)
        meta.update(hmeta)
    return cols, meta

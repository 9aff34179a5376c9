"""What the mixer and the packer know about a dataset, from its manifest and shard indexes only.

`Catalog(store, manifest, ...)` reads every shard index once (checked against the manifest's
sha256) and gives, per source, the packed token count and vision token count of every sample,
plus its document layout: the segments in reading order (text with its token count, media with
the token count of each of its chunks). Nothing is decoded: vision token counts come from the
stored height/width/frames through data.vision.

Document token layout (the same arithmetic the loader uses to build rows):
    text segment           its tokens under the dataset tokenizer
    image                  <|media_begin|> <|image|> x n <|media_end|>
    video                  per chunk of up to 4 frames: <|media_begin|> <|video|> x n <|media_end|>
    end of document        <|eos|>
Image and video samples put the media first, then the caption (captioning direction);
interleaved samples keep their reading order. A whole image or video (all its chunks, markers
included) is one *atom*: it is never cut across sequences.

Units: a document longer than a window (S * seq_len tokens) is cut into consecutive units of
at most S pieces each (pieces as in data/pack.py: <= seq_len tokens, never inside an atom); the
mixer orders units, so a long document's units are shuffled like separate documents (they could
not attend to each other anyway). Samples that can never be packed (an atom longer than seq_len)
are left out of the order and counted in `skipped` by reason.

Hold-out (`holdout_fraction` f > 0): a sample is held out for validation when a keyed hash of its
identity (source name, shard number within the source, member key) falls below f, plus, in a
source where no hash does, the sample with the smallest hash (every source has validation data).
The choice depends only on the sample's identity, never on the order, the seed, resume or DP
size. `split="train"` keeps the other samples, `split="val"` only the held-out ones; with f = 0
the catalog (and so the training stream) is exactly what it is without hold-out.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from data.mix import SourceSpec
from data.pack import piece_cuts
from data.shards import ShardError, read_index
from train.errors import InvalidInput

MEDIA_MARKERS = 2  # media_begin + media_end around each image / video chunk
GROUP_OF_KIND = {"text": "text", "image": "vision", "video": "vision", "interleaved": "vision"}
SPLITS = ("train", "val")
_HOLDOUT_KEY = b"mmpt-holdout/1"


def holdout_score(source: str, shard: int, member: str) -> float:
    """A uniform number in [0, 1) fixed by a sample's identity (keyed blake2b, not `hash`)."""
    text = f"{source}\x1f{shard}\x1f{member}".encode()
    digest = hashlib.blake2b(text, digest_size=8, key=_HOLDOUT_KEY).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def held_out(source: str, identities: list[tuple[int, str]], fraction: float) -> np.ndarray:
    """Which of a source's samples (shard number, member key) are held out (see the docstring)."""
    scores = np.array([holdout_score(source, k, key) for k, key in identities], dtype=np.float64)
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


def parse_weights(spec: str) -> dict[str, float]:
    """'web=3,code=1' -> {'web': 3.0, 'code': 1.0}; '' -> {}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not name.strip() or not weight > 0:
            raise ValueError(f"source weight {part!r} must look like name=positive_number")
        out[name.strip()] = weight
    return out


class Catalog:
    def __init__(self, store, manifest: dict, *, media, seq_len: int, window_sequences: int,
                 weights: dict[str, float] | None = None, holdout_fraction: float = 0.0,
                 split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split {split!r}; choose one of {list(SPLITS)}")
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"data.holdout_fraction={holdout_fraction} must be in [0, 1)")
        if split == "val" and holdout_fraction == 0:
            raise ValueError("a validation split of a dataset needs data.holdout_fraction > 0")
        self.store, self.manifest, self.media = store, manifest, media
        self.holdout_fraction, self.split = holdout_fraction, split
        self.seq_len, self.window_sequences = seq_len, window_sequences
        self.fingerprint: str = manifest["fingerprint"]
        self.names = [s["name"] for s in manifest["sources"]]
        self.kinds = [s["kind"] for s in manifest["sources"]]
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"data.source_weights names unknown source(s) {unknown}; "
                             f"the manifest has {self.names}")
        self.skipped: Counter = Counter()
        self.shard_keys: list[list[str]] = []  # [source][shard number] -> tar key
        self.samples: list[list[list[dict]]] = []  # [source][shard][member] -> index entry
        self.sources: list[SourceSpec] = []
        self._where: list[np.ndarray] = []  # [source] -> [sample] -> (shard, member)
        for si, (name, kind) in enumerate(zip(self.names, self.kinds)):
            shards = [s for s in manifest["shards"] if s["source"] == name]
            indexes = [read_index(store, s["index"], s.get("index_sha256")) for s in shards]
            for s, idx in zip(shards, indexes):
                if len(idx["samples"]) != s["num_samples"]:
                    raise ShardError(f"{store.url}/{s['index']}: {len(idx['samples'])} samples, "
                                     f"the manifest says {s['num_samples']}")
            self.shard_keys.append([s["key"] for s in shards])
            self.samples.append([idx["samples"] for idx in indexes])
            where = np.array([(k, m) for k, idx in enumerate(indexes) for m in range(len(idx["samples"]))],
                             dtype=np.int64).reshape(-1, 2)
            self._where.append(where)
            keep = None  # samples of this split (None: all)
            if holdout_fraction > 0:
                val = held_out(name, [(int(k), indexes[k]["samples"][m]["key"])
                                      for k, m in where.tolist()], holdout_fraction)
                keep = val if split == "val" else ~val
                if not keep.any():
                    raise ValueError(f"source {name!r} has {len(where)} sample(s): with "
                                     f"data.holdout_fraction={holdout_fraction} none is left "
                                     "for training")
            units = []  # (sample, offset, tokens, vision)
            for i, (k, m) in enumerate(where):
                if keep is not None and not keep[i]:
                    continue
                try:
                    units += self._units(self._segments(kind, indexes[k]["samples"][m]), i)
                except ShardError as e:
                    self.skipped[f"{name}: {e}"] += 1
            if not units:
                raise InvalidInput(f"source {name!r} has no usable samples "
                                   f"(skipped: {dict(self.skipped)})")
            sample, offset, tokens, vision = np.array(units, dtype=np.int64).T
            weight = weights.get(name, float(tokens.sum()))  # default: by size in tokens
            self.sources.append(SourceSpec(name, GROUP_OF_KIND[kind], weight, tokens, vision,
                                           sample, offset))

    # -- layout arithmetic
    def _media(self, kind: str, meta: dict) -> Segment:
        chunks = tuple(self.media.chunk_tokens(kind, meta))
        return Segment(kind, sum(chunks) + MEDIA_MARKERS * len(chunks), meta["member"], chunks=chunks,
                       meta=meta)

    def _segments(self, kind: str, entry: dict) -> list[Segment]:
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

    def _units(self, segs: list[Segment], sample: int) -> list[tuple[int, int, int, int]]:
        """(sample, offset, tokens, vision tokens) of each unit of one document."""
        length, atoms = sum(s.tokens for s in segs) + 1, self._atoms(segs)
        pieces = piece_cuts(length, atoms, self.seq_len, max_pieces=length)
        if pieces is None:
            raise ShardError(f"cannot pack: media longer than seq_len={self.seq_len}")
        units = []
        placeholders = [(a, sum(s.chunks)) for (a, _), s in zip(atoms, [s for s in segs if s.kind != "text"])]
        for u in range(0, len(pieces), self.window_sequences):
            start, end = pieces[u][0], pieces[min(u + self.window_sequences, len(pieces)) - 1][1]
            vision = sum(n for a, n in placeholders if start <= a < end)
            units.append((sample, start, end - start, vision))
        return units

    @staticmethod
    def _atoms(segs: list[Segment]) -> tuple[tuple[int, int], ...]:
        atoms, at = [], 0
        for s in segs:
            if s.kind != "text":
                atoms.append((at, at + s.tokens))
            at += s.tokens
        return tuple(atoms)

    # -- lookups used by the planner and the loader workers
    def locate(self, source: int, sample: int) -> tuple[int, int]:
        """(shard number within the source, sample number within the shard)."""
        k, m = self._where[source][sample].tolist()  # Python ints in one call (a hot lookup)
        return k, m

    def entry(self, source: int, sample: int) -> tuple[str, dict]:
        k, m = self.locate(source, sample)
        return self.shard_keys[source][k], self.samples[source][k][m]

    def document(self, source: int, sample: int) -> tuple[str, dict, list[Segment]]:
        """(shard key, index entry, segments) of one sample: what the loader needs to build it."""
        key, entry = self.entry(source, sample)
        return key, entry, self._segments(self.kinds[source], entry)

    def segments(self, source: int, sample: int) -> list[Segment]:
        return self._segments(self.kinds[source], self.entry(source, sample)[1])

    def layout(self, draw) -> tuple[int, tuple[tuple[int, int], ...]]:
        """(length, atoms) of a drawn unit, in the unit's own token coordinates."""
        if self.kinds[draw.source] == "text":  # planning's common case: no atoms, no lookup
            return draw.tokens, ()
        atoms = self._atoms(self.segments(draw.source, draw.sample))
        lo, hi = draw.offset, draw.offset + draw.tokens
        return draw.tokens, tuple((a - lo, b - lo) for a, b in atoms if lo <= a and b <= hi)

    def summary(self) -> dict:
        return {"fingerprint": self.fingerprint,
                "sources": {s.name: {"kind": k, "group": s.group, "weight": s.weight,
                                     "samples": int(len(s.tokens)), "tokens": int(s.tokens.sum()),
                                     "vision_tokens": int(s.vision.sum())}
                            for s, k in zip(self.sources, self.kinds)},
                "skipped": dict(self.skipped)}

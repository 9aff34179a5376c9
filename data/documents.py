"""Documents read from a dataset: their layout from the catalog, their text read and tokenized
(between the tokenizer restart points recorded at ingest, data/restarts.py, for a unit of a long
document), their media read and decoded. One DocumentReader per loader worker; its caches keep
the layouts and texts of the documents the worker's units are building (data/stream.py).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from data.catalog import Catalog
from data.decode import DecodeError
from data.media import MediaRules
from data.restarts import covering
from data.shards import ShardError, read_member
from train.errors import InvalidInput

DOC_TEXTS = 64  # documents whose text a worker keeps
DOC_METAS = 256  # documents whose layout a worker keeps


@dataclass
class Doc:
    """A materialized document: its tokens and its media items (placeholder run start, patches, grid)."""

    tokens: np.ndarray
    items: list[tuple[int, int, torch.Tensor, tuple[int, int, int]]]  # (start, count, patches, grid)
    error: str = ""


@dataclass
class DocMeta:
    """A document's layout from the catalog alone: what every rank knows without reading."""

    shard_key: str
    entry: dict
    segs: list
    name: str
    length: int  # tokens with the final <|eos|>
    # (start of the placeholder run, placeholders, grid (t, h, w), segment index, chunk index)
    items: list[tuple[int, int, tuple[int, int, int], int, int]]
    media_end: int  # end of the first item's placeholder run (length without media)


def skip_reason(error: Exception) -> str:
    """The reason a document is skipped, as batches record it."""
    # Object addresses in library messages would make the batch differ run to run.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(error).__name__}: {error}")


class DocumentReader:
    """The documents of one dataset (its store, manifest and catalog) under one tokenizer and
    media setting; `seed` and `fingerprint` key the media's random choices."""

    def __init__(self, store, manifest: dict, catalog: Catalog, media: MediaRules,
                 tokenizer: str, seed: int, fingerprint: str):
        self.store, self.manifest, self.catalog, self.media = store, manifest, catalog, media
        self.tokenizer_path, self.seed, self.fingerprint = tokenizer, seed, fingerprint
        self._tokenizer = None
        self._metas: OrderedDict = OrderedDict()
        self._texts: OrderedDict = OrderedDict()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
            fp = self.manifest["tokenizer"]["fingerprint"]
            if self._tokenizer.fingerprint != fp:
                raise InvalidInput(f"tokenizer {self.tokenizer_path} (data.tokenizer) has "
                                   f"fingerprint {self._tokenizer.fingerprint[:16]}, the dataset "
                                   f"was tokenized with {fp[:16]}: token counts would not match "
                                   "the index; pass the tokenizer the dataset was ingested with")
        return self._tokenizer

    def text(self, shard_key: str, entry: dict, member: str, cache: dict) -> str:
        if member not in cache:
            cache[member] = read_member(self.store, shard_key, entry, member).decode("utf-8")
        return cache[member]

    def doc_meta(self, source: int, sample: int) -> DocMeta:
        """The document's layout and item grids from the catalog (no store request)."""
        key = (source, sample)
        meta = self._metas.get(key)
        if meta is None:
            shard_key, entry, segs = self.catalog.document(source, sample)
            items, at = [], 0
            for k, seg in enumerate(segs):
                if seg.kind != "text":
                    grids = self.media.chunk_grids(seg.kind, seg.meta)
                    for c, (grid, n) in enumerate(zip(grids, seg.chunks, strict=True)):
                        items.append((at + 1, n, grid, k, c))
                        at += n + 2
                else:
                    at += seg.tokens
            meta = DocMeta(shard_key, entry, segs, f"{self.catalog.names[source]}/{entry['key']}",
                           at + 1, items, items[0][0] + items[0][1] if items else at + 1)
            self._metas[key] = meta
            while len(self._metas) > DOC_METAS:
                self._metas.popitem(last=False)
        return meta

    def layout_tokens(self, meta: DocMeta, text_id: int, lo: int = 0,
                       hi: int | None = None) -> np.ndarray:
        """Document tokens [lo, hi) (default: all) with every text token set to `text_id`: media
        markers and placeholders where they are, <|eos|> last."""
        tok = self.tokenizer
        hi = meta.length if hi is None else hi
        tokens = np.full(hi - lo, text_id, dtype=np.int64)
        for start, n, _, k, _ in meta.items:
            if start + n < lo or start - 1 >= hi:
                continue
            ids = np.full(n + 2, tok.image_id if meta.segs[k].kind == "image" else tok.video_id)
            ids[0], ids[-1] = tok.media_begin_id, tok.media_end_id
            a, b = max(start - 1, lo), min(start + n + 1, hi)
            tokens[a - lo:b - lo] = ids[a - start + 1:b - start + 1]
        if hi == meta.length:
            tokens[-1] = tok.special["eos"]  # (the tok.eos_id spelling goes through __getattr__: slow)
        return tokens

    def _doc_texts(self, meta: DocMeta) -> dict:
        """The document's text members as read so far (member -> text), kept per worker for the
        last DOC_TEXTS documents: the units of a document built close together read it once."""
        raw = self._texts.get(meta.name)
        if raw is None:
            raw = self._texts[meta.name] = {}
            while len(self._texts) > DOC_TEXTS:
                self._texts.popitem(last=False)
        return raw

    def read_tokens(self, meta: DocMeta, lo: int = 0, hi: int | None = None,
                     restarts=None, sample: int = -1) -> np.ndarray:
        """Document tokens [lo, hi) (default: all): text read and tokenized, media from the layout.
        With the source's restart points (data/restarts.py), a text segment only partly inside
        [lo, hi) is tokenized only between the restart points around that part: the same ids."""
        tok = self.tokenizer
        hi = meta.length if hi is None else hi
        # The index gives the document's length; fill one buffer (no per-segment arrays to join).
        tokens = self.layout_tokens(meta, 0, lo, hi)
        at, raw = 0, self._doc_texts(meta)
        for seg in meta.segs:
            if seg.kind != "text":
                at += seg.tokens
                continue
            # Every text member is read and decoded, in the span or not: a document that cannot
            # be read is a skip whichever of its units is built.
            if seg.member == "json":
                if "json texts" not in raw:
                    raw["json texts"] = [s["text"] for s in json.loads(
                        self.text(meta.shard_key, meta.entry, "json", raw))["segments"] if "text" in s]
                text = raw["json texts"][seg.text_index]
            else:
                text = self.text(meta.shard_key, meta.entry, seg.member, raw)
            a, b = max(lo - at, 0), min(hi - at, seg.tokens)  # the segment's tokens in the span
            points = (restarts.points(sample, seg.text_index)
                      if restarts is not None and a < b and (a, b) != (0, seg.tokens) else None)
            if points is not None:
                for c0, c1, t0, t1 in covering(*points, seg.tokens, len(text), a, b):
                    ids = tok.encode_array(text[c0:c1])
                    if len(ids) != t1 - t0:
                        raise ValueError(f"{meta.name}: {len(ids)} tokens, the restart points say "
                                         f"{t1 - t0} (tokens [{t0}, {t1}) of a text of "
                                         f"{seg.tokens}): the tokenizer differs from the one used "
                                         "at ingest")
                    x0, x1 = max(t0, a), min(t1, b)
                    tokens[at + x0 - lo:at + x1 - lo] = ids[x0 - t0:x1 - t0]
            elif a < b:
                ids = tok.encode_array(text)
                if len(ids) != seg.tokens:
                    raise ValueError(f"{meta.name}: {len(ids)} tokens, the index says {seg.tokens}: the "
                                     "tokenizer differs from the one used at ingest")
                tokens[at + a - lo:at + b - lo] = ids[a:b]
            at += seg.tokens
        return tokens

    def decode(self, meta: DocMeta, source: int, sample: int, epoch: int, k: int,
                chunks: list[int] | None = None) -> list[torch.Tensor]:
        """Patches of the chunks (None: all) of the document's media segment k, checked
        against the grids its metadata gives."""
        seg = meta.segs[k]
        data = read_member(self.store, meta.shard_key, meta.entry, seg.member)
        got = self.media.load(seg.kind, data, seg.meta, f"{meta.name}.{seg.member}",
                              (self.seed, self.fingerprint, source, sample, epoch), chunks)
        want = [it[2] for it in meta.items if it[3] == k]
        if chunks is not None:
            want = [want[c] for c in chunks]
        for (_, grid), expect in zip(got, want, strict=True):
            if tuple(grid) != tuple(expect):
                raise ValueError(f"{meta.name}.{seg.member}: media gives grid {tuple(grid)} "
                                 f"({self.media.tokens_of(grid)} tokens), the index metadata "
                                 f"{tuple(expect)}")
        return [patches for patches, _ in got]

    def _build_doc(self, source: int, sample: int, epoch: int) -> Doc:
        meta = self.doc_meta(source, sample)
        return Doc(self.read_tokens(meta), self.doc_items(meta, source, sample, epoch))

    def doc_items(self, meta: DocMeta, source: int, sample: int, epoch: int) -> list[tuple]:
        """(start, count, patches, grid) of every media item of the document: each media
        segment read and decoded once."""
        patches = {}
        for k in sorted({it[3] for it in meta.items}):
            for c, pt in enumerate(self.decode(meta, source, sample, epoch, k)):
                patches[k, c] = pt
        return [(start, n, patches[k, c], grid) for start, n, grid, k, c in meta.items]

    def doc(self, source: int, sample: int, epoch: int) -> Doc:
        """The whole document (all its tokens, every media item decoded): an empty one with the
        reason if it cannot be read. Not cached: batches read units (data/stream.py)."""
        try:
            return self._build_doc(source, sample, epoch)
        except (DecodeError, ShardError, UnicodeDecodeError) as e:
            return Doc(np.zeros(0, np.int64), [], skip_reason(e))

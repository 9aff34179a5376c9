"""One DP rank's stream of local batches (PackedStream), built in the DataLoader's workers
(data/loader.py wraps it, with the resume state and the ordering it guarantees).

Workers plan windows (metadata only, cheap) and materialize only their own rows: ranged GETs
through the tiered cache, online tokenization, image/video decoding and patchification (pixels
stay uint8; they are normalised where they are encoded). A unit of a long document is tokenized
from its own text only, between the tokenizer restart points recorded at ingest
(data/restarts.py): the same ids as tokenizing the whole document, cached per unit.

Stage-aware reading (`read=ReadRole(...)`): a rank reads only the fields its role names - token
ids (pipeline stage 0), targets (the last stage), the media it encodes (this replica's, or under
DEP a selector's choice from the whole global batch) - and builds the layout every stage needs
(positions, documents, cu_seqlens, vision items and their grids, provenance) from the catalog.
Under a role, a document that cannot be read keeps its slot (so every stage sees one layout):
its text becomes padding ids without loss for the ranks that read text, an undecodable medium
zero pixels for the rank that decodes it, each a counted skip; `mark_unread` applies the skips
other ranks met (the training loop shares them: train/reading.py). FULL_READ (the default) reads
everything and drops an unreadable document from its row, as described below.
A document whose media cannot be decoded or whose bytes are missing (truncated shard) is a
counted skip: its tokens become padding with no loss, recorded in Batch.skipped; the stream
does not shift. Store outages (after the store's retries) raise.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from data.batch import IGNORE, ROLE_CAPTION, ROLE_MARKER, ROLE_TEXT, ROLES, Batch
from data.catalog import Catalog
from data.decode import DecodeError
from data.documents import DocMeta, DocumentReader, skip_reason
from data.media import MediaRules
from data.mix import MixState, TokenMixer
from data.pack import PlanState, Window, WindowPlanner, pack_rows
from data.shards import ShardError
from train.errors import UserError

UNIT_CACHE = 128  # units whose tokens a worker keeps (the pieces of a unit reuse one tokenization)
log = logging.getLogger(__name__)


class ResumeError(UserError, ValueError):
    """A loader state does not belong to this dataset / configuration."""


@dataclass(frozen=True)
class ReadRole:
    """What one rank reads of the batches (picklable: DataLoader workers build the batches).

    inputs   token ids and vision placeholders (`input_ids`): pipeline stage 0.
    targets  `labels`, `loss_mask` and `token_category`: the last pipeline stage.
    media    "replica": every image / video chunk in this replica's rows; None: none; or a
             selector for the whole global batch (DEP): `media(patches)`, given the patch
             counts of every replica's items (replica d's list in its grid_thw order), returns
             the (replica, item) pairs this rank decodes, e.g. parallel.dep_plan.EncoderItems.
    What every stage needs (position_ids, doc_ids, cu_seqlens, grid_thw, vision_spans,
    sample_ids, sequence_ids) comes from the catalog's metadata, whatever the role: a role that
    reads nothing makes no store request. `FULL_READ` (the default) reads everything, with the
    stream's original semantics; a document that fails to read under any other role keeps its
    slot (module docstring).
    """

    inputs: bool = True
    targets: bool = True
    media: object = "replica"

    @property
    def reads_text(self) -> bool:
        return self.inputs or self.targets


FULL_READ = ReadRole()


class WindowCursor:
    """Windows in increasing order from a planner, keeping the few still needed."""

    def __init__(self, planner: WindowPlanner):
        self.planner = planner
        self.cache: OrderedDict[int, Window] = OrderedDict()

    def get(self, k: int) -> Window:
        if k in self.cache:
            return self.cache[k]
        if k < self.planner.next_index:
            raise RuntimeError(f"window {k} was planned and dropped (windows only go forward)")
        while self.planner.next_index <= k:
            w = self.planner.next()
            self.cache[w.index] = w
            while len(self.cache) > 8:
                self.cache.popitem(last=False)
        return self.cache[k]


class PackedStream(torch.utils.data.IterableDataset):
    """Local batches of one DP rank, from global sequence `start` on (the order: data/loader.py)."""

    def __init__(self, url: str, *, seq_len: int, window_sequences: int, global_batch: int,
                 dp_rank: int, dp_size: int, seed: int, vision_fraction: float, weights: dict,
                 tokenizer: str, media: MediaRules, store_opts: dict | None = None,
                 cache_opts: dict | None = None, holdout_fraction: float = 0.0,
                 split: str = "train", read: ReadRole = FULL_READ):
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by dp_size={dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} not in [0, {dp_size})")
        self.url, self.seq_len, self.S, self.B = url, seq_len, window_sequences, global_batch
        self.rank, self.dp = dp_rank, dp_size
        self.local = global_batch // dp_size
        self.seed, self.fraction, self.media = seed, vision_fraction, media
        self.store_opts, self.cache_opts = store_opts or {}, cache_opts
        self.store = _open_cached(url, self.store_opts, cache_opts)
        self.manifest = _read_manifest(url, self.store)
        self.catalog = Catalog(self.store, self.manifest, media=media, seq_len=seq_len,
                               window_sequences=window_sequences, global_batch=global_batch,
                               weights=weights,
                               holdout_fraction=holdout_fraction, split=split)
        self.holdout_fraction = holdout_fraction
        self.fingerprint = self.catalog.fingerprint
        self.start, self.start_window, self.start_state = 0, 0, self._fresh_state()
        self.reader = DocumentReader(self.store, self.manifest, self.catalog, media, tokenizer,
                                     seed, self.fingerprint)
        self.read = read
        self._docs: OrderedDict = OrderedDict()  # decoded media items of the documents in use
        self._token_cache: OrderedDict = OrderedDict()

    # -- planning (metadata only)
    def _fresh_state(self) -> PlanState:
        n = len(self.catalog.sources)
        return PlanState(MixState([0] * n, [0] * n, [0] * n), [])

    def new_cursor(self, window: int | None = None, state: PlanState | None = None) -> WindowCursor:
        mixer = TokenMixer(self.catalog.sources, self.fraction, self.seed, self.fingerprint)
        planner = WindowPlanner(mixer, self.catalog.layout, self.seq_len, self.S,
                                batch_sequences=self.B)
        planner.seek(self.start_window if window is None else window,
                     self.start_state if state is None else state)
        return WindowCursor(planner)

    def set_start(self, sequence: int, window: int, state: PlanState) -> None:
        if window * self.S > sequence or sequence >= (window + 1) * self.S:
            raise ResumeError(f"sequence {sequence} is not in window {window} of {self.S} sequences")
        self.start, self.start_window, self.start_state = sequence, window, state.copy()

    def batch_sequences(self, j: int) -> range:
        first = self.start + j * self.B + self.rank * self.local
        return range(first, first + self.local)

    # -- materialization (inside workers)
    def _media(self, meta: DocMeta, source: int, sample: int, epoch: int) -> list[tuple] | str:
        """The document's media items (cached per worker while in use), or why they cannot be
        decoded (logged once)."""
        key = (source, sample, epoch)
        if key not in self._docs:
            try:
                self._docs[key] = self.reader.doc_items(meta, source, sample, epoch)
            except (DecodeError, ShardError) as e:
                self._docs[key] = reason = skip_reason(e)
                log.warning("skipping %s sample %s: %s", self.catalog.names[source],
                            self.catalog.locate(source, sample), reason)
            while len(self._docs) > 64:
                self._docs.popitem(last=False)
        return self._docs[key]

    def build_batch(self, cursor: WindowCursor, sequences: range) -> Batch:
        """The local batch of these global sequences, read as `self.read` says."""
        if self.read == FULL_READ:
            return self._full_batch(cursor, sequences)
        return self._role_batch(cursor, sequences)

    def _full_batch(self, cursor: WindowCursor, sequences: range) -> Batch:
        tok = self.reader.tokenizer
        no_loss = np.array([tok.image_id, tok.video_id, tok.media_end_id])
        rows, spans, patches, grids, sids, skipped = [], [], [], [], [], []
        roles = []  # (row, first position, lo, hi, source, end of the document's first media)
        for r, g in enumerate(sequences):
            pieces, at = [], 0
            for d, meta, lo, hi in self._pieces(cursor, g):  # lo, hi: document coordinates
                got = self._tokens(d, meta, skipped)
                if got is None:  # unreadable text: the document is left out of its row
                    continue
                tokens, base = got  # tokens of document positions [base, base + len(tokens))
                items = self._media(meta, d.source, d.sample, d.epoch) if meta.items else []
                if isinstance(items, str):  # undecodable media: likewise
                    self._skip(skipped, d.source, d.sample, items, log_it=False)
                    continue
                shard, member = self.catalog.locate(d.source, d.sample)
                for start, n, pt, grid in items:
                    if lo <= start and start + n <= hi:
                        spans.append((r, at + start - lo, n))
                        patches.append(pt)
                        grids.append(grid)
                pieces.append((tokens, lo - base, hi - base))
                sids.append((r, d.source, shard, member, d.epoch, lo, hi))
                roles.append((r, at, lo, hi, d.source, meta.media_end))
                at += hi - lo
            rows.append(pieces)
        packed = pack_rows(rows, self.seq_len, tok.pad_id, no_loss)
        category = self._categories(packed, roles)
        return Batch(
            input_ids=torch.from_numpy(packed.input_ids), labels=torch.from_numpy(packed.labels),
            loss_mask=torch.from_numpy(packed.loss_mask), position_ids=torch.from_numpy(packed.position_ids),
            doc_ids=torch.from_numpy(packed.doc_ids),
            cu_seqlens=torch.tensor(np.concatenate([[0], np.cumsum(packed.seqlens)]), dtype=torch.int32),
            pixel_patches=(torch.cat(patches) if patches
                           else torch.zeros(0, self.media.patch_dim, dtype=torch.uint8)),
            grid_thw=torch.tensor(grids, dtype=torch.int64).reshape(-1, 3),
            vision_spans=torch.tensor(spans, dtype=torch.int64).reshape(-1, 3),
            sample_ids=torch.tensor(sids, dtype=torch.int64).reshape(-1, 7),
            sequence_ids=torch.tensor(list(sequences), dtype=torch.int64),
            token_category=torch.from_numpy(category), skipped=skipped)

    def _categories(self, packed, roles: list) -> np.ndarray:
        tok = self.reader.tokenizer
        category = np.full(packed.labels.shape, -1, dtype=np.int64)
        for r, at, lo, hi, source, media_end in roles:
            # Position j predicts document token lo + j + 1: text after the first media item
            # is caption text, a media_begin target a marker, the rest plain text.
            target = np.arange(lo + 1, hi + 1)
            role = np.where(target > media_end, ROLE_CAPTION, ROLE_TEXT)
            role[packed.labels[r, at:at + hi - lo] == tok.media_begin_id] = ROLE_MARKER
            category[r, at:at + hi - lo] = source * len(ROLES) + role
        category[~packed.loss_mask] = -1
        return category

    # -- role-based reading (ReadRole): metadata from the catalog, reads only what is needed
    def _pieces(self, cursor: WindowCursor, g: int) -> list:
        """(planned doc, its DocMeta, lo, hi) of each piece of global sequence g."""
        window = cursor.get(g // self.S)
        out = []
        for p in window.sequences[g % self.S]:
            d = window.docs[p.doc]
            meta = self.reader.doc_meta(d.source, d.sample)
            out.append((d, meta, d.offset + p.start, d.offset + p.end))
        return out

    def _replica_items(self, cursor: WindowCursor, sequences) -> list[tuple]:
        """(source, sample, epoch, segment, chunk, grid) of every item in these rows, in row-major
        placeholder order (the order of the replica's grid_thw); metadata only."""
        items = []
        for g in sequences:
            window = cursor.get(g // self.S)
            for p in window.sequences[g % self.S]:
                d = window.docs[p.doc]
                if d.vision == 0:  # most documents: no catalog lookup at all
                    continue
                meta = self.reader.doc_meta(d.source, d.sample)
                lo, hi = d.offset + p.start, d.offset + p.end
                items += [(d.source, d.sample, d.epoch, k, c, grid)
                          for start, n, grid, k, c in meta.items if lo <= start and start + n <= hi]
        return items

    def _skip(self, skipped: list, source: int, sample: int, reason: str, log_it: bool = True
              ) -> None:
        shard, member = self.catalog.locate(source, sample)
        if log_it:
            log.warning("skipping %s sample %s: %s", self.catalog.names[source], (shard, member),
                        reason)
        entry = (self.catalog.names[source], shard, member, reason)
        if entry not in skipped:
            skipped.append(entry)

    def _tokens(self, d, meta: DocMeta, skipped: list) -> tuple[np.ndarray, int] | None:
        """(tokens, first): the ids of document tokens [first, first + len(tokens)), the planned
        unit d's tokens and the one after (its last token's label); read once per worker while
        in use, None if unreadable (a counted skip in every batch that meets it)."""
        source, sample = d.source, d.sample
        lo, hi = d.offset, min(d.offset + d.tokens + 1, meta.length)
        key = (source, sample, lo, hi)
        if key not in self._token_cache:
            try:
                self._token_cache[key] = (self.reader.read_tokens(
                    meta, lo, hi, self.catalog.restarts[source], sample), lo)
            except (ShardError, UnicodeDecodeError) as e:
                self._token_cache[key] = skip_reason(e)
                self._skip(skipped, source, sample, self._token_cache[key])
            while len(self._token_cache) > UNIT_CACHE:
                self._token_cache.popitem(last=False)
        got = self._token_cache[key]
        if isinstance(got, str):
            self._skip(skipped, source, sample, got, log_it=False)
            return None
        return got

    def _decode_items(self, items: list[tuple], skipped: list) -> list[torch.Tensor]:
        """Patches of each (source, sample, epoch, segment, chunk, grid) item: one read and one
        decode per media segment, of the chunks asked for. An undecodable segment gives zero
        patches of its grids' sizes and a counted skip (the layout is fixed by then)."""
        groups: dict[tuple, list[int]] = {}
        for source, sample, epoch, k, c, _ in items:
            groups.setdefault((source, sample, epoch, k), []).append(c)
        got = {}
        for (source, sample, epoch, k), chunks in groups.items():
            meta = self.reader.doc_meta(source, sample)
            try:
                patches = self.reader.decode(meta, source, sample, epoch, k, chunks)
            except (DecodeError, ShardError) as e:
                self._skip(skipped, source, sample, skip_reason(e))
                grids = [it[2] for it in meta.items if it[3] == k]
                patches = [torch.zeros(math.prod(grids[c]), self.media.patch_dim, dtype=torch.uint8)
                           for c in chunks]
            for c, pt in zip(chunks, patches):
                got[source, sample, epoch, k, c] = pt
        return [got[it[:5]] for it in items]

    def _role_batch(self, cursor: WindowCursor, sequences: range) -> Batch:
        read, tok = self.read, self.reader.tokenizer
        rows, spans, grids, items, sids, skipped, roles, unread = [], [], [], [], [], [], [], []
        selector = read.media not in (None, "replica")  # DEP: items of the whole global batch
        first = sequences[0] - self.rank * self.local
        # Windows are planned forward only (and a few kept): the replicas' rows in order.
        every = [self._replica_items(cursor, range(first + d * self.local, first + (d + 1) * self.local))
                 for d in range(self.rank)] if selector else []
        for r, g in enumerate(sequences):
            pieces, at = [], 0
            for d, meta, lo, hi in self._pieces(cursor, g):
                if read.reads_text:
                    got = self._tokens(d, meta, skipped)
                    if got is None:  # keeps its slot (every stage has the same layout), no loss
                        got = (self.reader.layout_tokens(meta, tok.pad_id, lo,
                                                         min(hi + 1, meta.length)), lo)
                        unread.append((r, at, hi - lo))
                else:
                    got = np.zeros(min(hi + 1, meta.length) - lo, np.int64), lo
                tokens, base = got  # tokens of document positions [base, base + len(tokens))
                for start, n, grid, k, c in meta.items:
                    if lo <= start and start + n <= hi:
                        spans.append((r, at + start - lo, n))
                        grids.append(grid)
                        items.append((d.source, d.sample, d.epoch, k, c, grid))
                pieces.append((tokens, lo - base, hi - base))
                shard, member = self.catalog.locate(d.source, d.sample)
                sids.append((r, d.source, shard, member, d.epoch, lo, hi))
                roles.append((r, at, lo, hi, d.source, meta.media_end))
                at += hi - lo
            rows.append(pieces)
        no_loss = np.array([tok.image_id, tok.video_id, tok.media_end_id])
        packed = pack_rows(rows, self.seq_len, tok.pad_id, no_loss)
        for r, at, n in unread:
            packed.labels[r, at:at + n] = IGNORE
            packed.loss_mask[r, at:at + n] = False
        out = {}
        if read.inputs:
            out["input_ids"] = torch.from_numpy(packed.input_ids)
        if read.targets:
            out.update(labels=torch.from_numpy(packed.labels),
                       loss_mask=torch.from_numpy(packed.loss_mask),
                       token_category=torch.from_numpy(self._categories(packed, roles)))
        if read.media == "replica":
            patches = self._decode_items(items, skipped)
            out["pixel_patches"] = (torch.cat(patches) if patches
                                    else torch.zeros(0, self.media.patch_dim, dtype=torch.uint8))
        elif selector:
            every += [items] + [self._replica_items(
                cursor, range(first + d * self.local, first + (d + 1) * self.local))
                for d in range(self.rank + 1, self.dp)]
            chosen = sorted(read.media([[math.prod(it[5]) for it in its] for its in every]))
            patches = self._decode_items([every[d][i] for d, i in chosen], skipped)
            out["pixel_patches"] = (torch.cat(patches) if patches
                                    else torch.zeros(0, self.media.patch_dim, dtype=torch.uint8))
            out["pixel_items"] = torch.tensor(chosen, dtype=torch.int64).reshape(-1, 2)
            out["global_items"] = torch.tensor([(d, *it[5]) for d, its in enumerate(every)
                                                for it in its], dtype=torch.int64).reshape(-1, 4)
        return Batch(
            position_ids=torch.from_numpy(packed.position_ids),
            doc_ids=torch.from_numpy(packed.doc_ids),
            cu_seqlens=torch.tensor(np.concatenate([[0], np.cumsum(packed.seqlens)]), dtype=torch.int32),
            grid_thw=torch.tensor(grids, dtype=torch.int64).reshape(-1, 3),
            vision_spans=torch.tensor(spans, dtype=torch.int64).reshape(-1, 3),
            sample_ids=torch.tensor(sids, dtype=torch.int64).reshape(-1, 7),
            sequence_ids=torch.tensor(list(sequences), dtype=torch.int64),
            skipped=skipped, **out)

    def mark_unread(self, batch: Batch, docs) -> None:
        """Make the pieces of these documents, (source, shard, member), in a role batch what an
        unread document becomes in `_role_batch`: padding ids around its media markers and
        placeholders, no loss (in place; a field the role did not read is left alone)."""
        docs, at = set(docs), {}
        for r, source, shard, member, _, lo, hi in batch.sample_ids.tolist():
            start = at.get(r, 0)
            at[r] = start + hi - lo
            if (source, shard, member) not in docs:
                continue
            if batch.input_ids is not None:
                sample = self.catalog.catalogs[source].sample_of(shard, member)
                meta = self.reader.doc_meta(source, sample)
                batch.input_ids[r, start:start + hi - lo] = torch.from_numpy(
                    self.reader.layout_tokens(meta, self.reader.tokenizer.pad_id)[lo:hi])
            if batch.labels is not None:
                batch.labels[r, start:start + hi - lo] = IGNORE
                batch.loss_mask[r, start:start + hi - lo] = False
                batch.token_category[r, start:start + hi - lo] = -1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        cursor = self.new_cursor()
        j = w
        while True:
            yield self.build_batch(cursor, self.batch_sequences(j))
            j += nw


def _open_cached(url: str, store_opts: dict, cache_opts: dict | None):
    from data.shards import split_dataset_url
    from data.store import open_store

    store = open_store(split_dataset_url(url)[0], **store_opts)
    if cache_opts is None:
        return store
    from data.cache import TieredCache

    return TieredCache(store, **cache_opts)


def _read_manifest(url: str, store) -> dict:
    from data.shards import read_manifest, split_dataset_url

    return read_manifest(store, split_dataset_url(url)[1])

"""What the mixer and the packer know about a dataset: columnar metadata, memory-mapped.

Two kinds of column files (data/columnar.py) per source, written at ingest next to its shards:

- the *sample catalog* `<source>/catalog.cols` (format mmpt-catalog/1): one row per sample with
  its shard number, number within the shard, key, text token and byte counts, and where its
  member and segment rows start; member rows (extension, data offset, size in the tar); segment
  rows in reading order (kind, text tokens or media metadata: height, width, frames, fps); and
  one row per shard (tar key, size). Rows of one shard are contiguous and in tar order, so these
  are the shard indexes in columns. It does not depend on any training setting.
- the *plan table* `<source>/plan-<key>.cols` (format mmpt-plan/2) for one planning key (seq_len,
  window_sequences, the unit rule and its pieces per unit, and the vision settings that fix token
  counts): one row per unit with its
  packed token count, vision token count, sample number and first token (one record per unit,
  so a draw touches one page); totals and the samples
  that can never be packed (by reason) in its header. `mmpt ingest --plan CONFIG` writes it.

`Catalog(store, manifest, ...)` maps both per source and touches only the rows it plans or builds:
opening costs the headers, whatever the number of samples. Without a plan table for the run's
key it derives one in memory from the sample catalog (a pass over every sample: fine for small
datasets, logged as a warning above a million samples). Datasets ingested before column files
(no "catalogs" in the manifest) still load: their JSON shard indexes are read (checked against
the manifest's sha256) and turned into the same columns in memory, with the same stream.

The units, the document token layout and the hold-out split are data/plan_table.py's.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from data.columnar import Columns, encode_columns, open_columns
from data.mix import RowsWithout, SourceSpec
from data.plan_table import (PLAN_FORMAT, SEG_IMAGE, SEG_TEXT, SEG_VIDEO, UNIT_RULE, Layout,
                             Segment, held_out, held_out_units, plan_columns, plan_key)
from data.restarts import Restarts
from data.shards import ShardError, read_index
from train.errors import InvalidInput

log = logging.getLogger(__name__)
CATALOG_FORMAT = "mmpt-catalog/1"
WARN_DERIVE_SAMPLES = 1_000_000
# One segment row (a record: a sample's segments are read together, from one page)
SEGMENT_DTYPE = np.dtype([("kind", "u1"), ("tokens", "<i4"), ("height", "<i4"), ("width", "<i4"),
                          ("frames", "<i4"), ("fps", "<f8"), ("ext", "<i2"), ("text_index", "<i4")])

GROUP_OF_KIND = {"text": "text", "image": "vision", "video": "vision", "interleaved": "vision"}
SPLITS = ("train", "val")


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



# ---------------------------------------------------------------------------------------------
# The sample catalog: building it from shard indexes (at ingest; for old datasets on load)


def _fixed_bytes(values: list[str]) -> np.ndarray:
    width = max([len(v.encode()) for v in values] + [1])
    return np.array([v.encode() for v in values], dtype=f"S{width}")


def catalog_columns(source: str, kind: str, shards: list[dict], indexes: list[dict]) -> tuple[dict, dict]:
    """(columns, meta) of one source's sample catalog from its shards' manifest entries and
    parsed indexes (in shard order). Deterministic: the same indexes give the same bytes."""
    exts: dict[str, int] = {}
    code = lambda ext: exts.setdefault(ext, len(exts))  # noqa: E731
    s_key, s_tt, s_tb, s_ms, s_mc, s_gs, s_gc = ([] for _ in range(7))
    m_ext, m_off, m_size = [], [], []
    g = {c: [] for c in ("kind", "tokens", "ext", "text_index", "height", "width", "frames", "fps")}

    def seg(kind_code, tokens=0, ext=-1, text_index=0, meta=None):
        meta = meta or {}
        for col, v in (("kind", kind_code), ("tokens", tokens), ("ext", ext), ("text_index", text_index),
                       ("height", meta.get("height", 0)), ("width", meta.get("width", 0)),
                       ("frames", meta.get("frames", 0)), ("fps", meta.get("fps", 0.0))):
            g[col].append(v)

    for idx in indexes:
        for e in idx["samples"]:
            s_key.append(e["key"])
            s_tt.append(int(e["text_tokens"]))
            s_tb.append(int(e.get("text_bytes", 0)))
            s_ms.append(len(m_ext))
            for ext, loc in e["members"].items():
                m_ext.append(code(ext))
                m_off.append(int(loc["offset"]))
                m_size.append(int(loc["size"]))
            s_mc.append(len(e["members"]))
            s_gs.append(len(g["kind"]))
            if kind in ("image", "video"):
                for meta in e["images" if kind == "image" else "videos"]:
                    seg(SEG_IMAGE if kind == "image" else SEG_VIDEO, ext=code(meta["member"]), meta=meta)
            elif kind == "interleaved":
                layout = e.get("layout")
                if layout is None:  # kept as a sample without segments: the plan skips it
                    seg(SEG_TEXT, tokens=-1)
                else:
                    images = {im["member"]: im for im in e["images"]}
                    t = 0
                    for item in layout:
                        if "image" in item:
                            seg(SEG_IMAGE, ext=code(item["image"]), meta=images[item["image"]])
                        else:
                            seg(SEG_TEXT, tokens=int(item["text_tokens"]), text_index=t)
                            t += 1
            s_gc.append(len(g["kind"]) - s_gs[-1])
    n = len(s_key)

    # The narrowest types that hold the values: the catalog's size is what a host keeps on disk.
    def index(v):
        return np.array(v, np.int32 if max(v, default=0) < 2**31 else np.int64)

    def wide(v):
        return np.array(v, np.uint32 if max(v, default=0) < 2**32 else np.int64)

    sequential = s_key == [f"{i:012d}" for i in range(n)]  # mmpt ingest's keys: not stored
    cols = {
        "h_key": _fixed_bytes([s["key"] for s in shards]),
        "h_size": np.array([s["size"] for s in shards], np.int64),
        "h_first": np.cumsum([0] + [s["num_samples"] for s in shards])[:-1].astype(np.int64),
        **({} if sequential else {"s_key": _fixed_bytes(s_key)}),
        "s_text_tokens": np.array(s_tt, np.int32), "s_text_bytes": wide(s_tb),
        "s_mem_start": index(s_ms), "s_mem_count": np.array(s_mc, np.uint8),
        "m_ext": np.array(m_ext, np.uint8), "m_offset": wide(m_off), "m_size": wide(m_size),
    }
    if kind != "text":  # text samples have no segment rows: their one segment is the text
        cols.update({
            "s_seg_start": index(s_gs), "s_seg_count": np.array(s_gc, np.int32),
            "segments": np.array(list(zip(*(g[f] for f in SEGMENT_DTYPE.names))), SEGMENT_DTYPE)})
    if len(exts) > 255 or max(s_mc, default=0) > 255:
        raise ShardError(f"source {source}: more than 255 member kinds or members per sample")
    meta = {"format": CATALOG_FORMAT, "source": source, "kind": kind, "num_samples": n,
            "num_shards": len(shards), "exts": list(exts), "sequential_keys": sequential}
    return cols, meta


class SourceCatalog:
    """One source's sample catalog over mapped columns: per-sample lookups touch only its rows."""

    def __init__(self, cols: Columns, name: str, kind: str):
        meta = cols.meta
        if meta.get("format") != CATALOG_FORMAT:
            raise ShardError(f"{cols.name}: format {meta.get('format')!r}, expected {CATALOG_FORMAT!r}")
        if meta.get("source") != name or meta.get("kind") != kind:
            raise ShardError(f"{cols.name}: catalog of source {meta.get('source')!r} "
                             f"({meta.get('kind')}), the manifest names {name!r} ({kind})")
        self.cols, self.name, self.kind = cols, name, kind
        self.n = int(meta["num_samples"])
        self.exts = list(meta["exts"])
        self.sequential_keys = bool(meta.get("sequential_keys"))
        c = cols.cols
        self._first, self._h_key = c["h_first"], c["h_key"]
        self._last_shard = (0, -1, -1)  # (shard, first sample, end): consecutive lookups share it

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, sample number within the shard): a binary search of the shard starts."""
        k, lo, hi = self._last_shard
        if not lo <= i < hi:
            k = int(np.searchsorted(self._first, i, side="right")) - 1
            lo = int(self._first[k])
            hi = int(self._first[k + 1]) if k + 1 < len(self._first) else self.n
            self._last_shard = (k, lo, hi)
        return k, i - lo

    def shard_key(self, k: int) -> str:
        return self._h_key[k].decode()

    def identities(self) -> list[tuple[int, str]]:
        """(shard number, member key) of every sample, in order: what the hold-out split hashes
        (a pass over the whole source: only runs with data.holdout_fraction > 0 pay it)."""
        c = self.cols.cols
        shard = np.searchsorted(self._first, np.arange(self.n), side="right") - 1
        keys = ([f"{i:012d}" for i in range(self.n)] if self.sequential_keys
                else [k.decode() for k in c["s_key"]])
        return list(zip(shard.tolist(), keys))

    def sample_of(self, shard: int, member: int) -> int:
        """The sample number of member `member` of shard `shard`."""
        return int(self.cols["h_first"][shard]) + member

    def segment_rows(self, i: int) -> list[tuple]:
        """(kind code, text tokens, height, width, frames, fps, ext, text index) per segment."""
        c = self.cols.cols
        gs, gc = int(c["s_seg_start"][i]), int(c["s_seg_count"][i])
        return c["segments"][gs:gs + gc].tolist()

    def entry(self, i: int) -> dict:
        """The sample's index entry (data/shards.py's JSON form), rebuilt from its rows."""
        c = self.cols.cols
        ms, mc = int(c["s_mem_start"][i]), int(c["s_mem_count"][i])
        members = {self.exts[e]: {"offset": o, "size": s} for e, o, s in zip(
            c["m_ext"][ms:ms + mc].tolist(), c["m_offset"][ms:ms + mc].tolist(),
            c["m_size"][ms:ms + mc].tolist())}
        key = f"{i:012d}" if self.sequential_keys else c["s_key"][i].decode()
        entry = {"key": key, "kind": self.kind, "members": members,
                 "text_tokens": int(c["s_text_tokens"][i]), "text_bytes": int(c["s_text_bytes"][i]),
                 "images": [], "videos": []}
        if self.kind == "text":
            return entry
        rows = self.segment_rows(i)
        layout = []
        for kind, tokens, h, w, frames, fps, ext, _t in rows:
            if kind == SEG_IMAGE:
                entry["images"].append({"member": self.exts[ext], "height": h, "width": w})
                layout.append({"image": self.exts[ext]})
            elif kind == SEG_VIDEO:
                entry["videos"].append({"member": self.exts[ext], "frames": frames, "height": h,
                                        "width": w, "fps": fps})
            elif tokens >= 0:
                layout.append({"text_tokens": tokens})
        if self.kind == "interleaved" and not (len(rows) == 1 and rows[0][1] < 0):
            entry["layout"] = layout
        return entry


def _in_memory(cols: dict, meta: dict, name: str) -> Columns:
    return Columns(encode_columns(cols, meta), name)


# ---------------------------------------------------------------------------------------------


class Catalog:
    def __init__(self, store, manifest: dict, *, media, seq_len: int, window_sequences: int,
                 global_batch: int, weights: dict[str, float] | None = None,
                 holdout_fraction: float = 0.0, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split {split!r}; choose one of {list(SPLITS)}")
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"data.holdout_fraction={holdout_fraction} must be in [0, 1)")
        if split == "val" and holdout_fraction == 0:
            raise ValueError("a validation split of a dataset needs data.holdout_fraction > 0")
        self.holdout_fraction, self.split = holdout_fraction, split
        self.store, self.manifest, self.media = store, manifest, media
        self.seq_len, self.window_sequences = seq_len, window_sequences
        self.layout_rules = Layout(media, seq_len, window_sequences, global_batch)
        self.plan_key = plan_key(media, seq_len, window_sequences, global_batch)
        self.fingerprint: str = manifest["fingerprint"]
        self.names = [s["name"] for s in manifest["sources"]]
        self.kinds = [s["kind"] for s in manifest["sources"]]
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"data.source_weights names unknown source(s) {unknown}; "
                             f"the manifest has {self.names}")
        self.skipped: Counter = Counter()
        self.catalogs: list[SourceCatalog] = []
        self.sources: list[SourceSpec] = []
        self.plans: list[Columns] = []  # [source] -> its plan table (totals in .meta)
        self.derived_plans: list[str] = []  # sources whose plan table was built on load
        self.derived_holdout: list[str] = []  # sources whose hold-out split was computed on load
        self.restarts: list[Restarts | None] = []  # [source] -> its tokenizer restart points
        listed = {c["source"]: c for c in manifest.get("catalogs", [])}
        for name, kind in zip(self.names, self.kinds):
            src = SourceCatalog(self._sample_catalog(name, kind, listed.get(name)), name, kind)
            plan = self._plan(src, listed.get(name))
            for reason, n in plan.meta["skipped"].items():
                self.skipped[f"{name}: {reason}"] += n
            if plan.meta["units"] == 0:
                raise InvalidInput(f"source {name!r} has no usable samples "
                                   f"(skipped: {dict(self.skipped)})")
            units = plan["units"]
            tokens, vision, sample, offset = (units["tokens"], units["vision"], units["sample"],
                                              units["offset"])
            total, rows = float(plan.meta["tokens"]), None
            if holdout_fraction > 0:  # this split's units, read through the mapped table
                held, held_tokens = self._held_out_units(src, plan, holdout_fraction)
                rows = held if split == "val" else RowsWithout(plan.meta["units"], held)
                if len(rows) == 0:
                    raise ValueError(f"source {name!r} has {src.n} sample(s): with "
                                     f"data.holdout_fraction={holdout_fraction} none is left "
                                     "for training")
                total = float(held_tokens if split == "val" else plan.meta["tokens"] - held_tokens)
            weight = weights.get(name, total)  # default: by size in tokens
            self.catalogs.append(src)
            self.restarts.append(self._restarts(src, listed.get(name)))
            self.sources.append(SourceSpec(name, GROUP_OF_KIND[kind], weight, tokens, vision,
                                           sample, offset, rows=rows))
            self.plans.append(plan)

    def _sample_catalog(self, name: str, kind: str, listed: dict | None) -> Columns:
        if listed is not None:
            return open_columns(self.store, listed["key"], int(listed["size"]), listed["sha256"])
        # A dataset from before column files: its JSON indexes, turned into the same columns.
        shards = [s for s in self.manifest["shards"] if s["source"] == name]
        indexes = [read_index(self.store, s["index"], s.get("index_sha256")) for s in shards]
        for s, idx in zip(shards, indexes):
            if len(idx["samples"]) != s["num_samples"]:
                raise ShardError(f"{self.store.url}/{s['index']}: {len(idx['samples'])} samples, "
                                 f"the manifest says {s['num_samples']}")
        cols, meta = catalog_columns(name, kind, shards, indexes)
        return _in_memory(cols, meta, f"{name} (from {len(shards)} JSON indexes)")

    def _restarts(self, src: SourceCatalog, listed: dict | None) -> Restarts | None:
        entry = (listed or {}).get("restarts")
        if entry is None:  # none stored (short texts, or an older dataset): whole documents
            return None
        cols = open_columns(self.store, entry["key"], int(entry["size"]), entry["sha256"])
        return Restarts(cols, src.name, self.manifest["tokenizer"]["fingerprint"], src.n)

    def _held_out_units(self, src: SourceCatalog, plan: Columns,
                        fraction: float) -> tuple[np.ndarray, int]:
        if "holdout" in plan.cols:
            return held_out_units(plan, fraction)
        # A plan table from before the hold-out columns: hash every sample's identity here.
        if src.n > WARN_DERIVE_SAMPLES:
            log.warning("source %s: plan table %s has no hold-out columns; hashing %d sample "
                        "identities on every start (re-ingest with mmpt ingest --plan to store "
                        "them)", src.name, plan.name, src.n)
        self.derived_holdout.append(src.name)
        val = held_out(src.name, src.identities(), fraction)
        held = np.flatnonzero(val[np.asarray(plan["units"]["sample"])]).astype(np.int64)
        return held, int(np.asarray(plan["units"]["tokens"])[held].sum(dtype=np.int64))

    def _plan(self, src: SourceCatalog, listed: dict | None) -> Columns:
        stored = (listed or {}).get("plans", {}).get(self.plan_key)
        if stored is not None:
            plan = open_columns(self.store, stored["key"], int(stored["size"]), stored["sha256"])
            if plan.meta.get("format") != PLAN_FORMAT or plan.meta.get("plan_key") != self.plan_key:
                raise ShardError(f"{plan.name}: format {plan.meta.get('format')!r}, key "
                                 f"{plan.meta.get('plan_key')!r}: not the plan table for key "
                                 f"{self.plan_key} ({PLAN_FORMAT}); re-ingest with mmpt ingest --plan")
            return plan
        sizes = (self.seq_len, self.window_sequences)
        older = sorted(k for k, p in (listed or {}).get("plans", {}).items()
                       if (p.get("seq_len"), p.get("window_sequences")) == sizes)
        if older:  # a table for these sizes, but another key: an older unit rule or other vision settings
            log.warning("source %s: the manifest's plan table(s) %s for seq_len=%d, window_sequences=%d "
                        "do not match key %s (plan format %s, unit rule %r with %d piece(s) per unit, "
                        "or other vision settings); deriving the plan table from the sample catalog "
                        "on every start (re-ingest with mmpt ingest --plan, for this global batch "
                        "size, to store it)", src.name, older, self.seq_len, self.window_sequences,
                        self.plan_key, PLAN_FORMAT, UNIT_RULE, self.layout_rules.unit_pieces)
        elif src.n > WARN_DERIVE_SAMPLES:
            log.warning("source %s: no plan table for key %s (seq_len=%d, window_sequences=%d) in the "
                        "manifest; deriving it from %d samples on every start (mmpt ingest --plan "
                        "writes it once)", src.name, self.plan_key, self.seq_len,
                        self.window_sequences, src.n)
        self.derived_plans.append(src.name)
        cols, meta = plan_columns(src, self.layout_rules, self.plan_key,
                                  holdout=self.holdout_fraction > 0)
        return _in_memory(cols, meta, f"{src.name} plan {self.plan_key} (derived)")

    # -- lookups used by the planner and the loader workers
    def locate(self, source: int, sample: int) -> tuple[int, int]:
        """(shard number within the source, sample number within the shard)."""
        return self.catalogs[source].locate(sample)

    def entry(self, source: int, sample: int) -> tuple[str, dict]:
        cat = self.catalogs[source]
        return cat.shard_key(cat.locate(sample)[0]), cat.entry(sample)

    def document(self, source: int, sample: int) -> tuple[str, dict, list[Segment]]:
        """(shard key, index entry, segments) of one sample: what the loader needs to build it."""
        key, entry = self.entry(source, sample)
        return key, entry, self.layout_rules.segments(self.kinds[source], entry)

    def segments(self, source: int, sample: int) -> list[Segment]:
        return self.layout_rules.segments(self.kinds[source], self.catalogs[source].entry(sample))

    def layout(self, draw) -> tuple[int, tuple[tuple[int, int], ...]]:
        """(length, atoms) of a drawn unit, in the unit's own token coordinates."""
        if draw.vision == 0:  # text (planning's common case): every atom has vision tokens
            return draw.tokens, ()
        atoms, at = [], 0
        for kind, tokens, h, w, frames, fps, _, _ in self.catalogs[draw.source].segment_rows(draw.sample):
            if kind == SEG_TEXT:
                at += tokens
            else:
                n = self.layout_rules.atom_tokens(kind, h, w, frames, fps)
                atoms.append((at, at + n))
                at += n
        lo, hi = draw.offset, draw.offset + draw.tokens
        return draw.tokens, tuple((a - lo, b - lo) for a, b in atoms if lo <= a and b <= hi)

    def summary(self) -> dict:
        return {"fingerprint": self.fingerprint,
                "sources": {s.name: {"kind": k, "group": s.group, "weight": s.weight,
                                     "samples": int(s.size), "tokens": p.meta["tokens"],
                                     "vision_tokens": p.meta["vision_tokens"]}
                            for s, k, p in zip(self.sources, self.kinds, self.plans)},
                "skipped": dict(self.skipped)}

"""Ingest: local inputs -> webdataset tar shards + per-shard indexes + catalogs + manifest, in a
store (`mmpt ingest`, data/ingest_cli.py, documents the inputs and the options).

`ingest` validates and measures every input once (corrupt or unreadable ones are counted,
logged skips), writes shards and indexes under a fresh generation prefix with their catalogs,
tokenizer restart points (data/restarts.py) and plan tables, and switches the manifest last, so
readers see the old dataset or the new one. A distributed ingest writes parts (`part`, `run_id`)
that `merge` joins into one manifest. Shards, indexes and the fingerprint are byte-identical for
the same inputs and tokenizer. Format: see data/shards.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from data.decode import DEFAULT_MAX_PIXELS
from data.inputs import InputError, Sample, Source, enumerate_inputs
from data.restarts import RESTART_EVERY, restart_points
from data.shards import (GENERATION_PREFIX, MANIFEST_KEY, ShardBuilder, build_manifest, canonical_json,
                         generation_prefix, shard_keys)

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_GENERATION_KEY = re.compile(r"^gen-(\d{6,})/")


class IngestConflict(Exception):
    """The dataset's manifest changed while this ingest ran (another ingest into the same prefix)."""


def _generations(store) -> tuple[bytes | None, dict | None, int]:
    """(current manifest bytes, parsed manifest or None, highest generation used so far).

    The next ingest takes a generation no object was ever written under (leftovers of failed
    ingests included), so a key never changes content: caches rely on objects being immutable."""
    try:
        raw = store.get(MANIFEST_KEY)
    except FileNotFoundError:
        raw = None
    try:
        current = json.loads(raw) if raw is not None else None
        used = int(current.get("generation", 0)) if current is not None else 0
    except (ValueError, AttributeError, TypeError):  # a damaged manifest: re-ingesting repairs it
        current, used = None, 0
    for key in store.list(GENERATION_PREFIX):
        m = _GENERATION_KEY.match(key)
        if m:
            used = max(used, int(m[1]))
    return raw, current, used


def manifest_keys(manifest: dict) -> set[str]:
    """Every object a manifest names: shards, indexes, column catalogs and plan tables."""
    keep = {k for s in manifest["shards"] for k in (s["key"], s["index"])}
    for c in manifest.get("catalogs", []):
        keep |= {c["key"], *(p["key"] for p in c.get("plans", {}).values())}
        if "restarts" in c:
            keep.add(c["restarts"]["key"])
    return keep


def prune(store, manifest: dict, previous: dict | None) -> list[str]:
    """Delete what the new manifest no longer names: other generations (superseded ones and
    leftovers of failed ingests), objects of distributed-ingest parts (parts/: other runs, and
    this run's part manifests) and the previous manifest's shards in the layout without
    generations. Only keys of those kinds are touched; returns the deleted keys."""
    keep = manifest_keys(manifest)
    stale = [k for k in store.list(GENERATION_PREFIX) if _GENERATION_KEY.match(k) and k not in keep]
    stale += [k for k in store.list(PARTS_PREFIX) if k not in keep]
    for s in (previous or {}).get("shards", []):
        stale += [k for k in (s.get("key"), s.get("index")) if isinstance(k, str)
                  and k not in keep and not _GENERATION_KEY.match(k) and not k.startswith(PARTS_PREFIX)]
    for key in stale:
        store.delete(key)
    return stale


def _put(store, key: str, data: bytes) -> dict:
    store.put(key, data)
    return {"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_restarts(store, gen: str, name: str, restarts: dict | None) -> dict | None:
    """Put one source's restart points (data/restarts.py) under `gen`; their manifest entry, or
    None when no segment has any. restarts: {"tokenizer", "num_samples", "every", "rows"}."""
    from data.columnar import encode_columns
    from data.restarts import restart_columns

    if not restarts or not any(points for _, _, points in restarts["rows"]):
        return None
    cols, meta = restart_columns(name, restarts["tokenizer"], restarts["num_samples"],
                                 restarts["every"], restarts["rows"])
    return _put(store, f"{gen}{name}/restarts.cols", encode_columns(cols, meta))


def write_catalog(store, gen: str, name: str, kind: str, shards: list[dict], indexes: list[dict],
                  plans: list[tuple] = (), restarts: dict | None = None) -> dict:
    """Put one source's sample catalog, plan tables (data/catalog.py) and restart points under
    the generation; returns its manifest entry. plans: [(MediaRules, seq_len, window_sequences,
    global_batch)]; restarts: see write_restarts."""
    from data.catalog import SourceCatalog, catalog_columns
    from data.columnar import Columns, encode_columns
    from data.plan_table import Layout, plan_columns, plan_key

    def put(key: str, data: bytes) -> dict:
        return _put(store, key, data)

    cols, meta = catalog_columns(name, kind, shards, indexes)
    raw = encode_columns(cols, meta)
    entry = {"source": name, **put(f"{gen}{name}/catalog.cols", raw), "plans": {}}
    listed = write_restarts(store, gen, name, restarts)
    if listed is not None:
        entry["restarts"] = listed
    src = SourceCatalog(Columns(raw, name), name, kind)
    for media, seq_len, window, global_batch in plans:
        key = plan_key(media, seq_len, window, global_batch)
        pcols, pmeta = plan_columns(src, Layout(media, seq_len, window, global_batch), key)
        entry["plans"][key] = {**put(f"{gen}{name}/plan-{key}.cols", encode_columns(pcols, pmeta)),
                               "seq_len": seq_len, "window_sequences": window}
    return entry


PART_FORMAT = "mmpt-part/1"
PARTS_PREFIX = "parts/"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def part_prefix(run_id: str, part: int, parts: int) -> str:
    """Key prefix of one part of a distributed ingest (its shards and its part manifest)."""
    if not _RUN_ID_RE.match(run_id) or run_id in (".", ".."):
        raise SystemExit(f"mmpt ingest: --run-id {run_id!r}: use letters, digits, '_', '-' and '.'")
    return f"{PARTS_PREFIX}{run_id}/part-{part:05d}-of-{parts:05d}/"


def _part_of(items, part: int, parts: int):
    """Part `part` of `parts` of a deterministic item sequence: a contiguous range (so the parts,
    concatenated in order, are the sequence). ``items`` is called twice: to count, to take."""
    import itertools

    total = sum(1 for _ in items())
    return itertools.islice(items(), total * part // parts, total * (part + 1) // parts)


def ingest(sources: list[Source], store, tokenizer, shard_size: int = 64 * 2**20,
           max_pixels: int = DEFAULT_MAX_PIXELS, video_backend: str = "auto", timeout_s: float = 30.0,
           progress: bool = True, log=print, prune_old: bool = False, plans: list[tuple] = (),
           part: tuple[int, int] | None = None, run_id: str = "",
           restart_every: int = RESTART_EVERY) -> dict:
    """Write shards, indexes, column catalogs and the manifest of `sources` to `store`; return
    the manifest. ``plans``: [(MediaRules, seq_len, window_sequences, global_batch)] (data.ingest.plan_setting
    of a training config) to write plan tables for. ``restart_every``: tokens between the
    tokenizer restart points of long text segments (data/restarts.py; 0: none).

    Atomic for readers: everything goes under a new generation prefix and manifest.json is put
    last, so a reader sees the old dataset or the new one, never a mix. The previous generation
    is kept (a running job may hold the old manifest) unless ``prune_old``; see data/shards.py.

    With ``part=(i, n)``: only the i-th of n contiguous ranges of every source's inputs, into
    ``parts/<run_id>/part-i-of-n/`` with a part manifest there and no dataset manifest;
    `merge` then writes the dataset manifest over all parts (same samples, same order)."""
    from tqdm import tqdm

    names = [s.name for s in sources]
    for s in sources:
        if not _NAME_RE.match(s.name):
            raise SystemExit(f"mmpt ingest: source name {s.name!r}: use letters, digits, '_' and '-'")
    if len(set(names)) != len(names) or not sources:
        raise SystemExit(f"mmpt ingest: need at least one source, with distinct names (got {names})")
    if part is not None:
        if not 0 <= part[0] < part[1]:
            raise SystemExit(f"mmpt ingest: --part {part[0]}/{part[1]}: need 0 <= I < N")
        gen, generation = part_prefix(run_id, *part), None
    else:
        before, previous, used = _generations(store)
        generation = used + 1
        gen = generation_prefix(generation)
    shards, skipped, catalogs, part_restarts = [], [], [], {}
    bar = tqdm(desc="ingest", unit="input", disable=not progress, file=sys.stderr)
    for src in sources:
        number, count, indexes, rows = 0, 0, [], []
        builder = ShardBuilder(src.name, shard_keys(src.name, 0)[0])

        def flush():
            nonlocal number, builder
            tar, index = builder.finish()
            tar_key, idx_key = shard_keys(src.name, number)  # inside the generation
            idx_bytes = canonical_json(index)
            store.put(gen + tar_key, tar)
            store.put(gen + idx_key, idx_bytes)
            shards.append({"source": src.name, "key": gen + tar_key, "index": gen + idx_key,
                           "num_samples": len(index["samples"]), "size": len(tar),
                           "index_sha256": hashlib.sha256(idx_bytes).hexdigest()})
            indexes.append(index)
            number += 1
            builder = ShardBuilder(src.name, shard_keys(src.name, number)[0])

        def items(src=src):
            return enumerate_inputs(src, max_pixels, video_backend, timeout_s)

        for where, load in (items() if part is None else _part_of(items, *part)):
            bar.update(1)
            try:
                sample = load()
            except (InputError, OSError, UnicodeError) as e:
                reason = _skip_reason(e)
                skipped.append({"path": where, "reason": reason, "source": src.name})
                log(f"skipped {where}: {reason}")
                continue
            builder.add(f"{count:012d}", sample.kind, sample.members,
                        text_tokens=tokenizer.count(sample.text) if sample.text else 0,
                        text_bytes=len(sample.text.encode("utf-8")), images=sample.images,
                        videos=sample.videos, layout=_layout(sample, tokenizer))
            rows += [(count, t, points) for t, text in _texts(sample)
                     if (points := restart_points(tokenizer, text, restart_every))]
            count += 1
            if builder.nbytes >= shard_size:
                flush()
        if builder.samples:
            flush()
        if count == 0 and part is None:
            log(f"warning: source {src.name!r} ({src.path}) produced no samples")
        restarts = {"tokenizer": tokenizer.fingerprint, "num_samples": count,
                    "every": restart_every, "rows": rows}
        if part is None:
            catalogs.append(write_catalog(store, gen, src.name, src.kind,
                                          [s for s in shards if s["source"] == src.name], indexes, plans,
                                          restarts))
        elif (listed := write_restarts(store, gen, src.name, restarts)) is not None:
            part_restarts[src.name] = listed
    bar.close()
    srcs = [{"name": s.name, "kind": s.kind} for s in sources]
    if part is not None:
        manifest = {"format": PART_FORMAT, "run_id": run_id, "part": part[0], "parts": part[1],
                    "sources": srcs, "shards": shards, "tokenizer": tokenizer.info(),
                    "skipped": skipped, "restarts": part_restarts}
        store.put(gen + "part-manifest.json", canonical_json(manifest))
        return manifest
    manifest = build_manifest(srcs, shards, tokenizer.info(),
                              [{"path": x["path"], "reason": x["reason"]} for x in skipped],
                              generation, catalogs)
    _switch(store, before, previous, manifest, gen, prune_old, log)
    return manifest


def _switch(store, before: bytes | None, previous: dict | None, manifest: dict, gen: str,
            prune_old: bool, log) -> None:
    """Put the new manifest (refused if it changed since `before`), then prune if asked."""
    try:
        now = store.get(MANIFEST_KEY)
    except FileNotFoundError:
        now = None
    if now != before:
        raise IngestConflict(f"{store.url}/{MANIFEST_KEY} changed while this ingest ran (another "
                             f"ingest into the same prefix?); left it as it is. This ingest's "
                             f"{gen} is unreferenced: run the ingest again")
    store.put(MANIFEST_KEY, canonical_json(manifest))  # the switch: one atomic put
    if prune_old:
        removed = prune(store, manifest, previous)
        log(f"pruned {len(removed)} object(s) of superseded generations")
    elif previous is not None:
        log(f"the previous dataset (generation {previous.get('generation', 0)}) is kept for readers "
            "that opened its manifest; --prune deletes superseded generations")


def merge(store, run_id: str, parts: int, plans: list[tuple] = (), prune_old: bool = False,
          log=print) -> dict:
    """The dataset manifest over the `parts` parts of run `run_id`: each source's shards in part
    order (so its samples are in the order one process gives), column catalogs and plan tables
    under a new generation, the skips in the same order; then the atomic switch as in `ingest`."""
    from data.shards import read_index

    pms = []
    for i in range(parts):
        key = part_prefix(run_id, i, parts) + "part-manifest.json"
        try:
            pm = json.loads(store.get(key))
        except FileNotFoundError:
            raise SystemExit(f"mmpt ingest merge: {store.url}/{key} is missing: part {i} of {parts} "
                             "has not finished (or ran with another --run-id / N)") from None
        if pm.get("format") != PART_FORMAT or (pm.get("part"), pm.get("parts")) != (i, parts):
            raise SystemExit(f"mmpt ingest merge: {store.url}/{key} is not part {i}/{parts} of a "
                             f"{PART_FORMAT} run")
        pms.append(pm)
    for pm in pms[1:]:
        for field_ in ("sources", "tokenizer"):
            if pm[field_] != pms[0][field_]:
                raise SystemExit(f"mmpt ingest merge: part {pm['part']} has other {field_} than part 0 "
                                 "(the parts must run with the same inputs and tokenizer)")
    before, previous, used = _generations(store)
    generation = used + 1
    gen = generation_prefix(generation)
    shards, skipped, catalogs = [], [], []
    for src in pms[0]["sources"]:
        mine = [s for pm in pms for s in pm["shards"] if s["source"] == src["name"]]
        indexes = [read_index(store, s["index"], s["index_sha256"]) for s in mine]
        restarts = _merged_restarts(store, pms, src["name"])
        catalogs.append(write_catalog(store, gen, src["name"], src["kind"], mine, indexes, plans,
                                      restarts))
        shards += mine
        skipped += [{"path": x["path"], "reason": x["reason"]} for pm in pms for x in pm["skipped"]
                    if x["source"] == src["name"]]
        if not mine:
            log(f"warning: source {src['name']!r} produced no samples")
    manifest = build_manifest(pms[0]["sources"], shards, pms[0]["tokenizer"], skipped, generation,
                              catalogs)
    _switch(store, before, previous, manifest, gen, prune_old, log)
    return manifest


def _merged_restarts(store, pms: list[dict], name: str) -> dict | None:
    """One source's restart points over the parts, with sample numbers counted from the first
    part's first sample (the rows a one-process ingest gathers), or None if no part has any."""
    from data.columnar import open_columns
    from data.restarts import Restarts

    tokenizer = pms[0]["tokenizer"]["fingerprint"]
    rows, offset, every = [], 0, set()
    for pm in pms:
        n = sum(s["num_samples"] for s in pm["shards"] if s["source"] == name)
        listed = pm.get("restarts", {}).get(name)
        if listed is not None:
            cols = open_columns(store, listed["key"], int(listed["size"]), listed["sha256"])
            rows += Restarts(cols, name, tokenizer, n).rows(offset)
            every.add(int(cols.meta["every"]))
        offset += n
    if not rows:
        return None
    if len(every) > 1:
        raise SystemExit(f"mmpt ingest merge: the parts of source {name!r} used different "
                         f"--restart-every values {sorted(every)}")
    return {"tokenizer": tokenizer, "num_samples": offset, "every": every.pop(), "rows": rows}


def _texts(sample: Sample) -> list[tuple[int, str]]:
    """(text segment number, text) of each text the loader tokenizes on its own: a text sample's
    text or a caption (the "txt" member), an interleaved sample's text segments."""
    if sample.segments is not None:
        return list(enumerate(s["text"] for s in sample.segments if "text" in s))
    return [(0, sample.text)] if "txt" in sample.members else []


def _skip_reason(e: Exception) -> str:
    if isinstance(e, InputError):
        return str(e)
    if isinstance(e, UnicodeError):  # e.g. a caption holding a lone surrogate
        return f"invalid Unicode text ({e})"
    return f"cannot read ({e.strerror or e})"


def _layout(sample: Sample, tokenizer) -> list[dict] | None:
    """Interleaved reading order with per-text-segment token counts (see data/shards.py)."""
    if sample.segments is None:
        return None
    return [{"text_tokens": tokenizer.count(s["text"])} if "text" in s else {"image": s["image"]}
            for s in sample.segments]


def corpus_sources(corpus: Path) -> list[Source]:
    """The four sources of a directory in the data.corpus layout."""
    c = Path(corpus)
    return [Source("text", "text", c / "text"), Source("images", "image", c / "images"),
            Source("videos", "video", c / "videos"),
            Source("interleaved", "interleaved", c / "interleaved" / "docs.jsonl")]


def plan_setting(spec: str) -> tuple:
    """'configs/k2.5.toml --data.seq_len=8192' -> (MediaRules, seq_len, window_sequences,
    global_batch_size): what fixes a plan table (the global batch through the units' size)."""
    import shlex

    from data.media import MediaRules
    from train.config import load_config

    path, *overrides = shlex.split(spec)
    cfg = load_config(path, overrides)
    return (MediaRules.from_config(cfg), cfg.data.seq_len, cfg.data.window_sequences,
            cfg.data.global_batch_size)

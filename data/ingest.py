"""`mmpt ingest`: local inputs -> webdataset tar shards + per-shard indexes + manifest, in a store.

    mmpt ingest --out s3://bucket/ds --tokenizer tok/tokenizer.json \
        --text text=corpus/text --images images=corpus/images --videos videos=corpus/videos \
        --interleaved docs=corpus/interleaved/docs.jsonl [--shard-size 64MB] [--prune]
        [--store.read_timeout=20 ...]   # S3 waiting and retrying, as the [store] config section
    mmpt ingest --out /data/ds --tokenizer tok/tokenizer.json --corpus corpus   # data.corpus layout
    mmpt ingest --part 3/16 --run-id R ...    # distributed: part 3 of 16 (launch/slurm/ingest.sbatch)
    mmpt ingest merge --out s3://bucket/ds --parts 16 --run-id R [--plan configs/k2.5.toml]

Inputs (each option repeatable, NAME= optional, default name = file/dir stem):
- --text: a JSONL file or a directory of *.jsonl files, one {"text": "..."} per line; Parquet
  files (*.parquet, the FineWeb / HF datasets layout) with a text column (--text-column, default
  "text", read with pyarrow); or an s3:// prefix holding such objects (listed at ingest);
- --webdataset: webdataset tars of image + caption pairs (LAION / DataComp layout: jpg/png/webp
  with txt or json {"caption"|"text"}): a .tar, a directory of *.tar or an s3:// prefix; members
  that escape their directory, links and devices are rejected, a corrupt tar keeps the samples
  before the damage; each is a counted skip;
- --images / --videos: a directory of images (jpg, jpeg, png, webp) or videos (mp4); captions from
  `captions.jsonl` in that directory ({"file": NAME, "caption": ...}) or a sidecar NAME-stem.txt;
- --interleaved: JSONL, one {"segments": [{"text": ...} | {"image": "relative/path.jpg"}, ...]}.
Every input is fully decoded once to validate it and measure it; corrupt or unreadable inputs are
reported (path, reason), skipped, counted in the summary and listed in the manifest. So are lines
that are not UTF-8 (in any JSONL file, captions.jsonl included, named by file and line).

Confinement: the paths on the command line are read as given; everything found below them must
stay inside them. A symlink whose target lies inside the same input directory is followed (as the
file it names); one leading out of it is refused, and so are document images named by an absolute
path or with '..'; each refusal is a counted skip with path and reason.

Tokenizer restart points (data/restarts.py) are recorded for every text segment of more than
2 x --restart-every tokens (default 512; 0: none), each verified at ingest, so the loader can
tokenize a unit of a long document without tokenizing the whole document.

Atomic for readers: shards and indexes go under a fresh generation prefix (gen-NNNNNN/) and the
manifest is switched last; the superseded generation stays for readers that opened it until an
ingest with --prune. Shards, indexes and the fingerprint are byte-identical for the same inputs
and tokenizer (into a fresh prefix, the whole output is). Format: see data/shards.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", s.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 64MB, 512KB, 1000000)")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


# ---------------------------------------------------------------------------------------------


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
    from data.catalog import Columns, Layout, SourceCatalog, catalog_columns, plan_columns, plan_key
    from data.columnar import encode_columns

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


def summary(manifest: dict, url: str) -> str:
    lines = [f"wrote {url}/{MANIFEST_KEY}  generation {manifest.get('generation', 0)}  "
             f"fingerprint {manifest['fingerprint'][:16]}"]
    for s in manifest["sources"]:
        size = sum(x["size"] for x in manifest["shards"] if x["source"] == s["name"])
        lines.append(f"  {s['name']:<14} {s['kind']:<12} {s['num_samples']:>7} samples "
                     f"{s['num_shards']:>4} shards {size / 1e6:9.2f} MB")
    sk = manifest["skipped"]
    lines.append(f"  skipped {sk['count']} input(s)" + (":" if sk["count"] else ""))
    lines += [f"    {x['path']}: {x['reason']}" for x in sk["inputs"]]
    return "\n".join(lines)


def corpus_sources(corpus: Path) -> list[Source]:
    """The four sources of a directory in the data.corpus layout."""
    c = Path(corpus)
    return [Source("text", "text", c / "text"), Source("images", "image", c / "images"),
            Source("videos", "video", c / "videos"),
            Source("interleaved", "interleaved", c / "interleaved" / "docs.jsonl")]


def _source_arg(kind: str, layout: str = ""):
    def parse(s: str) -> Source:
        name, sep, path = s.partition("=")
        if not sep or "://" in name:
            name, path = Path(s.rstrip("/")).stem, s
        if path.startswith("s3://"):
            return Source(name, kind, Path(), url=path, layout=layout)
        return Source(name, kind, Path(path), layout=layout)
    return parse


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


def _log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)  # keeps the progress bar intact


def _part_arg(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", s.strip())
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise argparse.ArgumentTypeError(f"--part {s!r}: expected I/N with 0 <= I < N (e.g. 0/3)")
    return int(m[1]), int(m[2])


def _run_id(value: str | None) -> str:
    run = value or os.environ.get("SLURM_ARRAY_JOB_ID", "")
    if not run:
        raise SystemExit("mmpt ingest: --part/merge need --run-id (or SLURM_ARRAY_JOB_ID): the id "
                         "that every part and the merge of one distributed ingest share")
    return run


def merge_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mmpt ingest merge",
                                 description="write the dataset manifest over the parts of a "
                                             "distributed ingest (mmpt ingest --part I/N)")
    ap.add_argument("--out", required=True, help="the dataset URL the parts wrote into")
    ap.add_argument("--parts", type=int, required=True, help="N, the number of parts")
    ap.add_argument("--run-id", help="the parts' --run-id (default: $SLURM_ARRAY_JOB_ID)")
    ap.add_argument("--plan", action="append", default=[], metavar="'CONFIG.toml [--data.x=y ...]'")
    ap.add_argument("--prune", action="store_true")
    args = ap.parse_args(argv)
    from data.store import open_store

    store = open_store(args.out)
    manifest = merge(store, _run_id(args.run_id), args.parts, [plan_setting(p) for p in args.plan],
                     prune_old=args.prune, log=_log)
    print(summary(manifest, store.url))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    ap = argparse.ArgumentParser(prog="mmpt ingest", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True, help="dataset URL: s3://bucket/prefix or a local directory")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json or a tiktoken rank file")
    for kind, opt in (("text", "--text"), ("image", "--images"), ("video", "--videos"),
                      ("interleaved", "--interleaved")):
        ap.add_argument(opt, action="append", default=[], type=_source_arg(kind), metavar="[NAME=]PATH")
    ap.add_argument("--webdataset", action="append", default=[], type=_source_arg("image", "webdataset"),
                    metavar="[NAME=]PATH|s3://...", help="webdataset tars of image + caption pairs "
                    "(jpg/png/webp with txt or json): a .tar, a directory of them or an S3 prefix")
    ap.add_argument("--text-column", default="text", help="the text column of Parquet inputs")
    ap.add_argument("--corpus", help="a directory in the data.corpus layout (adds its four sources)")
    ap.add_argument("--shard-size", type=parse_size, default=64 * 2**20, help="target tar size (default 64MB)")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit")
    ap.add_argument("--video-backend", default="auto", choices=["auto", "decord", "pyav"])
    ap.add_argument("--timeout", type=float, default=30.0, help="per-video decode timeout, seconds")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--plan", action="append", default=[], metavar="'CONFIG.toml [--data.x=y ...]'",
                    help="also write the plan tables (data/catalog.py) for this training config and "
                         "overrides, so its runs start without a pass over every sample (repeatable)")
    ap.add_argument("--restart-every", type=int, default=RESTART_EVERY, metavar="TOKENS",
                    help="tokens between the tokenizer restart points of long texts, which let the "
                         f"loader tokenize a unit's own text (data/restarts.py; default {RESTART_EVERY}, "
                         "0: none)")
    ap.add_argument("--prune", action="store_true",
                    help="after the switch, delete superseded generations (no reader may still use them)")
    ap.add_argument("--part", type=_part_arg, metavar="I/N",
                    help="distributed ingest: only the I-th of N contiguous ranges of every source's "
                         "inputs, into parts/RUN_ID/; then `mmpt ingest merge` (0 <= I < N)")
    ap.add_argument("--run-id", help="with --part: the id all parts share (default: $SLURM_ARRAY_JOB_ID)")
    args, rest = ap.parse_known_args(argv)
    from train.config import load_config, parse_overrides

    if set(parse_overrides(rest)) - {"store"}:  # junk raises ConfigError naming it
        ap.error(f"unrecognized arguments: {' '.join(rest)} (of the config, only "
                 "--store.FIELD=VALUE applies to ingest)")

    sources = args.text + args.images + args.videos + args.interleaved + args.webdataset
    for src in args.text:
        src.column = args.text_column
    if args.corpus:
        sources += corpus_sources(Path(args.corpus))
    from data.store import open_store
    from data.tokenizer import load_tokenizer

    store = open_store(args.out, **load_config(None, rest).store.store_opts())
    part = {"part": args.part, "run_id": _run_id(args.run_id)} if args.part else {}
    manifest = ingest(sources, store, load_tokenizer(args.tokenizer), args.shard_size, args.max_pixels,
                      args.video_backend, args.timeout, progress=not args.no_progress,
                      log=_log, prune_old=args.prune, plans=[plan_setting(p) for p in args.plan],
                      restart_every=max(args.restart_every, 0), **part)
    if args.part:
        print(f"wrote part {args.part[0]}/{args.part[1]} of run {part['run_id']}: "
              f"{sum(s['num_samples'] for s in manifest['shards'])} samples, "
              f"{len(manifest['skipped'])} skipped; then: mmpt ingest merge --parts {args.part[1]}")
        return 0
    print(summary(manifest, store.url))
    return 0

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

Atomic for readers: shards and indexes go under a fresh generation prefix (gen-NNNNNN/) and the
manifest is switched last; the superseded generation stays for readers that opened it until an
ingest with --prune. Shards, indexes and the fingerprint are byte-identical for the same inputs
and tokenizer (into a fresh prefix, the whole output is). Format: see data/shards.py.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, decode_video_frames, probe_video
from data.shards import (GENERATION_PREFIX, MANIFEST_KEY, ShardBuilder, build_manifest, canonical_json,
                         generation_prefix, shard_keys)

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
VIDEO_EXTS = {".mp4": "mp4"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_GENERATION_KEY = re.compile(r"^gen-(\d{6,})/")


class InputError(Exception):
    """One input cannot be used; becomes a (path, reason) entry in the skip report."""


@dataclass
class Source:
    name: str
    kind: str  # text | image | video | interleaved
    path: Path
    url: str = ""  # an s3:// prefix instead of a local path (listed at ingest)
    layout: str = ""  # "webdataset": image + caption pairs read from tar shards
    column: str = "text"  # the text column of Parquet inputs


@dataclass
class Sample:
    kind: str
    members: dict[str, bytes]
    text: str  # all text of the sample, for token/byte counts
    images: list[dict] = field(default_factory=list)
    videos: list[dict] = field(default_factory=list)
    segments: list[dict] | None = None  # interleaved: [{"text": str} | {"image": member}] in order


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", s.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 64MB, 512KB, 1000000)")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


# ---------------------------------------------------------------------------------------------
# Enumerating inputs: every item is (display path, loader); loader() -> Sample or raises InputError


def _rel(path: Path, root: Path, source: str) -> str:
    """Report paths relative to the source root, so the manifest does not depend on where inputs lie."""
    try:
        return f"{source}/{path.relative_to(root).as_posix()}" if path != root else f"{source}/{path.name}"
    except ValueError:
        return str(path)


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise SystemExit(f"mmpt ingest: {path}: no *.jsonl files")
        return files
    if not path.exists():
        raise SystemExit(f"mmpt ingest: {path}: no such file")
    return [path]


def _inside(path: Path, root: Path) -> Path:
    """``path`` with symlinks resolved, if it stays inside ``root`` (resolved); else InputError.

    The paths given on the command line are taken as given; everything found below them (files
    of a directory, captions, images named by documents) must resolve inside them. A symlink
    whose target lies in the same input directory is followed; one leading out is refused."""
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise InputError("no such file" + (" (broken symlink)" if path.is_symlink() else "")) from None
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise InputError(f"cannot resolve the path ({e})") from None
    if not real.is_relative_to(root):
        raise InputError(f"leads outside the input directory {root.name}/ (symlink); refused")
    if not real.is_file():
        raise InputError("not a regular file")
    return real


def _refused(reason: str):
    def load() -> Sample:
        raise InputError(reason)
    return load


def _jsonl_lines(files: list[Path], root: Path, source: str, given: Path | None = None):
    """(where, line bytes) of every non-blank line, or (where, InputError) for a file that leads
    outside ``root``. ``given`` is a file named on the command line, read as given."""
    real_root = root.resolve()
    for f in files:
        where = _rel(f, root, source)
        try:
            data = (f if f == given else _inside(f, real_root)).read_bytes()
        except InputError as e:
            yield where, e
            continue
        except OSError as e:
            yield where, InputError(f"cannot read ({e.strerror or e})")
            continue
        for n, line in enumerate(data.split(b"\n"), 1):
            if line.strip():
                yield f"{where}:{n}", line


def _decode_utf8(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"invalid UTF-8 (byte {line[e.start:e.start + 1]!r} at offset {e.start} "
                         "of the line)") from None


def _parse_json(line: bytes) -> dict:
    try:
        obj = json.loads(_decode_utf8(line))
    except ValueError as e:
        raise InputError(f"invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InputError("JSON line is not an object")
    try:  # a "\ud800" escape decodes to a lone surrogate, which no UTF-8 text can hold
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"invalid Unicode in JSON ({e.reason}: {e.object[e.start:e.end]!r})") from None
    return obj


def _text_item(line: bytes):
    def load() -> Sample:
        text = _parse_json(line).get("text")
        if not isinstance(text, str) or not text:
            raise InputError("no non-empty string field 'text'")
        return Sample("text", {"txt": text.encode("utf-8")}, text)
    return load


def _captions(folder: Path, source: str) -> tuple[dict[str, str], list]:
    """Captions from ``captions.jsonl`` and the skips of its unusable lines as (where, loader):
    a line that is not UTF-8 or not a {"file", "caption"} object is a counted skip (its file then
    needs a sidecar caption)."""
    caps, bad = {}, []
    cj = folder / "captions.jsonl"
    if not (cj.exists() or cj.is_symlink()):
        return caps, bad
    for where, line in _jsonl_lines([cj], folder, source):
        if isinstance(line, InputError):  # the whole file is refused (a symlink leading out)
            bad.append((where, _refused(str(line))))
            continue
        try:
            row = _parse_json(line)
            file, caption = row["file"], row["caption"]
            if not isinstance(file, str) or not isinstance(caption, str):
                raise InputError("'file' and 'caption' must be strings")
            caps[file] = caption
        except KeyError as e:
            bad.append((where, _refused(f"bad caption line (no {e} field)")))
        except InputError as e:
            bad.append((where, _refused(f"bad caption line: {e}")))
    return caps, bad


def _caption_for(path: Path, caps: dict[str, str], root: Path) -> str:
    if path.name in caps:
        return caps[path.name]
    side = path.with_suffix(".txt")
    if side.exists() or side.is_symlink():
        try:
            return _decode_utf8(_inside(side, root).read_bytes()).strip()
        except InputError as e:
            raise InputError(f"sidecar caption {side.name}: {e}") from None
    raise InputError("no caption (neither in captions.jsonl nor a sidecar .txt)")


def _image_meta(data: bytes, name: str, max_pixels: int, member: str) -> dict:
    try:
        h, w = decode_image(data, name, max_pixels).shape[:2]
    except DecodeError as e:
        raise InputError(str(e)) from None
    return {"member": member, "height": int(h), "width": int(w)}


def _image_item(path: Path, root: Path, caps: dict, max_pixels: int):
    def load() -> Sample:
        data = _inside(path, root).read_bytes()
        caption = _caption_for(path, caps, root)
        ext = IMAGE_EXTS[path.suffix.lower()]
        meta = _image_meta(data, "image", max_pixels, ext)
        return Sample("image", {ext: data, "txt": caption.encode("utf-8")}, caption, images=[meta])
    return load


def _video_item(path: Path, root: Path, caps: dict, backend: str, timeout_s: float):
    def load() -> Sample:
        data = _inside(path, root).read_bytes()
        caption = _caption_for(path, caps, root)
        try:
            info = probe_video(data, "video", backend, timeout_s)
            decode_video_frames(data, [info.frames - 1], "video", backend, timeout_s)  # last frame reads
        except DecodeError as e:
            raise InputError(str(e)) from None
        meta = {"member": "mp4", **info.as_meta()}
        return Sample("video", {"mp4": data, "txt": caption.encode("utf-8")}, caption, videos=[meta])
    return load


def _document_image(base: Path, root: Path, name: str, i: int) -> Path:
    """The file an interleaved document's image segment names: a relative path without '..',
    resolving inside the source's directory."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\x00" in name:
        raise InputError(f"segment {i}: image path {name!r} is absolute; name images relative to "
                         "the document file's directory")
    if ".." in re.split(r"[/\\]", name):
        raise InputError(f"segment {i}: image path {name!r} contains '..'; images must lie inside "
                         "the document file's directory")
    try:
        return _inside(base / name, root)
    except InputError as e:
        raise InputError(f"segment {i}: image {name!r}: {e}") from None


def _interleaved_item(line: bytes, base: Path, root: Path, max_pixels: int):
    def load() -> Sample:
        segs = _parse_json(line).get("segments")
        if not isinstance(segs, list) or not segs:
            raise InputError("no non-empty list field 'segments'")
        members, out, texts, images = {}, [], [], []
        for i, seg in enumerate(segs):
            if isinstance(seg, dict) and isinstance(seg.get("text"), str) and set(seg) == {"text"}:
                out.append({"text": seg["text"]})
                texts.append(seg["text"])
            elif isinstance(seg, dict) and isinstance(seg.get("image"), str) and set(seg) == {"image"}:
                ext = IMAGE_EXTS.get(Path(seg["image"]).suffix.lower())
                if ext is None:
                    raise InputError(f"segment {i}: {seg['image']!r} is not a jpg/png/webp image")
                p = _document_image(base, root, seg["image"], i)
                try:
                    data = p.read_bytes()
                except OSError as e:
                    raise InputError(f"segment {i}: cannot read {seg['image']!r} ({e.strerror})") from None
                member = f"img{len(images)}.{ext}"
                images.append(_image_meta(data, seg["image"], max_pixels, member))
                members[member] = data
                out.append({"image": member})
            else:
                raise InputError(f"segment {i} is neither {{'text': str}} nor {{'image': path}}")
        members["json"] = canonical_json({"segments": out})
        return Sample("interleaved", members, "".join(texts), images=images, segments=out)
    return load


# -- inputs in other layouts: S3 prefixes, Parquet, webdataset tars


def _input_files(src: Source, exts: tuple[str, ...]):
    """(display path, open()) of the source's input files ending in one of ``exts``, sorted;
    open() gives a local path (confined as above) or, for an S3 prefix, the object's bytes."""
    if src.url:
        from data.store import open_store, redact

        store = open_store(src.url)
        keys = [k for k in store.list("") if k.lower().endswith(exts)]
        if not keys:
            raise SystemExit(f"mmpt ingest: {redact(src.url)}: no objects ending in {'/'.join(exts)}")
        return [(f"{src.name}/{k}", lambda k=k: store.get(k)) for k in keys]
    path = src.path
    if path.is_dir():
        root = path.resolve()
        files = sorted(p for p in path.iterdir() if p.name.lower().endswith(exts)
                       and (p.is_file() or p.is_symlink()))
        if not files:
            raise SystemExit(f"mmpt ingest: {path}: no files ending in {'/'.join(exts)}")
        return [(_rel(p, path, src.name), lambda p=p: _inside(p, root)) for p in files]
    if not path.exists():
        raise SystemExit(f"mmpt ingest: {path}: no such file")
    return [(f"{src.name}/{path.name}", lambda: path)]


def _read_all(opened) -> bytes:
    return opened if isinstance(opened, bytes) else opened.read_bytes()


def _text_value(value, column: str):
    def load() -> Sample:
        text = value
        if isinstance(text, bytes):
            text = _decode_utf8(text)
        if not isinstance(text, str):
            raise InputError(f"column {column!r} is {'null' if text is None else type(text).__name__}, "
                             "not text")
        if not text:
            raise InputError(f"column {column!r} is empty")
        return Sample("text", {"txt": text.encode("utf-8")}, text)
    return load


def _parquet_rows(where: str, opened, column: str):
    """(where, loader) per row of one Parquet file's text column; an unreadable file or column
    is one counted skip (rows read before a corrupt page stay, the rest is one skip)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("mmpt ingest: Parquet inputs need pyarrow (pip install 'mmpt[ingest]')") from None
    n = 0
    try:
        source = pa.BufferReader(opened) if isinstance(opened, bytes) else str(opened)
        pf = pq.ParquetFile(source)
        names = pf.schema_arrow.names
        if column not in names:
            raise InputError(f"no column {column!r} (has {names}); pick one with --text-column")
        for batch in pf.iter_batches(columns=[column], batch_size=4096):
            for value in batch.column(0).to_pylist():
                yield f"{where}:row{n}", _text_value(value, column)
                n += 1
    except InputError as e:
        yield where, _refused(str(e))
    except (pa.ArrowException, OSError) as e:
        at = f" after row {n}" if n else ""
        yield where, _refused(f"corrupt Parquet file{at} ({type(e).__name__}: {e})")


def _wds_member(name: str) -> tuple[str, str]:
    """(key, extension) of a webdataset member name; unsafe names raise InputError."""
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name
            or any(p in ("", ".", "..") for p in parts)):
        raise InputError(f"tar member {name!r} escapes its directory or hides a path; rejected")
    base = parts[-1]
    if "." not in base.lstrip("."):
        raise InputError(f"tar member {name!r} has no extension")
    stem, _, ext = base.partition(".")
    return "/".join(parts[:-1] + [stem]), ext.lower()


def _wds_sample(where: str, members: dict[str, bytes], max_pixels: int):
    def load() -> Sample:
        image = next((e for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
        if image is None:
            raise InputError(f"no jpg/png/webp member (has {sorted(members)})")
        if "txt" in members:
            caption = _decode_utf8(members["txt"]).strip()
        elif "json" in members:
            meta = _parse_json(members["json"])
            caption = meta.get("caption", meta.get("text"))
            if not isinstance(caption, str):
                raise InputError("json member has no string 'caption' or 'text'")
        else:
            raise InputError(f"no caption (txt or json member; has {sorted(members)})")
        if not caption:
            raise InputError("empty caption")
        ext = IMAGE_EXTS["." + image]
        meta = _image_meta(members[image], "image", max_pixels, ext)
        return Sample("image", {ext: members[image], "txt": caption.encode("utf-8")}, caption,
                      images=[meta])
    return load


def _webdataset_samples(where: str, opened, max_pixels: int):
    """(where, loader) per sample of one webdataset tar (members grouped by key, in tar order).
    Unsafe or non-file members are counted skips; a corrupt tar keeps the samples before the
    damage and is one skip for the rest."""
    import tarfile

    try:
        data = _read_all(opened())
    except InputError as e:
        yield where, _refused(str(e))
        return
    key, group, done = None, {}, 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for ti in tf:
                if ti.isdir():
                    continue
                try:
                    k, ext = _wds_member(ti.name)
                    if not ti.isreg():
                        raise InputError(f"tar member {ti.name!r} is not a regular file (link or "
                                         "device); rejected")
                except InputError as e:
                    yield f"{where}:{ti.name}", _refused(str(e))
                    continue
                if k != key and group:
                    yield f"{where}:{key}", _wds_sample(f"{where}:{key}", group, max_pixels)
                    done += 1
                    group = {}
                key = k
                group[ext] = tf.extractfile(ti).read()
        if group:
            yield f"{where}:{key}", _wds_sample(f"{where}:{key}", group, max_pixels)
    except (tarfile.TarError, OSError, EOFError) as e:
        lost = f"; sample {key} was being read" if group else ""
        yield where, _refused(f"corrupt or truncated tar after {done} sample(s){lost} "
                              f"({type(e).__name__}: {e})")


def enumerate_inputs(src: Source, max_pixels: int, video_backend: str, timeout_s: float):
    if src.layout == "webdataset":
        for where, opened in _input_files(src, (".tar",)):
            yield from _webdataset_samples(where, opened, max_pixels)
        return
    if src.url and src.kind != "text":
        raise SystemExit(f"mmpt ingest: --{src.kind}s from an S3 prefix is not supported; S3 inputs "
                         "are --text (JSONL, Parquet) and --webdataset (tars)")
    if src.kind == "text" and (src.url or src.path.suffix == ".parquet"
                               or (src.path.is_dir() and any(src.path.glob("*.parquet")))):
        for where, opened in _input_files(src, (".jsonl", ".parquet")):
            if where.endswith(".parquet"):
                try:
                    opened = opened()
                except InputError as e:
                    yield where, _refused(str(e))
                    continue
                yield from _parquet_rows(where, opened, src.column)
                continue
            try:
                data = _read_all(opened())
            except InputError as e:
                yield where, _refused(str(e))
                continue
            for n, line in enumerate(data.split(b"\n"), 1):
                if line.strip():
                    yield f"{where}:{n}", _text_item(line)
        return
    if src.kind in ("text", "interleaved"):
        files = _jsonl_files(src.path)
        given, root = (None, src.path) if src.path.is_dir() else (src.path, src.path.parent)
        for f in files:
            for where, line in _jsonl_lines([f], root, src.name, given):
                if isinstance(line, InputError):
                    yield where, _refused(str(line))
                elif src.kind == "text":
                    yield where, _text_item(line)
                else:
                    yield where, _interleaved_item(line, f.parent, root.resolve(), max_pixels)
    else:
        if not src.path.is_dir():
            raise SystemExit(f"mmpt ingest: {src.path}: not a directory")
        root = src.path.resolve()
        exts = IMAGE_EXTS if src.kind == "image" else VIDEO_EXTS
        caps, bad = _captions(src.path, src.name)
        yield from bad
        for p in sorted(src.path.iterdir()):
            if p.suffix.lower() in exts and (p.is_file() or p.is_symlink()):
                item = (_image_item(p, root, caps, max_pixels) if src.kind == "image"
                        else _video_item(p, root, caps, video_backend, timeout_s))
                yield _rel(p, src.path, src.name), item


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


def write_catalog(store, gen: str, name: str, kind: str, shards: list[dict], indexes: list[dict],
                  plans: list[tuple] = ()) -> dict:
    """Put one source's sample catalog and plan tables (data/catalog.py) under the generation;
    returns its manifest entry. plans: [(MediaRules, seq_len, window_sequences)]."""
    from data.catalog import Columns, Layout, SourceCatalog, catalog_columns, plan_columns, plan_key
    from data.columnar import encode_columns

    def put(key: str, data: bytes) -> dict:
        store.put(key, data)
        return {"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    cols, meta = catalog_columns(name, kind, shards, indexes)
    raw = encode_columns(cols, meta)
    entry = {"source": name, **put(f"{gen}{name}/catalog.cols", raw), "plans": {}}
    src = SourceCatalog(Columns(raw, name), name, kind)
    for media, seq_len, window in plans:
        key = plan_key(media, seq_len, window)
        pcols, pmeta = plan_columns(src, Layout(media, seq_len, window), key)
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
           part: tuple[int, int] | None = None, run_id: str = "") -> dict:
    """Write shards, indexes, column catalogs and the manifest of `sources` to `store`; return
    the manifest. ``plans``: [(MediaRules, seq_len, window_sequences)] to write plan tables for.

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
    shards, skipped, catalogs = [], [], []
    bar = tqdm(desc="ingest", unit="input", disable=not progress, file=sys.stderr)
    for src in sources:
        number, count, indexes = 0, 0, []
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
            count += 1
            if builder.nbytes >= shard_size:
                flush()
        if builder.samples:
            flush()
        if count == 0 and part is None:
            log(f"warning: source {src.name!r} ({src.path}) produced no samples")
        if part is None:
            catalogs.append(write_catalog(store, gen, src.name, src.kind,
                                          [s for s in shards if s["source"] == src.name], indexes, plans))
    bar.close()
    srcs = [{"name": s.name, "kind": s.kind} for s in sources]
    if part is not None:
        manifest = {"format": PART_FORMAT, "run_id": run_id, "part": part[0], "parts": part[1],
                    "sources": srcs, "shards": shards, "tokenizer": tokenizer.info(),
                    "skipped": skipped}
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
        catalogs.append(write_catalog(store, gen, src["name"], src["kind"], mine, indexes, plans))
        shards += mine
        skipped += [{"path": x["path"], "reason": x["reason"]} for pm in pms for x in pm["skipped"]
                    if x["source"] == src["name"]]
        if not mine:
            log(f"warning: source {src['name']!r} produced no samples")
    manifest = build_manifest(pms[0]["sources"], shards, pms[0]["tokenizer"], skipped, generation,
                              catalogs)
    _switch(store, before, previous, manifest, gen, prune_old, log)
    return manifest


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
    """'configs/k2.5.toml --data.seq_len=8192' -> (MediaRules, seq_len, window_sequences)."""
    import shlex

    from data.media import MediaRules
    from train.config import load_config

    path, *overrides = shlex.split(spec)
    cfg = load_config(path, overrides)
    return MediaRules.from_config(cfg), cfg.data.seq_len, cfg.data.window_sequences


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
                      log=_log, prune_old=args.prune, plans=[plan_setting(p) for p in args.plan], **part)
    if args.part:
        print(f"wrote part {args.part[0]}/{args.part[1]} of run {part['run_id']}: "
              f"{sum(s['num_samples'] for s in manifest['shards'])} samples, "
              f"{len(manifest['skipped'])} skipped; then: mmpt ingest merge --parts {args.part[1]}")
        return 0
    print(summary(manifest, store.url))
    return 0

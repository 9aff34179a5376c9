"""`mmpt ingest`: local inputs -> webdataset tar shards + per-shard indexes + manifest, in a store.

    mmpt ingest --out s3://bucket/ds --tokenizer tok/tokenizer.json \
        --text text=corpus/text --images images=corpus/images --videos videos=corpus/videos \
        --interleaved docs=corpus/interleaved/docs.jsonl [--shard-size 64MB]
    mmpt ingest --out /data/ds --tokenizer tok/tokenizer.json --corpus corpus   # data.corpus layout

Inputs (each option repeatable, NAME= optional, default name = file/dir stem):
- --text: a JSONL file or a directory of *.jsonl files, one {"text": "..."} per line;
- --images / --videos: a directory of images (jpg, jpeg, png, webp) or videos (mp4); captions from
  `captions.jsonl` in that directory ({"file": NAME, "caption": ...}) or a sidecar NAME-stem.txt;
- --interleaved: JSONL, one {"segments": [{"text": ...} | {"image": "relative/path.jpg"}, ...]}.
Every input is fully decoded once to validate it and measure it; corrupt or unreadable inputs are
reported (path, reason), skipped, counted in the summary and listed in the manifest. Output is
byte-identical for the same inputs and tokenizer. Format: see data/shards.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, decode_video_frames, probe_video
from data.shards import ShardBuilder, build_manifest, canonical_json, shard_keys, MANIFEST_KEY

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
VIDEO_EXTS = {".mp4": "mp4"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class InputError(Exception):
    """One input cannot be used; becomes a (path, reason) entry in the skip report."""


@dataclass
class Source:
    name: str
    kind: str  # text | image | video | interleaved
    path: Path


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


def _jsonl_lines(files: list[Path], root: Path, source: str):
    for f in files:
        for n, line in enumerate(f.read_bytes().split(b"\n"), 1):
            if line.strip():
                yield f"{_rel(f, root, source)}:{n}", line


def _parse_json(line: bytes) -> dict:
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError) as e:
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


def _captions(folder: Path) -> dict[str, str]:
    caps = {}
    cj = folder / "captions.jsonl"
    if cj.exists():
        for n, line in enumerate(cj.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    caps[str(row["file"])] = str(row["caption"])
                except (ValueError, KeyError, TypeError) as e:
                    print(f"warning: {cj}:{n}: bad caption line ({e}); its file will lack a caption",
                          file=sys.stderr)
    return caps


def _caption_for(path: Path, caps: dict[str, str]) -> str:
    if path.name in caps:
        return caps[path.name]
    side = path.with_suffix(".txt")
    if side.exists():
        return side.read_text(encoding="utf-8").strip()
    raise InputError("no caption (neither in captions.jsonl nor a sidecar .txt)")


def _image_meta(data: bytes, name: str, max_pixels: int, member: str) -> dict:
    try:
        h, w = decode_image(data, name, max_pixels).shape[:2]
    except DecodeError as e:
        raise InputError(str(e)) from None
    return {"member": member, "height": int(h), "width": int(w)}


def _image_item(path: Path, caps: dict, max_pixels: int):
    def load() -> Sample:
        caption = _caption_for(path, caps)
        ext = IMAGE_EXTS[path.suffix.lower()]
        data = path.read_bytes()
        meta = _image_meta(data, "image", max_pixels, ext)
        return Sample("image", {ext: data, "txt": caption.encode("utf-8")}, caption, images=[meta])
    return load


def _video_item(path: Path, caps: dict, backend: str, timeout_s: float):
    def load() -> Sample:
        caption = _caption_for(path, caps)
        data = path.read_bytes()
        try:
            info = probe_video(data, "video", backend, timeout_s)
            decode_video_frames(data, [info.frames - 1], "video", backend, timeout_s)  # last frame reads
        except DecodeError as e:
            raise InputError(str(e)) from None
        meta = {"member": "mp4", **info.as_meta()}
        return Sample("video", {"mp4": data, "txt": caption.encode("utf-8")}, caption, videos=[meta])
    return load


def _interleaved_item(line: bytes, base: Path, max_pixels: int):
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
                p = base / seg["image"]
                ext = IMAGE_EXTS.get(p.suffix.lower())
                if ext is None:
                    raise InputError(f"segment {i}: {seg['image']!r} is not a jpg/png/webp image")
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


def enumerate_inputs(src: Source, max_pixels: int, video_backend: str, timeout_s: float):
    if src.kind == "text":
        files = _jsonl_files(src.path)
        root = src.path if src.path.is_dir() else src.path.parent
        for where, line in _jsonl_lines(files, root, src.name):
            yield where, _text_item(line)
    elif src.kind == "interleaved":
        files = _jsonl_files(src.path)
        root = src.path if src.path.is_dir() else src.path.parent
        for f in files:
            for where, line in _jsonl_lines([f], root, src.name):
                yield where, _interleaved_item(line, f.parent, max_pixels)
    else:
        if not src.path.is_dir():
            raise SystemExit(f"mmpt ingest: {src.path}: not a directory")
        exts = IMAGE_EXTS if src.kind == "image" else VIDEO_EXTS
        caps = _captions(src.path)
        for p in sorted(src.path.iterdir()):
            if p.is_file() and p.suffix.lower() in exts:
                item = (_image_item(p, caps, max_pixels) if src.kind == "image"
                        else _video_item(p, caps, video_backend, timeout_s))
                yield _rel(p, src.path, src.name), item


# ---------------------------------------------------------------------------------------------


def ingest(sources: list[Source], store, tokenizer, shard_size: int = 64 * 2**20,
           max_pixels: int = DEFAULT_MAX_PIXELS, video_backend: str = "auto", timeout_s: float = 30.0,
           progress: bool = True, log=print) -> dict:
    """Write shards, indexes and the manifest of `sources` to `store`; return the manifest."""
    from tqdm import tqdm

    names = [s.name for s in sources]
    for s in sources:
        if not _NAME_RE.match(s.name):
            raise SystemExit(f"mmpt ingest: source name {s.name!r}: use letters, digits, '_' and '-'")
    if len(set(names)) != len(names) or not sources:
        raise SystemExit(f"mmpt ingest: need at least one source, with distinct names (got {names})")
    shards, skipped = [], []
    bar = tqdm(desc="ingest", unit="input", disable=not progress, file=sys.stderr)
    for src in sources:
        number, count = 0, 0
        builder = ShardBuilder(src.name, shard_keys(src.name, 0)[0])

        def flush():
            nonlocal number, builder
            tar, index = builder.finish()
            tar_key, idx_key = shard_keys(src.name, number)
            idx_bytes = canonical_json(index)
            store.put(tar_key, tar)
            store.put(idx_key, idx_bytes)
            shards.append({"source": src.name, "key": tar_key, "index": idx_key,
                           "num_samples": len(index["samples"]), "size": len(tar),
                           "index_sha256": hashlib.sha256(idx_bytes).hexdigest()})
            number += 1
            builder = ShardBuilder(src.name, shard_keys(src.name, number)[0])

        for where, load in enumerate_inputs(src, max_pixels, video_backend, timeout_s):
            bar.update(1)
            try:
                sample = load()
            except (InputError, OSError, UnicodeError) as e:
                reason = _skip_reason(e)
                skipped.append({"path": where, "reason": reason})
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
        if count == 0:
            log(f"warning: source {src.name!r} ({src.path}) produced no samples")
    bar.close()
    manifest = build_manifest([{"name": s.name, "kind": s.kind} for s in sources], shards,
                              tokenizer.info(), skipped)
    store.put(MANIFEST_KEY, canonical_json(manifest))
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
    lines = [f"wrote {url}/{MANIFEST_KEY}  fingerprint {manifest['fingerprint'][:16]}"]
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


def _source_arg(kind: str):
    def parse(s: str) -> Source:
        name, sep, path = s.partition("=")
        if not sep:
            name, path = Path(s).stem, s
        return Source(name, kind, Path(path))
    return parse


def _log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)  # keeps the progress bar intact


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mmpt ingest", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True, help="dataset URL: s3://bucket/prefix or a local directory")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json or a tiktoken rank file")
    for kind, opt in (("text", "--text"), ("image", "--images"), ("video", "--videos"),
                      ("interleaved", "--interleaved")):
        ap.add_argument(opt, action="append", default=[], type=_source_arg(kind), metavar="[NAME=]PATH")
    ap.add_argument("--corpus", help="a directory in the data.corpus layout (adds its four sources)")
    ap.add_argument("--shard-size", type=parse_size, default=64 * 2**20, help="target tar size (default 64MB)")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit")
    ap.add_argument("--video-backend", default="auto", choices=["auto", "decord", "pyav"])
    ap.add_argument("--timeout", type=float, default=30.0, help="per-video decode timeout, seconds")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    sources = args.text + args.images + args.videos + args.interleaved
    if args.corpus:
        sources += corpus_sources(Path(args.corpus))
    from data.store import open_store
    from data.tokenizer import load_tokenizer

    store = open_store(args.out)
    manifest = ingest(sources, store, load_tokenizer(args.tokenizer), args.shard_size, args.max_pixels,
                      args.video_backend, args.timeout, progress=not args.no_progress,
                      log=_log)
    print(summary(manifest, store.url))
    return 0

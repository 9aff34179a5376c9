"""What `mmpt ingest` reads: its input sources, enumerated as (display path, loader) items.

A loader returns a `Sample` or raises `InputError`, which ingest records as a counted skip with
the path and reason. Local inputs must stay inside the directories given: a symlink whose
target is inside the same input directory is followed; one leading out, or an interleaved
document naming an image by an absolute or `..` path, is refused. Text is JSONL or Parquet (a
text column); image and video folders take captions from `captions.jsonl` or sidecar `.txt`
files; webdataset tars hold image + caption pairs; an s3:// prefix is listed once, here.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from data.decode import DecodeError, decode_image, decode_video_frames, probe_video
from data.shards import canonical_json

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
VIDEO_EXTS = {".mp4": "mp4"}


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

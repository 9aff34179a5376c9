"""Shard format: webdataset-compatible tar shards, a JSON index per shard, a dataset manifest.

Layout under a store prefix (local directory or s3://bucket/prefix, see data/store.py):

    manifest.json                                 names the current generation's shard keys
    gen-000001/<source>/shard-000000.tar          webdataset tar: members "<key>.<ext>"
    gen-000001/<source>/shard-000000.idx.json     byte-offset index of that tar

Generations make ingest atomic for readers: each ingest writes its shards and indexes under a
fresh `gen-NNNNNN/` (the manifest's generation + 1) and puts manifest.json last, in one atomic
put. A reader sees either the old manifest, whose objects nobody touches, or the new one, whose
objects are all written. Old generations stay until `mmpt ingest --prune` removes them, so a
run that opened the old manifest keeps reading. Datasets written before generations existed
(shards at `<source>/shard-...`) read the same way: readers only follow the manifest's keys.

Tar shards
----------
Plain ustar archives, readable by the `webdataset` library as ordinary shards. A sample's members
are consecutive and named "<key>.<ext>"; keys contain no dot (webdataset splits at the first dot).
Headers are fixed (mtime 0, uid/gid 0, uname/gname "", mode 0o644), members are written in sorted
order, so the same input gives byte-identical shards. Member extensions by sample kind:

    text         "txt"                         UTF-8 text
    image        "jpg" | "png" | "webp", "txt" image bytes as ingested, caption
    video        "mp4", "txt"                  video bytes as ingested, caption
    interleaved  "json", "img0.jpg", "img1.png", ...
                 json = {"segments": [{"text": "..."} | {"image": "img0.jpg"}, ...]}, in reading
                 order; "image" names another member of the same sample.

Index (<shard>.idx.json)
------------------------
{
  "format": "mmpt-index/1",
  "source": "text",                      # source name (manifest.sources[].name)
  "shard": "text/shard-000000.tar",      # the tar's key inside its generation, so identical
                                         # inputs give identical indexes in every generation
  "size": 123456,                        # tar size in bytes
  "samples": [                           # in tar order; sample i of the shard is samples[i]
    {
      "key": "000000000012",             # webdataset __key__
      "kind": "text" | "image" | "video" | "interleaved",
      "members": {                       # ext -> DATA offset/size inside the tar (ranged GET:
        "txt": {"offset": 1536, "size": 812}   #   bytes [offset, offset + size))
      },
      "text_tokens": 187,                # tokens of all text (text, caption, or text segments)
                                         # under the dataset tokenizer, no special tokens added
      "text_bytes": 812,                 # UTF-8 bytes of that text
      "images": [                        # image and interleaved samples, in reading order
        {"member": "jpg", "height": 512, "width": 384}   # size AFTER EXIF orientation
      ],
      "videos": [                        # video samples
        {"member": "mp4", "frames": 90, "height": 240, "width": 320, "fps": 30.0}
      ],
      "layout": [                        # interleaved samples only: reading order with each text
        {"text_tokens": 57}, {"image": "img0.jpg"}   # segment's own token count, so the loader
      ]                                  # knows where images sit without tokenizing
    }
  ]
}
"images"/"videos" are present (possibly empty) for every sample, so vision token counts can be
computed from the index alone (data.vision.vision_tokens_from_meta) without decoding.

Manifest (manifest.json)
------------------------
{
  "format": "mmpt-manifest/1",
  "generation": 1,                       # the gen-NNNNNN/ holding the shards (0 or absent: none)
  "sources": [{"name": "text", "kind": "text", "num_samples": 5000, "num_shards": 3}, ...],
  "shards": [                            # sources in manifest order, shards in order within a source
    {"source": "text", "key": "gen-000001/text/shard-000000.tar",
     "index": "gen-000001/text/shard-000000.idx.json",
     "num_samples": 2000, "size": 123456, "index_sha256": "..."}
  ],
  "catalogs": [                          # column files per source (data/catalog.py): the sample
    {"source": "text", "key": "gen-000001/text/catalog.cols", "size": 4096, "sha256": "...",
     "plans": {"<plan key>": {"key": "gen-000001/text/plan-<plan key>.cols", "size": ...,
                              "sha256": "...", "seq_len": 4096, "window_sequences": 32}},
     "restarts": {"key": "gen-000001/text/restarts.cols", "size": ..., "sha256": "..."}}
  ],                                     # catalog, the plan tables written by --plan and the
                                         # tokenizer restart points (data/restarts.py; only
                                         # for a source with long texts)
  "tokenizer": {"fingerprint": "<sha256>", "vocab_size": 2048, "special_tokens": {"<|pad|>": 0, ...}},
  "fingerprint": "<sha256>",             # sha256 over the index files' sha256 in shard order and the
                                         # tokenizer fingerprint: identifies the dataset's content
                                         # (checked on every read_manifest)
  "skipped": {"count": 2, "inputs": [{"path": "...", "reason": "..."}]},
  "num_samples": 5123
}

A sample is identified by (source, shard number within the source, sample number within the shard).
Training reads the column files, not the JSON indexes (which stay for webdataset tools and for
datasets written before column files; see data/catalog.py). The fingerprint covers the indexes
and the tokenizer; the column files are derived from the indexes (the restart points from the
texts and the tokenizer) and checked by their sha256 when a host fetches them.
Keys in the manifest/index are relative to the dataset prefix (the directory holding manifest.json).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator

from train.errors import UserError

INDEX_FORMAT = "mmpt-index/1"
MANIFEST_FORMAT = "mmpt-manifest/1"
MANIFEST_KEY = "manifest.json"
KINDS = ("text", "image", "video", "interleaved")
BLOCK = 512
RECORD = 20 * BLOCK  # tar pads archives to whole records; GNU tar and Python do the same


class ShardError(UserError):
    """A shard, index or manifest is missing, truncated or malformed. The message names the file."""


def canonical_json(obj) -> bytes:
    """The one byte encoding of our JSON files (sorted keys, no spaces): identical input, identical bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def check_member_name(name: str, where: str = "") -> str:
    """Reject tar member names that would escape the shard's directory or hide a path."""
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name
            or any(p in ("", ".", "..") for p in name.split("/")) or "/" in name):
        raise ShardError(f"{where}: unsafe tar member name {name!r} (paths, '..' and absolute names "
                         "are rejected)")
    return name


def member_name(key: str, ext: str) -> str:
    if "." in key or not key:
        raise ShardError(f"sample key {key!r} must be non-empty and contain no '.'")
    return check_member_name(f"{key}.{ext}", f"sample {key}")


def _tar_header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    ti.type = tarfile.REGTYPE
    return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


class ShardBuilder:
    """Accumulates samples into one tar shard (in memory) and its index.

    add() appends one sample: members are written in sorted extension order with fixed headers,
    so the same samples give the same bytes. finish() returns (tar bytes, index dict)."""

    def __init__(self, source: str, shard_key: str):
        self.source, self.shard_key = source, shard_key
        self._buf = io.BytesIO()
        self.samples: list[dict] = []

    @property
    def nbytes(self) -> int:
        return self._buf.tell()

    def add(self, key: str, kind: str, members: dict[str, bytes], *, text_tokens: int, text_bytes: int,
            images: list[dict] | None = None, videos: list[dict] | None = None,
            layout: list[dict] | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"sample {key}: kind {kind!r} not in {KINDS}")
        offsets = {}
        for ext in sorted(members):
            data = members[ext]
            header = _tar_header(member_name(key, ext), len(data))
            self._buf.write(header)
            offsets[ext] = {"offset": self._buf.tell(), "size": len(data)}
            self._buf.write(data)
            self._buf.write(b"\0" * (-len(data) % BLOCK))
        self.samples.append({"key": key, "kind": kind, "members": offsets, "text_tokens": int(text_tokens),
                             "text_bytes": int(text_bytes), "images": list(images or []),
                             "videos": list(videos or [])})
        if layout is not None:
            self.samples[-1]["layout"] = list(layout)

    def finish(self) -> tuple[bytes, dict]:
        self._buf.write(b"\0" * (2 * BLOCK))  # end-of-archive marker
        self._buf.write(b"\0" * (-self._buf.tell() % RECORD))
        data = self._buf.getvalue()
        index = {"format": INDEX_FORMAT, "source": self.source, "shard": self.shard_key,
                 "size": len(data), "samples": self.samples}
        return data, index


def shard_keys(source: str, number: int) -> tuple[str, str]:
    """(tar key, index key) of shard `number` of `source`, relative to the dataset prefix."""
    base = f"{source}/shard-{number:06d}"
    return base + ".tar", base + ".idx.json"


GENERATION_PREFIX = "gen-"


def generation_prefix(generation: int) -> str:
    """Key prefix of one ingest generation ('' for datasets written before generations)."""
    return f"gen-{generation:06d}/" if generation else ""


def dataset_fingerprint(tokenizer_fingerprint: str, index_sha256s: list[str]) -> str:
    """sha256 over the tokenizer fingerprint and the index hashes in shard order."""
    h = hashlib.sha256(MANIFEST_FORMAT.encode() + b"\0" + tokenizer_fingerprint.encode())
    for digest in index_sha256s:
        h.update(b"\0" + digest.encode())
    return h.hexdigest()


def build_manifest(sources: list[dict], shards: list[dict], tokenizer: dict, skipped: list[dict],
                   generation: int = 0, catalogs: list[dict] | None = None) -> dict:
    """sources: [{"name", "kind"}]; shards: [{"source", "key", "index", "num_samples", "size",
    "index_sha256"}] in order; skipped: [{"path", "reason"}]; catalogs: the column files of
    data/catalog.py, one entry per source. Adds counts and the fingerprint."""
    srcs = []
    for src in sources:
        mine = [s for s in shards if s["source"] == src["name"]]
        srcs.append({"name": src["name"], "kind": src["kind"], "num_shards": len(mine),
                     "num_samples": sum(s["num_samples"] for s in mine)})
    extra = {"catalogs": catalogs} if catalogs is not None else {}
    return {"format": MANIFEST_FORMAT, "generation": generation, "sources": srcs, "shards": shards,
            **extra, "tokenizer": tokenizer,
            "fingerprint": dataset_fingerprint(tokenizer["fingerprint"],
                                               [s["index_sha256"] for s in shards]),
            "num_samples": sum(s["num_samples"] for s in shards),
            "skipped": {"count": len(skipped), "inputs": skipped}}


# ---------------------------------------------------------------------------------------------
# Reading


def split_dataset_url(url: str) -> tuple[str, str]:
    """'s3://b/p/manifest.json' or 's3://b/p' -> ('s3://b/p', 'manifest.json')."""
    url = url.rstrip("/")
    if url.endswith(".json"):
        head, _, name = url.rpartition("/")
        return head, name
    return url, MANIFEST_KEY


def _get_json(store, key: str, what: str) -> tuple[dict, bytes]:
    try:
        raw = store.get(key)
    except FileNotFoundError:
        raise ShardError(f"{store.url}/{key}: missing {what}") from None
    try:
        return json.loads(raw), raw
    except (UnicodeDecodeError, ValueError) as e:
        raise ShardError(f"{store.url}/{key}: {what} is not valid JSON ({e})") from None


def read_manifest(store, key: str = MANIFEST_KEY) -> dict:
    """The manifest, with its fingerprint checked against its index hashes (the data order is a
    function of the fingerprint, so an edited one would silently change it)."""
    m, _ = _get_json(store, key, "dataset manifest (check data.manifest, or ingest the "
                              "dataset with `mmpt ingest`)")
    where = f"{store.url}/{key}"
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        got = m.get("format") if isinstance(m, dict) else None
        raise ShardError(f"{where}: format {got!r}, expected {MANIFEST_FORMAT!r}")
    try:
        expected = dataset_fingerprint(m["tokenizer"]["fingerprint"],
                                       [s["index_sha256"] for s in m["shards"]])
    except (KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{where}: malformed manifest (missing {e}); re-ingest the dataset") from None
    if m.get("fingerprint") != expected:
        raise ShardError(f"{where}: fingerprint {str(m.get('fingerprint'))[:16]}... does not match "
                         f"its shard index hashes and tokenizer ({expected[:16]}...): the manifest "
                         "was edited or damaged; re-ingest the dataset (or restore manifest.json)")
    return m


def open_dataset(url: str, **store_opts):
    """(store, manifest) for a dataset URL (its prefix or its manifest.json)."""
    from data.store import open_store

    prefix, key = split_dataset_url(url)
    store = open_store(prefix, **store_opts)
    return store, read_manifest(store, key)


def read_index(store, key: str, expect_sha256: str | None = None) -> dict:
    """One shard's index; with expect_sha256 (from the manifest) a changed index is an error."""
    idx, raw = _get_json(store, key, "shard index")
    if expect_sha256 is not None and hashlib.sha256(raw).hexdigest() != expect_sha256:
        raise ShardError(f"{store.url}/{key}: shard index does not match the manifest's sha256 "
                         "(dataset changed after the manifest was written? re-ingest it)")
    if idx.get("format") != INDEX_FORMAT:
        raise ShardError(f"{store.url}/{key}: format {idx.get('format')!r}, expected {INDEX_FORMAT!r}")
    for s in idx["samples"]:
        for ext in s["members"]:
            member_name(s["key"], ext)  # an index must not name an unsafe member either
    return idx


def read_member(store, shard_key: str, sample: dict, ext: str) -> bytes:
    """One member of one sample by a ranged GET, using the offsets from the index."""
    try:
        loc = sample["members"][ext]
    except KeyError:
        raise ShardError(f"{shard_key}: sample {sample.get('key')} has no member {ext!r} "
                         f"(has {sorted(sample.get('members', {}))})") from None
    start, size = loc["offset"], loc["size"]
    try:
        data = store.get(shard_key, start, start + size)
    except FileNotFoundError:
        raise ShardError(f"{store.url}/{shard_key}: missing shard") from None
    if len(data) != size:
        raise ShardError(f"{store.url}/{shard_key}: truncated tar: member {sample['key']}.{ext} needs "
                         f"bytes [{start}, {start + size}) but only {len(data)} of {size} exist")
    return data


def iter_tar(data: bytes, name: str) -> Iterator[tuple[str, int, int]]:
    """(member name, data offset, size) for every file of a whole tar held in memory; unsafe names
    and truncation raise ShardError naming the shard."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for ti in tf:
                check_member_name(ti.name, name)
                if not ti.isreg():
                    raise ShardError(f"{name}: member {ti.name!r} is not a regular file")
                if ti.offset_data + ti.size > len(data):
                    raise ShardError(f"{name}: truncated tar: member {ti.name!r} needs bytes up to "
                                     f"{ti.offset_data + ti.size}, file has {len(data)}")
                yield ti.name, ti.offset_data, ti.size
    except tarfile.TarError as e:
        raise ShardError(f"{name}: truncated or corrupt tar ({e})") from None


def verify_shard(data: bytes, index: dict, name: str) -> None:
    """Check that an index describes a tar exactly (same members, offsets, sizes, total size)."""
    if len(data) != index["size"]:
        raise ShardError(f"{name}: tar has {len(data)} bytes, index says {index['size']}"
                         + (" (truncated tar)" if len(data) < index["size"] else ""))
    expected = [(member_name(s["key"], e), m["offset"], m["size"])
                for s in index["samples"] for e, m in sorted(s["members"].items())]
    found = list(iter_tar(data, name))
    if found != expected:
        raise ShardError(f"{name}: tar members do not match the index")

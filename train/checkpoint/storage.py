"""Checkpoint bytes on our ObjectStore (local directory or S3) in DCP's metadata model.

Why our own writer and reader instead of DCP's FileSystemWriter (+ an upload step):
- one code path for a local directory (`LocalStore`) and S3 (`S3Store`, boto3 with retries), no
  staging disk and no second copy of every shard;
- no pickle anywhere: DCP's file system layer pickles its `.metadata` and loads it with
  `pickle.load`; ours writes JSON metadata and raw little-endian tensor bytes, so reading a
  checkpoint never unpickles (no torch.load at all);
- every item carries a CRC32, checked on read, so a corrupt object is detected, not loaded;
- writes are split from planning, so they can run in a background thread (manager.py).

Layout under the checkpoint prefix:
    data-RRRRR-PPP       raw tensor bytes of rank R; a rank's objects are closed at
                         `object_bytes`, each written as parts of `part_bytes` (an S3 multipart
                         upload; pwrite into one file locally), `concurrency` parts at once
    metadata.json        written by the coordinator once every rank's bytes are durable: logical
                         tensors with their chunks (DCP's ChunkStorageMetadata: offsets, sizes),
                         where each chunk's bytes are (object, start, length, crc32), the size of
                         every object, and the weights rebuilt from their fp32 masters
                         (`from_master`; rows such a weight stores of its own are its chunks,
                         laid over the rebuilt rows on load)

Only tensors can be saved (the checkpoint module turns small plain state into JSON beside it).
"""

from __future__ import annotations

import json
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)

from data.store import NotFound, ObjectStore
from train.errors import UserError

METADATA = "metadata.json"
# v2: expert stacks as chunked logical tensors, weights from masters; v3: a weight rebuilt from
# its masters may store some rows of its own (its chunks, laid over), which a v2 reader would
# take for the whole weight. v1 (one key per routed expert) and v2 still load.
FORMAT = "mmpt-dcp-v3"
FORMATS = ("mmpt-dcp-v1", "mmpt-dcp-v2", FORMAT)
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}
_COALESCE_GAP = 1 << 20  # read neighbouring items of one object in a single ranged GET
_COALESCE_MAX = 64 << 20


class CorruptCheckpoint(UserError, RuntimeError):
    """The stored bytes or metadata do not match what was written."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"dtype {dtype} cannot be checkpointed")
    return name


def master_key(model_key: str) -> str:
    """model/<fqn>... -> master/<fqn>...: where a weight stored only as its master is read."""
    return "master/" + model_key.removeprefix("model/")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


@dataclass
class Staged:
    """One chunk this rank writes: its stored key and offsets, and a host copy of its data."""

    key: str
    offsets: tuple[int, ...]
    tensor: torch.Tensor  # contiguous, on the CPU

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def write_chunks(store: ObjectStore, prefix: str, rank: int, chunks: list[Staged], *,
                 object_bytes: int, part_bytes: int, concurrency: int) -> list[dict]:
    """Write `chunks` as rank `rank`'s data objects under `prefix`; returns one item record per
    chunk (index, object, start, length, crc32). Parts and CRCs run `concurrency` at a time;
    every object is committed (durable) before this returns."""
    objects: list[list[tuple[Staged, int]]] = [[]]  # per object: (chunk, start)
    fill = 0
    for c in chunks:
        if objects[-1] and fill + c.nbytes > object_bytes:
            objects.append([])
            fill = 0
        objects[-1].append((c, fill))
        fill += c.nbytes
    objects = [o for o in objects if o]
    names = [f"data-{rank:05d}-{i:03d}" for i in range(len(objects))]
    records: list[dict] = []
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="ckpt-write") as pool:
        uploads = []
        try:
            tasks = []
            for name, members in zip(names, objects):
                size = sum(c.nbytes for c, _ in members)
                up = store.open_upload(_join(prefix, name), size, part_bytes)
                uploads.append(up)
                for lo in range(0, max(size, 1), part_bytes):
                    hi = min(lo + part_bytes, size)
                    tasks.append(pool.submit(_write_part, up, members, lo, hi))
            crcs = {id(c): pool.submit(lambda t: zlib.crc32(_bytes_view(t)), c.tensor)
                    for members in objects for c, _ in members}
            for t in tasks:
                t.result()
            for f in [pool.submit(up.commit) for up in uploads]:
                f.result()
        except BaseException:
            for up in uploads:
                up.abort()
            raise
        for name, members in zip(names, objects):
            for c, start in members:
                records.append({"index": {"fqn": c.key, "offset": list(c.offsets)},
                                "object": name, "start": start, "length": c.nbytes,
                                "crc32": crcs[id(c)].result()})
    return records


def _write_part(upload, members: list[tuple[Staged, int]], lo: int, hi: int) -> None:
    pieces = []
    for c, start in members:
        a, b = max(lo, start), min(hi, start + c.nbytes)
        if a < b:
            pieces.append(_bytes_view(c.tensor)[a - start:b - start])
    upload.write(lo, pieces[0] if len(pieces) == 1 else b"".join(pieces))  # b"" if empty


def build_metadata(tensors: dict[str, dict], items: list[dict], from_master: list[str]) -> bytes:
    """metadata.json from the coordinator's table of logical tensors (dtype, size, chunks) and
    every rank's item records."""
    objects: dict[str, int] = {}
    for it in items:
        objects[it["object"]] = max(objects.get(it["object"], 0), it["start"] + it["length"])
    doc = {"format": FORMAT, "tensors": tensors, "items": items, "objects": objects,
           "from_master": sorted(from_master)}
    return json.dumps(doc, sort_keys=True).encode()


def parse_metadata(raw: bytes, where: str) -> tuple[Metadata, dict]:
    """Our JSON metadata -> (DCP Metadata, the JSON document); CorruptCheckpoint if malformed."""
    try:
        doc = json.loads(raw)
        if doc.get("format") not in FORMATS:
            raise ValueError(f"format {doc.get('format')!r}, expected one of {FORMATS}")
        state = {}
        for fqn, t in doc["tensors"].items():
            if t["dtype"] not in _DTYPES:
                raise ValueError(f"{fqn}: unknown dtype {t['dtype']!r}")
            state[fqn] = TensorStorageMetadata(
                properties=TensorProperties(dtype=_DTYPES[t["dtype"]]),
                size=torch.Size(t["size"]),
                chunks=[ChunkStorageMetadata(offsets=torch.Size(c["offsets"]),
                                             sizes=torch.Size(c["sizes"])) for c in t["chunks"]])
        storage = {}
        for it in doc["items"]:
            idx = MetadataIndex(it["index"]["fqn"], it["index"]["offset"])
            storage[idx] = {k: it[k] for k in ("object", "start", "length", "crc32")}
        if not isinstance(doc["objects"], dict):
            raise ValueError("objects must be a table")
        for k in doc.setdefault("from_master", []):
            if not k.startswith("model/") or master_key(k) not in state:
                raise ValueError(f"{k} is to be rebuilt from a master that is not stored")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(f"{where}: unreadable metadata ({type(e).__name__}: {e})") from None
    return Metadata(state_dict_metadata=state, storage_data=storage), doc


@dataclass
class Read:
    """Copy part of a stored chunk into `target` (a view of this rank's fresh buffer)."""

    storage: MetadataIndex  # the stored chunk
    src_offsets: tuple[int, ...]  # where, inside the stored chunk, the copied box starts
    target: torch.Tensor  # the box's destination, already narrowed


def read_chunks(store: ObjectStore, prefix: str, metadata: Metadata, doc: dict,
                reads: list[Read], *, concurrency: int, after: list[Read] = ()) -> int:
    """Check the size of every object `reads` and `after` touch against metadata, read them
    (nearby items of one object in one ranged GET, `concurrency` at a time), check each item's
    CRC32 and copy the asked-for boxes, those of `after` once all of `reads` are done (rows laid
    over a weight rebuilt from its master); returns the number of store requests.
    CorruptCheckpoint / NotFound name the damaged object."""
    objects: set[str] = set()

    def spans_of(rds: list[Read]) -> list[tuple]:
        by_object: dict[str, dict[MetadataIndex, list[Read]]] = {}
        for r in rds:
            info = metadata.storage_data[r.storage]
            by_object.setdefault(info["object"], {}).setdefault(r.storage, []).append(r)
        objects.update(by_object)
        spans = []
        for obj, by_item in by_object.items():
            infos = sorted(((metadata.storage_data[idx], rs) for idx, rs in by_item.items()),
                           key=lambda x: x[0]["start"])
            spans += [(obj, start, end, group) for start, end, group in _coalesce(infos)]
        return spans

    phases = [spans_of(reads), spans_of(list(after))]

    def check_size(obj: str) -> None:
        want = doc["objects"].get(obj)
        try:
            actual = store.size(_join(prefix, obj))
        except NotFound as e:
            raise NotFound(f"missing object ({e})") from None
        if actual != want:
            raise CorruptCheckpoint(f"object {obj} has {actual} bytes, {want} were written")

    def read_span(span) -> None:
        obj, start, end, group = span
        blob = store.get(_join(prefix, obj), start, end)
        if len(blob) != end - start:
            raise CorruptCheckpoint(f"{obj}: read {len(blob)} bytes of [{start}, {end}); the "
                                    "object is short")
        view = memoryview(blob)
        for info, rs in group:
            data = view[info["start"] - start:info["start"] - start + info["length"]]
            if zlib.crc32(data) != info["crc32"]:
                raise CorruptCheckpoint(f"{obj}: checksum mismatch for {rs[0].storage.fqn!r}")
            md = metadata.state_dict_metadata[rs[0].storage.fqn]
            chunk = next(c for c in md.chunks if c.offsets == rs[0].storage.offset)
            # a read-only view of the fetched bytes (only ever copied from, never written)
            stored = torch.from_numpy(np.frombuffer(data, dtype=np.uint8)).view(
                md.properties.dtype).reshape(chunk.sizes)
            for r in rs:
                box = stored
                for dim, (o, n) in enumerate(zip(r.src_offsets, r.target.shape)):
                    box = box.narrow(dim, o, n)
                r.target.copy_(box)  # casts where a weight is rebuilt from its fp32 master

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="ckpt-read") as pool, \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        list(pool.map(check_size, sorted(objects)))
        for spans in phases:
            list(pool.map(read_span, spans))
    return len(objects) + sum(len(spans) for spans in phases)


def _coalesce(infos):
    """Group sorted (info, reads) pairs into ranged reads of nearby bytes."""
    group, start, end = [], 0, 0
    for info, rs in infos:
        s, e = info["start"], info["start"] + info["length"]
        if group and (s - end > _COALESCE_GAP or e - start > _COALESCE_MAX):
            yield start, end, group
            group = []
        if not group:
            start, end = s, e
        group.append((info, rs))
        end = max(end, e)
    if group:
        yield start, end, group

"""A torch.distributed.checkpoint (DCP) storage layer over our ObjectStore: local dirs and S3 alike.

Why our own StorageWriter/StorageReader instead of DCP's FileSystemWriter (+ an upload step):
- one code path for a local directory (`LocalStore`) and S3 (`S3Store`, boto3 with retries), no
  staging disk and no second copy of every shard;
- no pickle anywhere: DCP's file system layer pickles its `.metadata` and loads it with
  `pickle.load`; ours writes JSON metadata and raw little-endian tensor bytes, so reading a
  checkpoint never unpickles (no torch.load at all);
- every item carries a CRC32, checked on read, so a corrupt object is detected, not loaded.

Layout under the checkpoint prefix:
    data-00000-000 ...   raw tensor bytes; plan i writes data-{i:05d}-{part:03d}, a part is
                         closed at `part_bytes` so a rank never buffers more than that in memory
    metadata.json        written last by the coordinator (DCP `finish`): tensors, chunks, where
                         each chunk's bytes are (object, start, length, crc32)

Only tensors can be saved (the checkpoint module turns small plain state into JSON beside it).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Any

import torch
from torch.futures import Future
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadPlan, LoadPlanner, SavePlan, SavePlanner,
                                                  WriteItemType)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

from data.store import ObjectStore
from train.errors import UserError

METADATA = "metadata.json"
FORMAT = "mmpt-dcp-v1"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}
_COALESCE_GAP = 1 << 20  # read neighbouring items of one object in a single ranged GET
_COALESCE_MAX = 64 << 20


class CorruptCheckpoint(UserError, RuntimeError):
    """The stored bytes or metadata do not match what was written."""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _index_json(index: MetadataIndex) -> dict:
    return {"fqn": index.fqn, "offset": None if index.offset is None else list(index.offset)}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


class StoreWriter(StorageWriter):
    """DCP writer into `store` under key prefix `prefix` (a checkpoint directory)."""

    def __init__(self, store: ObjectStore, prefix: str, *, part_bytes: int = 256 << 20):
        super().__init__()
        self.store, self.prefix, self.part_bytes = store, prefix.rstrip("/"), part_bytes
        self.is_coordinator = False

    def reset(self, checkpoint_id=None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=f"data-{i:05d}") for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results: list[WriteResult] = []
        part, buf, size = 0, [], 0

        def flush():
            nonlocal part, buf, size
            if buf:
                self.store.put(_join(self.prefix, f"{plan.storage_data}-{part:03d}"), b"".join(buf))
                part, buf, size = part + 1, [], 0

        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise TypeError(f"checkpoint entry {item.index.fqn!r} is not a tensor; only "
                                "tensors go through DCP here (small plain state goes to JSON)")
            tensor = planner.resolve_data(item)
            if str(tensor.dtype).removeprefix("torch.") not in _DTYPES:
                raise TypeError(f"checkpoint entry {item.index.fqn!r}: dtype {tensor.dtype} "
                                "is not supported")
            data = _tensor_bytes(tensor)
            if size and size + len(data) > self.part_bytes:
                flush()
            info = {"object": f"{plan.storage_data}-{part:03d}", "start": size,
                    "length": len(data), "crc32": zlib.crc32(data)}
            buf.append(data)
            size += len(data)
            results.append(WriteResult(index=item.index, size_in_bytes=len(data),
                                       storage_data=info))
        flush()
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        tensors = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                raise TypeError(f"checkpoint entry {fqn!r} is not a tensor")
            tensors[fqn] = {"dtype": str(md.properties.dtype).removeprefix("torch."),
                            "size": list(md.size),
                            "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)}
                                       for c in md.chunks]}
        items = [{"index": _index_json(r.index), **r.storage_data} for rs in results for r in rs]
        objects: dict[str, int] = {}
        for it in items:
            objects[it["object"]] = max(objects.get(it["object"], 0), it["start"] + it["length"])
        doc = {"format": FORMAT, "tensors": tensors, "items": items, "objects": objects}
        self.store.put(_join(self.prefix, METADATA), json.dumps(doc, sort_keys=True).encode())

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False

    def storage_meta(self):
        return None


def parse_metadata(raw: bytes, where: str) -> tuple[Metadata, dict]:
    """Our JSON metadata -> (DCP Metadata, the JSON document); CorruptCheckpoint if malformed."""
    try:
        doc = json.loads(raw)
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT!r}")
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
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(f"{where}: unreadable metadata ({type(e).__name__}: {e})") from None
    return Metadata(state_dict_metadata=state, storage_data=storage), doc


class StoreReader(StorageReader):
    """DCP reader from a checkpoint written by StoreWriter; verifies every item's CRC32."""

    def __init__(self, store: ObjectStore, prefix: str):
        super().__init__()
        self.store, self.prefix = store, prefix.rstrip("/")
        self.storage_data: dict[MetadataIndex, dict] = {}

    def reset(self, checkpoint_id=None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        where = f"{self.store.url}/{_join(self.prefix, METADATA)}"
        metadata, _ = parse_metadata(self.store.get(_join(self.prefix, METADATA)), where)
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_object: dict[str, list] = {}
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            by_object.setdefault(info["object"], []).append((info, req))
        for obj, reqs in by_object.items():
            reqs.sort(key=lambda r: r[0]["start"])
            for span_start, span_end, group in _coalesce(reqs):
                blob = self.store.get(_join(self.prefix, obj), span_start, span_end)
                if len(blob) != span_end - span_start:
                    raise CorruptCheckpoint(f"{obj}: read {len(blob)} bytes of "
                                            f"[{span_start}, {span_end}); the object is short")
                for info, req in group:
                    data = blob[info["start"] - span_start:info["start"] - span_start + info["length"]]
                    if zlib.crc32(data) != info["crc32"]:
                        raise CorruptCheckpoint(f"{obj}: checksum mismatch for "
                                                f"{req.storage_index.fqn!r}")
                    self._commit(data, req, planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _commit(self, data: bytes, req, planner: LoadPlanner) -> None:
        md = planner.metadata.state_dict_metadata[req.storage_index.fqn]
        chunk = next(c for c in md.chunks if c.offsets == req.storage_index.offset)
        stored = torch.frombuffer(bytearray(data), dtype=md.properties.dtype).reshape(chunk.sizes)
        for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
            stored = stored.narrow(dim, start, length)
        target = planner.resolve_tensor(req).detach()
        if target.shape != stored.shape:
            raise CorruptCheckpoint(f"{req.storage_index.fqn!r}: stored chunk {tuple(stored.shape)} "
                                    f"does not fit the target {tuple(target.shape)}")
        target.copy_(stored)
        planner.commit_tensor(req, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False


def _coalesce(reqs):
    """Group sorted (info, req) pairs into ranged reads of nearby bytes."""
    group, start, end = [], 0, 0
    for info, req in reqs:
        s, e = info["start"], info["start"] + info["length"]
        if group and (s - end > _COALESCE_GAP or e - start > _COALESCE_MAX):
            yield start, end, group
            group = []
        if not group:
            start, end = s, e
        group.append((info, req))
        end = max(end, e)
    if group:
        yield start, end, group

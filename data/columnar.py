"""Column files: fixed-width numpy columns in one object, memory-mapped by readers.

Layout of one file (all integers little-endian):

    b"MMPTCOL1"  u64 header length  header (canonical JSON, padded to 64 bytes)
    column data, each column starting at a multiple of 64 bytes

A column may be of a record type (several fixed-width fields per row, e.g. a plan table's units):
rows that are read together then share one page.

    header = {"format": "mmpt-columns/1", "meta": {...},
              "columns": {name: {"dtype": "<i4", "shape": [n], "offset": bytes from file start}}}

Why raw columns rather than .npy files or Arrow: a reader maps the whole object once and takes
zero-copy views of the columns it needs (np.frombuffer over the map), so opening costs one small
JSON header and nothing is read until a row is touched; one object per source means one fetch
per host; and it needs nothing beyond numpy (Arrow IPC would give the same mapping, but adds a
dependency to every reader for a format with a handful of integer columns).

Where readers map from (`open_columns`): a local dataset directory in place; through a
TieredCache with a disk tier, a plain copy in the cache directory that the first process on the
host fetches by ranged GETs, checks against the manifest's sha256 and renames into place, so
every rank and DataLoader worker of the host maps the same pages; otherwise a private copy in
the temporary directory (each process then downloads it: configure a disk cache).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import tempfile
import uuid
from pathlib import Path

import numpy as np

from data.shards import ShardError

MAGIC = b"MMPTCOL1"
FORMAT = "mmpt-columns/1"
ALIGN = 64
FETCH_CHUNK = 64 << 20  # bytes per ranged GET when copying a column file to the host
_LEN = struct.Struct("<Q")


class ColumnError(ShardError):
    """A column file is missing, truncated or malformed; the message names it."""


def _pad(n: int) -> int:
    return -n % ALIGN


def column_layout(specs: dict[str, tuple[np.dtype, tuple]], meta: dict) -> tuple[bytes, dict[str, int]]:
    """(header bytes incl. magic and padding, {column: offset}) of a file holding columns of the
    given (dtype, shape): lets a writer fill a large file column by column (np.memmap)."""
    hdr_len = 0
    for _ in range(4):  # the offsets depend on the header length and back: a few passes settle
        at = len(MAGIC) + _LEN.size + hdr_len
        at += _pad(at)
        out, offsets = {}, {}
        for name, (dtype, shape) in specs.items():
            dtype = np.dtype(dtype)
            if dtype.byteorder == ">" or dtype.hasobject:
                raise ValueError(f"column {name!r}: dtype {dtype} is not a fixed-width little-endian type")
            # a record type (several fields per row) keeps its field names and offsets
            spec = ([list(f) for f in dtype.descr] if dtype.names else dtype.str)
            out[name] = {"dtype": spec, "shape": list(shape), "offset": at}
            offsets[name] = at
            nbytes = int(np.prod(shape)) * dtype.itemsize
            at += nbytes + _pad(nbytes)
        header = json.dumps({"format": FORMAT, "meta": meta, "columns": out}, sort_keys=True,
                            separators=(",", ":")).encode()
        if len(header) == hdr_len:
            break
        hdr_len = len(header)
    head = MAGIC + _LEN.pack(len(header)) + header
    return head + b"\0" * _pad(len(head)), offsets


def _layout(columns: dict[str, np.ndarray], meta: dict) -> tuple[bytes, list[tuple[np.ndarray, int]]]:
    columns = {name: np.ascontiguousarray(col) for name, col in columns.items()}
    head, offsets = column_layout({n: (c.dtype, c.shape) for n, c in columns.items()}, meta)
    return head, [(col, offsets[name]) for name, col in columns.items()]


def encode_columns(columns: dict[str, np.ndarray], meta: dict) -> bytes:
    """The bytes of one column file (same columns and meta: same bytes)."""
    head, arrays = _layout(columns, meta)
    out = bytearray(head)
    for col, at in arrays:
        assert len(out) == at
        out += col.tobytes()
        out += b"\0" * _pad(col.nbytes)
    return bytes(out)


def write_columns(path: str | os.PathLike, columns: dict[str, np.ndarray], meta: dict) -> int:
    """Write a column file to a local path without building it in memory; returns its size."""
    head, arrays = _layout(columns, meta)
    with open(path, "wb") as f:
        f.write(head)
        for col, at in arrays:
            assert f.tell() == at
            col.reshape(-1).tofile(f) if col.size else None
            f.write(b"\0" * _pad(col.nbytes))
        return f.tell()


class Columns:
    """A column file opened over a buffer (a memory map or bytes): `meta`, `names`, `cols[name]`.

    Columns are zero-copy views; only the pages of the rows a reader touches are read."""

    def __init__(self, buf, name: str):
        self.name = name
        self._buf = buf
        view = memoryview(buf)
        if len(view) < len(MAGIC) + _LEN.size or bytes(view[:len(MAGIC)]) != MAGIC:
            raise ColumnError(f"{name}: not a column file (bad magic)")
        (hdr_len,) = _LEN.unpack_from(view, len(MAGIC))
        start = len(MAGIC) + _LEN.size
        try:
            header = json.loads(bytes(view[start:start + hdr_len]))
        except ValueError as e:
            raise ColumnError(f"{name}: corrupt header ({e})") from None
        if header.get("format") != FORMAT:
            raise ColumnError(f"{name}: format {header.get('format')!r}, expected {FORMAT!r}")
        self.meta: dict = header["meta"]
        self.cols: dict[str, np.ndarray] = {}
        for col, spec in header["columns"].items():
            d = spec["dtype"]
            dtype = np.dtype([tuple(f) for f in d] if isinstance(d, list) else d)
            shape, at = tuple(spec["shape"]), int(spec["offset"])
            count = int(np.prod(shape)) if shape else 1
            if at + count * dtype.itemsize > len(view):
                raise ColumnError(f"{name}: truncated (column {col!r} needs bytes up to "
                                  f"{at + count * dtype.itemsize}, the file has {len(view)})")
            self.cols[col] = np.frombuffer(buf, dtype=dtype, count=count, offset=at).reshape(shape)

    def __getitem__(self, col: str) -> np.ndarray:
        try:
            return self.cols[col]
        except KeyError:
            raise ColumnError(f"{self.name}: no column {col!r} (has {sorted(self.cols)})") from None


def map_file(path: str | os.PathLike, name: str | None = None) -> Columns:
    """Memory-map a local column file read-only."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ColumnError(f"{name or path}: empty column file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):
        # Rows are read in a shuffled order: no read-ahead, and no mapping of the neighbouring
        # pages on a fault (they would count as resident without ever being read).
        mm.madvise(mmap.MADV_RANDOM)
    return Columns(mm, name or str(path))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _copy_to(store, key: str, size: int, sha256: str | None, dest: Path, tmp_dir: Path) -> Path:
    """Fetch `key` by ranged GETs into dest (atomic rename), checking size and sha256."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}"
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for at in range(0, size, FETCH_CHUNK):
                part = store.get(key, at, min(at + FETCH_CHUNK, size))
                h.update(part)
                f.write(part)
            got = f.tell()
        if got != size:
            raise ColumnError(f"{store.url}/{key}: {got} bytes, the manifest says {size}")
        if sha256 is not None and h.hexdigest() != sha256:
            raise ColumnError(f"{store.url}/{key}: sha256 does not match the manifest "
                              "(dataset changed after the manifest was written?)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)  # other processes see no file or the whole file
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def open_columns(store, key: str, size: int, sha256: str | None = None) -> Columns:
    """Map the column file `key` of `store` (see the module docstring for where it maps from)."""
    from data.cache import TieredCache
    from data.store import LocalStore

    name = f"{store.url}/{key}"
    base = store.store if isinstance(store, TieredCache) else store
    try:
        if isinstance(base, LocalStore):
            path = Path(base._path(key))
            if path.stat().st_size != size:
                raise ColumnError(f"{name}: {path.stat().st_size} bytes, the manifest says {size}: the file "
                                  "changed after ingest; re-ingest the dataset (or restore it)")
            return map_file(path, name)
        if isinstance(store, TieredCache) and store.disk_dir is not None:
            ident = hashlib.sha256(f"{store.url}\0{key}\0{sha256}".encode()).hexdigest()
            root = store.disk_dir / "columns"
            dest = root / ident
            if not dest.exists():
                _copy_to(store.store, key, size, sha256, dest, root / "tmp")
            return map_file(dest, name)
        root = Path(tempfile.gettempdir()) / f"mmpt-columns-{os.getuid()}"
        dest = root / hashlib.sha256(f"{store.url}\0{key}\0{sha256}\0{os.getpid()}".encode()).hexdigest()
        if not dest.exists():
            _copy_to(store, key, size, sha256, dest, root / "tmp")
        cols = map_file(dest, name)
        dest.unlink(missing_ok=True)  # the map keeps the pages; nothing is left behind
        return cols
    except FileNotFoundError:
        raise ColumnError(f"{name}: missing column file") from None

"""Tiered read cache in front of an object store: memory LRU -> shared disk LRU -> the store.

Usage::

    from data.cache import TieredCache
    store = TieredCache(open_store(url), memory_bytes=256 << 20,
                        disk_dir="/local/nvme/mmpt-cache", disk_bytes=50 << 30)
    blob = store.get("shards/text-000001.tar", start, end)   # same interface as ObjectStore
    print(store.format_stats())   # cache: 1200 gets | mem hit 75.0% | disk hit 60.0% | store ...

What is cached: ``get`` results, by exact (key, start, end); the loader reads index-described
member ranges, so the same ranges recur across epochs, workers and ranks. ``size`` answers are
remembered in memory. Objects are assumed immutable once written (shards, indexes, manifests);
``put``/``delete`` through the cache go to the store and drop that key's entries here.

Disk tier: one directory may be shared by every DataLoader worker and every rank on a host.
Entries appear only by ``os.replace`` of a fully written temp file, and carry a header (magic,
length, CRC32), so no reader ever sees a partial entry; a corrupt entry is dropped and refetched.
Readers hold a shared ``flock`` while reading; the evictor unlinks a file only after winning a
non-blocking exclusive ``flock`` on it, so a file being read is never evicted. LRU order is the
file mtime (touched on every hit). The budget is enforced by a directory scan whenever this
process's running estimate exceeds it (evicting down to ``low_water`` x budget); processes that
write concurrently can overshoot by what they wrote since their last scan.

Concurrency: concurrent gets of the same (key, start, end) in one process are coalesced into one
fetch (the others wait for it). State that must not cross a fork (locks, in-flight fetches,
counters) is rebuilt in a forked child; the memory tier's contents are inherited.

Stats (per process; ``merge_stats`` sums several): gets, hits per tier, store requests and bytes,
store requests per second since creation / ``reset_stats()``, evictions, coalesced waits.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from pathlib import Path

from data import store as store_module
from data.store import ObjectStore, _check_range, validate_key

__all__ = ["TieredCache", "merge_stats", "format_stats"]

_HEADER = struct.Struct("<8sQI")  # magic, payload length, crc32 of payload
_MAGIC = b"MMPTC001"
_COUNTERS = ("gets", "mem_hits", "disk_hits", "disk_misses", "coalesced", "store_gets",
             "store_size_calls", "bytes_served", "store_bytes", "mem_evictions", "disk_evictions",
             "disk_busy_skips", "disk_corrupt")


class _Flight:
    """One in-progress fetch that other threads asking for the same range wait on."""

    __slots__ = ("done", "value", "error")

    def __init__(self):
        self.done = threading.Event()
        self.value: bytes | None = None
        self.error: BaseException | None = None


class TieredCache(ObjectStore):
    """An ObjectStore that serves reads from memory, then a shared disk directory, then ``store``."""

    def __init__(self, store: ObjectStore, *, memory_bytes: int = 256 << 20,
                 disk_dir: str | os.PathLike | None = None, disk_bytes: int = 10 << 30,
                 low_water: float = 0.8):
        if memory_bytes < 0 or disk_bytes < 0 or not 0.0 < low_water <= 1.0:
            raise ValueError("memory_bytes/disk_bytes must be >= 0 and 0 < low_water <= 1")
        self.store = store
        self.memory_bytes, self.disk_bytes, self.low_water = memory_bytes, disk_bytes, low_water
        self.disk_dir = Path(disk_dir).resolve() if disk_dir is not None and disk_bytes > 0 else None
        self._mem: OrderedDict[tuple, bytes] = OrderedDict()
        self._mem_used = 0
        self._sizes: dict[str, int] = {}
        self._disk_used = 0
        if self.disk_dir is not None:
            (self.disk_dir / "tmp").mkdir(parents=True, exist_ok=True)
            self._disk_used = self._scan_disk()[1]
        self._pid = None
        self._process_state()

    # -- per-process state
    def _process_state(self) -> None:
        if self._pid != os.getpid():
            with store_module._INIT_LOCK:  # first use after a fork may come from many threads
                if self._pid != os.getpid():
                    self._lock = threading.Lock()
                    self._flights: dict[tuple, _Flight] = {}
                    self.reset_stats()
                    self._pid = os.getpid()

    def reset_stats(self) -> None:
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._since = time.monotonic()

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_lock", "_flights", "_counts", "_since", "_mem", "_pid")}
        state["_mem_used"] = 0
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._mem, self._pid = OrderedDict(), None
        self._process_state()

    @property
    def url(self) -> str:
        return self.store.url

    def _count(self, name: str, n: int = 1) -> None:
        self._counts[name] += n  # callers hold self._lock or accept a benign race on a counter

    # -- reads
    def get(self, key, start=None, end=None):
        self._process_state()
        validate_key(key)
        start, end = _check_range(start, end)
        ident = (key, start, end)
        with self._lock:
            self._count("gets")
            data = self._mem.get(ident)
            if data is not None:
                self._mem.move_to_end(ident)
                self._count("mem_hits")
                self._count("bytes_served", len(data))
                return data
            flight = self._flights.get(ident)
            owner = flight is None
            if owner:
                flight = self._flights[ident] = _Flight()
            else:
                self._count("coalesced")
        if not owner:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            with self._lock:
                self._count("bytes_served", len(flight.value))
            return flight.value
        try:
            flight.value = self._fetch(ident)
            return flight.value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[ident]
                if flight.value is not None:
                    self._mem_insert(ident, flight.value)
                    self._count("bytes_served", len(flight.value))
            flight.done.set()

    def _fetch(self, ident: tuple) -> bytes:
        """Disk tier, then the store (filling the disk tier)."""
        key, start, end = ident
        path = self._disk_path(ident) if self.disk_dir is not None else None
        if path is not None:
            data = self._disk_read(path)
            with self._lock:
                self._count("disk_hits" if data is not None else "disk_misses")
            if data is not None:
                return data
        data = self.store.get(key, start, end)
        with self._lock:
            self._count("store_gets")
            self._count("store_bytes", len(data))
        if path is not None:
            self._disk_write(path, data)
        return data

    def _mem_insert(self, ident: tuple, data: bytes) -> None:
        if len(data) > self.memory_bytes or ident in self._mem:
            return
        self._mem[ident] = data
        self._mem_used += len(data)
        while self._mem_used > self.memory_bytes:
            _, old = self._mem.popitem(last=False)
            self._mem_used -= len(old)
            self._count("mem_evictions")

    # -- disk tier
    def _key_dir(self, key: str) -> Path:
        h = hashlib.sha256(f"{self.store.url}\0{key}".encode()).hexdigest()
        return self.disk_dir / h[:2] / h[2:40]

    def _disk_path(self, ident: tuple) -> Path:
        key, start, end = ident
        return self._key_dir(key) / f"{start}-{'end' if end is None else end}"

    def _disk_read(self, path: Path) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # the evictor cannot unlink while we hold this
            if os.fstat(fd).st_nlink == 0:
                return None  # evicted between our open and our lock
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read()
            os.utime(fd)  # LRU order across processes is the mtime
        finally:
            os.close(fd)
        if len(raw) >= _HEADER.size:
            magic, length, crc = _HEADER.unpack_from(raw)
            payload = raw[_HEADER.size:]
            if magic == _MAGIC and length == len(payload) and zlib.crc32(payload) == crc:
                return payload
        with self._lock:
            self._count("disk_corrupt")
        self._evict_file(path)
        return None

    def _disk_write(self, path: Path, data: bytes) -> None:
        size = _HEADER.size + len(data)
        if size > self.disk_bytes:
            return
        tmp = self.disk_dir / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, len(data), zlib.crc32(data)))
                f.write(data)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)  # readers see the old entry, the new one, or none: never a part
        except OSError:
            tmp.unlink(missing_ok=True)
            return  # a full or read-only cache disk must not fail the read
        with self._lock:
            self._disk_used += size
            over = self._disk_used > self.disk_bytes
        if over:
            self._evict_disk()

    def _scan_disk(self) -> tuple[list[tuple[float, int, Path]], int]:
        """All entries as (mtime, size, path), and their total size; drops stale temp files."""
        entries, total, now = [], 0, time.time()
        for dirpath, _dirs, files in os.walk(self.disk_dir):
            in_tmp = Path(dirpath) == self.disk_dir / "tmp"
            for name in files:
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                if in_tmp:
                    if now - st.st_mtime > 3600:  # left by a crashed writer
                        path.unlink(missing_ok=True)
                    continue
                entries.append((st.st_mtime, st.st_size, path))
                total += st.st_size
        return entries, total

    def _evict_disk(self) -> None:
        entries, total = self._scan_disk()
        target = self.disk_bytes * self.low_water
        if total > self.disk_bytes:
            for _mtime, size, path in sorted(entries, key=lambda e: e[0]):
                if total <= target:
                    break
                if self._evict_file(path):
                    total -= size
                    with self._lock:
                        self._count("disk_evictions")
                else:
                    with self._lock:
                        self._count("disk_busy_skips")
        with self._lock:
            self._disk_used = total

    @staticmethod
    def _evict_file(path: Path) -> bool:
        """Unlink ``path`` unless someone holds a lock on it (i.e. is reading it)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            # unlink only the file we locked, not one a writer renamed into place meanwhile
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
            return True
        except FileNotFoundError:
            return True
        finally:
            os.close(fd)

    # -- the rest of the ObjectStore interface
    def size(self, key):
        self._process_state()
        with self._lock:
            if key in self._sizes:
                return self._sizes[key]
        n = self.store.size(key)
        with self._lock:
            self._count("store_size_calls")
            self._sizes[key] = n
        return n

    def exists(self, key):
        return self.store.exists(key)

    def list(self, prefix=""):
        return self.store.list(prefix)

    def put(self, key, data):
        self.store.put(key, data)
        self._invalidate(key)

    def delete(self, key):
        self.store.delete(key)
        self._invalidate(key)

    def _invalidate(self, key: str) -> None:
        self._process_state()
        with self._lock:
            for ident in [i for i in self._mem if i[0] == key]:
                self._mem_used -= len(self._mem.pop(ident))
            self._sizes.pop(key, None)
        if self.disk_dir is not None:
            kdir = self._key_dir(key)
            for path in kdir.glob("*") if kdir.is_dir() else ():
                path.unlink(missing_ok=True)

    # -- stats
    def stats(self) -> dict:
        self._process_state()
        with self._lock:
            s = dict(self._counts)
            s.update(mem_used=self._mem_used, mem_budget=self.memory_bytes,
                     disk_used=self._disk_used if self.disk_dir else 0,
                     disk_budget=self.disk_bytes if self.disk_dir else 0,
                     seconds=time.monotonic() - self._since)
        s["store"] = self.store.stats()
        return _derive(s)

    def format_stats(self) -> str:
        return format_stats(self.stats())


def _derive(s: dict) -> dict:
    """Add rates to a counter dict (also after merging several)."""
    s["store_requests"] = s["store_gets"] + s["store_size_calls"]
    s["mem_hit_rate"] = s["mem_hits"] / s["gets"] if s["gets"] else 0.0
    lookups = s["disk_hits"] + s["disk_misses"]
    s["disk_hit_rate"] = s["disk_hits"] / lookups if lookups else 0.0
    s["store_requests_per_s"] = s["store_requests"] / s["seconds"] if s["seconds"] > 0 else 0.0
    return s


def merge_stats(many: list[dict]) -> dict:
    """Sum the stats of several processes (e.g. loader workers); seconds is the longest window."""
    out = {}
    for s in many:
        for k, v in s.items():
            if k in _COUNTERS or k in ("mem_used", "disk_used"):
                out[k] = out.get(k, 0) + v
            elif k in ("mem_budget", "disk_budget", "seconds"):
                out[k] = max(out.get(k, 0), v)
    for k in _COUNTERS:
        out.setdefault(k, 0)
    out.setdefault("seconds", 0.0)
    return _derive(out)


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def format_stats(s: dict) -> str:
    """One readable line of cache stats."""
    return (f"cache: {s['gets']} gets | mem hit {100 * s['mem_hit_rate']:.1f}% "
            f"({_mb(s.get('mem_used', 0))}/{_mb(s.get('mem_budget', 0))}) | "
            f"disk hit {100 * s['disk_hit_rate']:.1f}% "
            f"({_mb(s.get('disk_used', 0))}/{_mb(s.get('disk_budget', 0))}) | "
            f"store {s['store_requests']} req, {s['store_requests_per_s']:.1f} req/s, "
            f"{_mb(s['store_bytes'])} | coalesced {s['coalesced']} | "
            f"evicted mem {s['mem_evictions']} disk {s['disk_evictions']}")

"""Tiered cache: LRU order and byte budgets per tier, a disk tier shared by processes, no partial
files, no eviction of files being read, coalescing of concurrent identical reads, stats."""

import fcntl
import multiprocessing as mp
import os
import pickle
import random
import threading
import time
from pathlib import Path

import pytest

from data.cache import _HEADER, _MAGIC, TieredCache, format_stats, merge_stats
from data.store import LocalStore, NotFound


class CountingStore(LocalStore):
    """A LocalStore that counts (and can slow down or fail) its reads."""

    def __init__(self, root, delay=0.0):
        super().__init__(root)
        self.delay, self.calls, self.fail = delay, [], None
        self._lock = threading.Lock()

    def get(self, key, start=None, end=None):
        with self._lock:
            self.calls.append((key, start, end))
        time.sleep(self.delay)
        if self.fail:
            raise self.fail
        return super().get(key, start, end)


def payload(i, n=100):
    return bytes((i * 31 + j) % 251 for j in range(n))


def entry_files(disk_dir):
    return [p for p in Path(disk_dir).rglob("*") if p.is_file() and p.parent.name != "tmp"]


def disk_usage(disk_dir):
    return sum(p.stat().st_size for p in entry_files(disk_dir))


def test_same_semantics_as_a_store(tmp_path):
    base = LocalStore(tmp_path / "s")
    cache = TieredCache(base, memory_bytes=1 << 20, disk_dir=tmp_path / "c", disk_bytes=1 << 20)
    blob = payload(1, 5000)
    cache.put("a/b", blob)
    assert cache.url == base.url and cache.list() == ["a/b"] and cache.exists("a/b")
    for rng in [(None, None), (0, 10), (4990, 6000), (6000, None), (7, 7), (100, None)]:
        assert cache.get("a/b", *rng) == blob[slice(*rng)]
        assert cache.get("a/b", *rng) == blob[slice(*rng)]  # second time from the cache
    assert cache.size("a/b") == 5000
    with pytest.raises(NotFound):
        cache.get("missing")
    with pytest.raises(ValueError):
        cache.get("../escape")
    cache.put("a/b", b"replaced")  # put/delete drop cached entries of the key
    assert cache.get("a/b") == b"replaced" and cache.size("a/b") == 8
    cache.delete("a/b")
    with pytest.raises(NotFound):
        cache.get("a/b")


def test_memory_lru_order_and_budget(tmp_path):
    base = CountingStore(tmp_path)
    for k in "abcd":
        base.put(k, payload(ord(k)))
    cache = TieredCache(base, memory_bytes=300)  # room for three 100-byte entries
    for k in "abc":
        cache.get(k)
    cache.get("a")          # a becomes most recent: order b, c, a
    cache.get("d")          # evicts b
    assert cache.stats()["mem_used"] <= 300
    n = len(base.calls)
    cache.get("c"), cache.get("a"), cache.get("d")
    assert len(base.calls) == n  # all three still in memory
    cache.get("b")
    assert len(base.calls) == n + 1 and cache.get("b") == payload(ord("b"))
    s = cache.stats()
    assert s["mem_evictions"] == 2 and s["mem_used"] == 300
    big = TieredCache(base, memory_bytes=50)
    big.get("a"), big.get("a")
    assert big.stats()["mem_used"] == 0 and big.stats()["store_gets"] == 2  # too big to keep


def test_disk_lru_budget_and_sharing(tmp_path):
    base = CountingStore(tmp_path / "s")
    for i in range(12):
        base.put(f"k{i}", payload(i, 1000))
    entry = _HEADER.size + 1000
    disk = tmp_path / "c"
    cache = TieredCache(base, memory_bytes=0, disk_dir=disk, disk_bytes=5 * entry, low_water=0.8)
    for i in range(5):  # exactly at the budget: nothing evicted yet
        cache.get(f"k{i}")
        time.sleep(0.02)  # file mtimes have coarse (jiffy) resolution
    assert len(entry_files(disk)) == 5
    cache.get("k0")  # a disk hit refreshes k0's mtime: k1, k2 are now the oldest
    time.sleep(0.02)
    cache.get("k5")  # over budget: evict down to 0.8 x budget = 4 entries, oldest first
    s = cache.stats()
    assert s["disk_hits"] == 1 and s["disk_evictions"] == 2
    assert s["disk_used"] == disk_usage(disk) == 4 * entry
    # another cache on the same directory (as another worker/rank would be) hits the disk tier
    other = TieredCache(base, memory_bytes=0, disk_dir=disk, disk_bytes=5 * entry)
    n = len(base.calls)
    for i in (0, 3, 4, 5):
        assert other.get(f"k{i}") == payload(i, 1000)
    assert len(base.calls) == n, "the recently used k0 was evicted (FIFO instead of LRU?)"
    assert other.get("k1") == payload(1, 1000) and len(base.calls) == n + 1  # k1 was evicted
    for i in range(6, 12):
        other.get(f"k{i}")
        assert disk_usage(disk) <= 5 * entry
    assert not list((disk / "tmp").iterdir())


def test_corrupt_disk_entry_is_dropped_and_refetched(tmp_path):
    base = CountingStore(tmp_path / "s")
    base.put("k", payload(3, 500))
    cache = TieredCache(base, memory_bytes=0, disk_dir=tmp_path / "c", disk_bytes=1 << 20)
    cache.get("k")
    (path,) = entry_files(tmp_path / "c")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert cache.get("k") == payload(3, 500)
    assert cache.stats()["disk_corrupt"] == 1 and len(base.calls) == 2
    assert cache.get("k") == payload(3, 500) and len(base.calls) == 2  # healthy again


def test_eviction_skips_a_file_being_read(tmp_path):
    base = CountingStore(tmp_path / "s")
    for i in range(6):
        base.put(f"k{i}", payload(i, 1000))
    entry = _HEADER.size + 1000
    disk = tmp_path / "c"
    cache = TieredCache(base, memory_bytes=0, disk_dir=disk, disk_bytes=3 * entry, low_water=0.5)
    cache.get("k0")
    (path,) = entry_files(disk)
    time.sleep(0.02)
    # a reader mid-read holds a shared flock on the entry, exactly as TieredCache._disk_read does
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        for i in range(1, 6):
            cache.get(f"k{i}")
            time.sleep(0.02)
        assert path.exists(), "the oldest entry was evicted while it was being read"
        assert cache.stats()["disk_busy_skips"] >= 1
    finally:
        os.close(fd)
    cache.get("k1"), cache.get("k2")  # more writes trigger eviction again: now k0 may go
    assert not path.exists()


def test_concurrent_identical_reads_are_coalesced(tmp_path):
    base = CountingStore(tmp_path, delay=0.3)
    base.put("shard", payload(9, 4000))
    cache = TieredCache(base, memory_bytes=1 << 20, disk_dir=tmp_path / "c", disk_bytes=1 << 20)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("shard", 100, 900)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [payload(9, 4000)[100:900]] * 8
    assert base.calls == [("shard", 100, 900)]
    s = cache.stats()
    assert s["coalesced"] == 7 and s["store_gets"] == 1 and s["bytes_served"] == 8 * 800
    # a failing fetch reaches every waiter and is not cached
    base.fail = OSError("store down")
    errors = []

    def failing():
        try:
            cache.get("shard", 0, 10)
        except OSError as e:
            errors.append(str(e))
    threads = [threading.Thread(target=failing) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == ["store down"] * 4 and base.calls.count(("shard", 0, 10)) == 1
    base.fail = None
    assert cache.get("shard", 0, 10) == payload(9, 4000)[:10]


def test_stats_and_format(tmp_path):
    base = CountingStore(tmp_path / "s")
    base.put("a", payload(1))
    base.put("b", payload(2))
    cache = TieredCache(base, memory_bytes=1 << 20, disk_dir=tmp_path / "c", disk_bytes=1 << 20)
    cache.get("a"), cache.get("a"), cache.get("b"), cache.get("a"), cache.size("a"), cache.size("a")
    s = cache.stats()
    assert (s["gets"], s["mem_hits"], s["disk_misses"], s["store_gets"]) == (4, 2, 2, 2)
    assert s["store_requests"] == 3 and s["mem_hit_rate"] == 0.5 and s["store_bytes"] == 200
    assert s["store_requests_per_s"] > 0
    fresh = TieredCache(base, memory_bytes=1 << 20, disk_dir=tmp_path / "c", disk_bytes=1 << 20)
    fresh.get("a")
    assert fresh.stats()["disk_hit_rate"] == 1.0 and fresh.stats()["store_gets"] == 0
    line = cache.format_stats()
    assert "4 gets" in line and "mem hit 50.0%" in line and "store 3 req" in line
    total = merge_stats([cache.stats(), fresh.stats()])
    assert total["gets"] == 5 and total["disk_hits"] == 1 and total["store_gets"] == 2
    assert "5 gets" in format_stats(total)
    cache.reset_stats()
    assert cache.stats()["gets"] == 0


N_KEYS, SIZE = 12, 3000


def _hammer(cache, seed, seconds, out):
    rng = random.Random(seed)
    bad = ops = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        i = rng.randrange(N_KEYS)
        start = rng.choice([0, 100, 1500])
        end = rng.choice([None, 2000, 2999])
        if cache.get(f"k{i}", start, end) != payload(i, SIZE)[start:end]:
            bad += 1
        ops += 1
    out.put((bad, ops, cache.stats()))


def _check_entries(disk, seconds, out):
    """Read every visible entry over and over: each one must be complete and valid."""
    import zlib

    bad = seen = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for p in entry_files(disk):
            try:
                raw = p.read_bytes()
            except FileNotFoundError:
                continue  # evicted meanwhile
            seen += 1
            if len(raw) < _HEADER.size:
                bad += 1
                continue
            magic, length, crc = _HEADER.unpack_from(raw)
            body = raw[_HEADER.size:]
            bad += not (magic == _MAGIC and length == len(body) and zlib.crc32(body) == crc)
    out.put((bad, seen))


def test_processes_share_the_disk_tier_safely(tmp_path):
    base = LocalStore(tmp_path / "s")
    for i in range(N_KEYS):
        base.put(f"k{i}", payload(i, SIZE))
    disk = tmp_path / "c"
    budget = 10 * (SIZE + _HEADER.size)  # far less than the working set: constant eviction
    cache = TieredCache(base, memory_bytes=0, disk_dir=disk, disk_bytes=budget)
    cache.get("k0")  # the parent uses it before forking, like a loader before its workers start
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(cache, seed, 3.0, out)) for seed in range(3)]
    procs.append(ctx.Process(target=_check_entries, args=(disk, 3.0, out)))
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    checker = [r for r in results if len(r) == 2]
    workers = [r for r in results if len(r) == 3]
    assert len(workers) == 3 and sum(w[0] for w in workers) == 0, "a read returned wrong bytes"
    assert checker[0][0] == 0 and checker[0][1] > 0, "a partial or corrupt entry was visible"
    stats = merge_stats([w[2] for w in workers])
    assert stats["disk_hits"] > 0 and stats["disk_evictions"] > 0
    assert stats["gets"] == sum(w[1] for w in workers)  # child counters start from zero
    assert stats["disk_corrupt"] == 0
    slack = 3 * (SIZE + _HEADER.size)  # each writer may overshoot by its last entry
    assert disk_usage(disk) <= budget + slack


def test_pickled_cache_works_and_starts_cold(tmp_path):
    base = LocalStore(tmp_path / "s")
    base.put("k", b"hello world")
    cache = TieredCache(base, memory_bytes=1 << 20, disk_dir=tmp_path / "c", disk_bytes=1 << 20)
    cache.get("k")
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.get("k", 6, None) == b"world"
    s = clone.stats()
    assert s["gets"] == 1 and s["mem_hits"] == 0 and s["store_gets"] == 1

"""S3Store and the tiered cache through a fault-injecting proxy in front of a real SeaweedFS:
503 SlowDown, connection resets, truncated bodies and delays never lose, duplicate or corrupt
bytes; retries are counted; an unreachable or hanging store fails clearly in bounded time."""

import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from data.cache import TieredCache
from data.embedded_s3 import EmbeddedS3, free_port
from data.s3_store import REFUSED_RETRY_S, S3Store
from data.store import StoreUnavailable
from tests.fault_proxy import FaultProxy

N_OBJECTS = 16


def blob(i: int) -> bytes:
    rng = random.Random(i)
    return rng.randbytes(rng.randrange(1, 120_000))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with EmbeddedS3(tmp_path_factory.mktemp("s3"), bucket="mmpt-fault-test") as server:
        direct = server.store("data")
        for i in range(N_OBJECTS):
            direct.put(f"obj/{i:03d}", blob(i))
        yield server


def faulty_store(s3, proxy, prefix="data", **opts):
    opts = {"backoff_base": 0.005, "backoff_cap": 0.05, "seed": 0, **opts}
    return S3Store(s3.bucket, prefix, endpoint_url=proxy.endpoint, access_key=s3.access_key,
                   secret_key=s3.secret_key, **opts)


def read_plan(seed=0, n=160):
    """Whole-object and ranged reads, as (key, start, end)."""
    rng = random.Random(seed)
    plan = [(f"obj/{i:03d}", None, None) for i in range(N_OBJECTS)]
    for _ in range(n):
        i = rng.randrange(N_OBJECTS)
        size = len(blob(i))
        start = rng.randrange(size)
        plan.append((f"obj/{i:03d}", start, rng.choice([None, start + rng.randrange(1, 5000)])))
    return plan


def test_reads_through_faults_equal_reads_without(s3):
    plan = read_plan()
    direct = s3.store("data")
    expected = [direct.get(*r) for r in plan]
    assert expected == [blob(int(k[4:]))[s:e] for k, s, e in plan]  # the store itself is right
    with FaultProxy(s3.endpoint, fraction=0.3, seed=1, delay_s=0.05) as proxy:
        store = faulty_store(s3, proxy, max_concurrency=4)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda r: store.get(*r), plan))
    assert got == expected  # nothing lost, duplicated, reordered or truncated
    counts = proxy.counts
    assert all(counts.get(k, 0) > 0 for k in ("slowdown", "reset", "truncate", "delay")), counts
    stats = store.stats()
    # every injected failure (not the delays) costs exactly one retry, and is counted as one
    assert stats["retries"] == counts["slowdown"] + counts["reset"] + counts["truncate"], (
        stats, counts)
    assert stats["retry_reasons"].get("SlowDown") == counts["slowdown"]
    assert stats["retry_reasons"].get("truncated", 0) >= 1
    assert stats["requests"] == counts["requests"] == len(plan) + stats["retries"]


def test_writes_through_faults_are_exact_and_not_duplicated(s3):
    kinds = ("slowdown", "reset", "reset_after", "truncate", "delay")
    with FaultProxy(s3.endpoint, fraction=0.4, kinds=kinds, seed=2, delay_s=0.02) as proxy:
        store = faulty_store(s3, proxy, prefix="writes")
        for i in range(12):
            store.put(f"w/{i}", blob(100 + i))
        listed = store.list("w/")
    assert proxy.counts.get("reset_after", 0) > 0, proxy.counts  # applied upstream, reply lost
    assert listed == sorted(f"w/{i}" for i in range(12))
    direct = s3.store("writes")
    assert [direct.get(f"w/{i}") for i in range(12)] == [blob(100 + i) for i in range(12)]


def test_fault_schedule_is_deterministic(s3):
    plan = read_plan(seed=5, n=20)

    def run(seed):
        with FaultProxy(s3.endpoint, fraction=0.3, seed=seed, delay_s=0.01) as proxy:
            store = faulty_store(s3, proxy)
            data = [store.get(*r) for r in plan]
        return data, proxy.faults

    data_a, faults_a = run(7)
    data_b, faults_b = run(7)
    data_c, faults_c = run(8)
    assert data_a == data_b == data_c
    assert faults_a == faults_b and len(faults_a) > 0
    assert faults_a != faults_c


def test_cache_over_faulty_store(s3, tmp_path):
    plan = read_plan(seed=3, n=60)
    expected = [blob(int(k[4:]))[s:e] for k, s, e in plan]
    with FaultProxy(s3.endpoint, fraction=0.3, seed=3, delay_s=0.02) as proxy:
        cache = TieredCache(faulty_store(s3, proxy), memory_bytes=1 << 20,
                            disk_dir=tmp_path / "cache", disk_bytes=4 << 20)
        with ThreadPoolExecutor(4) as pool:
            first = list(pool.map(lambda r: cache.get(*r), plan * 2))
        second = [cache.get(*r) for r in plan]
    assert first == expected * 2 and second == expected
    s = cache.stats()
    unique = len(set(plan))
    assert s["store_gets"] == unique  # coalescing + cache: one successful fetch per range
    assert s["store"]["retries"] > 0 and s["gets"] == 3 * len(plan)


def test_unreachable_store_fails_clearly_and_fast():
    port = free_port()  # nothing listens here
    store = S3Store("mmpt-nowhere", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=4,
                    backoff_base=0.05, backoff_cap=0.2, access_key="k", secret_key="s-e-c-r-e-t")
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        store.get("x")
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert "after 4 attempts" in msg and f"127.0.0.1:{port}" in msg and "s3://mmpt-nowhere/x" in msg
    assert "s-e-c-r-e-t" not in msg
    assert elapsed < 10, elapsed
    assert store.stats()["requests"] == 4 and store.stats()["retry_reasons"] == {"refused": 4}


def test_refused_port_with_default_settings_gives_up_after_a_second(monkeypatch):
    """Default settings: a refused connection is retried for REFUSED_RETRY_S (1 s), not for the
    whole retry budget; credentials in AWS_ENDPOINT_URL never reach the message."""
    port = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:secret@127.0.0.1:{port}")
    store = S3Store("mmpt-nowhere", access_key="k", secret_key="s")
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        store.get("x")
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert "retry time 1 s for a refused connection" in msg and "connection refused" in msg, msg
    assert f"http://***@127.0.0.1:{port}" in msg and "secret" not in msg and "user" not in msg
    assert REFUSED_RETRY_S <= 1.0 and elapsed < 5, elapsed  # bounded (about 1 s when idle)
    assert store.stats()["requests"] < store.max_attempts


def test_hanging_store_times_out(s3):
    with FaultProxy(s3.endpoint, fraction=1.0, kinds=("hang",), max_faults_per_request=99) as proxy:
        store = faulty_store(s3, proxy, max_attempts=3, read_timeout=0.5, connect_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="after 3 attempts"):
            store.get("obj/000", 0, 10)
        elapsed = time.monotonic() - t0
    assert elapsed < 15, elapsed
    assert store.stats()["retry_reasons"] == {"timeout": 3}


def test_hanging_store_gives_up_after_retry_time_and_says_what_it_waits_for(s3, caplog):
    """Many attempts allowed, but retry_time bounds the whole operation; the wait is logged."""
    with FaultProxy(s3.endpoint, fraction=1.0, kinds=("hang",), max_faults_per_request=999) as proxy:
        store = faulty_store(s3, proxy, max_attempts=100, read_timeout=0.3, connect_timeout=0.3,
                             retry_time=2.5)
        endpoint = proxy.endpoint
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="data.s3_store"), \
                pytest.raises(StoreUnavailable, match=r"retry time 2\.5 s\)") as info:
            store.get("obj/000", 0, 10)
        elapsed = time.monotonic() - t0
    assert "no reply within read_timeout=0.3 s" in str(info.value)
    assert 2.5 - 0.05 <= elapsed < 2.5 + 0.6 + 3.0, elapsed  # never sleeps past the budget
    waits = [r.getMessage() for r in caplog.records if r.name == "data.s3_store"]
    assert waits and all("no reply within read_timeout=0.3 s" in w and endpoint in w
                         and "giving up after 2.5 s" in w for w in waits), waits


def test_a_server_that_closes_every_connection(s3):
    """A listener that accepts and immediately closes: bounded retries, 'connection' errors."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.1)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                conn.close()
            except OSError:
                pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        store = S3Store(s3.bucket, endpoint_url=f"http://127.0.0.1:{srv.getsockname()[1]}",
                        max_attempts=3, backoff_base=0.01, access_key="k", secret_key="s")
        with pytest.raises(StoreUnavailable, match="after 3 attempts"):
            store.get("obj/000")
        assert store.stats()["retries"] == 2
    finally:
        stop.set()
        t.join(5)
        srv.close()

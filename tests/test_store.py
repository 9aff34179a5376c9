"""Object stores: LocalStore and S3Store (against a real embedded SeaweedFS) share one semantics."""

import multiprocessing as mp
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from data.embedded_s3 import EmbeddedS3
from data.s3_store import S3Store
from data.store import (LocalStore, NotFound, StoreError, StoreUnavailable, open_store, redact,
                        validate_key)

BLOB = bytes((i * 7 + i // 251) % 256 for i in range(50_000))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with EmbeddedS3(tmp_path_factory.mktemp("s3"), bucket="mmpt-store-test") as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server = request.getfixturevalue("s3")
    return server.store(f"t/{request.node.name.replace('[', '_').replace(']', '')}")


def test_roundtrip_and_ranges_are_slices(store):
    store.put("shards/a.bin", BLOB)
    assert store.get("shards/a.bin") == BLOB
    assert store.size("shards/a.bin") == len(BLOB)
    n = len(BLOB)
    for start, end in [(0, 1), (10, 20), (0, None), (123, None), (n - 1, None), (n - 5, n + 100),
                       (n, None), (n + 10, n + 20), (5, 5), (9, 3), (None, 17), (0, n)]:
        assert store.get("shards/a.bin", start, end) == BLOB[start:end], (start, end)
    store.put("empty", b"")
    assert store.get("empty") == b"" and store.size("empty") == 0
    store.put("shards/a.bin", b"new")  # overwrite replaces the whole object
    assert store.get("shards/a.bin") == b"new"


def test_missing_key_same_error_everywhere(store):
    for call in (lambda: store.get("nope"), lambda: store.get("nope", 3, 9),
                 lambda: store.get("nope", 4, 4), lambda: store.size("nope")):
        with pytest.raises(NotFound, match="nope") as info:
            call()
        assert isinstance(info.value, FileNotFoundError)
    assert not store.exists("nope")
    store.delete("nope")  # deleting a missing key is not an error
    store.put("dir/x", b"1")
    with pytest.raises(NotFound):
        store.get("dir")  # a "directory" is not an object


def test_list_exists_delete(store):
    for k in ["b/2", "a/1", "a/sub/3", "c"]:
        store.put(k, k.encode())
    assert store.list() == ["a/1", "a/sub/3", "b/2", "c"]
    assert store.list("a/") == ["a/1", "a/sub/3"]
    assert store.exists("a/sub/3")
    store.delete("a/1")
    assert not store.exists("a/1") and store.list("a/") == ["a/sub/3"]


@pytest.mark.parametrize("bad", ["", "/abs", "a//b", "a/../b", "./a", "a\\b", "a/", "..", "a\x00"])
def test_bad_keys_rejected(store, bad):
    with pytest.raises(ValueError, match="key"):
        store.get(bad)
    with pytest.raises(ValueError):
        store.put(bad, b"x")


def test_validate_key_accepts_normal_keys():
    assert validate_key("shards/000001.tar") == "shards/000001.tar"
    assert validate_key("a.b/c-d_e") == "a.b/c-d_e"


def test_open_store_dispatch(tmp_path):
    s = open_store("s3://my-bucket/some/prefix/", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s, S3Store) and s.bucket == "my-bucket" and s.prefix == "some/prefix"
    assert s.url == "s3://my-bucket/some/prefix"
    assert open_store("s3://my-bucket").url == "s3://my-bucket"
    local = open_store(str(tmp_path / "d"))
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "d").resolve()
    assert open_store(local.url).root == local.root
    with pytest.raises(ValueError, match="unsupported scheme"):
        open_store("gs://bucket/x")
    with pytest.raises(ValueError, match="no bucket"):
        open_store("s3:///x")
    with pytest.raises(ValueError, match="3 characters"):
        open_store("s3://ab/x")


def test_local_put_is_atomic_for_readers(tmp_path):
    """A reader polling while a writer flips an object between two versions sees only whole ones."""
    store = LocalStore(tmp_path)
    versions = [b"A" * 200_000, b"B" * 150_000]
    store.put("obj", versions[0])
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            store.put("obj", versions[i % 2])

    t = threading.Thread(target=writer)
    t.start()
    try:
        seen = set()
        for _ in range(300):
            data = store.get("obj")
            assert data in versions
            seen.add(data[:1])
    finally:
        stop.set()
        t.join()
    assert not [p for p in tmp_path.iterdir() if p.name != "obj"], "temp files left behind"
    assert store.list() == ["obj"]


def test_s3_env_credential_chain(s3, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    store = open_store(f"s3://{s3.bucket}/envchain")
    store.put("k", b"via env")
    assert store.get("k") == b"via env"
    assert store.endpoint_url == s3.endpoint


def test_s3_bad_credentials_fail_fast_without_leaking_secret(s3):
    secret = "very-secret-value-123"
    store = S3Store(s3.bucket, endpoint_url=s3.endpoint, access_key="wrong", secret_key=secret)
    with pytest.raises(StoreError) as info:
        store.get("x")
    assert not isinstance(info.value, (NotFound, StoreUnavailable))
    assert secret not in str(info.value) and "InvalidAccessKeyId" in str(info.value)
    assert store.stats()["requests"] == 1  # an auth error is not retried


def test_s3_missing_bucket_is_clear(s3):
    store = s3.store()
    store.bucket = "no-such-bucket-here"  # (SeaweedFS creates buckets on PUT; reads show it)
    with pytest.raises(StoreError, match="no-such-bucket-here") as info:
        store.get("k")
    assert not isinstance(info.value, NotFound)


def test_s3_concurrency_is_bounded(s3):
    store = s3.store("conc", max_concurrency=2)
    store.put("obj", BLOB)
    state = {"now": 0, "max": 0}
    lock = threading.Lock()
    real = store._state()._client

    class Watching:
        def __getattr__(self, name):
            fn = getattr(real, name)

            def call(*a, **kw):
                with lock:
                    state["now"] += 1
                    state["max"] = max(state["max"], state["now"])
                try:
                    time.sleep(0.02)
                    return fn(*a, **kw)
                finally:
                    with lock:
                        state["now"] -= 1
            return call

    store._client = Watching()
    threads = [threading.Thread(target=lambda i=i: store.get("obj", i, i + 10)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["max"] == 2


def _child_reads(store, q):
    q.put(store.get("obj", 100, 200))


def test_s3_store_survives_fork_and_pickle(s3):
    store = s3.store("fork")
    store.put("obj", BLOB)
    assert store.get("obj", 0, 10) == BLOB[:10]  # the parent's client exists before the fork
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_reads, args=(store, q))
    p.start()
    assert q.get(timeout=60) == BLOB[100:200]
    p.join(30)
    assert p.exitcode == 0
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get("obj", 5, 9) == BLOB[5:9] and clone.url == store.url


def test_embedded_s3_cli_runs_until_killed(tmp_path, s3):
    """`python -m data.embedded_s3` serves (beside the fixture's server) and stops on SIGTERM."""
    from data.embedded_s3 import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "data.embedded_s3", "--dir", str(tmp_path),
                             "--port", str(port), "--bucket", "cli-bucket"],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, line
        env = dict(line.split("=", 1) for line in
                   (tmp_path / "s3.env").read_text().replace("export ", "").splitlines())
        assert oct((tmp_path / "s3.env").stat().st_mode & 0o777) == "0o600"
        store = S3Store("cli-bucket", endpoint_url=env["AWS_ENDPOINT_URL"],
                        access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])
        store.put("hello", b"world")
        assert store.get("hello", 1, 3) == b"or"
        assert env["AWS_ENDPOINT_URL"] != s3.endpoint  # two servers at once
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    with pytest.raises(StoreUnavailable):  # the server (and its weed child) is gone
        S3Store("cli-bucket", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2,
                access_key="k", secret_key="s").get("hello")


def test_redact_removes_userinfo_and_query_credentials():
    assert redact("http://user:secret@127.0.0.1:9000") == "http://***@127.0.0.1:9000"
    msg = redact("GET failed (endpoint https://AKIA:s/e@cret@host:1/b?X-Amz-Signature=abc&x=1&flag): "
                 "see s3://bucket/key")
    assert msg == ("GET failed (endpoint https://***@host:1/b?X-Amz-Signature=***&x=***&flag): "
                   "see s3://bucket/key")
    assert redact("s3://bucket/prefix") == "s3://bucket/prefix" and redact("no url") == "no url"


def test_credentials_in_store_urls_never_reach_messages(tmp_path):
    for url in ("s3://AKIAEXAMPLE:topsecret@bucket/p", "s3://bucket/p?X-Amz-Signature=topsecret"):
        with pytest.raises(ValueError) as info:
            open_store(url)
        assert "topsecret" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)
    with pytest.raises(ValueError) as info:
        S3Store("user:topsecret@bucket")
    assert "topsecret" not in str(info.value)
    s3 = S3Store("bucket", endpoint_url="http://user:topsecret@127.0.0.1:1")
    assert s3.endpoint == "http://***@127.0.0.1:1" and "topsecret" not in repr(s3)
    bad = S3Store("bucket", endpoint_url="http://user:topsecret@bad_host!:1", access_key="k",
                  secret_key="s")
    with pytest.raises(StoreError, match="cannot use endpoint") as info:  # botocore's ValueError
        bad.get("x")
    assert "topsecret" not in str(info.value)
    # the S3 wait settings apply to every store URL; a local directory has nothing to wait for
    assert isinstance(open_store(str(tmp_path), read_timeout=1.0, retry_time=2.0), LocalStore)


def test_stalled_store_fails_data_inspect_in_bounded_time(monkeypatch, caplog, capsys):
    """An endpoint that accepts connections and never answers: `mmpt data inspect` gives up after
    store.retry_time (set small here), logs what it waits for, and leaks no credential."""
    from train.cli import main

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)  # the kernel completes handshakes; nobody ever reads or answers
    port = srv.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:secret@127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also-secret")
    try:
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="data.s3_store"):
            rc = main(["data", "inspect", "--manifest", "s3://mmpt-stalled/ds",
                       "--store.read_timeout=0.3", "--store.connect_timeout=0.3",
                       "--store.retry_time=3"])
        elapsed = time.monotonic() - t0
    finally:
        srv.close()
    # The store's StoreUnavailable reaches the user as mmpt's one-line error, status 2.
    msg = capsys.readouterr().err
    assert rc == 2 and msg.startswith("mmpt data: error: "), (rc, msg)
    assert "manifest.json" in msg and "no reply within read_timeout=0.3 s" in msg, msg
    assert elapsed < 3 + 0.6 + 4, elapsed  # the budget, one attempt's timeouts, start-up
    logged = [r.getMessage() for r in caplog.records if r.name == "data.s3_store"]
    assert logged and "retry" in logged[0] and f"http://***@127.0.0.1:{port}" in logged[0]
    for text in [msg, *logged]:
        assert "secret" not in text and "user" not in text


def test_embedded_s3_starts_again_when_a_chosen_port_is_taken(tmp_path, monkeypatch):
    """A port taken between its choice and weed's bind (weed's own outgoing connections can take
    it) makes weed exit; the server starts again on fresh ports and serves."""
    import data.embedded_s3 as embedded

    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    real, calls = embedded.free_port, []

    def first_clashes() -> int:
        calls.append(1)
        # the 7th port of the first start is the filer's gRPC port (S3, then master, master
        # gRPC, volume, volume gRPC, filer, filer gRPC)
        return busy.getsockname()[1] if len(calls) == 7 else real()

    monkeypatch.setattr(embedded, "free_port", first_clashes)
    try:
        with embedded.EmbeddedS3(tmp_path / "s3", bucket="retry") as s3:
            s3.store().put("k", b"v")
            assert s3.store().get("k") == b"v"
        assert len(calls) == 16  # two starts of 8 ports each
        assert "address already in use" in (tmp_path / "s3" / "weed.log").read_text()
    finally:
        busy.close()

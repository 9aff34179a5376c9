"""Column files and the columnar catalog: round trip, where readers map them from, damage."""

import numpy as np
import pytest

from data import columnar
from data.cache import TieredCache
from data.columnar import ColumnError, Columns, encode_columns, map_file, open_columns, write_columns
from data.store import LocalStore, ObjectStore


class RemoteLike(ObjectStore):
    """A store that is not a local directory (like S3), counting ranged GETs."""

    def __init__(self, root):
        self.inner, self.gets = LocalStore(root), []

    url = property(lambda self: "remote://test")

    def get(self, key, start=None, end=None):
        self.gets.append((key, start, end))
        return self.inner.get(key, start, end)

    def put(self, key, data):
        self.inner.put(key, data)

    def size(self, key):
        return self.inner.size(key)

    def exists(self, key):
        return self.inner.exists(key)

    def delete(self, key):
        self.inner.delete(key)

    def list(self, prefix=""):
        return self.inner.list(prefix)


def _columns():
    rng = np.random.default_rng(0)
    return {"a": rng.integers(0, 1 << 30, 1000, dtype=np.int32), "b": rng.random(7),
            "key": np.array([b"x", b"yy", b"zzz"], dtype="S3"), "empty": np.zeros(0, np.int64)}


def test_round_trip_in_memory_and_mapped_and_bytes_are_deterministic(tmp_path):
    cols, meta = _columns(), {"source": "s", "n": 3}
    raw = encode_columns(cols, meta)
    assert raw == encode_columns(_columns(), dict(meta))
    size = write_columns(tmp_path / "c.cols", cols, meta)
    assert (tmp_path / "c.cols").read_bytes() == raw and size == len(raw)
    for opened in (Columns(raw, "mem"), map_file(tmp_path / "c.cols")):
        assert opened.meta == meta
        for name, col in cols.items():
            assert opened[name].dtype == col.dtype and np.array_equal(opened[name], col)
    mapped = map_file(tmp_path / "c.cols")  # a map starts page-aligned: columns are 64-byte aligned
    assert all(mapped[n].ctypes.data % columnar.ALIGN == 0 for n in cols if cols[n].size)
    with pytest.raises(ColumnError, match="no column 'c'"):
        Columns(raw, "mem")["c"]


def test_damaged_files_are_errors_naming_the_file(tmp_path):
    raw = encode_columns(_columns(), {})
    with pytest.raises(ColumnError, match="x.cols: truncated"):
        Columns(raw[:len(raw) - 64], "x.cols")
    with pytest.raises(ColumnError, match="x.cols: not a column file"):
        Columns(b"garbage" * 10, "x.cols")


def test_a_remote_catalog_is_fetched_once_per_host_and_shared_through_the_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(columnar, "FETCH_CHUNK", 4096)
    remote = RemoteLike(tmp_path / "remote")
    raw = encode_columns(_columns(), {"v": 1})
    remote.put("gen-000001/s/catalog.cols", raw)
    import hashlib

    sha = hashlib.sha256(raw).hexdigest()
    first = open_columns(TieredCache(remote, disk_dir=tmp_path / "cache"), "gen-000001/s/catalog.cols",
                         len(raw), sha)
    ranged = [g for g in remote.gets if g[0].endswith("catalog.cols")]
    assert len(ranged) == -(-len(raw) // 4096) and all(e - s <= 4096 for _, s, e in ranged)
    # another process of the host (a fresh cache object over the same directory) maps the copy
    remote.gets.clear()
    second = open_columns(TieredCache(remote, disk_dir=tmp_path / "cache"), "gen-000001/s/catalog.cols",
                          len(raw), sha)
    assert remote.gets == [] and np.array_equal(first["a"], second["a"])
    assert len(list((tmp_path / "cache" / "columns").glob("*"))) == 2  # the copy and tmp/
    # a changed object is refused at fetch, and the size is checked too
    with pytest.raises(ColumnError, match="sha256 does not match"):
        open_columns(TieredCache(remote, disk_dir=tmp_path / "c2"), "gen-000001/s/catalog.cols",
                     len(raw), "0" * 64)
    with pytest.raises(ColumnError, match="bytes, the manifest says"):
        open_columns(remote, "gen-000001/s/catalog.cols", len(raw) + 64, None)
    with pytest.raises(ColumnError, match="missing column file"):
        open_columns(remote, "gen-000001/s/nothing.cols", 10, None)


def test_a_local_dataset_is_mapped_in_place(tmp_path):
    store = LocalStore(tmp_path)
    raw = encode_columns(_columns(), {})
    store.put("c.cols", raw)
    opened = open_columns(TieredCache(store, disk_dir=tmp_path / "cache"), "c.cols", len(raw))
    assert not (tmp_path / "cache" / "columns").exists()
    assert np.array_equal(opened["a"], _columns()["a"])

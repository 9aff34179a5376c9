"""Column files and the columnar catalog: round trip, where readers map them from, damage."""

import json

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


# ---------------------------------------------------------------------------------------------
# The hold-out split from the plan table's columns against the per-sample computation


def _holdout_dataset(tmp_path, seq_len=64, window=2, global_batch=8):
    """Two small sources in column files (a few shards, random keys, documents longer than a
    window); returns (store, manifest, media)."""
    from data.ingest import write_catalog
    from data.media import MediaRules
    from data.shards import build_manifest, generation_prefix
    from data.vision import VisionPreprocess

    media, rng = MediaRules(VisionPreprocess()), np.random.default_rng(3)
    store, gen = LocalStore(tmp_path / "ds"), generation_prefix(1)
    shards_all, catalogs = [], []
    for name, n in (("web", 900), ("code", 40)):
        shards, indexes = [], []
        for k, count in enumerate(np.diff(np.r_[0, np.sort(rng.choice(n - 1, 3, replace=False)) + 1, n])):
            samples = [{"key": f"{rng.integers(1 << 40):x}", "kind": "text",
                        "members": {"txt": {"offset": 512 * j, "size": 100}},
                        "text_tokens": int(rng.integers(1, 300)), "text_bytes": 10,
                        "images": [], "videos": []} for j in range(int(count))]
            shards.append({"source": name, "key": f"{gen}{name}/shard-{k:06d}.tar",
                           "index": f"{gen}{name}/shard-{k:06d}.idx.json",
                           "num_samples": len(samples), "size": 1 << 20, "index_sha256": f"{k:064x}"})
            indexes.append({"samples": samples})
        catalogs.append(write_catalog(store, gen, name, "text", shards, indexes,
                                      [(media, seq_len, window, global_batch)]))
        shards_all += shards
    manifest = build_manifest([{"name": "web", "kind": "text"}, {"name": "code", "kind": "text"}],
                              shards_all, {"fingerprint": "t", "vocab_size": 100,
                                           "special_tokens": {}}, [], 1, catalogs)
    return store, manifest, media


def _old_split(catalog, s, fraction, split):
    """The split as it was computed before the hold-out columns: hash every sample, filter."""
    from data.plan_table import held_out

    src, units = catalog.catalogs[s], catalog.plans[s]["units"]
    val = held_out(src.name, src.identities(), fraction)
    keep = (val if split == "val" else ~val)[np.asarray(units["sample"])]
    return {f: np.asarray(units[f])[keep] for f in ("tokens", "vision", "sample", "offset")}


@pytest.mark.parametrize("fraction", [0.001, 0.05, 0.3, 0.9])
def test_holdout_columns_give_the_split_of_the_per_sample_computation(tmp_path, fraction):
    from data.catalog import Catalog
    from data.mix import TokenMixer

    store, manifest, media = _holdout_dataset(tmp_path)
    opts = dict(media=media, seq_len=64, window_sequences=2, global_batch=8)
    for split in ("train", "val"):
        cat = Catalog(store, manifest, holdout_fraction=fraction, split=split, **opts)
        assert cat.derived_plans == [] and cat.derived_holdout == []  # read from the columns
        assert "holdout" in cat.plans[0].cols
        for s, spec in enumerate(cat.sources):
            old = _old_split(cat, s, fraction, split)
            assert len(old["tokens"]) > 0  # at 0.001: the smallest-score sample of each source
            for field, got in (("tokens", spec.tokens), ("vision", spec.vision),
                               ("sample", spec.samples), ("offset", spec.offsets)):
                assert np.array_equal(np.asarray(got), old[field]), (split, s, field)
        # the same stream as from the filtered arrays
        weights = [float(_old_split(cat, s, fraction, split)["tokens"].sum()) for s in range(2)]
        assert [spec.weight for spec in cat.sources] == weights
        from data.mix import SourceSpec

        plain = [SourceSpec(sp.name, sp.group, sp.weight, *(_old_split(cat, s, fraction, split)[f]
                 for f in ("tokens", "vision", "sample", "offset"))) for s, sp in enumerate(cat.sources)]
        a, b = (TokenMixer(x, 0.0, seed=1, fingerprint="fp") for x in (cat.sources, plain))
        assert [a.next() for _ in range(3000)] == [b.next() for _ in range(3000)]
    # a plan table without the hold-out columns: the split is computed on load, the same
    stripped = json.loads(json.dumps(manifest))
    for c in stripped["catalogs"]:
        c["plans"] = {}
    old_style = Catalog(store, stripped, holdout_fraction=fraction, split="train", **opts)
    assert old_style.derived_plans == ["web", "code"]
    new = Catalog(store, manifest, holdout_fraction=fraction, split="train", **opts)
    for x, y in zip(old_style.sources, new.sources):
        assert np.array_equal(np.asarray(x.samples), np.asarray(y.samples))


def test_a_plan_table_without_holdout_columns_falls_back_to_hashing(tmp_path, monkeypatch):
    import data.catalog as catalog_mod
    import data.plan_table

    real = data.plan_table.plan_columns
    monkeypatch.setattr(data.plan_table, "plan_columns",
                        lambda *a, **k: real(*a, **{**k, "holdout": False}))
    import data.ingest  # write_catalog imports plan_columns from data.plan_table when it runs

    store, manifest, media = _holdout_dataset(tmp_path)
    monkeypatch.undo()
    cat = catalog_mod.Catalog(store, manifest, media=media, seq_len=64, window_sequences=2,
                              global_batch=8, holdout_fraction=0.3, split="val")
    assert "holdout" not in cat.plans[0].cols and cat.derived_holdout == ["web", "code"]
    for s, spec in enumerate(cat.sources):
        assert np.array_equal(np.asarray(spec.samples), _old_split(cat, s, 0.3, "val")["sample"])


def test_rows_without_matches_deleting_the_rows():
    from data.mix import RowsWithout

    rng = np.random.default_rng(0)
    for n in (1, 5, 100):
        for k in range(n):
            removed = np.sort(rng.choice(n, k, replace=False))
            rows = RowsWithout(n, removed)
            expect = np.delete(np.arange(n), removed)
            assert len(rows) == len(expect)
            assert np.array_equal(rows[np.arange(len(expect))], expect)


@pytest.mark.parametrize("global_batch", [4096, 8])
def test_the_scale_benchmarks_synthetic_plan_table_is_the_one_the_catalog_derives(tmp_path,
                                                                                 global_batch):
    """bench/data_scale.py writes plan tables itself (no ingest): they must hold the units the
    catalog's unit rule gives (up to U pieces of seq_len tokens: U = 32 at K2.5's global batch
    of 4096, U = 4 at 8) and the same hold-out column, or the benchmark would plan a stream no
    real dataset has."""
    import sys
    from pathlib import Path

    import data.catalog as catalog_mod
    from data.store import open_store

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import bench.data_scale as scale

    scale.write_dataset(tmp_path, 30_000, global_batch=global_batch)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    store = open_store(str(tmp_path))
    opts = dict(media=scale._media(), seq_len=scale.SEQ_LEN, window_sequences=scale.WINDOW,
                global_batch=global_batch, holdout_fraction=0.01)
    written = catalog_mod.Catalog(store, manifest, **opts)
    for c in manifest["catalogs"]:
        c["plans"] = {}
    derived = catalog_mod.Catalog(store, manifest, **opts)
    assert written.derived_plans == [] and derived.derived_plans == ["text", "images"]
    for a, b in zip(written.plans, derived.plans):
        assert a.meta["units"] == b.meta["units"] and a.meta["tokens"] == b.meta["tokens"]
        assert np.array_equal(np.asarray(a["units"]), np.asarray(b["units"]))
        assert np.array_equal(np.asarray(a["holdout"]), np.asarray(b["holdout"]))
    units = written.plans[0].meta["units"]
    if global_batch == 4096:  # no text sample is longer than a window (100,000 < 32 * 4096)
        assert units == 27_000
    else:  # units of 4 * 4096 tokens: the text samples longer than that are several
        assert units > 27_000


def test_unit_pieces_rule():
    from data.plan_table import unit_pieces

    # a window of at most one global batch: units of a whole window (S pieces)
    assert [unit_pieces(32, b) for b in (32, 64, 4096)] == [32, 32, 32]
    # several batches per window: a batch's worth of pieces, at least one
    assert [unit_pieces(32, b) for b in (16, 8, 4, 1, 20)] == [2, 4, 8, 32, 1]
    with pytest.raises(ValueError, match="global_batch=0"):
        unit_pieces(32, 0)


@pytest.mark.parametrize("window,global_batch", [(4, 8), (4, 2), (8, 2), (4, 3)])
def test_text_units_of_the_vectorized_path_are_the_per_document_units(window, global_batch):
    """plan_columns cuts text sources without a per-document pass: it must give the units that
    Layout.units gives each document (U pieces of seq_len tokens, the last one shorter)."""
    from data.catalog import SourceCatalog, catalog_columns
    from data.plan_table import Layout, plan_columns
    from data.media import MediaRules
    from data.vision import VisionPreprocess

    media, seq_len = MediaRules(VisionPreprocess()), 16
    layout = Layout(media, seq_len, window, global_batch)
    lengths = [1, 14, 15, 16, 31, 63, 64, 65, 200, 1000]
    entries = [{"key": f"{i:012d}", "text_tokens": n, "members": {"txt": {"offset": 0, "size": 1}}}
               for i, n in enumerate(lengths)]
    cols, meta = catalog_columns("t", "text", [{"key": "s.tar", "size": 1, "num_samples": len(entries)}],
                                 [{"samples": entries}])
    src = SourceCatalog(Columns(encode_columns(cols, meta), "t"), "t", "text")
    units = plan_columns(src, layout, "key", holdout=False)[0]["units"]
    expect = [u for i in range(src.n) for u in layout.units(layout.segments("text", src.entry(i)), i)]
    got = list(zip(units["sample"].tolist(), units["offset"].tolist(), units["tokens"].tolist(),
                   units["vision"].tolist()))
    assert got == expect
    assert max(t for _, _, t, _ in got) == seq_len * layout.unit_pieces  # grouped, not one piece

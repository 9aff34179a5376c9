"""Shard format: webdataset reads our tars, ranged reads by index, clear errors on bad files."""

import hashlib
import io
import json
import tarfile

import pytest

from data.shards import (ShardBuilder, ShardError, build_manifest, canonical_json, iter_tar, open_dataset,
                         read_index, read_manifest, read_member, verify_shard)
from data.store import open_store
from tests.corpus_fixtures import make_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("shards"))


def _small_shard():
    b = ShardBuilder("src", "src/shard-000000.tar")
    b.add("000000000000", "text", {"txt": b"hello"}, text_tokens=1, text_bytes=5)
    b.add("000000000001", "image", {"jpg": b"\xff\xd8fake", "txt": b"cap"}, text_tokens=1, text_bytes=3,
          images=[{"member": "jpg", "height": 2, "width": 3}])
    return b.finish()


def test_builder_is_deterministic_with_fixed_headers():
    (a, ia), (b, ib) = _small_shard(), _small_shard()
    assert a == b and canonical_json(ia) == canonical_json(ib)
    assert len(a) % 10240 == 0
    with tarfile.open(fileobj=io.BytesIO(a)) as tf:
        infos = tf.getmembers()
    assert [t.name for t in infos] == ["000000000000.txt", "000000000001.jpg", "000000000001.txt"]
    assert {(t.mtime, t.uid, t.gid, t.uname, t.gname, t.mode) for t in infos} == {(0, 0, 0, "", "", 0o644)}
    verify_shard(a, ia, "small")
    m = ia["samples"][1]["members"]["jpg"]
    assert a[m["offset"]:m["offset"] + m["size"]] == b"\xff\xd8fake"


def test_webdataset_reads_our_shards_as_ordinary_shards(built):
    import webdataset as wds

    store, manifest = open_dataset(built.url)
    assert {s["kind"] for s in manifest["sources"]} == {"text", "image", "video", "interleaved"}
    n = 0
    for sh in manifest["shards"]:
        index = read_index(store, sh["index"], sh["index_sha256"])
        path = f"{built.url}/{sh['key']}"
        samples = list(wds.WebDataset(path, shardshuffle=False, empty_check=False))
        assert [s["__key__"] for s in samples] == [s["key"] for s in index["samples"]]
        for got, entry in zip(samples, index["samples"]):
            exts = {k for k in got if not k.startswith("__")}
            assert exts == set(entry["members"])
            for ext in exts:
                assert got[ext] == read_member(store, sh["key"], entry, ext)  # ranged GET == wds bytes
            n += 1
        verify_shard(store.get(sh["key"]), index, sh["key"])
    assert n == manifest["num_samples"] > 100


def test_manifest_fingerprint_covers_indexes(built):
    store, manifest = open_dataset(built.url + "/manifest.json")
    shards = manifest["shards"]
    again = build_manifest([{"name": s["name"], "kind": s["kind"]} for s in manifest["sources"]], shards,
                           manifest["tokenizer"], manifest["skipped"]["inputs"])
    assert again["fingerprint"] == manifest["fingerprint"]
    changed = [dict(shards[0], index_sha256="0" * 64)] + shards[1:]
    assert build_manifest(manifest["sources"], changed, manifest["tokenizer"], [])["fingerprint"] \
        != manifest["fingerprint"]
    key = shards[0]["index"]
    assert hashlib.sha256(store.get(key)).hexdigest() == shards[0]["index_sha256"]


def test_truncated_tar_is_a_clear_error(built, tmp_path):
    store, manifest = open_dataset(built.url)
    sh = manifest["shards"][0]
    index = read_index(store, sh["index"])
    data = store.get(sh["key"])
    cut = index["samples"][-1]["members"]["txt"]["offset"] + 10  # inside the last member's data
    bad = open_store(str(tmp_path))
    bad.put(sh["key"], data[:cut])
    with pytest.raises(ShardError, match=r"shard-000000\.tar: truncated tar: member 0+\d+\.txt"):
        read_member(bad, sh["key"], index["samples"][-1], "txt")
    assert read_member(bad, sh["key"], index["samples"][0], "txt")  # earlier members still readable
    with pytest.raises(ShardError, match=r"shard-000000\.tar: .*truncated"):
        verify_shard(data[:cut], index, sh["key"])
    with pytest.raises(ShardError, match=r"truncated"):
        list(iter_tar(data[:cut], sh["key"]))


def test_missing_index_manifest_and_shard_are_clear_errors(built, tmp_path):
    store, manifest = open_dataset(built.url)
    empty = open_store(str(tmp_path))
    with pytest.raises(ShardError, match=r"text/shard-000000\.idx\.json: missing shard index"):
        read_index(empty, manifest["shards"][0]["index"])
    with pytest.raises(ShardError, match=r"manifest\.json: missing dataset manifest"):
        read_manifest(empty)
    entry = read_index(store, manifest["shards"][0]["index"])["samples"][0]
    with pytest.raises(ShardError, match=r"text/shard-000000\.tar: missing shard"):
        read_member(empty, manifest["shards"][0]["key"], entry, "txt")
    with pytest.raises(ShardError, match="has no member 'jpg'"):
        read_member(store, manifest["shards"][0]["key"], entry, "jpg")
    with pytest.raises(ShardError, match="does not match the manifest's sha256"):
        read_index(store, manifest["shards"][0]["index"], "0" * 64)
    empty.put("x.idx.json", b"{not json")
    with pytest.raises(ShardError, match=r"x\.idx\.json: shard index is not valid JSON"):
        read_index(empty, "x.idx.json")


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/passwd", "a/../../b.txt", "dir/x.txt"])
def test_escaping_member_names_are_rejected(name):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo(name)
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"abc"))
    with pytest.raises(ShardError, match="unsafe tar member name"):
        list(iter_tar(buf.getvalue(), "evil.tar"))


def test_index_with_unsafe_key_is_rejected(tmp_path):
    store = open_store(str(tmp_path))
    idx = {"format": "mmpt-index/1", "source": "s", "shard": "s/x.tar", "size": 0,
           "samples": [{"key": "..", "kind": "text", "members": {"txt": {"offset": 0, "size": 1}}}]}
    store.put("s/x.idx.json", json.dumps(idx).encode())
    with pytest.raises(ShardError):
        read_index(store, "s/x.idx.json")


def test_edited_manifest_fingerprint_is_refused_on_read(built, tmp_path):
    """The data order is a function of the fingerprint: an edited one must not be accepted."""
    from data.store import LocalStore

    store, manifest = open_dataset(built.url)
    edited = LocalStore(tmp_path / "ds")
    fp = manifest["fingerprint"]
    edited.put("manifest.json", canonical_json(dict(manifest, fingerprint=fp[::-1])))
    with pytest.raises(ShardError, match=r"manifest\.json: fingerprint .* does not match its shard "
                                         r"index hashes"):
        read_manifest(edited)
    # an edited index hash under the old fingerprint is refused the same way
    shards = [dict(manifest["shards"][0], index_sha256="0" * 64)] + manifest["shards"][1:]
    edited.put("manifest.json", canonical_json(dict(manifest, shards=shards)))
    with pytest.raises(ShardError, match="does not match its shard index hashes"):
        open_dataset(str(tmp_path / "ds"))
    edited.put("manifest.json", canonical_json(manifest))
    assert read_manifest(edited)["fingerprint"] == fp

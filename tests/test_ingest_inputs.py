"""mmpt ingest from the inputs people have: Parquet text columns, webdataset tars of image +
caption pairs, and S3 prefixes of them; unsafe and corrupt inputs are counted skips."""

import io
import json
import tarfile

import pytest

from data.shards import open_dataset, read_index, read_member
from tests.corpus_fixtures import make_corpus, make_tokenizer
from train.cli import main as mmpt

pa = pytest.importorskip("pyarrow")  # an ingest dependency (pyproject: the ingest extra)
import pyarrow.parquet as pq  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    corpus = make_corpus(root)
    tok = make_tokenizer(corpus, root / "tok")
    lines = (corpus / "text" / "topics.jsonl").read_text().splitlines()[:40]
    texts = [json.loads(line)["text"] for line in lines]
    par = root / "parquet"
    par.mkdir()
    pq.write_table(pa.table({"id": list(range(30)), "content": texts[:30]}), par / "a.parquet")
    pq.write_table(pa.table({"id": [0, 1, 2, 3], "content": [texts[30], None, "", texts[31]]}),
                   par / "b.parquet")
    pq.write_table(pa.table({"other": ["x"]}), par / "c.parquet")
    good = (par / "a.parquet").read_bytes()
    (par / "d.parquet").write_bytes(good[:len(good) // 2])  # cut short
    wds = root / "wds"
    wds.mkdir()
    photos = {p.stem: p.read_bytes() for p in (corpus / "images").iterdir() if p.suffix in (".jpg", ".png")}
    names = sorted(photos)
    members = []
    for i, name in enumerate(names[:6]):
        ext = "png" if photos[name][:4] == b"\x89PNG" else "jpg"
        members.append((f"{i:06d}.{ext}", photos[name]))
        members.append((f"{i:06d}.txt", f"A photo called {name}.".encode()) if i % 2 == 0 else
                       (f"{i:06d}.json", json.dumps({"caption": f"Photo {name}", "url": "x"}).encode()))
    members.append(("000006.jpg", photos[names[0]]))  # no caption
    members.append(("../../etc/evil.txt", b"escape"))  # escapes the directory
    members.append(("/abs/000007.txt", b"absolute"))
    _write_tar(wds / "shard-0.tar", members, link=("000008.jpg", "/etc/passwd"))
    jpgs = [n for n in names if photos[n][:2] == b"\xff\xd8"]
    whole = _tar_bytes([m for i in range(3) for m in ((f"{i:06d}.jpg", photos[jpgs[i]]),
                                                     (f"{i:06d}.txt", f"Kept {i}".encode()))])
    (wds / "shard-1.tar").write_bytes(whole[:len(whole) * 2 // 3])  # truncated in the middle
    return root, corpus, tok, par, wds


def _tar_bytes(members, link=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        if link:
            ti = tarfile.TarInfo(link[0])
            ti.type, ti.linkname = tarfile.SYMTYPE, link[1]
            tf.addfile(ti)
    return buf.getvalue()


def _write_tar(path, members, link=None):
    path.write_bytes(_tar_bytes(members, link))


def _ingest(out, tok, *args):
    return mmpt(["ingest", "--out", str(out), "--tokenizer", str(tok), "--no-progress",
                 "--shard-size", "100KB", *args])


def _texts_and_captions(url):
    store, manifest = open_dataset(url)
    out = []
    for sh in manifest["shards"]:
        for s in read_index(store, sh["index"], sh["index_sha256"])["samples"]:
            out.append((sh["source"], {e: read_member(store, sh["key"], s, e) for e in s["members"]}))
    return out, manifest


def test_parquet_text_column_rows_become_samples_and_bad_rows_and_files_are_counted(inputs, tmp_path, capsys):
    root, _, tok, par, _ = inputs
    assert _ingest(tmp_path / "ds", tok, "--text", f"web={par}", "--text-column", "content") == 0
    samples, manifest = _texts_and_captions(str(tmp_path / "ds"))
    expected = pq.read_table(par / "a.parquet")["content"].to_pylist() + [
        pq.read_table(par / "b.parquet")["content"][i].as_py() for i in (0, 3)]
    assert [m["txt"].decode() for _, m in samples] == expected
    skips = {x["path"]: x["reason"] for x in manifest["skipped"]["inputs"]}
    assert "column 'content' is null" in skips["web/b.parquet:row1"]
    assert "column 'content' is empty" in skips["web/b.parquet:row2"]
    assert "no column 'content'" in skips["web/c.parquet"]
    assert "corrupt Parquet file" in skips["web/d.parquet"]
    assert manifest["skipped"]["count"] == 4 and "skipped 4 input(s)" in capsys.readouterr().out


def test_webdataset_tars_give_image_caption_samples_and_reject_unsafe_members(inputs, tmp_path):
    root, corpus, tok, _, wds = inputs
    assert _ingest(tmp_path / "ds", tok, "--webdataset", f"laion={wds}") == 0
    samples, manifest = _texts_and_captions(str(tmp_path / "ds"))
    captions = [m["txt"].decode() for _, m in samples]
    kept = [c for c in captions if c.startswith("Kept ")]
    assert manifest["sources"][0]["num_samples"] == 6 + len(kept) and kept == ["Kept 0", "Kept 1"][:len(kept)]
    assert captions[0].startswith("A photo called") and captions[1].startswith("Photo ")
    store, _ = open_dataset(str(tmp_path / "ds"))
    index = read_index(store, manifest["shards"][0]["index"])
    assert all(s["images"][0]["height"] > 0 for s in index["samples"])
    skips = {x["path"]: x["reason"] for x in manifest["skipped"]["inputs"]}
    assert "no caption" in skips["laion/shard-0.tar:000006"]
    assert "escapes its directory" in skips["laion/shard-0.tar:../../etc/evil.txt"]
    assert "escapes its directory" in skips["laion/shard-0.tar:/abs/000007.txt"]
    assert "not a regular file" in skips["laion/shard-0.tar:000008.jpg"]
    assert "corrupt or truncated tar" in skips["laion/shard-1.tar"]
    # the samples of the truncated tar read before the damage are kept, none are duplicated
    assert kept and len(samples) == len({(m.get("jpg") or m["png"], m["txt"]) for _, m in samples})


def test_an_s3_prefix_of_jsonl_parquet_and_tars_ingests_like_the_local_files(inputs, tmp_path, monkeypatch):
    from data.embedded_s3 import EmbeddedS3

    root, corpus, tok, par, wds = inputs
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.jsonl").write_bytes((corpus / "text" / "code.jsonl").read_bytes())
    (text / "b.parquet").write_bytes((par / "a.parquet").read_bytes())
    local = ["--text-column", "content"]
    with EmbeddedS3(tmp_path / "s3", bucket="mmpt-in") as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        store = s3.store("in")
        for f in sorted(text.iterdir()):
            store.put(f"text/{f.name}", f.read_bytes())
        for f in sorted(wds.iterdir()):
            store.put(f"wds/{f.name}", f.read_bytes())
        assert _ingest(tmp_path / "from-s3", tok, "--text", "t=s3://mmpt-in/in/text/",
                       "--webdataset", "w=s3://mmpt-in/in/wds", *local) == 0
    assert _ingest(tmp_path / "from-disk", tok, "--text", f"t={text}", "--webdataset", f"w={wds}",
                   *local) == 0
    a, ma = _texts_and_captions(str(tmp_path / "from-s3"))
    b, mb = _texts_and_captions(str(tmp_path / "from-disk"))
    assert a == b and len(a) > 30
    assert ma["fingerprint"] == mb["fingerprint"] and ma["skipped"] == mb["skipped"]

"""mmpt ingest: byte-identical output, counted and reported skips, correct index metadata, S3 output."""

import json
from pathlib import Path

import pytest
from PIL import Image

from data.decode import decode_image, probe_video
from data.shards import open_dataset, read_index, read_member
from data.tokenizer import load_tokenizer
from tests.corpus_fixtures import make_corpus, make_tokenizer
from train.cli import main as mmpt

EXPECTED_SKIPS = {
    "text/topics.jsonl:80": "invalid JSON",
    "images/corrupt.jpg": "corrupt image",
    "images/nocaption.jpg": "no caption",
    "videos/truncated.mp4": "video: cannot decode",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    corpus = make_corpus(root, corrupt=True)
    return root, corpus, make_tokenizer(corpus, root / "tok")


def _run(out, corpus, tok, *extra):
    return mmpt(["ingest", "--out", str(out), "--tokenizer", str(tok), "--corpus", str(corpus),
                 "--shard-size", "150KB", "--no-progress", *extra])


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_output_is_byte_identical_and_skips_are_reported(inputs, capsys):
    root, corpus, tok = inputs
    assert _run(root / "a", corpus, tok) == 0
    out = capsys.readouterr()
    assert _run(root / "b", corpus, tok) == 0
    a, b = _files(root / "a"), _files(root / "b")
    assert a == b and len(a) > 8
    assert "skipped 4 input(s)" in out.out
    for path, reason in EXPECTED_SKIPS.items():
        assert f"{path}: " in out.out and reason in out.out  # in the summary
        assert f"skipped {path}" in out.err  # and logged when it happened
    manifest = json.loads(a["manifest.json"])
    assert manifest["skipped"]["count"] == 4
    got = {x["path"]: x["reason"] for x in manifest["skipped"]["inputs"]}
    assert set(got) == set(EXPECTED_SKIPS)
    assert all(EXPECTED_SKIPS[p] in r for p, r in got.items())
    # nothing silently dropped: every input is either a sample or a skip
    n_text = sum(1 for f in (corpus / "text").glob("*.jsonl") for line in f.read_text().splitlines() if line)
    n_img = len([p for p in (corpus / "images").iterdir() if p.suffix in (".jpg", ".png", ".webp")])
    n_vid = len(list((corpus / "videos").glob("*.mp4")))
    n_doc = len((corpus / "interleaved" / "docs.jsonl").read_text().splitlines())
    assert manifest["num_samples"] + 4 == n_text + n_img + n_vid + n_doc
    assert {s["name"]: s["num_samples"] for s in manifest["sources"]} == {
        "text": n_text - 1, "images": n_img - 2, "videos": n_vid - 1, "interleaved": n_doc}


def test_shard_size_is_respected(inputs):
    root, corpus, tok = inputs
    store, manifest = open_dataset(str(root / "a"))
    text = [s for s in manifest["shards"] if s["source"] == "text"]
    assert len(text) >= 3
    for sh in text[:-1]:  # a shard closes at the first sample that reaches the target size
        idx = read_index(store, sh["index"])
        last = max(m["size"] for m in idx["samples"][-1]["members"].values())
        assert 150 * 1024 <= sh["size"] <= 150 * 1024 + last + 10240 + 2048


def test_index_metadata_matches_the_media(inputs):
    root, corpus, tok_path = inputs
    tok = load_tokenizer(tok_path)
    store, manifest = open_dataset(str(root / "a"))
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint
    kinds = set()
    for sh in manifest["shards"]:
        for s in read_index(store, sh["index"], sh["index_sha256"])["samples"]:
            kinds.add(s["kind"])
            get = lambda ext: read_member(store, sh["key"], s, ext)  # noqa: E731
            if s["kind"] == "interleaved":
                segs = json.loads(get("json"))["segments"]
                text = "".join(x["text"] for x in segs if "text" in x)
                assert [x["image"] for x in segs if "image" in x] == [m["member"] for m in s["images"]]
            else:
                text = get("txt").decode()
            assert s["text_tokens"] == len(tok.encode(text)) > 0
            assert s["text_bytes"] == len(text.encode())
            for im in s["images"]:
                assert decode_image(get(im["member"])).shape == (im["height"], im["width"], 3)
            for v in s["videos"]:
                info = probe_video(get(v["member"]), backend="pyav")
                assert (v["frames"], v["height"], v["width"], v["fps"]) == (30, 112, 160, 12.0)
                assert info.as_meta() == {k: v[k] for k in ("frames", "height", "width", "fps")}
    assert kinds == {"text", "image", "video", "interleaved"}


def test_exif_orientation_is_applied_in_the_index(inputs):
    root, corpus, _ = inputs
    raw = Image.open(corpus / "images" / "coffee.jpg")
    store, manifest = open_dataset(str(root / "a"))
    for sh in (s for s in manifest["shards"] if s["source"] == "images"):
        for s in read_index(store, sh["index"])["samples"]:
            if read_member(store, sh["key"], s, "txt").startswith(b"A cup of coffee"):
                assert (s["images"][0]["height"], s["images"][0]["width"]) == (raw.width, raw.height)
                return
    pytest.fail("coffee sample not found")


def test_bad_arguments_are_clear(inputs, tmp_path):
    _, corpus, tok = inputs
    with pytest.raises(SystemExit, match="no such file"):
        mmpt(["ingest", "--out", str(tmp_path), "--tokenizer", str(tok), "--text", f"t={tmp_path}/nope.jsonl"])
    with pytest.raises(SystemExit, match="source name"):
        mmpt(["ingest", "--out", str(tmp_path), "--tokenizer", str(tok), "--text", f"a.b={corpus}/text"])


def test_ingest_to_embedded_s3_matches_local(inputs, tmp_path, monkeypatch):
    from data.embedded_s3 import EmbeddedS3

    root, corpus, tok = inputs
    local = _files(root / "a")
    with EmbeddedS3(tmp_path / "s3", bucket="mmpt-ingest") as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        assert _run("s3://mmpt-ingest/ds", corpus, tok) == 0
        store = s3.store("ds")
        assert store.list("") == sorted(local)
        for key, data in local.items():
            assert store.get(key) == data
        _, manifest = open_dataset("s3://mmpt-ingest/ds")
        sh = manifest["shards"][0]
        entry = read_index(store, sh["index"])["samples"][1]
        assert read_member(store, sh["key"], entry, "txt") == \
            local[sh["key"]][entry["members"]["txt"]["offset"]:][:entry["members"]["txt"]["size"]]


def test_lone_surrogates_are_counted_skips_not_crashes(inputs, tmp_path):
    _, _, tok = inputs
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n{"text": "fine too"}\n')
    docs = tmp_path / "i.jsonl"
    docs.write_text('{"segments": [{"text": "a \\udfff b"}]}\n')
    out = tmp_path / "out"
    assert mmpt(["ingest", "--out", str(out), "--tokenizer", str(tok), "--text", f"t={text}",
                 "--interleaved", f"i={docs}", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {x["path"]: x["reason"] for x in manifest["skipped"]["inputs"]}
    assert set(reasons) == {"t/t.jsonl:2", "i/i.jsonl:1"}
    assert all("invalid Unicode" in r for r in reasons.values())
    assert manifest["num_samples"] == 2

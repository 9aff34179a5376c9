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


def test_bad_arguments_are_clear(inputs, tmp_path, capsys):
    _, corpus, tok = inputs
    with pytest.raises(SystemExit, match="no such file"):
        mmpt(["ingest", "--out", str(tmp_path), "--tokenizer", str(tok), "--text", f"t={tmp_path}/nope.jsonl"])
    with pytest.raises(SystemExit, match="source name"):
        mmpt(["ingest", "--out", str(tmp_path), "--tokenizer", str(tok), "--text", f"a.b={corpus}/text"])
    # the [store] settings apply to ingest too, validated like a run's config
    assert mmpt(["ingest", "--out", str(tmp_path), "--tokenizer", str(tok), "--corpus", str(corpus),
                 "--store.read_timeout=0"]) == 2
    assert "store.read_timeout=0.0 is invalid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mmpt(["ingest", "--out", str(tmp_path), "--tokenizer", str(tok), "--corpus", str(corpus),
              "--data.seq_len=5"])


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


# ---------------------------------------------------------------------------------------------
# Atomic re-ingest, invalid UTF-8, inputs confined to their directories


class _FailAfterPuts:
    """A store that raises after `n` successful puts: an ingest killed half way."""

    def __init__(self, store, n: int):
        self._store, self.n, self.puts = store, n, 0

    def put(self, key, data):
        if self.puts >= self.n:
            raise OSError(f"injected fault before put {key}")
        self.puts += 1
        self._store.put(key, data)

    def __getattr__(self, name):
        return getattr(self._store, name)


def _read_everything(store, manifest) -> list[bytes]:
    """Every index (checked against the manifest) and every member, as a reader sees them."""
    out = []
    for sh in manifest["shards"]:
        index = read_index(store, sh["index"], sh["index_sha256"])
        out.append(json.dumps(index, sort_keys=True).encode())
        out += [read_member(store, sh["key"], s, ext) for s in index["samples"] for ext in s["members"]]
    return out


def test_interrupted_reingest_leaves_the_old_dataset_readable(inputs, tmp_path):
    from data.ingest import corpus_sources, ingest, manifest_keys
    from data.shards import read_manifest
    from data.store import LocalStore

    _, corpus, tok_path = inputs
    tok, store = load_tokenizer(tok_path), LocalStore(tmp_path / "ds")
    quiet = dict(progress=False, log=lambda m: None)
    first = ingest(corpus_sources(corpus), store, tok, shard_size=150 * 1024, **quiet)
    old_manifest = (tmp_path / "ds" / "manifest.json").read_bytes()
    old = _read_everything(store, read_manifest(store))
    n_objects = 2 * len(first["shards"])
    # Re-ingest with another shard size (every shard and index differs), killed half way.
    with pytest.raises(OSError, match="injected fault"):
        ingest(corpus_sources(corpus), _FailAfterPuts(store, n_objects // 2), tok,
               shard_size=100 * 1024, **quiet)
    assert (tmp_path / "ds" / "manifest.json").read_bytes() == old_manifest
    assert _read_everything(store, read_manifest(store)) == old  # the old dataset reads identically
    # Completed, the new dataset replaces it; a reader holding the old manifest still reads.
    second = ingest(corpus_sources(corpus), store, tok, shard_size=100 * 1024, **quiet)
    assert second["generation"] == 3  # gen 2 holds the failed attempt's objects: never reused
    assert read_manifest(store) == second and len(second["shards"]) > len(first["shards"])
    assert _read_everything(store, first) == old
    new = _read_everything(store, second)
    # --prune drops superseded generations and leftovers; identical inputs, identical content
    third = ingest(corpus_sources(corpus), store, tok, shard_size=100 * 1024, prune_old=True, **quiet)
    assert third["fingerprint"] == second["fingerprint"] and _read_everything(store, third) == new
    assert store.list("") == sorted(manifest_keys(third) | {"manifest.json"})
    assert {c["key"] for c in third["catalogs"]} <= manifest_keys(third)


def test_invalid_utf8_lines_are_counted_skips_naming_file_and_line(inputs, tmp_path):
    _, corpus, tok = inputs
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("astronaut.jpg", "coffee.jpg"):
        (images / name).write_bytes((corpus / "images" / name).read_bytes())
    (images / "captions.jsonl").write_bytes(b'{"file": "astronaut.jpg", "caption": "An astronaut."}\n'
                                            b'{"file": "coffee.jpg", "caption": "caf\xe9"}\n')
    text = tmp_path / "t.jsonl"
    text.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n{"text": "fine too"}\n')
    out = tmp_path / "out"
    assert mmpt(["ingest", "--out", str(out), "--tokenizer", str(tok), "--images", f"i={images}",
                 "--text", f"t={text}", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {x["path"]: x["reason"] for x in manifest["skipped"]["inputs"]}
    assert set(reasons) == {"i/captions.jsonl:2", "i/coffee.jpg", "t/t.jsonl:2"}, reasons
    assert "invalid UTF-8" in reasons["i/captions.jsonl:2"] and "invalid UTF-8" in reasons["t/t.jsonl:2"]
    assert "no caption" in reasons["i/coffee.jpg"]
    assert manifest["num_samples"] == 3 and manifest["skipped"]["count"] == 3


def test_inputs_cannot_leave_the_given_directories(inputs, tmp_path):
    """Symlinks out of an input directory and document images named by absolute or '..' paths
    are refused as counted skips; a symlink to a file inside the same directory is followed."""
    _, corpus, tok = inputs
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jpg"
    secret.write_bytes((corpus / "images" / "coffee.jpg").read_bytes())  # decodes fine if read
    (outside / "secret.txt").write_text("host file content")
    (outside / "secret.jsonl").write_text('{"text": "host file content"}\n')
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "good.jpg").write_bytes((corpus / "images" / "astronaut.jpg").read_bytes())
    (images / "alias.jpg").symlink_to("good.jpg")  # inside the tree: followed
    (images / "escape.jpg").symlink_to(secret)
    (images / "side.jpg").write_bytes((corpus / "images" / "astronaut.jpg").read_bytes())
    (images / "side.txt").symlink_to(outside / "secret.txt")  # a caption read from outside
    (images / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": "c"}) + "\n"
                                                   for f in ("good.jpg", "alias.jpg", "escape.jpg")))
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "ok.jsonl").write_text('{"text": "fine"}\n')
    (texts / "evil.jsonl").symlink_to(outside / "secret.jsonl")
    docs = tmp_path / "docs"
    (docs / "img").mkdir(parents=True)
    (docs / "img" / "a.jpg").write_bytes((corpus / "interleaved" / "img" / "astronaut.jpg").read_bytes())
    (docs / "img" / "out.jpg").symlink_to(secret)
    names = ["img/a.jpg", str(secret), "../outside/secret.jpg", "img/../../outside/secret.jpg",
             "img/out.jpg"]
    (docs / "docs.jsonl").write_text("".join(
        json.dumps({"segments": [{"text": "see"}, {"image": n}]}) + "\n" for n in names))
    out = tmp_path / "out"
    assert mmpt(["ingest", "--out", str(out), "--tokenizer", str(tok), "--images", f"i={images}",
                 "--text", f"t={texts}", "--interleaved", f"d={docs / 'docs.jsonl'}", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {x["path"]: x["reason"] for x in manifest["skipped"]["inputs"]}
    assert set(reasons) == {"i/escape.jpg", "i/side.jpg", "t/evil.jsonl", "d/docs.jsonl:2",
                            "d/docs.jsonl:3", "d/docs.jsonl:4", "d/docs.jsonl:5"}, reasons
    for path in ("i/escape.jpg", "i/side.jpg", "t/evil.jsonl", "d/docs.jsonl:5"):
        assert "leads outside the input directory" in reasons[path], reasons[path]
    assert "is absolute" in reasons["d/docs.jsonl:2"]
    assert "contains '..'" in reasons["d/docs.jsonl:3"] and "contains '..'" in reasons["d/docs.jsonl:4"]
    assert {s["name"]: s["num_samples"] for s in manifest["sources"]} == {"i": 2, "t": 1, "d": 1}
    blob = b"".join(p.read_bytes() for p in out.rglob("*.tar"))
    assert secret.read_bytes()[:4096] not in blob and b"host file content" not in blob
    assert (images / "good.jpg").read_bytes() in blob


def test_ingest_refuses_to_switch_a_manifest_that_changed_meanwhile(inputs, tmp_path):
    """Two ingests into one prefix: the one whose starting manifest was replaced does not switch."""
    from data.ingest import IngestConflict, Source, ingest
    from data.store import LocalStore

    _, _, tok_path = inputs
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "one"}\n{"text": "two"}\n')
    store, tok = LocalStore(tmp_path / "ds"), load_tokenizer(tok_path)
    quiet = dict(progress=False, log=lambda m: None)

    class OtherIngestMeanwhile(_FailAfterPuts):
        def put(self, key, data):
            if key.endswith(".tar"):  # the other ingest switches while this one writes shards
                self._store.put("manifest.json", b'{"other": true}')
            self._store.put(key, data)

    with pytest.raises(IngestConflict, match="manifest.json changed while this ingest ran"):
        ingest([Source("t", "text", text)], OtherIngestMeanwhile(store, 0), tok, **quiet)
    assert store.get("manifest.json") == b'{"other": true}'
    assert ingest([Source("t", "text", text)], store, tok, **quiet)["generation"] == 2


def test_a_dataset_without_generations_reads_and_is_replaced(inputs, tmp_path):
    """Datasets written before generations (shards at <source>/shard-...) still read; a re-ingest
    puts gen-000001 beside them and --prune removes exactly the old layout's shards."""
    from data.ingest import Source, ingest
    from data.shards import canonical_json, read_manifest
    from data.store import LocalStore

    _, _, tok_path = inputs
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "one"}\n{"text": "two"}\n')
    src, tok = [Source("t", "text", text)], load_tokenizer(tok_path)
    quiet = dict(progress=False, log=lambda m: None)
    new = LocalStore(tmp_path / "new")
    manifest = ingest(src, new, tok, **quiet)
    old = LocalStore(tmp_path / "old")  # the same dataset in the layout without generations
    flat = dict(manifest, shards=[dict(s, key=s["key"].split("/", 1)[1],
                                       index=s["index"].split("/", 1)[1]) for s in manifest["shards"]])
    del flat["generation"]
    for a, b in zip(manifest["shards"], flat["shards"]):
        old.put(b["key"], new.get(a["key"]))
        old.put(b["index"], new.get(a["index"]))
    old.put("manifest.json", canonical_json(flat))
    old.put("notes/readme.txt", b"not ours")
    assert _read_everything(old, read_manifest(old)) == _read_everything(new, manifest)
    again = ingest(src, old, tok, prune_old=True, **quiet)
    assert again["generation"] == 1 and again["fingerprint"] == manifest["fingerprint"]
    assert old.list("") == sorted(new.list("") + ["notes/readme.txt"])  # only the old shards went


def _samples(url):
    """Every sample per source in dataset order: its members' bytes and its index metadata."""
    from data.catalog import SourceCatalog
    from data.columnar import Columns, open_columns

    store, manifest = open_dataset(url)
    out = {}
    for c, src in zip(manifest["catalogs"], manifest["sources"]):
        cat = SourceCatalog(open_columns(store, c["key"], c["size"], c["sha256"]), src["name"], src["kind"])
        assert isinstance(cat.cols, Columns) and cat.n == src["num_samples"]
        rows = []
        for i in range(cat.n):
            entry, (k, _) = cat.entry(i), cat.locate(i)
            meta = {f: entry.get(f) for f in ("text_tokens", "text_bytes", "images", "videos", "layout")}
            rows.append((meta, {ext: read_member(store, cat.shard_key(k), entry, ext)
                                for ext in entry["members"]}))
        out[src["name"]] = rows
    return out, manifest


def test_three_parts_merged_give_the_samples_of_one_process_in_its_order(inputs, tmp_path, capsys):
    root, corpus, tok = inputs
    every = ("--restart-every", "16")  # tokenizer restart points in most texts (data/restarts.py)
    assert _run(tmp_path / "one", corpus, tok, *every) == 0
    for i in range(3):
        assert _run(tmp_path / "parts", corpus, tok, "--part", f"{i}/3", "--run-id", "r1", *every) == 0
        assert f"wrote part {i}/3 of run r1" in capsys.readouterr().out
    assert not (tmp_path / "parts" / "manifest.json").exists()  # nothing for readers before merge
    assert mmpt(["ingest", "merge", "--out", str(tmp_path / "parts"), "--parts", "3",
                 "--run-id", "r1", "--prune"]) == 0
    one, m1 = _samples(str(tmp_path / "one"))
    merged, m3 = _samples(str(tmp_path / "parts"))
    assert [s["name"] for s in m3["sources"]] == [s["name"] for s in m1["sources"]]
    assert merged == one and sum(map(len, one.values())) == m1["num_samples"] > 0
    assert m3["skipped"] == m1["skipped"]
    # the restart points are carried: the merged files are the one-process ones, byte for byte
    import hashlib

    restarts = [{c["source"]: c.get("restarts") for c in m["catalogs"]} for m in (m1, m3)]
    assert restarts[0]["text"] is not None and restarts[0].keys() == restarts[1].keys()
    for name, one_entry in restarts[0].items():
        merged_entry = restarts[1][name]
        assert (merged_entry is None) == (one_entry is None)
        if one_entry is not None:
            raw = (tmp_path / "parts" / merged_entry["key"]).read_bytes()  # kept by --prune
            assert hashlib.sha256(raw).hexdigest() == merged_entry["sha256"] == one_entry["sha256"]
            assert raw == (tmp_path / "one" / one_entry["key"]).read_bytes()
    # every part held a share of every source's shards, in part order
    assert {s["key"].split("/")[2] for s in m3["shards"]} == {f"part-{i:05d}-of-00003" for i in range(3)}
    # a missing part is refused by name
    with pytest.raises(SystemExit, match="part-00000-of-00004/part-manifest.json is missing"):
        mmpt(["ingest", "merge", "--out", str(tmp_path / "parts"), "--parts", "4", "--run-id", "r1"])


def test_ingest_sbatch_runs_its_part_and_task_0_submits_the_merge(inputs, tmp_path):
    """launch/slurm/ingest.sbatch outside SLURM: the array variables set by hand and a stand-in
    sbatch that records its arguments (the real cluster run is in tests/test_launch.py)."""
    import os
    import subprocess
    import sys

    root, corpus, tok = inputs
    script = Path(__file__).resolve().parents[1] / "launch" / "slurm" / "ingest.sbatch"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch.args\necho 99\n')
    (bin_dir / "sbatch").chmod(0o755)
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"  # sbatch, the venv's python
    out = tmp_path / "ds"
    args = ["--out", str(out), "--tokenizer", str(tok), "--corpus", str(corpus), "--shard-size",
            "150KB", "--no-progress", "--prune"]
    for task in (2, 0, 1):
        env = {**os.environ, "PATH": path, "SLURM_ARRAY_TASK_ID": str(task),
               "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_MIN": "0",
               "SLURM_ARRAY_TASK_MAX": "2", "SLURM_SUBMIT_DIR": str(script.parents[2])}
        res = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert f"wrote part {task}/3 of run 77" in res.stdout
    submitted = (tmp_path / "sbatch.args").read_text().split()
    assert "--dependency=afterok:77" in submitted
    merge = submitted[submitted.index("merge"):]
    assert merge == ["merge", "--parts", "3", "--run-id", "77", "--out", str(out), "--prune"]
    res = subprocess.run(["bash", str(script), *merge], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert _run(tmp_path / "one", corpus, tok) == 0
    assert _samples(str(out))[0] == _samples(str(tmp_path / "one"))[0]

"""Tokenizer restart points (data/restarts.py): every recorded split reproduces the whole text's
tokenization, for both backends; the loader reading a unit's own span gives the batches of
whole-document tokenization, bit for bit, while tokenizing about one document's worth of text
per document."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import restarts as restarts_mod
from data.restarts import covering, restart_points
from data.tokenizer import load_tokenizer
from tests.corpus_fixtures import Built, make_corpus, make_tokenizer
from train.config import load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
EVERY = 32
# S = 8 > B = 2: units of U = 4 pieces, so a document of a few thousand tokens is several units
DATA = {"seq_len": 128, "window_sequences": 8, "global_batch_size": 2,
        "image_max_pixels": 50176, "video_max_pixels": 12544, "video_max_frames": 8}
# What a naive cut gets wrong: runs of spaces before a word, multibyte and emoji characters (a
# byte-level token can hold part of one), newline runs, digit runs (split in threes).
HARD = ["hello    world   \n\n\n   again", "naïve café 日本語のテキスト 🎉🎉🙂 👩‍👩‍👧",
        "1234567 89 000 12345678901234", "\t\t  tabs\r\n\r\n crlf", "x" * 37 + " " * 9 + "y"]
# Numbers of various lengths: many cuts inside a digit run tokenize to another number of tokens
NUMBERS = " ".join(str(i * 7919) for i in range(1500))


def _long_texts(corpus: Path, n: int, paragraphs: int) -> list[str]:
    from data.train_tokenizer import corpus_texts

    plain = corpus_texts(corpus)
    out = []
    for i in range(n):
        parts = []
        for k in range(paragraphs):
            parts += [plain[(i * paragraphs + k) % len(plain)][:1500], HARD[(i + k) % len(HARD)]]
        out.append("  ".join(parts))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tokenizer, long texts, and a dataset of long text and interleaved documents ingested with
    restart points every EVERY tokens."""
    from data.inputs import Source
    from data.ingest import ingest
    from data.store import open_store

    root = tmp_path_factory.mktemp("restarts")
    corpus = make_corpus(root)
    tok_path = make_tokenizer(corpus, root / "tok")
    texts = _long_texts(corpus, 10, 8)
    src = root / "inputs"
    (src / "text").mkdir(parents=True)
    (src / "text" / "long.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[:6] + ["a short one"]))
    (src / "docs" / "img").mkdir(parents=True)
    Image.new("RGB", (96, 80), (200, 30, 60)).save(src / "docs" / "img" / "a.png")
    docs = [{"segments": [{"text": texts[6 + i]}, {"image": "img/a.png"}, {"text": "a caption"},
                          {"image": "img/a.png"}, {"text": texts[(9 + i) % 10]}]} for i in range(4)]
    (src / "docs" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    url = str(root / "ds")
    manifest = ingest([Source("long", "text", src / "text"),
                       Source("docs", "interleaved", src / "docs" / "docs.jsonl")],
                      open_store(url), load_tokenizer(tok_path), progress=False, log=lambda m: None,
                      restart_every=EVERY)
    return Built(corpus, tok_path, url), texts, manifest


def _stripped(ds: Built, root: Path) -> Built:
    """The same dataset with its restart points left out of the manifest (the fingerprint stays)."""
    shutil.copytree(ds.url, root)
    manifest = json.loads((root / "manifest.json").read_text())
    for c in manifest["catalogs"]:
        c.pop("restarts", None)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return Built(ds.corpus, ds.tokenizer, str(root))


def _loader(ds: Built, **data):
    from data.loader import DataLoaderWithState

    over = {"manifest": ds.url, "tokenizer": str(ds.tokenizer), **DATA, **data}
    return DataLoaderWithState(load_config(TINY, [f"--data.{k}={json.dumps(v)}" for k, v in over.items()]))


def _pieces_match(tok, text: str, points) -> bool:
    ids = tok.encode_array(text)
    chars = np.array([c for c, _ in points], np.int64)
    tokens = np.array([t for _, t in points], np.int64)
    return all(np.array_equal(tok.encode_array(text[c0:c1]), ids[t0:t1])
               for c0, c1, t0, t1 in covering(chars, tokens, len(ids), len(text), 0, len(ids)))


@pytest.mark.parametrize("backend", ["hf", "tiktoken"])
def test_every_recorded_split_reproduces_the_whole_tokenization(built, backend):
    ds, texts, _ = built
    path = ds.tokenizer if backend == "hf" else ds.tokenizer.with_suffix(".tiktoken")
    tok = load_tokenizer(path)
    assert tok.backend == backend
    for text in texts + ["".join(HARD) * 40]:
        points = restart_points(tok, text, EVERY)
        ids, starts = tok.encode_with_starts(text)
        assert len(points) >= len(ids) // EVERY // 2  # about every EVERY tokens
        assert all(starts[t] == c for c, t in points)  # at token starts on character boundaries
        assert _pieces_match(tok, text, points)
    # Cutting at any character-boundary token start is not safe on such text: some cuts
    # tokenize differently (what the verification at ingest drops).
    text = "".join(HARD) * 2
    ids, starts = tok.encode_with_starts(text)
    naive = [(int(starts[t]), t) for t in range(1, len(ids)) if starts[t] > 0]
    assert sum(not _pieces_match(tok, text, [p]) for p in naive) > 0
    # a token that holds part of a character is never a candidate
    ids, starts = tok.encode_with_starts("🎉" * 50)
    assert len(ids) > 50 and (starts == -1).any()


def test_a_split_that_fails_verification_is_dropped(built, monkeypatch):
    """Without verification, the first character-boundary cuts are kept and some tokenize
    differently; with it, none does."""
    ds, texts, _ = built
    tok = load_tokenizer(ds.tokenizer)
    text = NUMBERS
    checked = restart_points(tok, text, EVERY)
    monkeypatch.setattr(restarts_mod, "_same", lambda tok, text, ids: True)
    unchecked = restart_points(tok, text, EVERY)
    assert _pieces_match(tok, text, checked) and not _pieces_match(tok, text, unchecked)
    assert set(checked) != set(unchecked)


def test_the_loader_checks_each_span_against_the_restart_points(built, tmp_path, monkeypatch):
    """A dataset ingested with unverified restart points (some pieces tokenize to another number
    of tokens) is refused by the loader's length check, as a changed tokenizer would be."""
    from data.inputs import Source
    from data.ingest import ingest
    from data.store import open_store

    ds, texts, _ = built
    tok = load_tokenizer(ds.tokenizer)
    (tmp_path / "in").mkdir()
    text = NUMBERS
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"text": text}) + "\n")
    monkeypatch.setattr(restarts_mod, "_same", lambda tok, text, ids: True)
    url = str(tmp_path / "ds")
    ingest([Source("long", "text", tmp_path / "in")], open_store(url), tok, progress=False,
           log=lambda m: None, restart_every=EVERY)
    loader = _loader(Built(ds.corpus, ds.tokenizer, url), vision_fraction=0.0)
    with pytest.raises(ValueError, match=r"the restart points say \d+ .*the tokenizer differs"):
        for _ in zip(range(60), loader):  # one epoch: every unit once
            pass


def test_restart_points_do_not_enter_the_fingerprint_and_are_listed_and_checked(built):
    ds, _, manifest = built
    listed = {c["source"]: c.get("restarts") for c in manifest["catalogs"]}
    assert listed["long"] is not None and listed["docs"] is not None
    assert listed["long"]["key"].endswith("long/restarts.cols") and len(listed["long"]["sha256"]) == 64
    from data.shards import dataset_fingerprint

    assert manifest["fingerprint"] == dataset_fingerprint(
        manifest["tokenizer"]["fingerprint"], [s["index_sha256"] for s in manifest["shards"]])
    cat = _loader(ds).stream.catalog
    assert all(r is not None for r in cat.restarts)
    assert cat.restarts[0].points(6, 0) is None  # "a short one": no points


def _count_chars(tok, counter: list):
    encode = tok.encode_array

    def counting(text):
        counter[0] += len(text)
        return encode(text)
    return counting


@pytest.mark.parametrize("role", [False, True])
def test_batches_are_bit_identical_with_and_without_restart_points(built, tmp_path, role):
    from data.stream import ReadRole

    ds, _, _ = built
    plain = _stripped(ds, tmp_path / "plain")
    read = ReadRole(media=None) if role else None
    counts = {}
    digests = {}
    for name, d in (("restarts", ds), ("whole", plain)):
        loader = _loader(d)
        if read is not None:
            loader.stream.read = read
        stream = loader.stream
        counts[name] = [0]
        stream.reader.tokenizer.encode_array = _count_chars(stream.reader.tokenizer, counts[name])
        batches = [b for _, b in zip(range(40), loader)]
        digests[name] = [b.digest() for b in batches]
        assert sum(b.non_padding_tokens() for b in batches) > 40 * 2 * 100
    assert digests["restarts"] == digests["whole"]
    assert counts["restarts"][0] < counts["whole"][0] / 2


def test_each_unit_tokenizes_about_its_own_text(built, tmp_path):
    """Building every unit of every document once tokenizes about one document's worth of text
    per document with restart points (each unit: its own span, widened to restart points), and
    one document's worth per unit without; the tokens are the whole document's."""
    from data.mix import Draw

    ds, texts, _ = built
    for d, with_points in ((ds, True), (_stripped(ds, tmp_path / "plain"), False)):
        stream = _loader(d).stream
        counter, multi = [0], 0
        stream.reader.tokenizer.encode_array = _count_chars(stream.reader.tokenizer, counter)
        for source in range(len(stream.catalog.names)):
            units = stream.catalog.plans[source]["units"]
            for sample in np.unique(units["sample"]).tolist():
                meta = stream.reader.doc_meta(source, sample)
                whole = stream.reader.read_tokens(meta)
                mine = units[units["sample"] == sample]
                counter[0] = 0
                for u in mine:
                    draw = Draw(source, sample, 0, int(u["tokens"]), int(u["vision"]), int(u["offset"]))
                    tokens, first = stream._tokens(draw, meta, [])
                    assert first == int(u["offset"])
                    assert len(tokens) == min(int(u["tokens"]) + 1, meta.length - first)
                    assert np.array_equal(tokens, whole[first:first + len(tokens)])
                chars = _doc_chars(stream, meta)
                if len(mine) >= 3:
                    multi += 1
                    if with_points:
                        assert counter[0] <= 1.5 * chars, (source, sample, counter[0], chars)
                    elif stream.catalog.kinds[source] == "text":  # the whole text per unit
                        assert counter[0] >= len(mine) * chars
                    else:  # each text segment the unit meets, whole
                        assert counter[0] >= 2 * chars
        assert multi >= 8  # the long documents: several units each


def _doc_chars(stream, meta) -> int:
    if meta.segs[0].member == "txt" or any(s.member == "txt" for s in meta.segs):
        return len(stream.reader.text(meta.shard_key, meta.entry, "txt", {}))
    doc = json.loads(stream.reader.text(meta.shard_key, meta.entry, "json", {}))
    return sum(len(s["text"]) for s in doc["segments"] if "text" in s)

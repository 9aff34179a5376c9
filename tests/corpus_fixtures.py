"""Shared builders for tests that need the real small corpus, a trained tokenizer or an ingested
dataset (data.corpus, data.train_tokenizer, data.ingest). Use them from module-scoped fixtures:

    @pytest.fixture(scope="module")
    def dataset(tmp_path_factory):
        return make_dataset(tmp_path_factory.mktemp("ds"))   # -> Built(corpus, tokenizer, url)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Built:
    corpus: Path  # data.corpus layout
    tokenizer: Path  # tokenizer.json (tokenizer.tiktoken next to it)
    url: str  # dataset directory (manifest.json inside)


def make_corpus(root: Path, corrupt: bool = False) -> Path:
    from data.corpus import generate

    return generate(Path(root) / "corpus", corrupt=corrupt)


def make_tokenizer(corpus: Path, out: Path, vocab_size: int = 2048) -> Path:
    from data.train_tokenizer import corpus_texts, export_tiktoken, train_bpe

    out.mkdir(parents=True, exist_ok=True)
    tok = train_bpe(corpus_texts(corpus), vocab_size)
    tok.save(str(out / "tokenizer.json"))
    export_tiktoken(tok, out / "tokenizer.tiktoken")
    return out / "tokenizer.json"


def make_dataset(root: Path, corrupt: bool = False, shard_size: int = 200 * 1024) -> Built:
    """Corpus + tokenizer + ingested dataset in a local directory under root."""
    from data.ingest import corpus_sources, ingest
    from data.store import open_store
    from data.tokenizer import load_tokenizer

    root = Path(root)
    corpus = make_corpus(root, corrupt)
    tok_path = make_tokenizer(corpus, root / "tok")
    url = str(root / "ds")
    ingest(corpus_sources(corpus), open_store(url), load_tokenizer(tok_path), shard_size=shard_size,
           progress=False, log=lambda m: None)
    return Built(corpus, tok_path, url)

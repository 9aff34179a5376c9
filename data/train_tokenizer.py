"""Train a small byte-level BPE on the quickstart corpus, offline, and export it in both formats.

    python -m data.train_tokenizer CORPUS_DIR OUT_DIR [--vocab-size 2048]

writes OUT_DIR/tokenizer.json (HF `tokenizers`) and OUT_DIR/tokenizer.tiktoken (+ .json sidecar,
tiktoken rank-file format as Kimi ships). Special tokens take ids 0..6 (data.tokenizer
SPECIAL_TOKENS order), the 256 byte tokens follow, then merges in training order, so the rank of
a token is its id and both backends produce the same ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data.tokenizer import DEFAULT_PATTERN, SPECIAL_TOKENS, write_rank_file


def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of HF's ByteLevel pre-tokenizer: printable bytes stand for
    themselves, the others are shifted to code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def corpus_texts(corpus_dir: str | Path) -> list[str]:
    """All texts of the corpus's text JSONL files (invalid lines skipped: they are ingest's concern)."""
    texts = []
    for path in sorted(Path(corpus_dir).glob("text/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                texts.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                continue
    if not texts:
        raise ValueError(f"{corpus_dir}: no text/*.jsonl with {{'text': ...}} lines found")
    return texts


def train_bpe(texts: list[str], vocab_size: int = 2048):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(DEFAULT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    vocab = tok.get_vocab(with_added_tokens=True)
    for i, t in enumerate(SPECIAL_TOKENS.values()):
        assert vocab[t] == i, f"special token {t} got id {vocab[t]}, expected {i}"
    return tok


def export_tiktoken(hf_tokenizer, path: str | Path) -> None:
    """HF byte-level BPE -> tiktoken rank file (+ sidecar with pattern and special tokens)."""
    inv = {c: b for b, c in byte_to_unicode().items()}
    specials = set(SPECIAL_TOKENS.values())
    ranks, special_ids = {}, {}
    for tok, i in hf_tokenizer.get_vocab(with_added_tokens=True).items():
        if tok in specials:
            special_ids[tok] = i
        else:
            ranks[bytes(inv[c] for c in tok)] = i
    write_rank_file(path, ranks, DEFAULT_PATTERN, special_ids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.train_tokenizer", description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--vocab-size", type=int, default=2048)
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_bpe(corpus_texts(args.corpus_dir), args.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    export_tiktoken(tok, out / "tokenizer.tiktoken")
    print(f"wrote {out / 'tokenizer.json'} and {out / 'tokenizer.tiktoken'} (vocab {tok.get_vocab_size()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One tokenizer interface, two backends: HF `tokenizers` (tokenizer.json) and tiktoken BPE rank files.

    tok = load_tokenizer("tok/tokenizer.json")      # HF backend
    tok = load_tokenizer("tok/tokenizer.tiktoken")  # tiktoken backend (Kimi's format)
    ids = tok.encode("text")                        # never parses special tokens out of text
    tok.image_id, tok.video_id, tok.special          # fixed special-token ids

A tiktoken rank file has one "<base64 token bytes> <rank>" line per token (rank = id = merge
priority). The split pattern and special tokens live in a sidecar JSON `<file>.json`:
{"pattern": "...", "special_tokens": {"<|pad|>": 0, ...}}; without a sidecar the default pattern
and our special tokens after the last rank are used.

Special tokens have fixed roles. Our own trained tokenizers (data/train_tokenizer.py) give them
ids 0..6 in SPECIAL_TOKENS order, so the model config's image_token_id=3 / video_token_id=4 match.
Text that contains a special token's spelling is tokenized as ordinary text (no injection).
"""

from __future__ import annotations

import abc
import base64
import hashlib
import json
from pathlib import Path

import numpy as np

from train.errors import InvalidInput, MissingInput

# role -> token string; ids 0..6 in this order in our own tokenizers.
SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<|pad|>",
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "image": "<|image|>",  # one per LM vision token of an image
    "video": "<|video|>",  # one per LM vision token of a video chunk
    "media_begin": "<|media_begin|>",  # opens an image / a video chunk
    "media_end": "<|media_end|>",  # closes it
}
# GPT-4-style split pattern: supported by both tiktoken's regex engine and HF's (onig).
DEFAULT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class Tokenizer(abc.ABC):
    """Backend-independent part: special-token ids by role, fingerprint, vocab size."""

    backend: str
    fingerprint: str  # sha256 of the backend name and the tokenizer file(s): identifies token counts
    vocab_size: int  # ids are < vocab_size (special tokens included)
    special: dict[str, int]  # role -> id

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of encode(text) as a 1-D integer numpy array (the loader's hot path)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    @abc.abstractmethod
    def encode_with_starts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, starts): the ids of encode(text) and, per token, the character offset in `text`
        where it starts, or -1 where it does not start on a character boundary (a byte-level
        token can hold part of a UTF-8 character) or the backend cannot tell. Only candidates:
        data/restarts.py verifies every split it keeps."""

    def __getattr__(self, name: str) -> int:  # tok.pad_id, tok.image_id, ...
        if name.endswith("_id") and name[:-3] in self.__dict__.get("special", {}):
            return self.special[name[:-3]]
        raise AttributeError(name)

    def info(self) -> dict:
        """What the manifest records about the tokenizer."""
        return {"backend": self.backend, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
                "special_tokens": {SPECIAL_TOKENS.get(r, r): i for r, i in self.special.items()}}

    def _set_special(self, ids_by_name: dict[str, int], where: str) -> None:
        missing = [t for t in SPECIAL_TOKENS.values() if t not in ids_by_name]
        if missing:
            raise InvalidInput(f"{where}: tokenizer lacks special tokens {missing}")
        self.special = {role: ids_by_name[t] for role, t in SPECIAL_TOKENS.items()}


class HFTokenizer(Tokenizer):
    backend = "hf"

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _HF

        raw = Path(path).read_bytes()
        try:
            self._tok = _HF.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise InvalidInput(f"{path}: not a tokenizers tokenizer.json ({type(e).__name__}: "
                               f"{str(e)[:200]})") from None
        self._tok.encode_special_tokens = True  # special spellings in text stay ordinary text
        self.fingerprint = hashlib.sha256(b"hf\0" + raw).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._set_special({t: vocab[t] for t in SPECIAL_TOKENS.values() if t in vocab}, str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_with_starts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self._tok.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int64)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        starts = offsets[:, 0].copy()
        # Pieces of one character all carry the character's offsets: a token that starts before
        # the previous one ends is inside a character.
        starts[1:][offsets[1:, 0] < offsets[:-1, 1]] = -1
        return ids, starts

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def read_rank_file(path: str | Path) -> dict[bytes, int]:
    ranks = {}
    for n, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError as e:
            raise InvalidInput(f"{path}:{n}: not a '<base64> <rank>' line ({e}); is this a "
                               "tokenizer.json or tiktoken rank file?") from None
    return ranks


def write_rank_file(path: str | Path, ranks: dict[bytes, int], pattern: str,
                    special_tokens: dict[str, int]) -> None:
    lines = [f"{base64.b64encode(t).decode('ascii')} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")
    side = {"pattern": pattern, "special_tokens": dict(sorted(special_tokens.items(), key=lambda x: x[1]))}
    Path(str(path) + ".json").write_text(json.dumps(side, indent=1) + "\n", encoding="utf-8")


class TiktokenTokenizer(Tokenizer):
    backend = "tiktoken"

    def __init__(self, path: str | Path):
        import tiktoken

        path = Path(path)
        ranks = read_rank_file(path)
        side_path = Path(str(path) + ".json")
        h = hashlib.sha256(b"tiktoken\0" + path.read_bytes())
        if side_path.exists():
            side_raw = side_path.read_bytes()
            h.update(b"\0" + side_raw)
            side = json.loads(side_raw)
            pattern = side.get("pattern", DEFAULT_PATTERN)
            specials = {str(k): int(v) for k, v in side.get("special_tokens", {}).items()}
        else:
            pattern, base = DEFAULT_PATTERN, max(ranks.values()) + 1
            specials = {t: base + i for i, t in enumerate(SPECIAL_TOKENS.values())}
        self.fingerprint = h.hexdigest()
        self._enc = tiktoken.Encoding(name=path.stem, pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=specials)
        self.vocab_size = max(max(ranks.values()), max(specials.values(), default=0)) + 1
        self._set_special(specials, str(path))
        self._lengths: np.ndarray | None = None

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        # uint32 straight from tiktoken's buffer: no Python list of ints. With no special token
        # allowed, tiktoken's encode is encode_ordinary (special spellings stay ordinary text).
        try:
            return self._enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: encode_ordinary repairs them first
            return np.asarray(self.encode(text), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._enc.encode_ordinary(t) for t in texts]

    def _byte_lengths(self) -> np.ndarray:
        """UTF-8 byte length of every ordinary token, by id (built on first use)."""
        if self._lengths is None:
            lengths = np.zeros(self.vocab_size, dtype=np.int64)
            for i in range(self.vocab_size):
                try:
                    lengths[i] = len(self._enc.decode_single_token_bytes(i))
                except KeyError:  # an id no token has
                    pass
            self._lengths = lengths
        return self._lengths

    def encode_with_starts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(self.encode_array(text), dtype=np.int64)
        try:
            raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        except UnicodeEncodeError:  # lone surrogates (tiktoken repaired them): no candidates
            return ids, np.full(len(ids), -1, dtype=np.int64)
        byte_end = np.cumsum(self._byte_lengths()[ids])
        if len(ids) == 0 or byte_end[-1] != len(raw):
            return ids, np.full(len(ids), -1, dtype=np.int64)
        byte_start = byte_end - self._byte_lengths()[ids]
        lead = np.append((raw & 0xC0) != 0x80, True)  # a character starts at this byte
        chars_before = np.concatenate([[0], np.cumsum(lead[:-1])])
        return ids, np.where(lead[byte_start], chars_before[byte_start], -1)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """HF backend for *.json, tiktoken backend for anything else (a rank file)."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"tokenizer file not found: {path} (check data.tokenizer)")
    return HFTokenizer(path) if path.suffix == ".json" else TiktokenTokenizer(path)

"""Tokenizer: HF and tiktoken backends give identical ids; special tokens have fixed ids."""

import pytest

from data.tokenizer import SPECIAL_TOKENS, load_tokenizer, read_rank_file
from data.train_tokenizer import corpus_texts
from tests.corpus_fixtures import make_corpus, make_tokenizer
from train.config import ModelConfig, load_config

TRICKY = ["héllo wörld — naïve café", "日本語のテキスト and 中文", "emoji 🎉🚀 x", "tabs\t\tand\r\nCRLF\n\n\n",
          "   leading and trailing spaces   ", "numbers 1234567 3.14159 0x1F", "",
          "special spellings <|image|><|eos|> stay text", "don't won't I'LL we've", "\x00\x01 control"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = make_corpus(root)
    return corpus, make_tokenizer(corpus, root / "tok")


def test_backends_agree_on_corpus_and_tricky_text(built):
    corpus, path = built
    hf, tk = load_tokenizer(path), load_tokenizer(path.with_suffix(".tiktoken"))
    assert (hf.backend, tk.backend) == ("hf", "tiktoken")
    texts = corpus_texts(corpus) + TRICKY
    n_tokens = 0
    for t in texts:
        a, b = hf.encode(t), tk.encode(t)
        assert a == b, f"backends differ on {t[:60]!r}"
        assert hf.decode(a) == t and tk.decode(b) == t
        n_tokens += len(a)
    assert n_tokens > 100_000  # the whole corpus was compared, not a trivial sample
    assert hf.encode_batch(texts[:5]) == tk.encode_batch(texts[:5])
    assert hf.vocab_size == tk.vocab_size == load_config("configs/tiny.toml").model.vocab_size == 2048


def test_encode_array_is_encode(built):
    """The loader's array path (tiktoken: encode_to_numpy) gives exactly encode()'s ids."""
    corpus, path = built
    texts = corpus_texts(corpus) + TRICKY + ["<|media_begin|>x<|pad|>"]
    for tok in (load_tokenizer(path), load_tokenizer(path.with_suffix(".tiktoken"))):
        # tiktoken repairs lone surrogates (json.loads can produce them); HF rejects them
        for t in texts + (["lone surrogate \ud800 here"] if tok.backend == "tiktoken" else []):
            arr = tok.encode_array(t)
            assert arr.ndim == 1 and arr.dtype.kind in "iu", (tok.backend, arr.dtype)
            assert arr.tolist() == tok.encode(t), f"{tok.backend}: encode_array differs on {t[:60]!r}"


def test_special_tokens_fixed_ids_match_model_config(built):
    _, path = built
    for tok in (load_tokenizer(path), load_tokenizer(path.with_suffix(".tiktoken"))):
        assert tok.special == {role: i for i, role in enumerate(SPECIAL_TOKENS)}
        assert tok.image_id == ModelConfig().image_token_id and tok.video_id == ModelConfig().video_token_id
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
        # A special token's spelling inside text is ordinary text, never the special id.
        ids = tok.encode("<|image|> <|eos|>")
        assert not set(ids) & set(tok.special.values())
        assert tok.info()["special_tokens"]["<|video|>"] == 4


def test_training_is_deterministic(built, tmp_path):
    corpus, path = built
    again = make_tokenizer(corpus, tmp_path / "again")
    assert again.read_bytes() == path.read_bytes()
    assert again.with_suffix(".tiktoken").read_bytes() == path.with_suffix(".tiktoken").read_bytes()
    assert load_tokenizer(again).fingerprint == load_tokenizer(path).fingerprint
    assert load_tokenizer(path).fingerprint != load_tokenizer(path.with_suffix(".tiktoken")).fingerprint


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("SGVsbG8= 0\nnot-a-valid-line\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:2"):
        read_rank_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    # a rank file without sidecar and without our special tokens: defaults append them after the ranks
    plain = tmp_path / "plain.tiktoken"
    plain.write_text("\n".join(f"{__import__('base64').b64encode(bytes([b])).decode()} {b}" for b in range(256)))
    tok = load_tokenizer(plain)
    assert tok.special["pad"] == 256 and tok.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert tok.encode("ab") == [97, 98]

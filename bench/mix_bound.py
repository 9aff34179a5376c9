"""How far each global batch's vision share is from the target, when a window holds several.

    python bench/mix_bound.py [--out bench/results/mix_bound.json] [--batches 2000]

The requirement: every global batch carries data.vision_fraction f of its tokens as vision
tokens to within one sequence's tokens, |V_b - f * T_b| <= seq_len, whenever a window holds more
than one batch. Planning only (metadata; nothing is read or decoded), on
  - the quickstart corpus (data.corpus, its BPE tokenizer, 1 MB shards) at the quickstart's
    seq_len 128, for windows of 16 to 64 sequences holding 2 to 16 batches;
  - the synthetic K2.5-like catalog of bench/data_scale.py (200,000 samples, seq_len 4096,
    windows of 32 sequences) at batches of 4, 8 and 16 sequences.
Units of up to U = unit_pieces(S, B) pieces (data/catalog.py's UNIT_RULE; U = S // B here).
Vision tokens of a piece of a unit cut across sequences: the unit's vision tokens shared out by
the atom tokens inside the piece (data/pack.py's _piece_vision), exact for one-piece units.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def batch_errors(stream, batches: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(V_b - f * T_b, T_b) of the first `batches` global batches of a PackedStream's plan."""
    cursor = stream.new_cursor(0, stream._fresh_state())
    S, B = stream.S, stream.B
    out, sizes = [], []
    for j in range(batches):
        vision = tokens = 0.0
        for g in range(j * B, (j + 1) * B):
            w = cursor.get(g // S)
            for p in w.sequences[g % S]:
                d = w.docs[p.doc]
                tokens += p.end - p.start
                whole = p.start == 0 and p.end == d.tokens
                vision += cursor.planner._piece_vision(d, p.start, p.end, [0] if whole else [0, 0])
        out.append(vision - fraction * tokens)
        sizes.append(tokens)
    return np.array(out), np.array(sizes)


def summarize(errors: np.ndarray, tokens: np.ndarray, seq_len: int, batch: int,
              fraction: float) -> dict:
    """The bound's figures, the vision share over all the batches and the packing efficiency
    (tokens placed / batch capacity)."""
    dev = np.abs(errors)
    return {"batches": len(dev),
            "vision_share": float((errors.sum() + fraction * tokens.sum()) / tokens.sum()),
            "packing_efficiency": float(tokens.sum() / (len(tokens) * batch * seq_len)),
            "max_abs_error": float(dev.max()),
            "max_abs_error_in_seq_len": float(dev.max() / seq_len),
            "batches_over_seq_len": int((dev > seq_len).sum()),
            "max_surplus": float(errors.max()), "max_deficit": float(-errors.min())}


def quickstart_dataset(root: Path) -> str:
    from data import corpus
    from data.ingest import corpus_sources, ingest
    from data.store import open_store
    from data.tokenizer import load_tokenizer
    from data.train_tokenizer import corpus_texts, export_tiktoken, train_bpe

    out = corpus.generate(root / "corpus")
    tok = train_bpe(corpus_texts(out), 2048)
    (root / "tok").mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tok" / "tokenizer.json"))
    export_tiktoken(tok, root / "tok" / "tokenizer.tiktoken")
    ingest(corpus_sources(out), open_store(str(root / "ds")), load_tokenizer(root / "tok" / "tokenizer.json"),
           shard_size=2**20, progress=False, log=lambda m: None)
    return str(root / "ds")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mix_bound.json"))
    ap.add_argument("--batches", type=int, default=2000, help="global batches of 8 sequences (scaled)")
    args = ap.parse_args(argv)
    from data.plan_table import unit_pieces
    from data.stream import PackedStream
    from data.media import MediaRules
    from train.config import load_config

    import bench.data_scale as scale

    results = {"vision_fraction": 0.1, "quickstart": {}, "k2.5_like": {}}
    with tempfile.TemporaryDirectory(prefix="mmpt-mixbound-") as tmp:
        url = quickstart_dataset(Path(tmp) / "qs")
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml",
                          ["--data.image_max_pixels=50176", "--data.video_max_pixels=12544",
                           "--data.video_max_frames=8"])
        media = MediaRules.from_config(cfg)
        for S, B in [(32, 8), (32, 4), (32, 2), (16, 8), (16, 4), (64, 8)]:
            stream = PackedStream(url, seq_len=128, window_sequences=S, global_batch=B, dp_rank=0,
                                  dp_size=1, seed=0, vision_fraction=0.1, weights={}, tokenizer="",
                                  media=media)
            r = summarize(*batch_errors(stream, args.batches * 8 // B, 0.1), 128, B, 0.1)
            r["unit_pieces"] = unit_pieces(S, B)
            results["quickstart"][f"S={S},B={B}"] = r
            print(f"quickstart seq_len 128, window {S}, batch {B}: {r}", flush=True)
        for B in [16, 8, 4]:
            root = Path(tmp) / f"k25-b{B}"  # its plan tables: units of unit_pieces(32, B) pieces
            scale.write_dataset(root, 200_000, global_batch=B)
            stream = PackedStream(str(root), seq_len=4096, window_sequences=32, global_batch=B,
                                  dp_rank=0, dp_size=1, seed=0, vision_fraction=0.1, weights={},
                                  tokenizer="", media=scale._media())
            assert stream.catalog.derived_plans == []
            r = summarize(*batch_errors(stream, args.batches * 8 // B // 2, 0.1), 4096, B, 0.1)
            r["unit_pieces"] = unit_pieces(32, B)
            results["k2.5_like"][f"S=32,B={B}"] = r
            print(f"k2.5-like seq_len 4096, window 32, batch {B}: {r}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

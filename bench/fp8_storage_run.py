"""Training with FP8-E4M3 activation storage against bf16 storage: the tiny model, 200 steps.

    .venv/bin/python bench/fp8_storage_run.py [--steps 200] [--out bench/results/fp8_storage_run.json]

Both runs start from the same weights and see the same batches (a fixed random bigram language,
so the loss has something to learn); weights and optimizer state are float32 (MuonClip from
train/optim), the forward runs under bfloat16 autocast on CPU. The only difference is
`activations.fp8_storage`, which changes what backward reads, so the first step's loss is
identical and later ones drift apart by what FP8 rounding does to the updates. Reports the
largest per-step loss difference, the difference of the mean loss over the last 20 steps, and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import ActivationConfig, load_config  # noqa: E402
from train.model import build_lm, init_weights  # noqa: E402
from train.model.activations import apply_activation_memory  # noqa: E402
from train.model.lm import lm_loss_sum  # noqa: E402
from train.optim.muon import build_optimizer  # noqa: E402
from train.optim.schedule import set_lr  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bigram_batches(vocab: int, rows: int, seq: int, steps: int, seed: int = 0,
                   successors: int = 4) -> list[torch.Tensor]:
    """Token rows [rows, seq + 1] of a random bigram language: each token has `successors`
    equally likely next tokens."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(5, vocab, (vocab, successors), generator=g)
    out = []
    for _ in range(steps):
        tok = torch.randint(5, vocab, (rows,), generator=g)
        cols = [tok]
        for _ in range(seq):
            tok = table[tok, torch.randint(0, successors, (rows,), generator=g)]
            cols.append(tok)
        out.append(torch.stack(cols, 1))
    return out


def train_losses(fp8: bool, steps: int, config: str = str(ROOT / "configs/tiny.toml"),
                 rows: int = 8, seq: int = 128, recompute: str = "selective") -> list[float]:
    cfg = load_config(config, [f"--train.steps={steps}"])
    torch.manual_seed(0)
    lm = build_lm(cfg.model)
    init_weights(lm, 0)
    apply_activation_memory(lm, ActivationConfig(recompute=recompute, fp8_storage=fp8))
    opt = build_optimizer(lm, cfg.optim)
    pos = torch.arange(seq).expand(rows, seq)
    doc = torch.zeros(rows, seq, dtype=torch.long)
    losses = []
    for step, tokens in enumerate(bigram_batches(cfg.model.vocab_size, rows, seq, steps)):
        set_lr(opt, step, cfg.optim, steps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = lm(tokens[:, :-1], position_ids=pos, doc_ids=doc)
        s, n = lm_loss_sum(logits, tokens[:, 1:], torch.ones(rows, seq, dtype=torch.bool))
        loss = s / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.optim.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def compare(steps: int, **kw) -> dict:
    t0 = time.perf_counter()
    ref = train_losses(False, steps, **kw)
    fp8 = train_losses(True, steps, **kw)
    diffs = [abs(a - b) for a, b in zip(ref, fp8)]
    tail = min(20, steps)
    return {"steps": steps, "loss_bf16_storage": ref, "loss_fp8_storage": fp8,
            "first_step_equal": ref[0] == fp8[0],
            "max_abs_step_diff": max(diffs),
            "tail_mean_bf16": sum(ref[-tail:]) / tail, "tail_mean_fp8": sum(fp8[-tail:]) / tail,
            "tail_mean_abs_diff": abs(sum(ref[-tail:]) - sum(fp8[-tail:])) / tail,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench/results/fp8_storage_run.json"))
    args = ap.parse_args(argv)
    r = compare(args.steps)
    r.update(config="configs/tiny.toml", rows=8, seq_len=128, recompute="selective",
             autocast="bfloat16", torch=torch.__version__, threads=torch.get_num_threads())
    print(f"{args.steps} steps: loss {r['loss_bf16_storage'][0]:.4f} -> "
          f"{r['tail_mean_bf16']:.4f} (bf16 storage) vs {r['tail_mean_fp8']:.4f} (fp8 storage, "
          f"last-20 means); max per-step |diff| {r['max_abs_step_diff']:.4f}")
    Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

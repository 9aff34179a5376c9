"""Text-model throughput: forward + backward tokens/s, peak memory and MFU.

    .venv/bin/python bench/model.py                      # tiny on CPU (float32)
    .venv/bin/python bench/model.py --config configs/proxy-1gpu.toml --device cuda \\
        --dtype bfloat16                                 # proxy on one GPU, bf16 autocast

Batches are packed rows of several documents (random lengths, fixed seed) at data.seq_len.
Weights stay float32 (the optimizer's master copy); bfloat16 runs the forward under autocast.
MFU = tokens/s * FLOPs/token (train/model/flops.py) / peak (H100 dense bf16: 989 TFLOP/s).
Prints a table and writes JSON (bench/results/model.json unless --out is given).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import load_config  # noqa: E402
from train.model import build_lm, init_weights  # noqa: E402
from train.model.attention import resolve_backend  # noqa: E402
from train.model.flops import training_flops_per_token  # noqa: E402
from train.model.info import count_text  # noqa: E402
from train.model.lm import lm_loss_sum, position_ids_from_doc_ids  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def packed_batch(batch: int, seq: int, vocab: int, gen: torch.Generator, mean_doc: int):
    """Token ids, doc ids and positions of rows packed with documents of random lengths."""
    ids = torch.randint(5, vocab, (batch, seq), generator=gen)
    doc = torch.empty(batch, seq, dtype=torch.long)
    for b in range(batch):
        start, d = 0, 0
        while start < seq:
            n = int(torch.randint(1, 2 * mean_doc, (1,), generator=gen))
            doc[b, start:start + n] = d
            start, d = start + n, d + 1
    return ids, doc, position_ids_from_doc_ids(doc)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=None, help="rows per step (default 4 CPU, 1 GPU)")
    p.add_argument("--seq-len", type=int, default=None, help="default: data.seq_len")
    p.add_argument("--mean-doc", type=int, default=None, help="mean document length (seq/4)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", default="bench/results/model.json")
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/model.py: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    seq = args.seq_len or cfg.data.seq_len
    batch = args.batch or (1 if device.type == "cuda" else 4)

    with torch.device("meta"):
        model = build_lm(cfg.model)
    model.to_empty(device=device)
    init_weights(model, 0)
    counts = count_text(model)
    gen = torch.Generator().manual_seed(0)
    ids, doc, pos = (t.to(device) for t in packed_batch(batch, seq, cfg.model.vocab_size, gen,
                                                         args.mean_doc or max(1, seq // 4)))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step():
        with autocast:
            logits = model(ids, position_ids=pos, doc_ids=doc)
        loss, n = lm_loss_sum(logits, ids, torch.ones_like(ids, dtype=torch.bool))
        (loss / n).backward()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]  # median
    tokens_per_s = batch * seq / step_s
    flops = training_flops_per_token(cfg.model, seq)
    peak = peak_tflops(device, args.peak_tflops)
    result = {
        "config": args.config, "overrides": overrides, "device": args.device,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "dtype": args.dtype,
        "attention_backend": resolve_backend(cfg.model.attention_backend, device),
        "batch": batch, "seq_len": seq, "tokens_per_step": batch * seq,
        "params_total": counts.total, "params_activated": counts.activated,
        "step_s_median": step_s, "step_s_all": times, "tokens_per_s": tokens_per_s,
        "train_flops_per_token": flops, "achieved_tflops": tokens_per_s * flops / 1e12,
        "peak_tflops": peak, "mfu": (tokens_per_s * flops / (peak * 1e12)) if peak else None,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                            if device.type == "cuda" else None),
        "torch": torch.__version__,
    }
    rows = [("config", args.config), ("device", result["device_name"]), ("dtype", args.dtype),
            ("attention", result["attention_backend"]),
            ("tokens/step", f"{batch} x {seq}"), ("params total / activated",
             f"{counts.total / 1e6:.1f}M / {counts.activated / 1e6:.1f}M"),
            ("step (median)", f"{step_s * 1e3:.1f} ms"), ("tokens/s", f"{tokens_per_s:,.0f}"),
            ("achieved TFLOP/s", f"{result['achieved_tflops']:.3f}"),
            ("MFU", f"{result['mfu']:.1%}" if peak else "n/a (no peak for this device)"),
            ("peak memory", f"{result['peak_memory_gib']:.2f} GiB" if device.type == "cuda" else "n/a")]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

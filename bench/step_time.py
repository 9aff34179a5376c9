"""One-GPU step time of a config through ParallelRuntime: text-only vs DEP on vs DEP off.

    .venv/bin/python bench/step_time.py --config configs/proxy-1gpu.toml   # needs a CUDA GPU

Synthetic packed batches: rows of seq_len tokens; in the vision runs about 10% of the tokens are
image placeholders (392x392-pixel images, 196 tokens each) and video chunks (4 frames of
224x224 pixels, 64 tokens each). One process, world size 1 (gloo for CPU tensors, NCCL for
CUDA ones), bf16 compute with fp32 ZeRO-1 masters, MuonClip. Writes bench/results/step_time.json.
With one rank DEP cannot balance anything; the comparison shows its fixed cost (the encoder
forward runs twice: once without autograd, once in the recompute).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel.dep import rank_batch  # noqa: E402
from parallel.mesh import build_mesh  # noqa: E402
from parallel.runtime import ParallelRuntime  # noqa: E402
from train.config import load_config  # noqa: E402
from train.model import build_model, init_weights  # noqa: E402
from train.optim.muon import muonclip_factory  # noqa: E402
from train.step import training_step  # noqa: E402


def synthetic_batch(cfg, rows: int, vision: bool, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s, m, v = cfg.data.seq_len, cfg.model, cfg.vision
    ids = torch.randint(10, m.vocab_size, (rows, s), generator=g)
    grids, patch_dim = [], v.in_channels * v.patch_size**2
    if vision:
        for r in range(rows):
            pos, budget = 16, int(0.10 * s)
            while budget > 0:
                image = len(grids) % 3 != 2
                grid = (1, 28, 28) if image else (4, 16, 16)
                tok = (grid[1] // v.merge_size) * (grid[2] // v.merge_size)
                if pos + tok >= s:
                    break
                ids[r, pos:pos + tok] = m.image_token_id if image else m.video_token_id
                grids.append(grid)
                pos, budget = pos + tok + 32, budget - tok
    batch = dict(input_ids=ids, position_ids=torch.arange(s).expand(rows, s).clone(),
                 doc_ids=torch.zeros(rows, s, dtype=torch.long), labels=torch.roll(ids, -1, 1),
                 loss_mask=torch.ones(rows, s, dtype=torch.bool), pixel_patches=None, grid_thw=None)
    if grids:
        grid_thw = torch.tensor(grids)
        batch["grid_thw"] = grid_thw
        batch["pixel_patches"] = torch.randn(int(grid_thw.prod(1).sum()), patch_dim, generator=g)
    return {k: (t.to(device) if t is not None else None) for k, t in batch.items()}


def time_mode(config: str, mode: str, steps: int, warmup: int, microbatches: int) -> dict:
    overrides = [f"--parallel.dep={'true' if mode == 'dep' else 'false'}",
                 f"--parallel.microbatches={microbatches}"]
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model(cfg)
    init_weights(model, 0)
    model.to(torch.bfloat16)
    mesh = build_mesh(cfg, "cuda")
    rt = ParallelRuntime(cfg, model, mesh, muonclip_factory(cfg.optim), dtype=torch.bfloat16,
                         device="cuda")
    del model
    batch = synthetic_batch(cfg, cfg.data.global_batch_size, vision=mode != "text", device="cuda")
    if cfg.parallel.dep:  # the pixels of the items this rank encodes: all of them on one GPU
        batch = rank_batch([batch], mesh)
    times, losses = [], []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = training_step(rt, batch)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(out.loss)
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    vision_tokens = int(((batch["input_ids"] == cfg.model.image_token_id)
                         | (batch["input_ids"] == cfg.model.video_token_id)).sum())
    res = dict(mode=mode, step_s=round(sum(times) / len(times), 4), tokens_per_step=tokens,
               vision_tokens=vision_tokens, tokens_per_s=round(tokens * len(times) / sum(times)),
               max_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               losses=[round(x, 4) for x in losses], **rt.zero.state_bytes())
    del rt
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/proxy-1gpu.toml")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_time.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("step_time: no CUDA GPU here; nothing measured", file=sys.stderr)
        return 1
    torch.cuda.set_device(0)
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method="tcp://127.0.0.1:29511",
                            rank=0, world_size=1)
    rows = [time_mode(args.config, mode, args.steps, args.warmup, args.microbatches)
            for mode in ("text", "dep", "no_dep")]
    base = rows[0]["step_s"]
    for r in rows:
        r["speed_vs_text"] = round(base / r["step_s"], 4)
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(bench="step_time", config=args.config,
                                   device=torch.cuda.get_device_name(0), rows=rows), indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

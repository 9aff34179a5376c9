"""MoonViT-3D tower throughput: forward and forward+backward patches/s, peak memory.

A DEP-like load of native-resolution items: images of several sizes plus 4-frame video chunks
(one encoder item each). On CUDA the script first checks that the tower gives the CPU's
numbers (float32) and how far bf16 autocast is from float32.

    .venv/bin/python bench/vision.py --config configs/tiny.toml            # CPU, quick
    python3 bench/vision.py --config configs/k2.5.toml --device cuda --dtype bfloat16

Writes bench/results/vision_<device>_<dtype>.json (and prints it). Recorded on one H100:
vision_cuda_bfloat16.json, vision_cuda_float32.json (half the items, to fit float32 activations).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import load_config  # noqa: E402
from train.model import init_weights  # noqa: E402
from train.model.vision import VisionTower, num_patches, vision_tokens  # noqa: E402

# (t, h, w) in patches: 448x448, 336x672, 896x896 images and 4-frame 336x336 video chunks.
ITEMS = [(1, 32, 32)] * 8 + [(1, 24, 48)] * 8 + [(1, 64, 64)] * 2 + [(4, 24, 24)] * 8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def forward_flops(cfg, items) -> float:
    """Matmul FLOPs of one forward: patch embedding, per layer q/k/v/o + MLP + attention scores
    and values over each item's t*h*w patches, and the projector."""
    d, i, layers = cfg.vision.hidden_size, cfg.vision.intermediate_size, cfg.vision.num_layers
    merged = d * cfg.vision.merge_size**2
    total = 0.0
    for t, h, w in items:
        n = t * h * w
        total += 2 * n * cfg.vision.in_channels * cfg.vision.patch_size**2 * d
        total += layers * (2 * n * (4 * d * d + 2 * d * i) + 4 * n * n * d)
        tokens = (h // cfg.vision.merge_size) * (w // cfg.vision.merge_size)
        total += 2 * tokens * merged * (merged + cfg.model.hidden_size)
    return total


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.toml")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the item list to run")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    items = ITEMS[: max(1, int(len(ITEMS) * args.scale))]
    grid_thw = torch.tensor(items)
    tower = VisionTower(cfg.vision, cfg.model.hidden_size)
    init_weights(tower, seed=0)
    patches = torch.randn(num_patches(grid_thw), tower.patch_embed.in_features)
    result = {"config": args.config, "device": args.device, "dtype": args.dtype,
              "items": len(items), "patches": num_patches(grid_thw),
              "vision_tokens": vision_tokens(grid_thw, cfg.vision.merge_size),
              "params": sum(p.numel() for p in tower.parameters())}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        small = grid_thw[[0, len(items) - 1]]
        x_small = patches[: num_patches(small)]
        with torch.no_grad():
            ref = tower(x_small, small)
            gpu_tower = tower.cuda()
            out = gpu_tower(x_small.cuda(), small)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out_bf16 = gpu_tower(x_small.cuda(), small)
        result["cuda_vs_cpu_fp32_rel_diff"] = rel(out.cpu(), ref)
        result["bf16_autocast_vs_fp32_rel_diff"] = rel(out_bf16, out)
    tower = tower.to(args.device)
    patches = patches.to(args.device)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def forward():
        with torch.no_grad(), autocast:
            tower(patches, grid_thw)

    def forward_backward():
        with autocast:
            out = tower(patches, grid_thw)
        out.float().square().mean().backward()

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fwd = timed(forward, args.device, args.repeats)
    fwd_bwd = timed(forward_backward, args.device, args.repeats)
    result.update(forward_s=fwd, forward_backward_s=fwd_bwd,
                  forward_patches_per_s=result["patches"] / fwd,
                  forward_backward_patches_per_s=result["patches"] / fwd_bwd,
                  forward_tflops_per_s=forward_flops(cfg, items) / fwd / 1e12,
                  forward_backward_tflops_per_s=3 * forward_flops(cfg, items) / fwd_bwd / 1e12)
    if args.device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"vision_{args.device}_{args.dtype}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

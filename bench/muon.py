"""Muon on the device: Newton-Schulz checks against torch.optim.Muon and step times at K2 shapes.

    .venv/bin/python bench/muon.py                 # CPU, small shapes
    .venv/bin/python bench/muon.py --device cuda   # K2 shapes on one GPU

Checks (any failure exits 1): our bf16 Newton-Schulz is bit-identical to torch's
`_zeropower_via_newtonschulz` on this device; the batched [E, r, c] path matches per-matrix
calls. Timings: one MuonClip step (momentum + NS5 + update) for the matrices one GPU holds of a
K2 MoE layer at EP16 (24 experts x 3 stacks of 2048 x 7168) and of its MLA projections.
Prints a table and writes JSON (bench/results/muon_<device>.json unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim import _muon as torch_muon

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.optim.muon import MuonClip, newton_schulz5  # noqa: E402

# (name, shape): K2 at EP16 (384 experts / 16), hidden 7168, expert hidden 2048, 64 heads,
# q low-rank 1536, kv low-rank 512, nope 128 + rope 64, v 128.
K2_SHAPES = [("experts.w_gate [24,2048,7168]", (24, 2048, 7168)),
             ("experts.w_down [24,7168,2048]", (24, 7168, 2048)),
             ("q_b_proj [12288,1536]", (12288, 1536)),
             ("kv_b_proj [16384,512]", (16384, 512)),
             ("o_proj [7168,8192]", (7168, 8192))]
CPU_SHAPES = [("experts [4,96,128]", (4, 96, 128)), ("q_b_proj [192,64]", (192, 64))]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_ns(device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for shape in [(256, 512), (512, 256), (1024, 1024)]:
        g = torch.randn(shape, device=device, generator=gen)
        ours = newton_schulz5(g)
        ref = torch_muon._zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        out[f"ns_bf16_bit_identical_{shape[0]}x{shape[1]}"] = bool(torch.equal(ours, ref))
    stack = torch.randn(8, 256, 640, device=device, generator=gen)
    batched = newton_schulz5(stack, dtype=torch.float32)
    single = torch.stack([newton_schulz5(m, dtype=torch.float32) for m in stack])
    out["batched_vs_single_fp32_max_abs_diff"] = float((batched - single).abs().max())
    return out


def time_step(shape, device, repeats: int) -> float:
    p = nn.Parameter(torch.randn(shape, device=device) * 0.02)
    opt = MuonClip([p], lr=0.02)
    p.grad = torch.randn_like(p)
    opt.step()  # warm-up (allocations, kernels)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    checks = check_ns(device)
    shapes = K2_SHAPES if device.type == "cuda" else CPU_SHAPES
    rows = []
    for name, shape in shapes:
        secs = time_step(shape, device, args.repeats)
        rows.append({"matrix": name, "shape": list(shape), "step_ms": round(secs * 1e3, 3)})
        print(f"{name:32s} {secs * 1e3:10.2f} ms / MuonClip step")
    for k, v in checks.items():
        print(f"{k:40s} {v}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    result = {"device": name, "torch": torch.__version__, "checks": checks, "steps": rows}
    out = Path(args.out or Path(__file__).parent / "results" / f"muon_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    ok = all(v for k, v in checks.items() if k.startswith("ns_bf16")) and \
        checks["batched_vs_single_fp32_max_abs_diff"] < 1e-4
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

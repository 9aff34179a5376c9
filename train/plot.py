"""`mmpt plot RUN_DIR`: a PNG of loss, throughput and expert balance over steps."""

from __future__ import annotations

import argparse
from pathlib import Path

from train.metrics import read_metrics

PANELS = (
    ("loss", "loss"),
    ("tok_s", "tokens / s"),
    ("expert_load_max_mean", "expert load max / mean"),
)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: metrics.jsonl has no step records to plot")
    out = Path(out) if out else Path(run_dir) / "training.png"
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.6 * len(PANELS)), sharex=True)
    for ax, (key, label) in zip(axes, PANELS):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="." if len(xs) < 60 else None, linewidth=1.2)
        else:
            ax.text(0.5, 0.5, f"no '{key}' logged", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].set_title(f"{Path(run_dir).name}: {len(records)} steps")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmpt plot", description=__doc__)
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/training.png)")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.out))
    return 0

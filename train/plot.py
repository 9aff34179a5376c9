"""`mmpt plot RUN_DIR`: a PNG of loss (training and validation), loss by modality and by
source, throughput and expert balance over steps.

Training series are solid lines, validation series (logged every train.eval_every steps)
dashed with markers in the same colour. A panel whose metrics were never logged says so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train.metrics import KINDS, read_metrics

MODALITIES = tuple(f"loss_{k}" for k in KINDS + ("caption", "plain_text"))


def panels(records: list[dict]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(y label, [(metric key, legend label)]) per panel; validation keys are the training
    key with a val_ prefix and share its colour."""
    keys = {k for r in records for k in r}
    sources = sorted({k[len("loss_source_"):] for k in keys if k.startswith("loss_source_")}
                     | {k[len("val_loss_source_"):] for k in keys
                        if k.startswith("val_loss_source_")})
    return [
        ("loss", [("loss", "loss")]),
        ("loss by modality", [(k, k[len("loss_"):]) for k in MODALITIES
                              if k in keys or f"val_{k}" in keys]),
        ("loss by source", [(f"loss_source_{s}", s) for s in sources]),
        ("tokens / s", [("tok_s", "tokens / s")]),
        ("expert load max / mean", [("expert_load_max_mean", "max / mean")]),
    ]


def _points(records: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return tuple(zip(*pts)) if pts else None


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: metrics.jsonl has no step records to plot")
    out = Path(out) if out else Path(run_dir) / "training.png"
    layout = panels(records)
    fig, axes = plt.subplots(len(layout), 1, figsize=(8, 2.6 * len(layout)), sharex=True)
    for n, (ax, (label, series)) in enumerate(zip(axes, layout)):
        drawn = 0
        for i, (key, name) in enumerate(series):
            colour = f"C{i}"
            train = _points(records, key)
            if train:
                ax.plot(*train, color=colour, linewidth=1.2, label=name,
                        marker="." if len(train[0]) < 60 else None)
                drawn += 1
            val = _points(records, f"val_{key}")
            if val:
                ax.plot(*val, color=colour, linewidth=1.2, linestyle="--", marker="o",
                        markersize=3, label=f"{name} (val)")
                drawn += 1
        if drawn:
            if drawn > 1:
                ax.legend(fontsize=7, ncol=3, loc="upper right")
        else:
            ax.text(0.5, 0.5, f"no '{label}' logged", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].set_title(f"{Path(run_dir).name}: {len(records)} steps "
                      "(solid: training, dashed: validation)")
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

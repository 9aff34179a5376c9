"""Per-step training metrics: one readable console line with progress/ETA, JSONL, TensorBoard.

Only rank 0 writes. The JSONL file (`RUN_DIR/metrics.jsonl`) is the source of truth that
`mmpt plot` and the resume tests read; a resumed run appends to it, and readers keep the last
record of each step (a step re-run after a crash replaces the earlier one).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key in ("lr",):
            return f"{key} {value:.2e}"
        if key.endswith("tok_s"):
            return f"{key} {value:,.0f}"
        if abs(value) >= 1000 or (value != 0 and abs(value) < 1e-3):
            return f"{key} {value:.3e}"
        return f"{key} {value:.4f}"
    return f"{key} {value}"


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsLogger:
    """Writes each step's metrics to the console, `metrics.jsonl` and TensorBoard (rank 0 only)."""

    # Shown on the console line, in this order, when present; everything goes to JSONL/TB.
    CONSOLE_KEYS = ("loss", "lr", "grad_norm", "tok_s", "mfu", "expert_load_max_mean",
                    "vision_share", "max_logit", "skipped_steps")

    def __init__(self, run_dir: str | Path, total_steps: int, *, enabled: bool = True,
                 tensorboard: bool = True, stream: TextIO | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self._t0 = time.monotonic()
        self._first_step: int | None = None
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a core dependency; keep logging if it is absent
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
        if self._first_step is None:
            self._first_step, self._t0 = step, time.monotonic()
        done = step - self._first_step
        rate = done / max(time.monotonic() - self._t0, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        width = len(str(self.total_steps))
        bar_len = 20
        filled = int(bar_len * step / max(self.total_steps, 1))
        bar = "#" * filled + "." * (bar_len - filled)
        parts = [_fmt(k, metrics[k]) for k in self.CONSOLE_KEYS if k in metrics]
        print(f"[{bar}] step {step:>{width}}/{self.total_steps} | " + " | ".join(parts)
              + f" | eta {_eta(eta)}", file=self.stream, flush=True)

    def event(self, message: str) -> None:
        """A one-off line (checkpoint saved, step skipped, ...), also recorded in the JSONL."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"event": message, "time": time.time()}) + "\n")
        print(message, file=self.stream, flush=True)

    def close(self) -> None:  # idempotent: the trainer closes on success and on failure
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Step records of a run, one per step (the last written wins), ordered by step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    by_step: dict[int, dict[str, Any]] = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves at most one partial last line; anything else is damage.
            if n == len(lines):
                continue
            raise ValueError(f"{path}:{n} is not valid JSON") from None
        if "step" in record:
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]

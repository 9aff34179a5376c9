"""Per-step training metrics: one readable console line with progress/ETA, JSONL, TensorBoard,
and Weights & Biases when asked for.

Only rank 0 writes. The JSONL file (`RUN_DIR/metrics.jsonl`) is the source of truth that
`mmpt plot` and the resume tests read; a resumed run appends to it, and readers keep the last
record of each step (a step re-run after a crash replaces the earlier one).

Loss breakdown (`category_metrics`, from the per-category sums of parallel/runtime.py): the
mean loss over the target tokens of each document kind (`loss_text`, `loss_image`,
`loss_video`, `loss_interleaved`), of each role (`loss_caption`: text after the document's first
image or video; `loss_plain_text`: text with no media before it) and of each source
(`loss_source_NAME`); validation records the same with a `val_` prefix. A key is present only
when its tokens are.
"""

from __future__ import annotations

import json
import math
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from data.batch import ROLE_CAPTION, ROLE_TEXT, ROLES
from train.errors import ConfigError

KINDS = ("text", "image", "video", "interleaved")
ROLE_KEYS = {ROLE_CAPTION: "caption", ROLE_TEXT: "plain_text"}  # (markers: only in the totals)


@dataclass(frozen=True)
class CategoryNames:
    """What a loader's token categories mean: its sources' names and kinds, in manifest order
    (category = source * len(ROLES) + role, data/batch.py)."""

    sources: list[str]
    kinds: list[str]

    @property
    def count(self) -> int:
        return len(self.sources) * len(ROLES)


def category_metrics(sums, names: CategoryNames, prefix: str = "") -> dict[str, float]:
    """Mean losses by document kind, role and source from [C, 2] (loss sum, tokens) sums."""
    table = sums.double().reshape(len(names.sources), len(ROLES), 2)
    groups: dict[str, Any] = {}
    for kind in KINDS:
        rows = [i for i, k in enumerate(names.kinds) if k == kind]
        if rows:
            groups[f"loss_{kind}"] = table[rows].sum(dim=(0, 1))
    for role, key in ROLE_KEYS.items():
        groups[f"loss_{key}"] = table[:, role].sum(dim=0)
    for i, name in enumerate(names.sources):
        groups[f"loss_source_{name}"] = table[i].sum(dim=0)
    return {prefix + key: float(s / n) for key, (s, n) in groups.items() if n > 0}


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
    CONSOLE_KEYS = ("loss", "val_loss", "lr", "grad_norm", "tok_s", "mfu",
                    "expert_load_max_mean", "vision_share", "max_logit", "skipped_steps")
    # The per-modality line under it (sources are in the JSONL / TensorBoard / W&B only).
    BREAKDOWN_KEYS = tuple(f"loss_{k}" for k in KINDS + ("caption", "plain_text"))

    def __init__(self, run_dir: str | Path, total_steps: int, *, enabled: bool = True,
                 tensorboard: bool = True, stream: TextIO | None = None,
                 wandb: dict | None = None):
        """wandb: None, or wandb.init arguments {project, mode ("online" | "offline"),
        config}; the run lives in RUN_DIR/wandb and a resumed run continues it."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self._t0 = time.monotonic()
        self._first_step: int | None = None
        self._jsonl = None
        self._tb = None
        self._wandb = None
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
        if wandb is not None:
            self._wandb = _start_wandb(self.run_dir, **wandb)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        numbers = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
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
        for prefix, label in (("", "train"), ("val_", "val")):
            parts = [_fmt(k[len("loss_"):], metrics[prefix + k]) for k in self.BREAKDOWN_KEYS
                     if prefix + k in metrics]
            if parts:
                print(f"    {label:>5} loss by modality: " + " | ".join(parts), file=self.stream,
                      flush=True)

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
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(run_dir: Path, project: str, mode: str, config: dict):
    """A wandb run in RUN_DIR/wandb; its id is kept in RUN_DIR/wandb-id so a resumed run
    appends to the same run."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb=true needs the wandb package: pip install "
                           "'mmpt[wandb]' (or set train.wandb=false)") from None
    id_file = run_dir / "wandb-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, mode=mode, dir=str(run_dir), id=run_id, resume="allow",
                      name=run_dir.name, config=config)


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

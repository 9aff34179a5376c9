"""The data loader: planned windows -> documents read, tokenized and decoded in workers -> Batch.

    loader = DataLoaderWithState(cfg, dp_rank=r, dp_size=d)      # cfg: train.config.Config
    for step, batch in zip(range(steps), loader):   # batch: data.batch.Batch, rows = B / dp_size
        ...
    state = loader.state_dict()                      # a few integers; JSON-friendly
    loader.load_state_dict(state)                    # resume (any worker count / DP size)

Determinism. The global sequence stream is fixed by (seed, manifest fingerprint): the mixer
(data/mix.py) orders documents, the planner (data/pack.py) packs them into windows of S
sequences, window k holding global sequences [k*S, (k+1)*S). Global batch j (counted from the
resume point g0) is sequences g0 + j*B + [0, B); DP rank r of D takes [r*B/D, (r+1)*B/D) of it.
When a window spans several global batches, the planner spreads its sequences over them by
vision content (data/pack.py), so every batch carries the vision share; the order therefore
depends on B, which the loader state records.
DataLoader worker w of W builds the local batches j = w, w+W, ... and torch's DataLoader hands
them out in round-robin order, so batch j always comes out j-th. Nothing depends on W or D
except who does the work. Loader state is (fingerprint, seed, sequences consumed) plus the
plan state at the start of the window holding the next sequence (a few integers per source and
the few deferred units), so a resume never replays the stream.
The batches are built by data/stream.py (PackedStream, in the DataLoader's workers).

Validation: `DataLoaderWithState(cfg, split="val")` reads data.val_manifest whole, or else the
samples of data.manifest that data.holdout_fraction holds out (data/catalog.py), which the
training loader then never reads; `rewind()` restarts it at its first batch.
"""

from __future__ import annotations

import gc

import torch

from data.catalog import parse_weights
from data.media import MediaRules
from data.pack import PlanState
from data.store import redact
from data.stream import FULL_READ, PackedStream, ReadRole, ResumeError, WindowCursor

# /2: sequences spread over global batches; /3: units of one piece; /4: units of up to
# data/catalog.py's unit_pieces(S, B) pieces (a saved position counts units)
STATE_FORMAT = "mmpt-loader/4"


def _worker_init(_):
    torch.set_num_threads(1)
    # Everything inherited from the parent (imports, the catalog) lives as long as the worker:
    # keep the cyclic GC from rescanning it after every few thousand allocations.
    gc.freeze()


class DataLoaderWithState:
    """torch DataLoader over a PackedStream, counting what was consumed; O(1) state."""

    def __init__(self, cfg, *, dp_rank: int = 0, dp_size: int = 1,
                 store_opts: dict | None = None, cache_opts: dict | None = None,
                 split: str = "train", read: ReadRole = FULL_READ):
        if split not in ("train", "val"):
            raise ValueError(f"split {split!r}; choose 'train' or 'val'")
        data_cfg = self.cfg = cfg.data
        media = MediaRules.from_config(cfg)
        # page-locked host batches for asynchronous copies, where they go to a GPU
        self.pin_memory = cfg.train.device == "cuda" and torch.cuda.is_available()
        # the run's [store] timeouts and retry time, unless the caller passes its own
        store_opts = {**cfg.store.store_opts(), **(store_opts or {})}
        url, holdout = data_cfg.manifest, data_cfg.holdout_fraction
        if split == "val" and data_cfg.val_manifest:
            url, holdout = data_cfg.val_manifest, 0.0  # a dataset of its own: all of it
        # Explicit weights name the training sources; a separate validation set mixes by size.
        spec = "" if url != data_cfg.manifest else data_cfg.source_weights
        self.weights = parse_weights(spec)
        self.url = url  # the dataset this loader reads
        self.stream = PackedStream(
            url, seq_len=data_cfg.seq_len, window_sequences=data_cfg.window_sequences,
            global_batch=data_cfg.global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
            seed=data_cfg.seed, vision_fraction=data_cfg.vision_fraction, weights=self.weights,
            tokenizer=data_cfg.tokenizer, media=media, store_opts=store_opts, cache_opts=cache_opts,
            holdout_fraction=holdout,
            split="val" if split == "val" and url == data_cfg.manifest else "train", read=read)
        if split == "val" and not any(s.group == "vision" for s in self.stream.catalog.sources):
            self.stream.fraction = 0.0  # a text-only validation set mixes text only
        self.consumed = 0  # batches handed out since the stream's start sequence
        self._cursor: WindowCursor | None = None

    @property
    def fingerprint(self) -> str:
        return self.stream.fingerprint

    def rewind(self) -> None:
        """Back to the stream's first batch (validation reads the same batches every time)."""
        self.stream.set_start(0, 0, self.stream._fresh_state())
        self.consumed, self._cursor = 0, None

    def __iter__(self):
        self.stream.set_start(*self._position())
        self.consumed = 0
        loader = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.cfg.num_workers,
            worker_init_fn=_worker_init, prefetch_factor=2 if self.cfg.num_workers else None,
            persistent_workers=False, pin_memory=self.pin_memory)
        for batch in loader:
            self.consumed += 1
            yield batch

    def _position(self) -> tuple[int, int, PlanState]:
        """(next global sequence, its window, plan state at that window's start)."""
        seq = self.stream.start + self.consumed * self.stream.B
        k = seq // self.stream.S
        if self._cursor is None or self._cursor.planner.next_index > k:
            self._cursor = self.stream.new_cursor()
        return seq, k, self._cursor.get(k).start_state

    def state_dict(self) -> dict:
        seq, k, state = self._position()
        s = self.stream
        return {"format": STATE_FORMAT, "fingerprint": s.fingerprint, "seed": s.seed,
                "seq_len": s.seq_len, "window_sequences": s.S, "global_batch": s.B,
                "vision_fraction": s.fraction, "source_weights": dict(self.weights),
                "holdout_fraction": s.holdout_fraction, "sequences_consumed": seq, "window": k,
                "plan_state": state.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        s = self.stream
        if state.get("format") != STATE_FORMAT:
            raise ResumeError(f"loader state format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        if state["fingerprint"] != s.fingerprint:
            raise ResumeError(f"loader state is for dataset fingerprint {state['fingerprint']}, but "
                              f"{redact(self.url)} has fingerprint {s.fingerprint}: the data changed; "
                              "refusing to restart the stream silently")
        mine = {"seed": s.seed, "seq_len": s.seq_len, "window_sequences": s.S, "global_batch": s.B,
                "vision_fraction": s.fraction, "source_weights": dict(self.weights),
                "holdout_fraction": s.holdout_fraction}
        for key, value in mine.items():
            theirs = state.get(key, 0.0 if key == "holdout_fraction" else None)
            if theirs != value:
                raise ResumeError(f"loader state has {key}={theirs!r}, this loader {value!r}: "
                                  "the sample order would differ")
        s.set_start(int(state["sequences_consumed"]), int(state["window"]),
                    PlanState.from_dict(state["plan_state"]))
        self.consumed, self._cursor = 0, None

    def report(self) -> dict:
        """Realised mix and packing efficiency of everything planned up to the consumed position."""
        seq, k, _ = self._position()
        return plan_report(self.stream, max(k, 1))


def plan_report(stream: PackedStream, windows: int) -> dict:
    """Mix and packing efficiency of the first `windows` windows (metadata only)."""
    cursor = stream.new_cursor(0, stream._fresh_state())
    tokens = 0
    for k in range(windows):
        tokens += cursor.get(k).tokens()
    mix = cursor.planner.mixer.report()
    return {"windows": windows, "sequences": windows * stream.S,
            "packing_efficiency": tokens / (windows * stream.S * stream.seq_len),
            "mix": mix, "catalog": stream.catalog.summary()}

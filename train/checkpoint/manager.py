"""Checkpoint directories: commit protocol, discovery, validation and retention.

A checkpoint of step N lives under `<root>/step-0000000N/` (root: a local directory or
s3://bucket/prefix, through data.store). Object stores cannot rename, so completeness is a
marker, the same for both backends:

  1. rank 0 deletes whatever an earlier, interrupted attempt left under the step's prefix;
  2. every rank writes its tensor shards and rank 0 the metadata (DCP save, storage.py);
  3. rank 0 writes `meta.json` (small JSON state: step, data-loader state, ...) and then
     `COMMITTED` LAST: it records the sha256 of metadata.json and meta.json and the size of
     every data object. No COMMITTED, no checkpoint.
  4. rank 0 applies retention (`_prune`, below) and deletes incomplete checkpoints older than
     the new one (left by a crash).

Loading takes the newest checkpoint that validates (marker parses, hashes match, every object
has its recorded size; then every item's CRC32 while DCP reads). Anything that fails is logged
with its name and the reason, recorded in `skipped`, and the next older one is tried. Tensors
are read into fresh buffers and copied into the live state only once the whole load succeeded,
so a corrupt checkpoint never leaves a half-loaded model behind.

Timelines and quarantine. A run that resumes from step S (`resume`) continues a timeline that
branches off at S: every committed checkpoint newer than S, which either failed validation or
loading or was otherwise passed over, belongs to an abandoned timeline. Such checkpoints are
never deleted and never counted as newer than the run's own saves: rank 0 moves each one to
`<root>/quarantine/<n>/step-0000000N/` (n = 000001, 000002, ... in order of quarantining) with
a `QUARANTINED` note of the reason, and logs it. Discovery and retention only look at top-level
`step-*` directories, so a quarantined checkpoint is out of both; it stays loadable by pointing a
manager at `<root>/quarantine/<n>`. Retention after saving step N:
  - a committed checkpoint newer than N is from an abandoned timeline: quarantined;
  - N is kept, then older committed checkpoints, newest first, until `keep_last` are kept; each
    must pass `validate` to take a place, and one that fails is quarantined instead, so a damaged
    checkpoint never displaces a valid one;
  - the remaining older checkpoints are deleted.
Moving copies the objects (object stores cannot rename), so it costs one read and write of the
quarantined checkpoint; it only happens to checkpoints that failed or were abandoned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.api import CheckpointException

from data.store import NotFound, ObjectStore, StoreError, StoreUnavailable, open_store
from train.checkpoint.storage import (METADATA, CorruptCheckpoint, StoreReader, StoreWriter,
                                      parse_metadata)

log = logging.getLogger("mmpt.checkpoint")

COMMITTED = "COMMITTED"
META = "meta.json"
QUARANTINE = "quarantine"  # top-level prefix of quarantined checkpoints (module docstring)
QUARANTINED = "QUARANTINED"  # the reason note inside a quarantined checkpoint
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class Loaded:
    step: int
    meta: dict[str, Any]
    name: str
    missing: list[str] = field(default_factory=list)  # optional keys absent from the checkpoint


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _broadcast_int(value: int) -> int:
    if not _dist():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return int(t.item())


class CheckpointManager:
    """Save / find / load / prune checkpoints under one root URL (all ranks call save and load)."""

    def __init__(self, root: str | ObjectStore, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={keep_last} must be >= 1")
        self.store = open_store(root) if isinstance(root, str) else root
        self.keep_last = keep_last
        self.skipped: list[tuple[str, str]] = []  # (checkpoint name, reason), in report order
        # (checkpoint name, where it went, reason), in order: see "Timelines and quarantine"
        self.quarantined: list[tuple[str, str, str]] = []

    # -- discovery -------------------------------------------------------------------------

    def _steps(self) -> tuple[list[int], list[int]]:
        """(committed steps, incomplete steps), each ascending, from one listing."""
        names: dict[int, set[str]] = {}
        for key in self.store.list(""):
            head, _, rest = key.partition("/")
            m = _STEP_DIR.match(head)
            if m and rest:
                names.setdefault(int(m.group(1)), set()).add(rest)
        committed = sorted(s for s, files in names.items() if COMMITTED in files)
        incomplete = sorted(s for s, files in names.items() if COMMITTED not in files)
        return committed, incomplete

    def committed_steps(self) -> list[int]:
        return self._steps()[0]

    def _report(self, name: str, reason: str) -> None:
        log.warning("skipping checkpoint %s/%s: %s", self.store.url, name, reason)
        self.skipped.append((name, reason))

    def validate(self, step: int) -> str | None:
        """None when step's checkpoint is complete and intact as far as sizes and hashes go,
        else the reason it is not."""
        name = step_dir(step)
        try:
            marker = json.loads(self.store.get(f"{name}/{COMMITTED}"))
            if marker.get("step") != step:
                return f"{COMMITTED} records step {marker.get('step')!r}"
            for fname in (METADATA, META):
                if _sha256(self.store.get(f"{name}/{fname}")) != marker["sha256"][fname]:
                    return f"{fname} does not match the sha256 in {COMMITTED}"
            _, doc = parse_metadata(self.store.get(f"{name}/{METADATA}"), f"{name}/{METADATA}")
            for obj, size in marker["objects"].items():
                if doc["objects"].get(obj) != size:
                    return f"{COMMITTED} and {METADATA} disagree about {obj}"
                actual = self.store.size(f"{name}/{obj}")
                if actual != size:
                    return f"object {obj} has {actual} bytes, {size} were written"
        except NotFound as e:
            return f"missing object ({e})"
        except (ValueError, KeyError, TypeError, AttributeError, CorruptCheckpoint) as e:
            return f"{type(e).__name__}: {e}"
        return None

    # -- save ------------------------------------------------------------------------------

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None,
             ) -> str:
        """Write a checkpoint of `tensors` (flat FQN -> tensor, see state.py) and `meta` (JSON-able,
        rank 0's copy is kept) for `step`; returns its name once committed on every rank."""
        name = step_dir(step)
        meta_bytes = json.dumps({"step": step, **(meta or {})}, sort_keys=True).encode()
        if _rank() == 0:
            for key in self.store.list(f"{name}/"):  # leftovers of an interrupted attempt
                self.store.delete(key)
        _barrier()
        with warnings.catch_warnings():  # DCP warns that no process group means one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensors, storage_writer=StoreWriter(self.store, name),
                     planner=DefaultSavePlanner(), no_dist=not _dist())
        if _rank() == 0:
            meta_doc = self.store.get(f"{name}/{METADATA}")
            _, doc = parse_metadata(meta_doc, f"{name}/{METADATA}")
            self.store.put(f"{name}/{META}", meta_bytes)
            marker = {"step": step, "objects": doc["objects"],
                      "sha256": {METADATA: _sha256(meta_doc), META: _sha256(meta_bytes)}}
            self.store.put(f"{name}/{COMMITTED}", json.dumps(marker, sort_keys=True).encode())
            self._prune(step)
        _barrier()
        return name

    def _prune(self, newest: int) -> None:
        """Retention after saving `newest` (module docstring); rank 0 only."""
        committed, incomplete = self._steps()
        for s in committed:
            if s > newest:
                self.quarantine(s, f"newer than step {newest}, which a run saved after resuming "
                                   "from an older checkpoint (an abandoned timeline)")
        kept, doomed = [newest], [s for s in incomplete if s < newest]
        for s in reversed([s for s in committed if s < newest]):
            if len(kept) >= self.keep_last:
                doomed.append(s)
                continue
            reason = self.validate(s)
            if reason is None:
                kept.append(s)
            else:
                self.quarantine(s, f"failed validation: {reason}")
        for s in doomed:
            self._delete(step_dir(s))

    def _delete(self, prefix: str) -> None:
        keys = self.store.list(f"{prefix}/")
        # The marker goes first: a half-deleted checkpoint must never look complete.
        for key in sorted(keys, key=lambda k: not k.endswith(f"/{COMMITTED}")):
            self.store.delete(key)

    # -- quarantine ------------------------------------------------------------------------

    def quarantine(self, step: int, reason: str) -> str:
        """Move step's checkpoint to quarantine/<n>/ with a note of `reason`; returns where it
        went. Rank 0 only. The copy's marker is written last and the original's deleted first,
        so an interrupted move leaves a complete copy, an incomplete original or both intact."""
        name = step_dir(step)
        taken = [int(k.split("/")[1]) for k in self.store.list(f"{QUARANTINE}/")
                 if k.count("/") >= 2 and k.split("/")[1].isdigit()]
        dest = f"{QUARANTINE}/{max(taken, default=0) + 1:06d}"
        keys = sorted(self.store.list(f"{name}/"), key=lambda k: k.endswith(f"/{COMMITTED}"))
        self.store.put(f"{dest}/{name}/{QUARANTINED}",
                       json.dumps({"step": step, "reason": reason}, sort_keys=True).encode())
        for key in keys:
            self.store.put(f"{dest}/{key}", self.store.get(key))
        self._delete(name)
        where = f"{self.store.url}/{dest}/{name}"
        log.warning("quarantined checkpoint %s/%s as %s: %s", self.store.url, name, where, reason)
        self.quarantined.append((name, where, reason))
        return where

    # -- load ------------------------------------------------------------------------------

    def resume(self, tensors: dict[str, torch.Tensor], *,
               optional: tuple[str, ...] = ("rng/",)) -> Loaded | None:
        """`load_latest` for a run that goes on training from what it loads: afterwards rank 0
        quarantines every committed checkpoint newer than the loaded one (every one, when none
        loaded), since the run's saves replace that abandoned timeline."""
        loaded = self.load_latest(tensors, optional=optional)
        if _rank() == 0:
            start = loaded.step if loaded is not None else -1
            why = dict(self.skipped)
            for s in self.committed_steps():
                if s > start:
                    reason = why.get(step_dir(s), "passed over")
                    resumed = f"step {start}" if loaded is not None else "no checkpoint"
                    self.quarantine(s, f"{reason}; the run resumed from {resumed}")
        return loaded

    def load_latest(self, tensors: dict[str, torch.Tensor], *,
                    optional: tuple[str, ...] = ("rng/",)) -> Loaded | None:
        """Load the newest intact checkpoint into `tensors` in place; None when there is none.

        Every key of `tensors` must be in the checkpoint with the same shape and dtype, except
        keys starting with a prefix in `optional` (e.g. per-rank RNG states after a change of
        world size), which are left alone and listed in `Loaded.missing`.
        """
        tried: set[int] = set()
        while True:
            step = -1
            if _rank() == 0:
                committed, incomplete = self._steps()
                for s in reversed(committed):
                    if s in tried:
                        continue
                    reason = self.validate(s)
                    if reason is None:
                        step = s
                        break
                    self._report(step_dir(s), reason)
                    tried.add(s)
                for s in incomplete:
                    if s > step and s not in tried:
                        self._report(step_dir(s), f"incomplete: no {COMMITTED} marker "
                                                  "(the write was interrupted)")
                        tried.add(s)
            step = _broadcast_int(step)
            if step < 0:
                return None
            try:
                return self._load(step, tensors, optional)
            except (CorruptCheckpoint, StoreError, CheckpointException) as e:
                # DCP gathers every rank's failure and raises on all ranks alike. Only damaged
                # data makes us fall back to an older checkpoint; any other error is a bug.
                reason = _damage(e)
                if reason is None:
                    raise
                self._report(step_dir(step), f"load failed: {reason}")
                tried.add(step)

    def _load(self, step: int, tensors: dict[str, torch.Tensor], optional: tuple[str, ...]) -> Loaded:
        name = step_dir(step)
        metadata, _ = parse_metadata(self.store.get(f"{name}/{METADATA}"), f"{name}/{METADATA}")
        stored = metadata.state_dict_metadata
        missing = [k for k in tensors if k not in stored]
        problem = _mismatch(self.store.url, name, tensors, stored, missing, optional)
        # Every rank must agree before the collective load, or the healthy ranks would hang.
        if _dist():
            flag = torch.tensor([int(problem is not None)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and problem is None:
                problem = "another rank's state does not match the checkpoint (see its error)"
        if problem is not None:
            raise ValueError(problem)
        fresh = {k: torch.empty_like(t, device="cpu") for k, t in tensors.items() if k in stored}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(fresh, storage_reader=StoreReader(self.store, name),
                     planner=DefaultLoadPlanner(allow_partial_load=False), no_dist=not _dist())
        meta = json.loads(self.store.get(f"{name}/{META}"))
        with torch.no_grad():
            for k, t in fresh.items():
                tensors[k].copy_(t)
        return Loaded(step=step, meta=meta, name=name, missing=missing)


def _mismatch(url: str, name: str, tensors: dict[str, torch.Tensor], stored: dict,
              missing: list[str], optional: tuple[str, ...]) -> str | None:
    """Why this rank's state cannot take the checkpoint (a config error, not damage), or None."""
    required = [k for k in missing if not k.startswith(optional)]
    if required:
        return (f"checkpoint {url}/{name} lacks {len(required)} entries, e.g. {required[:3]}; "
                "was it written by a different model config?")
    for key, t in tensors.items():
        if key in stored and (tuple(stored[key].size) != tuple(t.shape)
                              or stored[key].properties.dtype != t.dtype):
            return (f"checkpoint {url}/{name}: {key} is {stored[key].properties.dtype} "
                    f"{tuple(stored[key].size)} there and {t.dtype} {tuple(t.shape)} here "
                    "(model config differs?)")
    return None


def _damage(e: BaseException) -> str | None:
    """The reason when e means damaged or unreadable stored data, else None."""
    if isinstance(e, StoreUnavailable):  # the store is down, the checkpoint may be fine
        return None
    if isinstance(e, (CorruptCheckpoint, StoreError)):
        return f"{type(e).__name__}: {e}"
    if isinstance(e, CheckpointException):
        reasons = [_damage(exc) for exc, _ in e.failures.values()]
        if reasons and all(reasons):
            return "; ".join(sorted(set(reasons)))
    return None

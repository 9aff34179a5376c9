"""Checkpoint directories: commit protocol, discovery, validation and retention.

A checkpoint of step N lives under `<root>/step-0000000N/` (root: a local directory or
s3://bucket/prefix, through data.store). Object stores cannot rename, so completeness is a
marker, the same for both backends:

  1. (main thread, every rank) a save still in flight is waited for; the ranks agree on a plan:
     an attempt id, which rank writes each chunk (replicas are written once, spread by bytes)
     and which weights need no bytes of their own (below). The plan depends only on the ranks'
     chunk lists (keys, offsets, sizes, dtypes), so the last one is kept: one all_reduce of a
     flag says whether every rank's list is unchanged (and carries rank 0's new attempt id);
     only if one changed do the ranks plan afresh (one gather, one scatter). No store request.
     Each rank then copies the chunks it writes to host memory (pinned on CUDA), and the
     owner of each master the weight rows it covers. This copy is all that training waits for
     (staging.py).
  2. (background thread, every rank) the owner compares those weight rows with its masters
     rounded; the chunks, and the weight rows that do not round, are written
     (storage.write_chunks: parallel parts, every object durable), then a done marker
     `done/<attempt>/rank-RRRRR.json` with the rank's item records and weight rows (or the
     error that stopped it);
  3. (rank 0's background thread) once every rank's done marker of this attempt is there, it
     deletes whatever an earlier, interrupted attempt left under the step, writes
     `metadata.json`, then `meta.json` (small JSON state: step, data-loader state, ...) and
     then `COMMITTED` LAST: it records the sha256 of metadata.json and meta.json and the size
     of every data object. No COMMITTED, no checkpoint: a kill at any moment of steps 1-3
     leaves the previous one intact.
  4. rank 0 applies retention (`_prune`, below) and deletes incomplete checkpoints older than
     the new one (left by a crash).
The background thread never runs a collective (it would race the training's on the same process
group): ranks agree through the done markers in the store. `async_save=False` runs steps 2-4 in
the caller and ends with a barrier, so `save` returns once the checkpoint is committed.

No redundant bytes: a weight whose every row has an fp32 master on a rank that holds the row too
(ZeRO-1's owner) is listed under `from_master` in metadata.json and a load reads the master's
bytes into it (a cast, as ZeRO-1 does after each step). That decision is layout only; the values
are checked in the background: rows where the weight is not bit for bit its master rounded
(QK-Clip scales weights and masters separately, which can break it in bf16) are stored as chunks
of the weight, and a load lays them over the rebuilt weight. A weight with every row stored is an
ordinary tensor. Expert stacks are one logical tensor each (layout.py).

Loading takes the newest checkpoint that validates. Rank 0 reads the marker and the small
metadata (marker parses, hashes match) and broadcasts them; every rank then checks only the
objects it reads (their size, then every item's CRC32), so requests per rank follow its own
shards. One small collective agrees on the outcome: damage found by any rank skips the
checkpoint on every rank, with the damaged object named. Anything that fails is logged with its
name and the reason, recorded in `skipped`, and the next older one is tried. Tensors are read
into fresh buffers and copied into the live state only once the whole load succeeded, so a
corrupt checkpoint never leaves a half-loaded model behind.

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
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from data.store import NotFound, ObjectStore, StoreError, open_store
from train.checkpoint import ranks
from train.checkpoint.layout import entries
from train.checkpoint.load_plan import damage_reason, read_plan
from train.checkpoint.save_plan import RowCheck, override_chunks, with_overrides
from train.checkpoint.staging import SaveStaging
from train.checkpoint.storage import (METADATA, CorruptCheckpoint, Staged, build_metadata,
                                      parse_metadata, read_chunks, write_chunks)
from train.errors import InvalidInput

log = logging.getLogger("mmpt.checkpoint")

COMMITTED = "COMMITTED"
META = "meta.json"
DONE = "done"  # per-rank done markers: <step>/done/rank-RRRRR.json
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


class CheckpointWriteError(RuntimeError):
    """A background checkpoint write failed (raised at the next save or wait)."""


@dataclass
class _Pending:
    """A save whose writes (and, on rank 0, commit) run in a background thread."""

    step: int
    name: str
    started: float
    attempt: str = ""  # this attempt's id: done markers of an interrupted one never count
    thread: threading.Thread | None = None
    error: BaseException | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class CheckpointManager:
    """Save / find / load / prune checkpoints under one root URL (all ranks call save and load)."""

    def __init__(self, root: str | ObjectStore, keep_last: int = 3, *, async_save: bool = False,
                 concurrency: int = 8, part_bytes: int = 16 << 20, object_bytes: int = 512 << 20):
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={keep_last} must be >= 1")
        self.store = open_store(root) if isinstance(root, str) else root
        self.keep_last = keep_last
        self.async_save, self.concurrency = async_save, concurrency
        self.part_bytes, self.object_bytes = part_bytes, object_bytes
        self._pending: _Pending | None = None
        self._staging = SaveStaging(asynchronous=async_save)
        self.last_save: dict[str, Any] = {}  # figures of the newest finished save
        self.last_load: dict[str, Any] = {}  # figures of the newest load
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

    def _check_marker(self, step: int) -> tuple[str | None, dict | None]:
        """(None, {"metadata": bytes, "meta": bytes, "doc": parsed metadata}) when step's marker
        is intact and its hashes match metadata.json and meta.json, else (the reason, None).
        Reads three small objects: what rank 0 checks before a load."""
        name = step_dir(step)
        try:
            marker = json.loads(self.store.get(f"{name}/{COMMITTED}"))
            if marker.get("step") != step:
                return f"{COMMITTED} records step {marker.get('step')!r}", None
            raw = {}
            for fname in (METADATA, META):
                raw[fname] = self.store.get(f"{name}/{fname}")
                if _sha256(raw[fname]) != marker["sha256"][fname]:
                    return f"{fname} does not match the sha256 in {COMMITTED}", None
            _, doc = parse_metadata(raw[METADATA], f"{name}/{METADATA}")
            for obj, size in marker["objects"].items():
                if doc["objects"].get(obj) != size:
                    return f"{COMMITTED} and {METADATA} disagree about {obj}", None
            if set(doc["objects"]) != set(marker["objects"]):
                return f"{COMMITTED} and {METADATA} list different objects", None
        except NotFound as e:
            return f"missing object ({e})", None
        except (ValueError, KeyError, TypeError, AttributeError, CorruptCheckpoint) as e:
            return f"{type(e).__name__}: {e}", None
        return None, {"metadata": raw[METADATA], "meta": raw[META], "doc": doc}

    def validate(self, step: int) -> str | None:
        """None when step's checkpoint is complete and intact as far as sizes and hashes go,
        else the reason it is not (the marker check, then one size request per object)."""
        reason, found = self._check_marker(step)
        if reason is not None:
            return reason
        name = step_dir(step)
        try:
            for obj, size in found["doc"]["objects"].items():
                actual = self.store.size(f"{name}/{obj}")
                if actual != size:
                    return f"object {obj} has {actual} bytes, {size} were written"
        except NotFound as e:
            return f"missing object ({e})"
        return None

    # -- save ------------------------------------------------------------------------------

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None,
             ) -> str:
        """Write a checkpoint of `tensors` (flat FQN -> tensor, see state.py) and `meta` (JSON-able,
        rank 0's copy is kept) for `step`; returns its name. Synchronous managers return once it
        is committed on every rank; asynchronous ones once this rank's state is copied to host
        memory (`wait` for the rest; the next save waits too)."""
        t0 = time.monotonic()
        self.wait()
        waited = time.monotonic() - t0
        name = step_dir(step)
        meta_bytes = json.dumps({"step": step, **(meta or {})}, sort_keys=True).encode()
        ents = entries(tensors)
        mine, checks, table, attempt, reused = self._staging.plan(ents)
        planned = time.monotonic()
        staged, rows = self._staging.stage(ents, mine, checks)
        job = _Pending(step=step, name=name, started=t0, attempt=attempt)
        job.stats = {"stall_s": time.monotonic() - t0, "wait_s": waited,
                     "plan_s": planned - t0 - waited, "stage_s": time.monotonic() - planned,
                     "plan_reused": reused,
                     "staged_bytes": sum(c.nbytes for c in staged)
                     + sum(r.weight.numel() * r.weight.element_size() for r in rows)}
        if not self.async_save:
            self._write(job, staged, rows, table, meta_bytes)
            self._pending = job
            self.wait()
            ranks.barrier()
            return name
        job.thread = threading.Thread(target=self._write,
                                      args=(job, staged, rows, table, meta_bytes),
                                      name=f"ckpt-save-{step}", daemon=True)
        self._pending = job
        job.thread.start()
        return name

    def wait(self) -> dict[str, Any] | None:
        """Wait for the save in flight (rank 0: until it is committed); returns its figures
        (None when none was in flight). Raises CheckpointWriteError if it failed."""
        job, self._pending = self._pending, None
        if job is None:
            return None
        if job.thread is not None:
            job.thread.join()
        if job.error is not None:
            raise CheckpointWriteError(f"checkpoint {self.store.url}/{job.name} was not "
                                       f"written: {job.error}") from job.error
        self.last_save = {"step": job.step, "name": job.name, **job.stats}
        return self.last_save

    def close(self) -> None:
        """Before exit: the last save is waited for and committed on every rank."""
        self.wait()
        ranks.barrier()

    def _write(self, job: _Pending, staged: list[Staged], rows: list[RowCheck],
               table: dict | None, meta_bytes: bytes) -> None:
        """Steps 2-4 of the protocol (module docstring); failures land in job.error."""
        rank, name = ranks.rank(), job.name
        t0 = time.monotonic()
        done = f"{name}/{DONE}/{job.attempt}/rank-{rank:05d}.json"
        try:
            if rank == 0:  # a re-save of a committed step: never a marker over new bytes
                self.store.delete(f"{name}/{COMMITTED}")
            try:
                overrides = override_chunks(rows)
                chunks = staged + overrides
                records = write_chunks(self.store, name, rank, chunks,
                                       object_bytes=self.object_bytes, part_bytes=self.part_bytes,
                                       concurrency=self.concurrency)
            except BaseException as e:
                self.store.put(done, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
                raise
            report = {"items": records, "overrides": [
                {"key": c.key, "offsets": list(c.offsets), "sizes": list(c.tensor.shape)}
                for c in overrides]}
            self.store.put(done, json.dumps(report).encode())
            job.stats.update(write_s=time.monotonic() - t0, chunks=len(chunks),
                             bytes=sum(c.nbytes for c in chunks),
                             override_bytes=sum(c.nbytes for c in overrides))
            if rank == 0:
                self._commit(job.step, name, table, meta_bytes, job.attempt)
                job.stats["commit_s"] = time.monotonic() - t0
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            job.error = e
            log.error("checkpoint %s/%s: background write failed: %s", self.store.url, name, e)

    def _commit(self, step: int, name: str, table: dict, meta_bytes: bytes, attempt: str) -> None:
        """Rank 0: wait for every rank's done marker of this attempt, drop what an interrupted
        attempt left under the step, then metadata, meta and COMMITTED."""
        world, delay, waited = ranks.world(), 0.01, time.monotonic()
        while True:
            done = self.store.list(f"{name}/{DONE}/{attempt}/")
            if len(done) >= world:
                break
            if time.monotonic() - waited > 60:
                log.warning("checkpoint %s/%s: %d of %d ranks have written their shards",
                            self.store.url, name, len(done), world)
                waited = time.monotonic()
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        items, overrides, failed = [], [], []
        for key in done:
            report = json.loads(self.store.get(key))
            if "error" in report:
                failed.append(f"{key.rpartition('/')[2]}: {report['error']}")
            else:
                items += report["items"]
                overrides += report["overrides"]
        if failed:
            raise CheckpointWriteError("; ".join(failed))
        stored, from_master = with_overrides(table, overrides)
        meta_doc = build_metadata(stored, items, from_master)
        _, doc = parse_metadata(meta_doc, f"{name}/{METADATA}")
        ours = {f"{name}/{obj}" for obj in doc["objects"]} | set(done)
        for key in self.store.list(f"{name}/"):  # leftovers of an interrupted attempt
            if key not in ours:
                self.store.delete(key)
        self.store.put(f"{name}/{METADATA}", meta_doc)
        self.store.put(f"{name}/{META}", meta_bytes)
        marker = {"step": step, "objects": doc["objects"],
                  "sha256": {METADATA: _sha256(meta_doc), META: _sha256(meta_bytes)}}
        self.store.put(f"{name}/{COMMITTED}", json.dumps(marker, sort_keys=True).encode())
        self._prune(step)

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
        if ranks.rank() == 0:
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
        world size), which are left alone and listed in `Loaded.missing`. A weight stored only
        as its fp32 master is read from it (cast to the weight's dtype).
        """
        tried: set[int] = set()
        while True:
            step, found = -1, None
            if ranks.rank() == 0:
                committed, incomplete = self._steps()
                for s in reversed(committed):
                    if s in tried:
                        continue
                    reason, found = self._check_marker(s)
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
                found = (step, found["metadata"], found["meta"]) if found else (step, None, None)
            step, metadata_bytes, meta_bytes = ranks.broadcast(found)
            if step < 0:
                return None
            loaded, problem, damage, error = self._load(step, tensors, optional, metadata_bytes,
                                                        meta_bytes)
            # One small collective: every rank learns every rank's outcome, so all skip alike.
            outcomes = ranks.all_gather((problem, damage, None if error is None else
                                    f"{type(error).__name__}: {error}"))
            if error is not None:
                raise error
            others = [(r, o) for r, o in enumerate(outcomes) if r != ranks.rank()]
            # A state that cannot take the checkpoint is a config error, not damage: every rank
            # raises the lowest failing rank's reason, so rank 0 can report it.
            problem = next((o[0] for o in outcomes if o[0] is not None), None)
            if problem is not None:
                raise InvalidInput(f"{problem}; use the config of the run that wrote it, or "
                                   "another checkpoint.dir (one per model config)")
            if any(o[2] for _, o in others):
                raise RuntimeError("loading checkpoint failed on rank(s) "
                                   + ", ".join(f"{r} ({o[2]})" for r, o in others if o[2]))
            damages = sorted({o[1] for o in outcomes if o[1]})
            if damages:
                self._report(step_dir(step), "load failed: " + "; ".join(damages))
                tried.add(step)
                continue
            return loaded

    def _load(self, step: int, tensors: dict[str, torch.Tensor], optional: tuple[str, ...],
              metadata_bytes: bytes, meta_bytes: bytes):
        """This rank's part of a load: (Loaded or None, config problem, damage, other error);
        the live state changes only when all three are None."""
        name = step_dir(step)
        t0 = time.monotonic()
        try:
            metadata, doc = parse_metadata(metadata_bytes, f"{name}/{METADATA}")
            stacks = doc["format"] != "mmpt-dcp-v1"  # v1 stored one key per routed expert
            plan, missing, problem = read_plan(
                self.store.url, name, entries(tensors, stacks=stacks),
                metadata.state_dict_metadata, set(doc["from_master"]), optional)
            if problem is not None:
                return None, problem, None, None
            reads = [r for _, _, rs, _ in plan for r in rs]
            overlays = [r for _, _, _, rs in plan for r in rs]
            requests = read_chunks(self.store, name, metadata, doc, reads, after=overlays,
                                   concurrency=self.concurrency)
        except (CorruptCheckpoint, StoreError) as e:
            reason = damage_reason(e)
            if reason is None:
                return None, None, None, e
            return None, None, reason, None
        except Exception as e:  # noqa: BLE001 - every rank must reach the agreement collective
            return None, None, None, e
        with torch.no_grad():
            for entry, fresh, _, _ in plan:
                entry.tensor.copy_(fresh)
        self.last_load = {"step": step, "requests": requests, "seconds": time.monotonic() - t0,
                          "bytes": sum(f.numel() * f.element_size() for _, f, _, _ in plan)}
        return Loaded(step=step, meta=json.loads(meta_bytes), name=name, missing=missing), \
            None, None, None

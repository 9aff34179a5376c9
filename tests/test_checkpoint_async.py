"""Checkpoints at scale: asynchronous saves, expert stacks as chunked logical tensors, weights
rebuilt from fp32 masters, per-rank validation, parallel part uploads, throttling."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from data.store import LocalStore
from tests.dist import run_distributed
from tests.test_checkpoint import (META, _assert_layout_free, _load_body, _numpy, _replica,
                                   _save_body, _train)
from train.checkpoint import CheckpointManager, step_dir, training_state


def _metadata(root, step):
    return json.loads((root / step_dir(step) / "metadata.json").read_text())


class _GatedWrites:
    """A store whose data-part writes wait for `gate`; records the order of part writes."""

    def __init__(self, store):
        self._store, self.gate, self.log = store, threading.Event(), []

    def open_upload(self, key, size, part_size):
        up, gate, log = self._store.open_upload(key, size, part_size), self.gate, self.log

        class Gated:
            def write(self, offset, data):
                gate.wait()
                log.append(("write", key))
                up.write(offset, data)

            def commit(self):
                up.commit()
                log.append(("commit", key))

            def abort(self):
                up.abort()

        return Gated()

    def __getattr__(self, name):
        return getattr(self._store, name)


def _state(seed):
    from tests.test_checkpoint import _model_state

    return _model_state(seed)


# ------------------------------------------------------------------------------------------
# 1. Asynchronous save
# ------------------------------------------------------------------------------------------


def test_async_save_returns_before_the_write_and_saves_the_state_of_the_call(tmp_path):
    store = _GatedWrites(LocalStore(tmp_path))
    mgr = CheckpointManager(store, async_save=True)
    state = _state(0)
    saved = {k: v.clone() for k, v in state.items()}
    mgr.save(5, state, meta=META)  # returns although no byte can be written yet
    assert not (tmp_path / step_dir(5) / "COMMITTED").exists()
    assert mgr._pending is not None and mgr._pending.thread.is_alive()
    with torch.no_grad():  # training goes on and changes the live state
        for v in state.values():
            v.add_(1) if v.is_floating_point() else None
    store.gate.set()
    done = mgr.wait()
    assert done["step"] == 5 and done["stall_s"] < done["commit_s"]
    assert mgr.validate(5) is None
    target = _state(1)
    loaded = CheckpointManager(str(tmp_path)).load_latest(target)
    assert loaded.step == 5 and loaded.meta == {"step": 5, **META}
    for k, v in saved.items():
        assert torch.equal(target[k], v), k  # the state at the call, not the changed one


def test_next_save_waits_for_the_one_in_flight(tmp_path):
    store = _GatedWrites(LocalStore(tmp_path))
    mgr = CheckpointManager(store, async_save=True, keep_last=5)
    mgr.save(1, _state(0))
    threading.Timer(0.5, store.gate.set).start()
    mgr.save(2, _state(1))  # blocks until step 1 is written and committed
    assert (tmp_path / step_dir(1) / "COMMITTED").exists()
    mgr.close()
    first = [i for i, (_, key) in enumerate(store.log) if key.startswith(step_dir(1))]
    second = [i for i, (_, key) in enumerate(store.log) if key.startswith(step_dir(2))]
    assert first and second and max(first) < min(second)  # never overlapped
    assert mgr.committed_steps() == [1, 2]


def _async_two_ranks(rank, world, root):
    import torch.distributed as dist

    store = LocalStore(root)
    if rank == 1:  # rank 1 is slow: rank 0's commit must wait for its done marker
        store = _GatedWrites(store)
        threading.Timer(1.0, store.gate.set).start()
    model, opt = _replica(rank, world, 2)
    _train(model, opt, 2)
    state = training_state(model, opt, rank)
    mgr = CheckpointManager(store, async_save=True)
    t0 = time.monotonic()
    mgr.save(2, state, meta=META)
    stall = time.monotonic() - t0
    mgr.wait()
    committed = (root / step_dir(2) / "COMMITTED").exists()
    dist.barrier()
    mgr.close()
    return stall, committed, _numpy(state)


def test_async_commit_waits_for_every_rank(tmp_path):
    root = tmp_path / "ckpt"
    out = run_distributed(_async_two_ranks, 2, root)
    assert out[0][0] < 1.0  # rank 0 did not wait for rank 1's slow write to return from save
    assert out[0][1]  # rank 0's wait returns once committed
    done = root / step_dir(2) / "done"
    assert (root / step_dir(2) / "COMMITTED").stat().st_mtime_ns >= max(
        p.stat().st_mtime_ns for p in done.iterdir())
    _assert_layout_free([o[2] for o in out], run_distributed(_load_body, 1, str(root), 1))


# ------------------------------------------------------------------------------------------
# 3. Expert stacks as one chunked tensor; resharding EP2 -> EP4 -> EP1
# ------------------------------------------------------------------------------------------


def _resave_body(rank, world, src, dst, ep):
    model, opt = _replica(rank, world, ep, seed=3)
    state = training_state(model, opt, rank)
    assert CheckpointManager(src).load_latest(state).step == 2
    CheckpointManager(dst).save(2, state, meta=META)
    return _numpy(state)


def test_expert_stacks_are_chunks_of_one_tensor_and_reshard_ep2_ep4_ep1(tmp_path):
    a, b = tmp_path / "ep2", tmp_path / "ep4"
    saved = run_distributed(_save_body, 2, str(a), 2, 2)
    doc = _metadata(a, 2)
    assert not any("/expert-" in k for k in doc["tensors"])  # one entry per stack, not per expert
    # Under ZeRO-1 the bf16/fp32 weights come from their masters (`from_master`), so the stacks
    # stored are the masters and optimizer state: one chunked tensor each.
    experts = [k for k in doc["tensors"] if k.endswith("experts.w_up")]
    assert experts and any(k.startswith("master/") for k in experts)
    assert all(k.startswith("model/") for k in doc["from_master"])
    for k in experts:
        t = doc["tensors"][k]
        assert t["size"][0] == 4 and [c["offsets"][0] for c in t["chunks"]] == [0, 2]
    four = run_distributed(_resave_body, 4, str(a), str(b), 4)
    _assert_layout_free(saved, [(2, {"step": 2, **META}, [], s) for s in four])
    chunks = _metadata(b, 2)["tensors"][experts[0]]["chunks"]
    assert [c["offsets"][0] for c in chunks] == [0, 1, 2, 3]
    _assert_layout_free(saved, run_distributed(_load_body, 1, str(b), 1))


# ------------------------------------------------------------------------------------------
# 3. Weights stored once: rebuilt from their fp32 masters
# ------------------------------------------------------------------------------------------


def _weights_and_masters(rank, world, root, perturb):
    """Every rank holds bf16 weights w0, w1 and an expert stack; rank r owns the fp32 masters
    of w<r> and of expert rows [2r, 2r+2) (ZeRO-1's split); one weight may be off its master."""
    gen = torch.Generator().manual_seed(0)
    masters = {"w0": torch.randn(6, 4, generator=gen), "w1": torch.randn(3, generator=gen),
               "experts": torch.randn(4, 2, 3, generator=gen)}
    state = {f"model/{k}": v.to(torch.bfloat16) for k, v in masters.items() if k != "experts"}
    stack = masters["experts"].to(torch.bfloat16)
    state.update({f"model/experts/expert-{e}": stack[e] for e in range(4)})
    if perturb:
        state["model/w1"] = state["model/w1"] + 1  # no longer its master rounded
    state[f"master/w{rank}"] = masters[f"w{rank}"]
    state.update({f"master/experts/expert-{e}": masters["experts"][e]
                  for e in range(2 * rank, 2 * rank + 2)})
    mgr = CheckpointManager(root)
    mgr.save(1, state)
    written = mgr.last_save["bytes"]
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    CheckpointManager(root).load_latest(target)
    return written, {k: torch.equal(target[k], v) for k, v in state.items()}


@pytest.mark.parametrize("perturb", [False, True], ids=["exact", "w1-off-its-master"])
def test_weights_are_rebuilt_from_masters_instead_of_stored(tmp_path, perturb):
    out = run_distributed(_weights_and_masters, 2, str(tmp_path), perturb)
    assert all(all(same.values()) for _, same in out), out  # every rank gets its weights back
    doc = _metadata(tmp_path, 1)
    want = ["model/experts", "model/w0"] + ([] if perturb else ["model/w1"])
    assert doc["from_master"] == want
    assert all(k not in doc["tensors"] for k in want)
    masters_bytes = (24 + 3 + 24) * 4
    assert sum(w for w, _ in out) == masters_bytes + (3 * 2 if perturb else 0)


def _some_rows_off(rank, world, root):
    """As _weights_and_masters, with rows 2-3 of w0 (owned by rank 0) and expert 3 (owned by
    rank 1) off their masters, and w1's first element -0.0 where its master is 0.0 (equal as
    numbers, other bits)."""
    gen = torch.Generator().manual_seed(0)
    masters = {"w0": torch.randn(6, 4, generator=gen), "w1": torch.randn(3, generator=gen),
               "experts": torch.randn(4, 2, 3, generator=gen)}
    masters["w1"][0] = 0.0
    weights = {k: v.to(torch.bfloat16) for k, v in masters.items()}
    weights["w0"][2:4] += 1
    weights["experts"][3] *= 3
    weights["w1"][0] = -0.0
    state = {"model/w0": weights["w0"], "model/w1": weights["w1"]}
    state.update({f"model/experts/expert-{e}": weights["experts"][e] for e in range(4)})
    state[f"master/w{rank}"] = masters[f"w{rank}"]
    state.update({f"master/experts/expert-{e}": masters["experts"][e]
                  for e in range(2 * rank, 2 * rank + 2)})
    mgr = CheckpointManager(root, async_save=True)
    mgr.save(1, state)
    mgr.close()
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    CheckpointManager(root).load_latest(target)
    same = {k: torch.equal(target[k].view(torch.uint8), v.view(torch.uint8))
            for k, v in state.items()}
    return mgr.last_save["bytes"], same, _numpy({k: v.view(torch.int16) for k, v in state.items()
                                                 if k.startswith("model/")})


def _load_weights(rank, world, root):
    shapes = {"model/w0": (6, 4), "model/w1": (3,)}
    shapes.update({f"model/experts/expert-{e}": (2, 3) for e in range(4)})
    target = {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    CheckpointManager(root).load_latest(target)
    return _numpy({k: v.view(torch.int16) for k, v in target.items()})


def test_weight_rows_off_their_masters_are_stored_and_laid_over_the_rebuilt_weight(tmp_path):
    out = run_distributed(_some_rows_off, 2, str(tmp_path))
    assert all(all(same.values()) for _, same, _ in out), out  # bit for bit, -0.0 included
    doc = _metadata(tmp_path, 1)
    assert doc["from_master"] == ["model/experts", "model/w0", "model/w1"]
    assert doc["tensors"]["model/w0"]["chunks"] == [{"offsets": [2, 0], "sizes": [2, 4]}]
    assert doc["tensors"]["model/w1"]["chunks"] == [{"offsets": [0], "sizes": [1]}]
    assert doc["tensors"]["model/experts"]["chunks"] == [{"offsets": [3, 0, 0],
                                                         "sizes": [1, 2, 3]}]
    masters_bytes = (24 + 3 + 24) * 4
    assert sum(w for w, _, _ in out) == masters_bytes + (2 * 4 + 1 + 2 * 3) * 2
    # One rank, which holds every expert: masters read from both ranks' chunks, rows laid over
    (one,) = run_distributed(_load_weights, 1, str(tmp_path))
    saved = out[0][2]
    for k, v in one.items():
        assert (v == saved[k]).all(), k


def _planned_saves(rank, world, root):
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(0)
    masters = {"w0": torch.randn(6, 4, generator=gen), "w1": torch.randn(3, generator=gen)}
    state = {f"model/{k}": v.to(torch.bfloat16) for k, v in masters.items()}
    state[f"master/w{rank}"] = masters[f"w{rank}"]
    state[f"optim/w{rank}/momentum_buffer"] = torch.full_like(masters[f"w{rank}"], 0.5)
    mgr = CheckpointManager(root, async_save=True, keep_last=5)
    reused, loads = [], []

    def save(step):
        mgr.save(step, state)
        reused.append(mgr.wait()["plan_reused"])
        dist.barrier()
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        CheckpointManager(root).load_latest(target)
        loads.append(all(torch.equal(target[k], v) for k, v in state.items()))

    save(1)
    save(2)  # the same layout and values: the plan is reused
    with torch.no_grad():  # values only: still the same plan; w0's row 5 now has bytes of its own
        state["model/w0"][5] += 1
        state["optim/w0/momentum_buffer"].mul_(2) if rank == 0 else None
    save(3)
    if rank == 1:  # one rank's chunk list changes: every rank plans afresh
        state["model/extra"] = torch.arange(5.0)
    save(4)
    save(5)
    mgr.close()
    return reused, loads


def test_the_plan_is_reused_while_the_layout_stays_and_made_afresh_when_it_changes(tmp_path):
    out = run_distributed(_planned_saves, 2, str(tmp_path))
    for reused, loads in out:
        assert reused == [False, True, True, False, True]
        assert all(loads)
    one, two = tmp_path / step_dir(1), tmp_path / step_dir(2)
    for f in sorted(p.name for p in one.iterdir() if p.is_file() and p.name != "meta.json"):
        if f != "COMMITTED":
            assert (one / f).read_bytes() == (two / f).read_bytes(), f  # reuse: the same bytes
    three = _metadata(tmp_path, 3)
    assert three["tensors"]["model/w0"]["chunks"] == [{"offsets": [5, 0], "sizes": [1, 4]}]
    assert "model/extra" in _metadata(tmp_path, 4)["tensors"]


def test_zero1_checkpoint_stores_no_weight_next_to_its_master(tmp_path):
    from tests.test_muonclip_parallel import WORLD, _body

    run_distributed(_body, WORLD, 2, str(tmp_path))
    doc = _metadata(tmp_path, max(int(d.name[5:]) for d in tmp_path.glob("step-*")))
    masters = {k.removeprefix("master/") for k in doc["tensors"] if k.startswith("master/")}
    assert masters and {k.removeprefix("model/") for k in doc["from_master"]} == masters
    assert not any(k.startswith("model/") and k.removeprefix("model/") in masters
                   for k in doc["tensors"])


# ------------------------------------------------------------------------------------------
# 4. Distributed validation
# ------------------------------------------------------------------------------------------


class _CountingStore:
    def __init__(self, store):
        self._store, self.calls = store, []

    def get(self, key, start=None, end=None):
        self.calls.append(("get", key))
        return self._store.get(key, start, end)

    def size(self, key):
        self.calls.append(("size", key))
        return self._store.size(key)

    def __getattr__(self, name):
        return getattr(self._store, name)


def _validating_load(rank, world, root):
    store = _CountingStore(LocalStore(root))
    model, opt = _replica(rank, world, 2, seed=1)
    state = training_state(model, opt, rank)
    mgr = CheckpointManager(store)
    loaded = mgr.load_latest(state)
    return loaded.step, mgr.skipped, store.calls


def test_each_rank_checks_what_it_reads_and_all_skip_a_damaged_object_alike(tmp_path):
    root = tmp_path / "ckpt"
    run_distributed(_save_body, 2, str(root), 2, 2)
    (root / step_dir(2)).rename(root / step_dir(1))  # an older, intact copy ...
    marker = json.loads((root / step_dir(1) / "COMMITTED").read_text())
    (root / step_dir(1) / "COMMITTED").write_text(json.dumps({**marker, "step": 1}))
    run_distributed(_save_body, 2, str(root), 2, 2)  # ... and step 2 again
    data = root / step_dir(2) / "data-00001-000"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 3] ^= 1
    data.write_bytes(bytes(blob))

    out = run_distributed(_validating_load, 2, root)
    assert [step for step, _, _ in out] == [1, 1]
    for _, skipped, _ in out:  # the same reason, naming the object, on every rank
        assert [n for n, _ in skipped] == [step_dir(2)]
        assert "data-00001-000" in skipped[0][1] and "checksum mismatch" in skipped[0][1]
    assert out[0][1] == out[1][1]
    small = {"COMMITTED", "metadata.json", "meta.json"}
    for rank, (_, _, calls) in enumerate(out):
        names = {key.rpartition("/")[2] for _, key in calls}
        assert (names & small) == (small if rank == 0 else set())  # rank 0 alone reads them
        sizes = [key for op, key in calls if op == "size"]
        assert len(sizes) == len(set(sizes))  # one size check per object read, per checkpoint
        assert not any("/done/" in key for _, key in calls)


# ------------------------------------------------------------------------------------------
# 2 + 5. Parallel part uploads to S3 through 30% SlowDown
# ------------------------------------------------------------------------------------------


def test_adaptive_concurrency_halves_on_throttling_and_grows_back():
    from data.s3_store import _AdaptiveLimit

    lim = _AdaptiveLimit(8)
    for _ in range(3):
        lim.acquire()
        lim.release(throttled=True)
    assert lim.limit == 1 and lim.cuts == 3
    for _ in range(1 + 2 + 3):
        lim.acquire()
        lim.release(throttled=False)
    assert lim.limit == 4


def test_s3_multipart_save_through_30_percent_slowdown_outlasts_the_old_budget(tmp_path):
    from data.embedded_s3 import EmbeddedS3
    from data.s3_store import S3Store
    from tests.fault_proxy import FaultProxy

    gen = torch.Generator().manual_seed(0)
    state = {f"model/w{i}": torch.randn(1 << 19, generator=gen) for i in range(12)}  # 24 MiB
    state["model/small"] = torch.arange(7.0)
    with EmbeddedS3(tmp_path / "s3", bucket="mmpt-ckpt-throttle") as s3, \
            FaultProxy(s3.endpoint, fraction=0.3, kinds=("slowdown",), seed=3,
                       max_faults_per_request=20) as proxy:
        # The checkpoint budget (minutes, many attempts) with a realistic backoff; the old
        # one (8 attempts within about 7 s) was the whole job's limit. Base 1.5 s: measured
        # 13-19 s of throttling on an idle machine (base 1 s could finish in under 7 s).
        store = S3Store(s3.bucket, "ckpt", endpoint_url=proxy.endpoint, access_key=s3.access_key,
                        secret_key=s3.secret_key, max_concurrency=4, max_attempts=1000,
                        retry_time=600.0, backoff_base=1.5, backoff_cap=8.0, seed=0)
        mgr = CheckpointManager(store, async_save=True, concurrency=4, part_bytes=5 << 20,
                                object_bytes=12 << 20)
        t0 = time.monotonic()
        mgr.save(3, state)
        done = mgr.wait()
        elapsed = time.monotonic() - t0
        stats = store.stats()
        assert proxy.counts.get("slowdown", 0) >= 5, proxy.counts
        assert elapsed > 7.0 and done["stall_s"] < 1.0, (elapsed, done)
        assert stats["retry_reasons"].get("SlowDown") == proxy.counts["slowdown"]
        assert stats["concurrency_cuts"] >= 1
        objects = _metadata_s3(s3.store("ckpt"))["objects"]
        assert len(objects) == 3 and max(objects.values()) > 10 << 20  # multipart objects
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        assert CheckpointManager(s3.store("ckpt")).load_latest(target).step == 3
        for k, v in state.items():
            assert torch.equal(target[k], v), k  # nothing lost


def _metadata_s3(store):
    return json.loads(store.get(f"{step_dir(3)}/metadata.json"))


@pytest.mark.parametrize("field,value", [("part_mib", 4), ("object_mib", 8), ("concurrency", 0)])
def test_checkpoint_write_options_are_validated(field, value):
    from train.config import load_config
    from train.errors import ConfigError

    with pytest.raises(ConfigError, match=f"checkpoint.{field}"):
        load_config("configs/tiny.toml", [f"--checkpoint.{field}={value}"])


def _v1_body(rank, world, root):
    import functools
    from unittest import mock

    import train.checkpoint.manager as manager
    import train.checkpoint.storage as storage
    from train.checkpoint.layout import entries

    model, opt = _replica(rank, world, 1)
    state = training_state(model, opt, rank)
    with mock.patch.object(manager, "entries", functools.partial(entries, stacks=False)), \
            mock.patch.object(storage, "FORMAT", "mmpt-dcp-v1"):
        CheckpointManager(root).save(2, state, meta=META)
    target_model, target_opt = _replica(rank, world, 1, seed=1)
    target = training_state(target_model, target_opt, rank)
    assert CheckpointManager(root).load_latest(target).step == 2
    return {k: torch.equal(target[k], v) for k, v in state.items()}


def test_a_checkpoint_of_the_per_expert_format_still_loads(tmp_path):
    """mmpt-dcp-v1 stored every routed expert as its own tensor; such checkpoints still load."""
    (same,) = run_distributed(_v1_body, 1, str(tmp_path))
    doc = _metadata(tmp_path, 2)
    assert doc["format"] == "mmpt-dcp-v1" and any("/expert-3" in k for k in doc["tensors"])
    assert same and all(same.values()), [k for k, ok in same.items() if not ok]

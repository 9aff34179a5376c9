"""Checkpoints: DCP over our object store, commit marker, skip damaged ones, keep-last-K, reshard."""

from __future__ import annotations

import hashlib
import json
import logging
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from data.store import LocalStore
from tests.dist import run_distributed
from train.checkpoint import CheckpointManager, restore_rng, step_dir, training_state
from train.config import ModelConfig
from train.model import init_weights
from train.model.lm import DecoderLM
from train.model.moe import GroupedExperts
from train.optim.muon import build_optimizer, is_expert_stack

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, first_k_dense=1,
                  intermediate_size=48, num_heads=4, q_lora_rank=16, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=16)
OPTIM = types.SimpleNamespace(lr=0.02, adamw_lr=3e-3, weight_decay=0.1, momentum=0.95,
                              betas=(0.9, 0.95), eps=1e-8)
META = {"loader": {"fingerprint": "abc123", "seed": 7, "windows": 12}}


def _grad(name: str, step: int, shape) -> torch.Tensor:
    """A gradient that depends only on (parameter name, step): the same at every layout."""
    seed = int.from_bytes(hashlib.blake2b(f"{name}:{step}".encode(), digest_size=6).digest(), "little")
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------
# A replica at some layout: DP `world` ranks, experts sharded over `ep` of them, optimizer
# state by whole-parameter ownership (round robin over names; expert shards by their holder).
# ------------------------------------------------------------------------------------------


def _replica(rank: int, world: int, ep: int, seed: int = 0):
    model = DecoderLM(CFG)
    init_weights(model, seed)
    if ep > 1:
        for module in model.modules():
            if isinstance(module, GroupedExperts):
                local = CFG.n_routed_experts // ep
                first = (rank % ep) * local
                for w in ("w_gate", "w_up", "w_down"):
                    full = getattr(module, w).detach()
                    setattr(module, w, nn.Parameter(full[first:first + local].clone()))
                module.first_expert = first
    names = sorted(n for n, p in model.named_parameters()
                   if not (ep > 1 and is_expert_stack(n, p)))
    owner = {n: i % world for i, n in enumerate(names)}
    opt = build_optimizer(model, OPTIM, ns_dtype=torch.float32,
                          owned=lambda n, p: owner.get(n, rank) == rank)
    return model, opt, owner


def _train(model, opt, owner, steps, start=0):
    experts = {n: m.first_expert for n, m in model.named_modules() if isinstance(m, GroupedExperts)}
    for step in range(start, start + steps):
        for name, p in model.named_parameters():
            if is_expert_stack(name, p):
                full = _grad(name, step, (CFG.n_routed_experts,) + tuple(p.shape[1:]))
                first = experts[name.rpartition(".")[0]]
                p.grad = full[first:first + p.shape[0]].clone()
            else:
                p.grad = _grad(name, step, p.shape)
        opt.step()
        if dist.is_initialized():  # owners publish their updated params (ZeRO-1's broadcast)
            for name, p in model.named_parameters():
                if name in owner:
                    dist.broadcast(p.data, src=owner[name])


def _numpy(state):
    return {k: v.detach().clone().numpy() for k, v in state.items()}


def _save_body(rank, world, root, ep, steps):
    model, opt, owner = _replica(rank, world, ep)
    _train(model, opt, owner, steps)
    state = training_state(model, opt, rank)
    CheckpointManager(root, keep_last=2).save(steps, state, meta=META)
    return _numpy(state)


def _load_body(rank, world, root, ep):
    model, opt, owner = _replica(rank, world, ep, seed=1)  # other values: the load must overwrite
    state = training_state(model, opt, rank)
    loaded = CheckpointManager(root).load_latest(state)
    return loaded.step, loaded.meta, loaded.missing, _numpy(state)


def _assert_layout_free(saved_by_rank, loaded_by_rank):
    saved = {}
    for st in saved_by_rank:
        for k, v in st.items():
            if not k.startswith("rng/"):
                if k in saved:  # replicas agree (the broadcast), so dedup may keep any copy
                    assert (saved[k] == v).all(), k
                saved[k] = v
    restored_optim = set()
    for step, meta, missing, st in loaded_by_rank:
        assert step == 2 and meta == {"step": 2, **META}
        for k, v in st.items():
            if k.startswith("rng/"):
                continue
            assert (v == saved[k]).all(), k  # bit for bit
            restored_optim.add(k) if k.startswith("optim/") else None
    assert restored_optim == {k for k in saved if k.startswith("optim/")}


def test_two_rank_save_loads_at_one_and_four_ranks(tmp_path):
    """Saved at DP2 with EP2 and sharded optimizer state; loaded at 1 rank and at DP4 x EP4."""
    root = str(tmp_path / "ckpt")
    saved = run_distributed(_save_body, 2, root, 2, 2)
    assert any("expert-3" in k for k in saved[1]) and not any("expert-3" in k for k in saved[0])
    one = run_distributed(_load_body, 1, root, 1)
    assert one[0][2] == []  # rank 0's RNG state is there
    _assert_layout_free(saved, one)
    four = run_distributed(_load_body, 4, root, 4)
    assert four[3][2] == ["rng/rank-3/cpu"]  # no rank 3 before: optional, reported, untouched
    _assert_layout_free(saved, four)


# ------------------------------------------------------------------------------------------
# Single process: exact resume, damaged checkpoints, retention
# ------------------------------------------------------------------------------------------


def _batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(5, 64, (2, 16), generator=gen)
    return ids, torch.arange(16).expand(2, -1), torch.zeros_like(ids)


def _real_steps(model, opt, start, steps):
    losses = []
    for step in range(start, start + steps):
        ids, pos, doc = _batch(step)
        logits = model(ids, position_ids=pos, doc_ids=doc)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_resume_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = DecoderLM(CFG)
    init_weights(model, 0)
    opt = build_optimizer(model, OPTIM)
    _real_steps(model, opt, 0, 2)
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    mgr.save(2, training_state(model, opt), meta=META)
    straight = _real_steps(model, opt, 2, 3) + [torch.rand(3).tolist()]

    resumed_model = DecoderLM(CFG)
    init_weights(resumed_model, 5)
    resumed_opt = build_optimizer(resumed_model, OPTIM)
    state = training_state(resumed_model, resumed_opt)
    torch.manual_seed(123)  # a different generator state, restored from the checkpoint
    loaded = mgr.load_latest(state)
    assert loaded.step == 2 and loaded.meta["loader"] == META["loader"]
    assert restore_rng(state, 0, loaded.missing)
    resumed = _real_steps(resumed_model, resumed_opt, 2, 3) + [torch.rand(3).tolist()]
    assert resumed == straight
    for (n, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), n
    for n, buf in model.named_buffers():
        assert torch.equal(buf, dict(resumed_model.named_buffers())[n]), n


def _model_state(seed):
    model = DecoderLM(CFG)
    init_weights(model, seed)
    opt = build_optimizer(model, OPTIM)
    opt.init_state()
    return training_state(model, opt)


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte in data": (lambda d: _flip_byte(d / "data-00000-000"), "checksum mismatch"),
    "truncated data": (lambda d: (d / "data-00000-000").write_bytes(
        (d / "data-00000-000").read_bytes()[:-10]), "bytes"),
    "edited metadata": (lambda d: (d / "metadata.json").write_text(
        (d / "metadata.json").read_text().replace('"float32"', '"float16"', 1)), "sha256"),
    "garbage marker": (lambda d: (d / "COMMITTED").write_text("{not json"), "JSONDecodeError"),
    "missing data object": (lambda d: (d / "data-00000-000").unlink(), "missing object"),
    "incomplete": (lambda d: (d / "COMMITTED").unlink(), "incomplete"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_is_reported_and_skipped(tmp_path, damage, caplog):
    mgr = CheckpointManager(str(tmp_path), keep_last=3)
    good, bad = _model_state(0), _model_state(1)
    mgr.save(10, good, meta=META)
    mgr.save(20, bad, meta=META)
    hurt, reason = DAMAGE[damage]
    hurt(tmp_path / step_dir(20))

    target = _model_state(2)
    with caplog.at_level(logging.WARNING, logger="mmpt.checkpoint"):
        loaded = CheckpointManager(str(tmp_path)).load_latest(target)
    assert loaded.step == 10
    for k, v in good.items():
        assert torch.equal(target[k], v), k  # the older, intact one; nothing of step 20
    assert "step-00000020" in caplog.text and reason in caplog.text


def test_no_checkpoint_gives_none(tmp_path):
    assert CheckpointManager(str(tmp_path)).load_latest(_model_state(0)) is None


def test_keep_last_and_leftovers_are_pruned(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    state = _model_state(0)
    mgr.save(1, state)
    (tmp_path / step_dir(2)).mkdir()  # a crashed write of step 2
    (tmp_path / step_dir(2) / "data-00000-000").write_bytes(b"partial")
    for step in (3, 4, 5):
        mgr.save(step, state)
    # LocalStore may leave empty directories behind; what counts is the objects.
    assert sorted({k.split("/")[0] for k in LocalStore(tmp_path).list("")}) == [step_dir(4),
                                                                                 step_dir(5)]
    assert mgr.committed_steps() == [4, 5]


# Retention across timelines: a run that resumed from an older checkpoint owns the future.

TIMELINE_DAMAGE = {  # caught by validate (marker/hashes/sizes) or only by the CRC32s at load
    "garbage marker": DAMAGE["garbage marker"][0],
    "flipped byte in data": DAMAGE["flipped byte in data"][0],
}


def _quarantined(root: Path) -> dict[int, Path]:
    """step -> its quarantined directory under root/quarantine/<n>/."""
    return {int(d.name[5:]): d for d in sorted((root / "quarantine").glob("*/step-*"))}


@pytest.mark.parametrize("damage", sorted(TIMELINE_DAMAGE))
def test_resume_past_a_damaged_newer_checkpoint_keeps_the_runs_own_save(tmp_path, damage):
    """Valid 25, damaged 30; the run resumes from 25 and saves 27 with keep_last=1: 27 is what
    the next run loads, and 30 is quarantined (moved, with the reason), not deleted."""
    valid, newer, own = _model_state(0), _model_state(1), _model_state(3)
    CheckpointManager(str(tmp_path), keep_last=3).save(25, valid, meta=META)
    CheckpointManager(str(tmp_path), keep_last=3).save(30, newer, meta=META)
    TIMELINE_DAMAGE[damage](tmp_path / step_dir(30))

    run = CheckpointManager(str(tmp_path), keep_last=1)
    target = _model_state(2)
    assert run.resume(target).step == 25
    assert [name for name, _, _ in run.quarantined] == [step_dir(30)]
    assert run.committed_steps() == [25]
    run.save(27, own, meta=META)
    assert run.committed_steps() == [27]

    nxt = _model_state(4)
    loaded = CheckpointManager(str(tmp_path)).load_latest(nxt)
    assert loaded.step == 27
    for k, v in own.items():
        assert torch.equal(nxt[k], v), k
    moved = _quarantined(tmp_path)
    assert list(moved) == [30]
    note = json.loads((moved[30] / "QUARANTINED").read_text())
    assert note["step"] == 30 and "resumed from step 25" in note["reason"]
    assert (moved[30] / "COMMITTED").is_file() and (moved[30] / "data-00000-000").is_file()


def test_save_after_a_plain_load_never_keeps_a_damaged_newer_checkpoint(tmp_path):
    """The same scenario through load_latest (no resume): saving 27 with keep_last=1 must not
    delete 25 and 27 and keep the damaged 30; 30 is newer than the run's own save, so it is
    quarantined, and the next run loads 27."""
    CheckpointManager(str(tmp_path)).save(25, _model_state(0), meta=META)
    CheckpointManager(str(tmp_path)).save(30, _model_state(1), meta=META)
    _flip_byte(tmp_path / step_dir(30) / "data-00000-000")
    run = CheckpointManager(str(tmp_path), keep_last=1)
    assert run.load_latest(_model_state(2)).step == 25
    run.save(27, _model_state(3), meta=META)
    assert run.committed_steps() == [27]
    assert CheckpointManager(str(tmp_path)).load_latest(_model_state(4)).step == 27
    assert list(_quarantined(tmp_path)) == [30]


class _FlakyReads:
    """A store whose first ranged read under one prefix comes back short (a transient fault
    that a load reports as damage); every other call passes through."""

    def __init__(self, store, prefix: str):
        self._store, self._prefix, self.tripped = store, prefix, False

    def get(self, key, start=None, end=None):
        data = self._store.get(key, start, end)
        if not self.tripped and key.startswith(self._prefix) and start is not None:
            self.tripped = True
            return data[:-1]
        return data

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_abandoned_timeline_never_counts_as_newer_than_the_runs_saves(tmp_path):
    """30 is intact but its load failed once, so the run resumed from 25: 30 now belongs to an
    abandoned timeline. After the run saves 27 (keep_last=2), the next run loads 27, not 30;
    30 survives, intact and loadable, in quarantine."""
    first, abandoned = _model_state(0), _model_state(1)
    CheckpointManager(str(tmp_path)).save(25, first, meta=META)
    CheckpointManager(str(tmp_path)).save(30, abandoned, meta=META)
    run = CheckpointManager(_FlakyReads(LocalStore(tmp_path), f"{step_dir(30)}/data-"),
                            keep_last=2)
    assert run.resume(_model_state(2)).step == 25
    run.save(27, _model_state(3), meta=META)
    assert run.committed_steps() == [25, 27]
    assert CheckpointManager(str(tmp_path)).load_latest(_model_state(4)).step == 27

    moved = _quarantined(tmp_path)
    assert list(moved) == [30]
    back = _model_state(5)
    loaded = CheckpointManager(str(moved[30].parent)).load_latest(back)
    assert loaded.step == 30
    for k, v in abandoned.items():
        assert torch.equal(back[k], v), k


def test_a_checkpoint_failing_validation_never_takes_a_retention_place(tmp_path):
    """keep_last=2 with 10 valid and 20's marker damaged: saving 30 keeps 10 and 30 (20 goes to
    quarantine) instead of keeping the damaged 20 and deleting the valid 10."""
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    for step in (10, 20):
        mgr.save(step, _model_state(step), meta=META)
    (tmp_path / step_dir(20) / "COMMITTED").write_text("{not json")
    mgr.save(30, _model_state(30), meta=META)
    assert mgr.committed_steps() == [10, 30]
    assert mgr.validate(10) is None
    assert list(_quarantined(tmp_path)) == [20]
    assert "failed validation" in json.loads(
        (_quarantined(tmp_path)[20] / "QUARANTINED").read_text())["reason"]


def test_rewrite_of_an_interrupted_step_drops_its_leftovers(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    (tmp_path / step_dir(7)).mkdir()
    (tmp_path / step_dir(7) / "data-00009-000").write_bytes(b"stale part of another layout")
    mgr.save(7, _model_state(0))
    assert not (tmp_path / step_dir(7) / "data-00009-000").exists()
    assert mgr.validate(7) is None


def test_state_of_another_config_is_an_error_not_a_skip(tmp_path):
    CheckpointManager(str(tmp_path)).save(1, _model_state(0))
    other = DecoderLM(ModelConfig(**{**CFG.__dict__, "hidden_size": 48}))
    with pytest.raises(ValueError, match="model config differs"):
        CheckpointManager(str(tmp_path)).load_latest(training_state(other, None))


def test_no_pickle_in_a_checkpoint(tmp_path):
    """Metadata and markers are JSON; data objects are raw tensor bytes (never unpickled)."""
    CheckpointManager(LocalStore(tmp_path)).save(3, _model_state(0), meta=META)
    d = tmp_path / step_dir(3)
    for name in ("metadata.json", "meta.json", "COMMITTED"):
        json.loads((d / name).read_text())
    assert not (d / "data-00000-000").read_bytes().startswith(b"\x80")  # no pickle protocol header


def test_a_failed_load_leaves_the_live_state_untouched(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(4, _model_state(1))
    _flip_byte(tmp_path / step_dir(4) / "data-00000-000")
    target = _model_state(0)
    before = {k: v.clone() for k, v in target.items()}
    assert mgr.load_latest(target) is None
    assert [name for name, _ in mgr.skipped] == [step_dir(4)]
    for k, v in before.items():
        assert torch.equal(target[k], v), k


# ------------------------------------------------------------------------------------------
# S3 (the embedded SeaweedFS server): 2-rank save, 1-rank load, a damaged newer one skipped
# ------------------------------------------------------------------------------------------


def test_s3_two_rank_save_one_rank_load_and_damage_skipped(tmp_path):
    from data.embedded_s3 import EmbeddedS3

    with EmbeddedS3(tmp_path / "s3", bucket="mmpt-ckpt-test") as s3:
        store = s3.store("runs/a/ckpt")
        saved = run_distributed(_save_body, 2, store, 2, 2)
        assert store.exists(f"{step_dir(2)}/COMMITTED")
        _assert_layout_free(saved, run_distributed(_load_body, 1, store, 1))

        # A newer checkpoint whose data is damaged after the commit: reported and skipped.
        mgr = CheckpointManager(store)
        mgr.save(9, _model_state(3), meta=META)
        key = f"{step_dir(9)}/data-00000-000"
        data = bytearray(store.get(key))
        data[7] ^= 1
        store.put(key, bytes(data))
        loaded = run_distributed(_load_body, 1, store, 1)
        _assert_layout_free(saved, loaded)

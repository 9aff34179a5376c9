"""Exact resume with real processes: 4 torchrun ranks, PP2 x V2 x DP2 with EP2 and DEP, float32
CPU, the tiny model on the real small corpus (ingested into a local directory).

One uninterrupted reference run of 8 steps, and one run that is SIGKILLed three times and resumed:
  0. killed while the background writers of checkpoint 4 are stuck in their first data part
     (MMPT_PAUSE_DURING_WRITE; the faults are injected by tests/fault_hooks.py) and training
     has gone on past step 4, with step 2 committed;
  1. resumed from step 2 (the previous checkpoint stayed valid); killed DURING the checkpoint
     write of step 4 (MMPT_PAUSE_BEFORE_COMMIT stops rank 0 after the shards and metadata are
     written, before the COMMITTED marker), with step 2 committed;
  2. resumed: step-4 is reported incomplete and skipped, training restarts from step 2; killed
     again (SIGKILL, whole process tree) after a seeded random step in [5, 7];
  3. resumed; one rank exits before the last step, torchrun (--max-restarts=1) restarts the
     group, which resumes from the newest checkpoint again and finishes.
Every step any attempt logged must have the reference's loss and grad norm bit for bit, and the
final model + optimizer state of every rank the reference's (sha256 fingerprints).

Resharding (in-process ranks): a checkpoint written at PP2 x V2 x DP2 loads at PP1 x DP4 (EP2 in
both, so expert optimizer state is split differently under ZeRO-1) with every parameter, fp32
master and optimizer-state entry identical, trains on, and its checkpoint loads back at PP2 x DP2.
"""

from __future__ import annotations

import json

import torch

import pytest

from launch.resume_check import (compare, final_fingerprints, finish, kill_group, kill_step,
                                 logged_steps, start_run, wait_until)
from tests.corpus_fixtures import make_dataset
from tests.fault_hooks import env as faults

STEPS, EVERY, KILL_AFTER, SEED = 8, 2, 4, 7
TIMEOUT = 240.0


def overrides(ds, ckpt) -> list[str]:
    """The tiny config at test size: 64-token rows, 4 sequences per step, small media."""
    return [f"--data.manifest={ds.url}", f"--data.tokenizer={ds.tokenizer}", "--data.seq_len=64",
            "--data.global_batch_size=4", "--data.image_max_pixels=12544",
            "--data.video_max_pixels=3136", "--data.video_max_frames=8",
            f"--train.steps={STEPS}", f"--checkpoint.every={EVERY}", f"--checkpoint.dir={ckpt}",
            "--parallel.pp=2", "--parallel.virtual_stages=2", "--parallel.dp=2",
            "--parallel.ep=2", "--parallel.microbatches=2", "--parallel.dep=true"]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("resume-data"))


def _events(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["event"] for x in lines if '"event"' in x]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_mid_checkpoint_and_mid_run_then_resume_is_bit_identical(ds, tmp_path):
    cfg = "configs/tiny.toml"
    ref = start_run("reference", tmp_path, cfg, overrides(ds, tmp_path / "ref-ckpt"), 4)
    finish(ref, "reference", tmp_path, TIMEOUT)

    args = overrides(ds, tmp_path / "ckpt")
    # 0. Killed during the background write of checkpoint 4, while training runs on.
    early = start_run("attempt0", tmp_path, cfg, args, 4, env=faults(pause_during_write=4))
    flag = tmp_path / "attempt0" / "paused-during-write-4"
    wait_until(early, lambda: flag.exists() and 5 in logged_steps(tmp_path / "attempt0"),
               TIMEOUT, "a background write of step 4 stuck while step 5 trains")
    kill_group(early)
    assert not (tmp_path / "ckpt" / "step-00000004" / "COMMITTED").exists()
    assert (tmp_path / "ckpt" / "step-00000002" / "COMMITTED").exists()

    # 1. Killed during the write of checkpoint 4: its shards exist, its COMMITTED marker not.
    first = start_run("attempt1", tmp_path, cfg, args, 4, env=faults(pause_before_commit=4))
    flag = tmp_path / "attempt1" / "paused-before-commit-4"
    wait_until(first, flag.exists, TIMEOUT, "the pause before committing step 4")
    kill_group(first)
    step4 = tmp_path / "ckpt" / "step-00000004"
    assert (step4 / "metadata.json").exists() and not (step4 / "COMMITTED").exists()
    assert (tmp_path / "ckpt" / "step-00000002" / "COMMITTED").exists()
    events = _events(tmp_path / "attempt1")  # no part was published: nothing to skip
    assert any("resumed from" in e and "(step 2)" in e for e in events), events

    # 2. Resumes from step 2 (skipping the incomplete 4); killed after a seeded random step.
    at = kill_step(SEED, KILL_AFTER, STEPS)
    second = start_run("attempt2", tmp_path, cfg, args, 4)
    wait_until(second, lambda: at in logged_steps(tmp_path / "attempt2"), TIMEOUT, f"step {at}")
    kill_group(second)
    committed = max(int(d.name[5:]) for d in (tmp_path / "ckpt").iterdir()
                    if (d / "COMMITTED").exists())
    assert at - EVERY <= committed <= at  # the kill may land before or after the commit of `at`
    events = _events(tmp_path / "attempt2")
    assert any("step-00000004 skipped: incomplete" in e for e in events), events
    assert any("resumed from" in e and "(step 2)" in e for e in events), events

    # 3. Resumes from the newest complete checkpoint; one rank crashes before the last step,
    #    torchrun restarts the group (--max-restarts=1), which resumes again and finishes.
    third = start_run("attempt3", tmp_path, cfg, args, 4, max_restarts=1,
                      env=faults(crash_at_step=STEPS))
    finish(third, "attempt3", tmp_path, TIMEOUT)
    assert f"injected crash before step {STEPS}" in (tmp_path / "attempt3.log").read_text()
    resumed_at = [e for e in _events(tmp_path / "attempt3") if "resumed from" in e]
    assert len(resumed_at) == 2 and f"(step {committed})" in resumed_at[0], resumed_at
    assert f"(step {STEPS - 2})" in resumed_at[1], resumed_at

    table, bad = compare(tmp_path / "reference", [tmp_path / "attempt0"])
    assert not bad, table
    runs = [tmp_path / f"attempt{i}" for i in (1, 2, 3)]
    table, bad = compare(tmp_path / "reference", runs)
    assert not bad, table
    logged = set().union(*(logged_steps(r) for r in [tmp_path / "attempt0", *runs]))
    assert logged == set(range(1, STEPS + 1)), table
    assert logged_steps(runs[1])[0] == 3 and logged_steps(runs[2])[-1] == STEPS
    prints = final_fingerprints(tmp_path / "attempt3")
    assert len(prints) == 4 and prints == final_fingerprints(tmp_path / "reference")


# --------------------------------------------------------------------------------------------
# Resharding: PP2 x V2 x DP2 (EP2) <-> PP1 x DP4 (EP2), in-process ranks (tests/dist.py)
# --------------------------------------------------------------------------------------------

PP2_DP2 = ["--parallel.pp=2", "--parallel.virtual_stages=2", "--parallel.dp=2"]
PP1_DP4 = ["--parallel.pp=1", "--parallel.virtual_stages=1", "--parallel.dp=4"]


def _layout_cfg(ds, tmp_path, layout, steps, run):
    from train.config import load_config

    args = [a for a in overrides(ds, tmp_path / "ckpt") if not a.startswith(
        ("--parallel.pp", "--parallel.virtual_stages", "--parallel.dp=", "--train.steps",
         "--data.global_batch_size"))]
    return load_config("configs/tiny.toml", [*args, *layout, f"--train.steps={steps}",
                                             "--data.global_batch_size=8",
                                             f"--train.run_dir={tmp_path / run}"])


def _state_after_load_and_fit(rank, world, cfg):
    """(state right after resuming, state after training to cfg.train.steps), model/optim/master
    entries of this rank, cloned."""
    from train.trainer import Trainer

    def snapshot(t):
        return {k: v.clone() for k, v in t.state().items() if not k.startswith("rng/")}

    trainer = Trainer(cfg)
    trainer.resume()
    loaded = snapshot(trainer)
    trainer.fit()
    return trainer.step, loaded, snapshot(trainer)


def _union(states: list[dict]) -> dict:
    """One dict of every rank's entries; replicas of an entry must agree bit for bit."""
    out = {}
    for state in states:
        for k, v in state.items():
            if k in out:
                assert torch.equal(out[k], v), f"ranks disagree about {k}"
            out[k] = v
    return out


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), (what, sorted(a.keys() ^ b.keys())[:5])
    for k in a:
        assert torch.equal(a[k], b[k]), (what, k)
    assert any(k.startswith("optim/") and k.endswith("/momentum_buffer") for k in a)
    assert any(k.startswith("master/") for k in a) and any("/expert-7" in k for k in a)


@pytest.mark.timeout(600)
def test_checkpoint_reshards_pp2_dp2_to_pp1_dp4_and_back(ds, tmp_path):
    from tests.dist import run_distributed

    saved = run_distributed(_state_after_load_and_fit, 4,
                            _layout_cfg(ds, tmp_path, PP2_DP2, 1, "a"), timeout=300)
    wide = run_distributed(_state_after_load_and_fit, 4,
                           _layout_cfg(ds, tmp_path, PP1_DP4, 2, "b"), timeout=300)
    assert [s for s, _, _ in wide] == [2] * 4
    _assert_same(_union([f for _, _, f in saved]), _union([l for _, l, _ in wide]),
                 "PP2xDP2 step 1 -> PP1xDP4")
    back = run_distributed(_state_after_load_and_fit, 4,
                           _layout_cfg(ds, tmp_path, PP2_DP2, 2, "c"), timeout=300)
    _assert_same(_union([f for _, _, f in wide]), _union([l for _, l, _ in back]),
                 "PP1xDP4 step 2 -> PP2xDP2")
    # The resumed data stream continues where the other layout left it.
    from train.metrics import read_metrics

    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [2]

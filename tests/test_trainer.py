"""The training loop (train/trainer.py) on the real small corpus: metrics, NaN/inf step skipping,
the stop after repeated bad steps, config errors, and 4 ranks (PP2 x V2 x DP2, EP2, DEP) against
one process. Exact resume with real processes is in test_resume.py."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from tests.corpus_fixtures import make_dataset
from tests.dist import DistributedTestError, run_distributed
from tests.grad_check import assemble, assert_grads_match, capture_reduced_grads, merge_ranks
from train.config import load_config
from train.errors import ConfigError
from train.metrics import read_metrics

TINY = "configs/tiny.toml"


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("trainer-data"))


def _cfg(ds, run_dir, *extra):
    return load_config(TINY, [
        f"--data.manifest={ds.url}", f"--data.tokenizer={ds.tokenizer}", "--data.seq_len=64",
        "--data.global_batch_size=4", "--data.image_max_pixels=12544",
        "--data.video_max_pixels=3136", "--data.video_max_frames=8", "--parallel.microbatches=2",
        f"--train.run_dir={run_dir}", *extra])


def _train(rank, world, cfg, nan_steps=(), grads=False):
    """Train cfg; at the steps in nan_steps a hook turns the output head's gradient into NaN.
    Returns (final result, state fingerprint after each step, per step the runtime's
    expert-load stats and the trainer's own collectives by kind, outside every method of
    ParallelRuntime and ZeroOptimizer),
    plus with `grads` this rank's reduced gradients of step 1 (tests/grad_check.py)."""
    from tests.simulated_device import patch_collectives
    from train.trainer import Trainer, rank_pieces, state_fingerprint

    class Faulty(Trainer):
        def train_step(self, batch):
            hooks = []
            if self.step + 1 in nan_steps:
                for stage in self.rt.stage_modules:
                    if stage.lm.head is not None:
                        hooks.append(stage.lm.head.weight.register_hook(
                            lambda g: torch.full_like(g, float("nan"))))
            calls.clear()
            runtime_calls.clear()
            try:
                with patch_collectives(calls):
                    return super().train_step(batch)
            finally:
                for h in hooks:
                    h.remove()
                steps[-1]["trainer_collectives"] = dict(Counter(
                    name for i, (name, _) in enumerate(calls) if i not in runtime_calls))
                prints.append(state_fingerprint(self.state()))

    prints: list[str] = []
    calls: list = []
    runtime_calls: set[int] = set()  # indices in `calls` of the runtime's and ZeRO-1's own
    steps: list[dict] = []
    trainer = Faulty(cfg)

    def inside_runtime(obj, name):
        method = getattr(obj, name)

        def call(*args, **kwargs):
            start = len(calls)
            out = method(*args, **kwargs)
            runtime_calls.update(range(start, len(calls)))
            if name == "expert_load_stats":
                steps.append(dict(expert_load=out))
            return out
        setattr(obj, name, call)
    for obj in (trainer.rt, trainer.rt.zero):
        for name in dir(type(obj)):
            if not name.startswith("_") and callable(getattr(type(obj), name)):
                inside_runtime(obj, name)
    reduced = capture_reduced_grads(trainer.rt.zero, rank_pieces(trainer.rt)) if grads else None
    prints.append(state_fingerprint(trainer.state()))
    result = trainer.fit()
    return (result, prints, steps, reduced[0]) if grads else (result, prints, steps)


def test_one_process_logs_every_metric(ds, tmp_path):
    cfg = _cfg(ds, tmp_path / "run", "--train.steps=3")
    [(result, _, steps)] = run_distributed(_train, 1, cfg, timeout=240)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3] and result["step"] == 3
    from train.optim.schedule import schedule_multiplier

    top = cfg.model.n_routed_experts / cfg.model.num_experts_per_tok  # all tokens on k experts
    for r, step in zip(records, steps):
        stats = step["expert_load"]
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["grad_norm"] > 0
        assert r["lr"] == cfg.optim.lr * schedule_multiplier(r["step"] - 1, cfg.optim, 3)
        assert r["tok_s"] > 0 and r["flops_s"] > 0 and "mfu" not in r  # CPU: no known peak
        # the worst layer's max/mean tokens per expert, from this step's loads, not collapsed
        assert r["expert_load_max_mean"] == max(s["max"] / s["mean"] for s in stats.values())
        assert 1.0 < r["expert_load_max_mean"] < top
        assert 0.0 <= r["vision_share"] < 1.0 and r["max_logit"] > 0
        assert r["skipped_steps"] == 0 and r["loss_tokens"] > 0
    assert any(r["vision_share"] > 0 for r in records)
    # The loop's own collectives per step, besides the runtime's (counted with their devices in
    # tests/test_device_placement.py): token counts over DP, QK-Clip's max logits, the max logit
    # and the clipped heads over PP, the count of skipped documents over the world (a second
    # all-gather only in a step with skips). A new one must be added here, on purpose.
    assert all(s["trainer_collectives"] == {"all_reduce": 4, "all_gather": 1} for s in steps), steps
    assert (tmp_path / "run" / "tensorboard").is_dir()
    final = json.loads((tmp_path / "run" / "final-state.json").read_text())
    assert final["step"] == 3 and len(final["fingerprints"]) == 1


def test_a_nan_gradient_skips_the_update_and_is_counted(ds, tmp_path):
    cfg = _cfg(ds, tmp_path / "run", "--train.steps=4")
    [(result, prints, _)] = run_distributed(_train, 1, cfg, (2,), timeout=240)
    # prints[k] = state after k steps: step 2 changed nothing (params, masters, optimizer
    # state, router bias); the steps around it did.
    assert prints[2] == prints[1]
    assert len({prints[0], prints[1], prints[3], prints[4]}) == 4
    records = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert math.isnan(records[2]["grad_norm"]) and records[2]["skipped_steps"] == 1
    assert math.isfinite(records[3]["grad_norm"]) and records[4]["skipped_steps"] == 1
    assert result["skipped_steps"] == 1
    events = [json.loads(x)["event"] for x in (tmp_path / "run" / "metrics.jsonl")
              .read_text().splitlines() if '"event"' in x]
    assert any("step 2: non-finite" in e and "update skipped" in e for e in events), events


def test_repeated_bad_steps_stop_the_run_with_a_clear_message(ds, tmp_path):
    cfg = _cfg(ds, tmp_path / "run", "--train.steps=6", "--train.max_bad_steps=2")
    with pytest.raises(DistributedTestError, match=r"2 consecutive steps \(up to step 3\).*"
                                                   r"train.max_bad_steps=2"):
        run_distributed(_train, 1, cfg, (2, 3, 4), timeout=240)


def test_placeholder_ids_must_match_the_tokenizer(ds):
    from data.tokenizer import load_tokenizer
    from train.trainer import check_tokenizer

    tok = load_tokenizer(ds.tokenizer)
    check_tokenizer(load_config(TINY, [f"--data.tokenizer={ds.tokenizer}"]), tok)  # tiny.toml fits
    with pytest.raises(ConfigError, match="model.image_token_id=5"):
        check_tokenizer(load_config(TINY, ["--model.image_token_id=5"]), tok)
    with pytest.raises(ConfigError, match="model.vocab_size=64"):
        check_tokenizer(load_config(TINY, ["--model.vocab_size=64"]), tok)


def _trainer_without_manifest(rank, world, run_dir):
    from train.trainer import Trainer

    with pytest.raises(ConfigError, match="data.manifest is empty"):
        Trainer(load_config(TINY, [f"--train.run_dir={run_dir}"]))


def test_an_empty_manifest_is_a_config_error(tmp_path):
    run_distributed(_trainer_without_manifest, 1, tmp_path, timeout=60)


def test_four_ranks_pp2_v2_dp2_ep2_dep_match_one_process(ds, tmp_path):
    """The whole loop (loader split over DP, DEP, interleaved 1F1B, EP, ZeRO-1 MuonClip,
    QK-Clip) on 4 ranks follows the 1-process run on the same real batches."""
    one = _cfg(ds, tmp_path / "one", "--train.steps=3")
    four = _cfg(ds, tmp_path / "four", "--train.steps=3", "--parallel.pp=2",
                "--parallel.virtual_stages=2", "--parallel.dp=2", "--parallel.ep=2")
    [(_, _, _, ref)] = run_distributed(_train, 1, one, (), True, timeout=240)
    got = run_distributed(_train, 4, four, (), True, timeout=300)
    # Step 1's reduced gradient of every parameter (before the clip), expert rows included:
    # the same data and weights, so float32 round-off of another summation order only.
    assert_grads_match(merge_ranks([g for _, _, _, g in got]), assemble(ref), atol=1e-6, rtol=1e-4,
                       context="step 1")
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "four")
    assert [r["step"] for r in b] == [1, 2, 3]
    # Step 1: same data and weights, only the summation order differs (micro-batches,
    # all-reduces). Later steps: Muon's bf16 Newton-Schulz turns those fp32 round-off
    # differences into bf16 differences of the update, which can flip a near-tie top-k routing
    # choice, so the runs drift apart slowly (observed 2.4e-5 relative at step 3).
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=1e-5)
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), (x["step"], x["loss"], y["loss"])
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-2)
        assert y["vision_share"] == x["vision_share"] and y["loss_tokens"] == x["loss_tokens"]


def _rng_states(rank, world, cfg, resume_only):
    """The first run advances this rank's torch stream before training (as a random op of a
    step would), trains and saves; a fresh trainer then resumes. Returns the generator states."""
    from train.trainer import Trainer

    trainer = Trainer(cfg)
    fresh = torch.get_rng_state()
    if resume_only:
        assert trainer.resume()
    else:
        torch.rand(rank + 3)
        trainer.fit()
    return fresh, torch.get_rng_state()


def test_each_rank_has_its_own_torch_stream_and_resume_restores_it(ds, tmp_path):
    cfg = _cfg(ds, tmp_path / "run", "--train.steps=1", "--parallel.dp=2",
               f"--checkpoint.dir={tmp_path / 'ckpt'}")
    first = run_distributed(_rng_states, 2, cfg, False, timeout=240)
    again = run_distributed(_rng_states, 2, cfg, True, timeout=240)
    assert not torch.equal(first[0][0], first[1][0])  # rank 0 and rank 1 start apart
    for rank in range(2):
        assert torch.equal(again[rank][0], first[rank][0])  # derived, not drawn: reproducible
        assert not torch.equal(first[rank][1], first[rank][0])  # the run advanced it
        assert torch.equal(again[rank][1], first[rank][1]), rank  # resume restored it exactly

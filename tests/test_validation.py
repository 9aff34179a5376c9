"""Validation and per-category losses.

Runtime (synthetic batches, tiny KimiK25): `ParallelRuntime.evaluate` (forward only over PP x V,
DP, EP, DEP) gives the single-process loss sums; the per-category sums of training and evaluation
equal a plain per-token loop over the whole global batch; interleaving evaluations with training
steps changes no training loss, parameter, optimizer state or router bias (bit for bit).
Data (the real small corpus): the hold-out split is disjoint from training and fixed by sample
identity; token categories name each target token's source and role.
Trainer: validation metrics, per-modality metrics, bit-identical training with evaluation on,
Weights & Biases offline, the plot's panels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.batch import ROLE_CAPTION, ROLE_MARKER, ROLE_TEXT, ROLES
from data.plan_table import held_out, holdout_score
from data.loader import DataLoaderWithState
from parallel.mesh import build_mesh
from parallel.runtime import ParallelRuntime
from tests.corpus_fixtures import make_dataset
from tests.dist import run_distributed
from tests.parallel_fixtures import concat_batches, make_batch, rank_view, tiny_config
from train.config import load_config
from train.errors import ConfigError
from train.metrics import read_metrics
from train.model import build_model, init_weights
from train.model.lm import token_losses
from train.step import training_step

CATEGORIES = 6
TINY = "configs/tiny.toml"


def _with_categories(batch: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    cat = torch.randint(0, CATEGORIES, batch["loss_mask"].shape, generator=g)
    return {**batch, "token_category": cat.masked_fill(~batch["loss_mask"].bool(), -1)}


def _steps(cfg, n):
    dp, rows = cfg.parallel.dp, cfg.data.global_batch_size // cfg.parallel.dp
    return [[_with_categories(make_batch(rows, cfg.data.seq_len, seed=10 * s + d), 10 * s + d)
             for d in range(dp)] for s in range(n)]


def _global(per_replica):
    out = concat_batches(per_replica)
    out["token_category"] = torch.cat([b["token_category"] for b in per_replica])
    return out


def _reference_sums(cfg, global_batch):
    """Loss sum, token count and per-category sums of the untrained model, one process."""
    model = build_model(cfg)
    init_weights(model, 0)
    b = global_batch
    with torch.no_grad():
        logits = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"],
                       pixel_patches=b["pixel_patches"], grid_thw=b["grid_thw"])
    losses = token_losses(logits, b["labels"], b["loss_mask"]).double()
    cat = b["token_category"].reshape(-1)
    sums = torch.zeros(CATEGORIES, 2, dtype=torch.float64)
    for c in range(CATEGORIES):  # a plain loop, not the runtime's index_add
        sums[c, 0] = losses[cat == c].sum()
        sums[c, 1] = (cat == c).sum()
    return float(losses.sum()), int(b["loss_mask"].sum()), sums


def _runtime(cfg):
    mesh = build_mesh(cfg)
    model = build_model(cfg)
    init_weights(model, 0)
    adamw = lambda named: torch.optim.AdamW([t for _, t in named], lr=1e-3)  # noqa: E731
    return mesh, ParallelRuntime(cfg, model, mesh, adamw)


def _state(rt):
    """Everything training changes on this rank: params (with router biases) and optimizer."""
    out = {k: v.clone() for m in rt.stage_modules for k, v in m.state_dict().items()}
    if rt.dep is not None:
        out.update({f"vision.{k}": v.clone() for k, v in rt.dep.encoder.state_dict().items()})
    opt = rt.zero.optimizer
    if opt is not None:
        for i, st in enumerate(opt.state.values()):
            out.update({f"optim.{i}.{k}": v.clone() for k, v in st.items()
                        if isinstance(v, torch.Tensor)})
    return out


def _eval_and_train(rank, world, cfg, steps, evaluate_between):
    mesh, rt = _runtime(cfg)
    first = rt.evaluate(rank_view(cfg, mesh, steps[0]), CATEGORIES)
    again = rt.evaluate(rank_view(cfg, mesh, steps[0]), CATEGORIES)
    results, evals = [], []
    for per_replica in steps:
        results.append(training_step(rt, rank_view(cfg, mesh, per_replica),
                                     num_categories=CATEGORIES))
        if evaluate_between:
            evals.append(rt.evaluate(rank_view(cfg, mesh, steps[0]), CATEGORIES))
    grads = [n for n, p in rt.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    return first, again, results, evals, _state(rt), grads


@pytest.mark.parametrize("layout", [
    dict(pp=2, virtual_stages=2, dp=2, ep=2, microbatches=2, dep=True),
    dict(pp=2, virtual_stages=1, dp=1, ep=1, microbatches=2, dep=False, schedule="1f1b"),
    dict(pp=2, virtual_stages=2, dp=1, ep=1, microbatches=2, dep=False,
         schedule="interleaved_zero_bubble"),
], ids=["pp2-v2-dp2-ep2-dep-interleaved", "pp2-1f1b", "pp2-v2-zero-bubble"])
def test_evaluation_matches_one_process_and_leaves_training_untouched(layout):
    cfg = tiny_config(**layout)
    world = cfg.parallel.pp * cfg.parallel.dp
    steps = _steps(cfg, 3)
    ref_sum, ref_tokens, ref_cats = _reference_sums(cfg, _global(steps[0]))

    with_eval = run_distributed(_eval_and_train, world, cfg, steps, True, timeout=240)
    without = run_distributed(_eval_and_train, world, cfg, steps, False, timeout=240)
    for rank, ((first, again, res, evals, state, grads),
               (_, _, res0, _, state0, _)) in enumerate(zip(with_eval, without)):
        # Forward-only evaluation = the single-process sums; counts exactly.
        assert first.loss_tokens == ref_tokens
        assert first.loss_sum == pytest.approx(ref_sum, rel=1e-6)
        assert torch.equal(first.category_loss[:, 1], ref_cats[:, 1])
        torch.testing.assert_close(first.category_loss[:, 0], ref_cats[:, 0], rtol=1e-6, atol=1e-6)
        assert first.category_loss[:, 0].sum().item() == pytest.approx(first.loss_sum, rel=1e-6)
        # The same batch gives the same result each time, bit for bit.
        assert again.loss_sum == first.loss_sum
        assert torch.equal(again.category_loss, first.category_loss)
        # Training: the category sums add up to the step's loss (float64 sums of the float32
        # per-token losses vs the float32 loss: 1e-6).
        c = res[0].category_loss
        assert c[:, 0].sum().item() / c[:, 1].sum().item() == pytest.approx(res[0].loss, rel=1e-6)
        assert torch.equal(c[:, 1], ref_cats[:, 1])
        # Evaluations between steps change nothing in training, bit for bit.
        assert [r.loss for r in res] == [r.loss for r in res0], rank
        assert [r.grad_norm for r in res] == [r.grad_norm for r in res0]
        assert [r.expert_load for r in res] == [r.expert_load for r in res0]
        assert state.keys() == state0.keys()
        assert all(torch.equal(state[k], state0[k]) for k in state), rank
        assert not grads  # no gradient left behind
        # Later evaluations see the trained weights: the loss moves.
        assert evals[-1].loss_sum != first.loss_sum


# ---------------------------------------------------------------------------------------------
# Data: hold-out split and token categories (real corpus)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("validation-data"))


def _data_cfg(ds, *extra, **data):
    over = {"manifest": ds.url, "tokenizer": str(ds.tokenizer), "seq_len": 128,
            "window_sequences": 8, "global_batch_size": 4, **data}
    return load_config(TINY, [f"--data.{k}={json.dumps(v)}" for k, v in over.items()]
                       + list(extra))


def _identities(batches, catalog):
    """(source name, shard, member key) of every document piece in the batches."""
    out = set()
    for b in batches:
        for _, src, shard, member, *_ in b.sample_ids.tolist():
            cat = catalog.catalogs[src]
            out.add((catalog.names[src], shard, cat.entry(cat.sample_of(shard, member))["key"]))
    return out


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_holdout_is_keyed_by_sample_identity_and_never_reaches_training(ds):
    f = 0.2
    train = DataLoaderWithState(_data_cfg(ds, holdout_fraction=f), dp_rank=1, dp_size=2)
    val = DataLoaderWithState(_data_cfg(ds, holdout_fraction=f), split="val")
    full = DataLoaderWithState(_data_cfg(ds))
    cat = full.stream.catalog
    expected, every = set(), set()
    for s, name in enumerate(cat.names):
        src = cat.catalogs[s]
        ids = [(name, src.locate(i)[0], src.entry(i)["key"]) for i in range(src.n)]
        every |= set(ids)
        # Independently of held_out(): the samples whose score is below f, or else the one
        # with the smallest score (every source has validation data).
        below = {x for x in ids if holdout_score(*x) < f}
        expected |= below or {min(ids, key=lambda x: holdout_score(*x))}
        assert {x for x, v in zip(ids, held_out(name, [x[1:] for x in ids], f)) if v} \
            == (below or {min(ids, key=lambda x: holdout_score(*x))})
    assert 0.1 < len(expected) / len(every) < 0.3
    # Training never sees a held-out sample; validation sees nothing else; over the catalogs
    # the two splits partition the dataset.
    train_seen = _identities(_take(train, 12), cat)
    val_seen = _identities(_take(val, 6), cat)
    assert train_seen and val_seen and not train_seen & expected and val_seen <= expected
    units = lambda c: {(c.names[s], *c.locate(s, int(i)))  # noqa: E731
                       for s, spec in enumerate(c.sources) for i in spec.samples}
    tr, va = units(train.stream.catalog), units(val.stream.catalog)
    assert not tr & va and tr | va == units(cat)
    # Another seed: another order, the same split.
    other = DataLoaderWithState(_data_cfg(ds, holdout_fraction=f, seed=5), split="val")
    assert units(other.stream.catalog) == va
    # Validation restarts from its first batch after rewind() (a plain new iteration goes on).
    val.rewind()
    first = [b.digest() for b in _take(val, 3)]
    assert [b.digest() for b in _take(val, 3)] != first
    val.rewind()
    assert [b.digest() for b in _take(val, 3)] == first


def test_a_resume_state_records_the_holdout(ds):
    from data.stream import ResumeError

    a = DataLoaderWithState(_data_cfg(ds, holdout_fraction=0.2))
    _take(a, 2)
    b = DataLoaderWithState(_data_cfg(ds))
    with pytest.raises(ResumeError, match="holdout_fraction=0.2"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match="data.holdout_fraction"):
        _data_cfg(ds, holdout_fraction=1.0)
    with pytest.raises(ConfigError, match="train.eval_every"):
        _data_cfg(ds, "--train.eval_every=2")


def test_token_categories_name_the_source_and_role_of_every_target(ds):
    loader = DataLoaderWithState(_data_cfg(ds, vision_fraction=0.3))
    cat = loader.stream.catalog
    tok = loader.stream.reader.tokenizer
    seen = set()
    for b in _take(loader, 12):
        c = b.token_category
        assert ((c >= 0) == b.loss_mask).all()
        for r in range(b.rows):
            pieces = [p for p in b.sample_ids.tolist() if p[0] == r]
            for d, (_, src, _, _, _, lo, hi) in enumerate(pieces):
                at = b.doc_ids[r] == d
                mask = at & b.loss_mask[r]
                assert (c[r][mask] // len(ROLES) == src).all()
                roles = (c[r][mask] % len(ROLES)).tolist()
                labels = b.labels[r][mask].tolist()
                ids = b.input_ids[r][at].tolist()
                seen |= {(cat.kinds[src], x) for x in roles}
                if cat.kinds[src] == "text":
                    assert set(roles) == {ROLE_TEXT}
                if lo != 0:
                    continue  # only whole-document starts: the media before it are in the row
                # Independent reconstruction from the tokens: a caption follows a media_end
                # seen at or before the position; a marker predicts media_begin.
                ended = np.cumsum([t == tok.media_end_id for t in ids]) > 0
                want = [ROLE_MARKER if lab == tok.media_begin_id else
                        ROLE_CAPTION if e else ROLE_TEXT
                        for lab, e in zip(labels, ended[b.loss_mask[r][at].numpy()])]
                assert roles == want, (cat.kinds[src], roles, want)
    # (Which documents come first depends on the dataset fingerprint, so only roles that any
    # order shows within 12 batches at this vision share are required.)
    roles = {r for _, r in seen}
    assert ("text", ROLE_TEXT) in seen and {ROLE_CAPTION, ROLE_MARKER} <= roles, seen


# ---------------------------------------------------------------------------------------------
# Trainer: validation runs, per-modality metrics, W&B offline, the plot
# ---------------------------------------------------------------------------------------------

FOUR = ("--parallel.pp=2", "--parallel.virtual_stages=2", "--parallel.dp=2", "--parallel.ep=2",
        "--parallel.dep=true")


def _run_cfg(ds, run_dir, *extra):
    return load_config(TINY, [
        f"--data.manifest={ds.url}", f"--data.tokenizer={ds.tokenizer}", "--data.seq_len=64",
        "--data.global_batch_size=4", "--data.image_max_pixels=12544",
        "--data.video_max_pixels=3136", "--data.video_max_frames=8",
        "--data.holdout_fraction=0.2", "--data.window_sequences=2", "--parallel.microbatches=2",
        "--train.steps=3",
        f"--train.run_dir={run_dir}", *extra])


def _fit(rank, world, cfg):
    """Train; returns the final result and the digests of every validation batch read."""
    from train.trainer import Trainer

    read: list[str] = []

    class Recording(DataLoaderWithState):
        def __iter__(self):
            for batch in super().__iter__():
                if self is trainer.val_loader:
                    read.append(batch.digest())
                yield batch

    trainer = None
    trainer = Trainer(cfg, make_loader=Recording)
    return trainer.fit(), read


def _train_keys(records):
    return [{k: v for k, v in r.items() if not k.startswith("val_") and
             k not in ("time", "tok_s", "step_s", "flops_s", "data_s")} for r in records]


def test_validation_on_four_ranks_matches_one_process_and_changes_no_training_step(ds, tmp_path):
    four = _run_cfg(ds, tmp_path / "four", *FOUR, "--train.eval_every=1",
                    "--train.eval_batches=3")
    plain = _run_cfg(ds, tmp_path / "plain", *FOUR)
    one = _run_cfg(ds, tmp_path / "one", "--train.eval_every=2", "--train.eval_batches=3")
    results = run_distributed(_fit, 4, four, timeout=300)
    (plain_result, _), *_ = run_distributed(_fit, 4, plain, timeout=300)
    [(one_result, _)] = run_distributed(_fit, 1, one, timeout=240)
    a, b, c = (read_metrics(tmp_path / n) for n in ("four", "plain", "one"))

    # Evaluation changes nothing in training: same losses, grad norms, per-modality losses,
    # expert balance, max logits (bit for bit) and the same final state on every rank.
    assert _train_keys(a) == _train_keys(b)
    assert results[0][0]["fingerprints"] == plain_result["fingerprints"]
    # Every evaluation reads the same validation batches (per rank: 3 batches x 3 steps).
    for _, read in results:
        assert len(read) == 9 and read[0:3] == read[3:6] == read[6:9] and read[0] != read[1]
    # Validation and per-modality losses: present, and the 4-rank run's equal one process's
    # (step 2: same data, weights differing by float32 round-off after a step).
    # (Which documents come first depends on the dataset fingerprint: the test asks for what
    # every order gives with 90 % text tokens, windows of 2 sequences and 3 steps.)
    assert all(r["val_loss"] > 0 and r["val_loss_tokens"] > 0 for r in a)
    kinds = [f"loss_{k}" for k in ("text", "image", "video", "interleaved")]
    for prefix in ("", "val_"):
        for r in a:
            assert {f"{prefix}loss_plain_text", f"{prefix}loss_caption"} & set(r), r
            assert any(k.startswith(f"{prefix}loss_source_") for k in r), r
        assert len({k for r in a for k in r} & {prefix + k for k in kinds}) >= 2, prefix
    assert "val_loss" not in c[0] and "val_loss" in c[1] and "val_loss" in c[2]  # every 2 + end
    for key in [k for k in c[1] if k.startswith(("val_loss", "loss_"))]:
        assert a[1][key] == pytest.approx(c[1][key], rel=1e-4), key
    # The breakdown is the loss: token-weighted, the kinds add up to the total.
    assert a[0]["val_loss_tokens"] == c[1]["val_loss_tokens"]


def test_wandb_offline_gets_every_logged_metric_and_the_plot_has_the_new_panels(ds, tmp_path,
                                                                              monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'mmpt[wandb]')")
    import glob
    import struct

    from wandb.proto import wandb_internal_pb2

    from train.plot import panels, plot_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    cfg = _run_cfg(ds, run, "--train.steps=2", "--train.eval_every=1",
                   "--train.eval_batches=1", "--train.wandb=true", "--train.wandb_mode=offline",
                   "--train.wandb_project=mmpt-test")
    run_distributed(_fit, 1, cfg, timeout=240)
    records = read_metrics(run)
    [path] = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    # The run file is a LevelDB-style log (32 KiB blocks of CRC + length + type records) after
    # a 7-byte W&B header; history records hold the logged values.
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, chunks, parts = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or kind == 0:
            pos += left
            continue
        body, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        parts = body if kind in (1, 2) else parts + body
        if kind in (1, 4):
            chunks.append(parts)
    history = []
    for chunk in chunks:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(chunk)
        if rec.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in rec.history.item})
    assert [h["_step"] for h in history] == [1, 2]
    for h, r in zip(history, records):
        keys = [k for k in r if k in ("loss", "grad_norm", "val_loss")
                or k.startswith(("loss_", "val_loss_"))]
        assert len(keys) > 10
        for key in keys:
            assert h[key] == pytest.approx(r[key], rel=1e-12), key
    # The plot: training + validation loss, per-modality and per-source panels.
    layout = dict(panels(records))
    assert ("loss", "loss") in layout["loss"]
    assert {"loss_text", "loss_image", "loss_caption", "loss_plain_text"} <= {
        k for k, _ in layout["loss by modality"]}
    assert ("loss_source_images", "images") in layout["loss by source"]
    png = plot_run(run)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_separate_text_only_validation_dataset(ds, tmp_path):
    from data.ingest import Source, ingest
    from data.store import open_store
    from data.tokenizer import load_tokenizer

    url = str(tmp_path / "prose-ds")
    ingest([Source("prose", "text", ds.corpus / "text")], open_store(url),
           load_tokenizer(ds.tokenizer), shard_size=200 * 1024, progress=False,
           log=lambda m: None)
    run = tmp_path / "run"
    cfg = _run_cfg(ds, run, "--data.holdout_fraction=0.0", f"--data.val_manifest={url}",
                   "--train.steps=1", "--train.eval_every=1", "--train.eval_batches=1")
    val = DataLoaderWithState(cfg, split="val")
    full = DataLoaderWithState(cfg)
    # The whole separate dataset, mixed as text only; training keeps all of data.manifest.
    assert val.stream.catalog.names == ["prose"] and val.stream.fraction == 0.0
    assert len(val.stream.catalog.sources[0].tokens) == len(full.stream.catalog.sources[0].tokens)
    assert full.stream.catalog.holdout_fraction == 0.0
    run_distributed(_fit, 1, cfg, timeout=240)
    [r] = read_metrics(run)
    assert r["val_loss"] > 0 and r["val_loss_source_prose"] > 0
    assert r["val_loss_text"] == pytest.approx(r["val_loss"], rel=1e-6)
    assert not any(k.startswith("val_loss_") and k[4:] in ("loss_image", "loss_video",
                                                           "loss_interleaved") for k in r)


def test_category_metrics_and_the_console_breakdown(tmp_path):
    import io

    from train.metrics import CategoryNames, MetricsLogger, category_metrics

    names = CategoryNames(["web", "photos", "docs"], ["text", "image", "interleaved"])
    sums = torch.zeros(names.count, 2, dtype=torch.float64)
    sums[0 * 3 + ROLE_TEXT] = torch.tensor([20.0, 10])  # web: 10 plain tokens, mean 2
    sums[1 * 3 + ROLE_CAPTION] = torch.tensor([12.0, 4])  # photos: 4 caption tokens, mean 3
    sums[2 * 3 + ROLE_TEXT] = torch.tensor([4.0, 1])  # docs: plain 4, caption 5, marker 6
    sums[2 * 3 + ROLE_CAPTION] = torch.tensor([10.0, 2])
    sums[2 * 3 + ROLE_MARKER] = torch.tensor([6.0, 1])
    got = category_metrics(sums, names, prefix="val_")
    assert got == {"val_loss_text": 2.0, "val_loss_image": 3.0, "val_loss_interleaved": 5.0,
                   "val_loss_caption": 22.0 / 6, "val_loss_plain_text": 24.0 / 11,
                   "val_loss_source_web": 2.0, "val_loss_source_photos": 3.0,
                   "val_loss_source_docs": 5.0}
    out = io.StringIO()
    log = MetricsLogger(tmp_path, total_steps=1, tensorboard=False, stream=out)
    log.log(1, {"loss": 2.5, "loss_text": 2.25, "val_loss": 2.75} | got)
    log.close()
    lines = out.getvalue().splitlines()
    assert "val_loss 2.7500" in lines[0]
    assert lines[1].strip() == "train loss by modality: text 2.2500"
    assert lines[2].strip().startswith("val loss by modality: text 2.0000 | image 3.0000 | "
                                       "interleaved 5.0000 | caption 3.6667")

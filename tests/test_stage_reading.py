"""Stage-aware reading (data/stream.py ReadRole): a rank reads only what its pipeline stage or
its DEP encoder work needs, and what it builds equals the full reader's batch where they overlap.
The distributed count of store GETs and media decodes per rank is at the end."""

import json
from pathlib import Path

import pytest
import torch

from data.loader import DataLoaderWithState
from data.stream import ReadRole
from tests.corpus_fixtures import make_dataset
from train.config import load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
METADATA = ("position_ids", "doc_ids", "cu_seqlens", "grid_thw", "vision_spans", "sample_ids",
            "sequence_ids")
INPUTS, TARGETS = ("input_ids",), ("labels", "loss_mask", "token_category")
BATCHES = 12


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("stage-reading"))


def _cfg(ds, **data):
    over = {"manifest": ds.url, "tokenizer": str(ds.tokenizer), "seq_len": 128,
            "window_sequences": 8, "global_batch_size": 4, "image_max_pixels": 12544,
            "video_max_pixels": 3136, "video_max_frames": 8, **data}
    return load_config(TINY, [f"--data.{k}={json.dumps(v)}" for k, v in over.items()])


class Counting:
    """A store wrapper counting GETs (by key) - injected by the test, not a hook of the loader."""

    def __init__(self, store, gets: list):
        self._store, self.gets = store, gets

    def get(self, key, *args, **kwargs):
        self.gets.append(key)
        return self._store.get(key, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._store, name)


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out


def _loader(ds, read=None, gets=None, dp_rank=0, dp_size=1, **data):
    loader = DataLoaderWithState(_cfg(ds, **data), dp_rank=dp_rank, dp_size=dp_size,
                                 **({} if read is None else {"read": read}))
    if gets is not None:
        loader.stream.reader.store = Counting(loader.stream.reader.store, gets)  # document reads
    return loader


def _equal(a, b, names, context):
    for name in names:
        x, y = getattr(a, name), getattr(b, name)
        assert x is not None and y is not None, f"{context}: {name} missing"
        assert x.dtype == y.dtype and torch.equal(x, y), f"{context}: {name} differs"


@pytest.mark.parametrize("dp", [1, 2])
def test_every_role_builds_the_full_batch_where_they_overlap(ds, dp):
    for rank in range(dp):
        full = _take(_loader(ds, dp_rank=rank, dp_size=dp), BATCHES)
        assert any(b.grid_thw.shape[0] for b in full)  # the stream has vision items
        roles = {"stage 0": ReadRole(inputs=True, targets=False, media="replica"),
                 "last stage": ReadRole(inputs=False, targets=True, media=None),
                 "middle stage": ReadRole(inputs=False, targets=False, media=None),
                 "PP 1": ReadRole(inputs=True, targets=True, media="replica")}
        for label, role in roles.items():
            got = _take(_loader(ds, role, dp_rank=rank, dp_size=dp), BATCHES)
            for j, (a, b) in enumerate(zip(full, got)):
                ctx = f"{label}, rank {rank}/{dp}, batch {j}"
                _equal(a, b, METADATA, ctx)
                _equal(a, b, (INPUTS if role.inputs else ()) + (TARGETS if role.targets else ())
                       + (("pixel_patches",) if role.media else ()), ctx)
                absent = ((() if role.inputs else INPUTS) + (() if role.targets else TARGETS)
                          + (() if role.media else ("pixel_patches",)))
                assert all(getattr(b, n) is None for n in absent), ctx
                assert b.skipped == a.skipped == []


def test_a_middle_stage_reads_nothing_and_the_last_stage_no_media(ds):
    gets: list = []
    _take(_loader(ds, ReadRole(inputs=False, targets=False, media=None), gets), BATCHES)
    assert gets == []  # metadata only: the catalog was mapped before the wrapper went in
    _take(_loader(ds, ReadRole(inputs=False, targets=True, media=None), gets), BATCHES)
    assert gets and all(key.endswith(".tar") for key in gets)
    full: list = []
    _take(_loader(ds, gets=full), BATCHES)
    assert len(gets) < len(full)  # the full reader also fetched the media members


def test_a_dep_selector_decodes_the_chosen_items_of_any_replica(ds):
    """A selector over the global batch: the batch carries exactly the chosen items' pixels,
    equal to the owning replica's full-reader pixels, and the global item list."""
    chosen_log = []

    def every_other(patches):  # (replica, item) pairs: odd global positions
        flat = [(d, i) for d, ps in enumerate(patches) for i in range(len(ps))]
        chosen_log.append(patches)
        return flat[1::2]

    full = [_take(_loader(ds, dp_rank=d, dp_size=2), BATCHES) for d in range(2)]
    got = _take(_loader(ds, ReadRole(False, False, every_other), dp_rank=1, dp_size=2), BATCHES)
    for j, b in enumerate(got):
        grids = [f[j].grid_thw for f in full]
        assert chosen_log[j] == [g.prod(1).tolist() for g in grids]
        want_items = torch.tensor([(d, *g) for d in range(2) for g in grids[d].tolist()],
                                  dtype=torch.int64).reshape(-1, 4)
        assert torch.equal(b.global_items, want_items)
        flat = [(d, i) for d in range(2) for i in range(len(grids[d]))][1::2]
        assert b.pixel_items.tolist() == [list(x) for x in flat]
        parts = []
        for d, i in flat:
            per = full[d][j].grid_thw.prod(1)
            start = int(per[:i].sum())
            parts.append(full[d][j].pixel_patches[start:start + int(per[i])])
        want = torch.cat(parts) if parts else torch.zeros(0, b.pixel_patches.shape[1])
        assert torch.equal(b.pixel_patches, want), j
        _equal(full[1][j], b, METADATA, f"batch {j}")
    assert any(len(b.pixel_items) for b in got)


# ---------------------------------------------------------------------------------------------
# PP2 x DP2 with DEP on 4 ranks: store GETs and media decodes per rank against the plan

STEPS = 3
PP2_DP2_DEP = ["--parallel.pp=2", "--parallel.virtual_stages=2", "--parallel.dp=2",
               "--parallel.ep=2", "--parallel.microbatches=2", "--parallel.dep=true",
               f"--train.steps={STEPS}", "--train.eval_every=0"]


def _run_cfg(ds, run_dir, *extra):
    return load_config(TINY, [
        f"--data.manifest={ds.url}", f"--data.tokenizer={ds.tokenizer}", "--data.seq_len=64",
        "--data.global_batch_size=4", "--data.image_max_pixels=12544",
        "--data.video_max_pixels=3136", "--data.video_max_frames=8",
        f"--train.run_dir={run_dir}", *extra])


def _counted_training(rank, world, cfg):
    """Train with counting wrappers around the store and the decoders (put in by this test);
    returns per step the tar GETs (key, start, end) and the decodes (kind, name, frames)."""
    import data.stream
    import data.media
    from train.trainer import Trainer

    events: list = []
    open_cached, decode_image, decode_video = (data.stream._open_cached, data.media.decode_image,
                                               data.media.decode_video_frames)

    class Store(Counting):
        def get(self, key, *args, **kwargs):
            if key.endswith(".tar"):
                events.append(("get", key, *args))
            return self._store.get(key, *args, **kwargs)

    def counted_image(data_, name, *args, **kwargs):
        events.append(("decode", "image", name, ()))
        return decode_image(data_, name, *args, **kwargs)

    def counted_video(data_, indices, name, *args, **kwargs):
        events.append(("decode", "video", name, tuple(indices)))
        return decode_video(data_, indices, name, *args, **kwargs)

    data.stream._open_cached = lambda *a, **k: Store(open_cached(*a, **k), [])
    data.media.decode_image, data.media.decode_video_frames = counted_image, counted_video
    per_step: list = []

    class Counted(Trainer):
        def train_step(self, batch):  # the batch of this step has just been built
            per_step.append(list(events))
            events.clear()
            return super().train_step(batch)

    result = Counted(cfg).fit()
    return per_step, result["step"]


def _identify(stream, batch):
    """(source, sample, segment, chunk) of each vision item, and (row, first position, lo, hi,
    source, sample) of each document piece, from the batch's spans and provenance."""
    pieces, at = [], {}
    for r, source, shard, member, _, lo, hi in batch.sample_ids.tolist():
        sample = stream.catalog.catalogs[source].sample_of(shard, member)
        pieces.append((r, at.get(r, 0), lo, hi, source, sample))
        at[r] = at.get(r, 0) + hi - lo
    items = []
    for r, pos, n in batch.vision_spans.tolist():
        _, start, lo, _, source, sample = next(p for p in pieces if p[0] == r
                                               and p[1] <= pos < p[1] + p[3] - p[2])
        meta = stream.reader.doc_meta(source, sample)
        _, _, _, k, c = next(it for it in meta.items if it[0] == lo + pos - start)
        items.append((source, sample, k, c))
    return items, pieces


def _expected(ds, cfg):
    """Per step and rank, from whole batches of a full reader per replica and the DEP plan
    (parallel/dep_plan.py; without DEP: stage 0 decodes its replica's items): the media
    decodes and tar GETs each rank must make."""
    from parallel.dep_plan import plan_encoder_work

    full = [DataLoaderWithState(cfg, dp_rank=d, dp_size=2) for d in range(2)]
    batches = [_take(loader, STEPS) for loader in full]
    stream = full[0].stream
    fpc = stream.media.pre.frames_per_chunk

    def identify(batch):
        items, pieces = _identify(stream, batch)
        return items, [(p[4], p[5]) for p in pieces]

    def member_get(source, sample, member):
        meta = stream.reader.doc_meta(source, sample)
        loc = meta.entry["members"][member]
        return ("get", meta.shard_key, loc["offset"], loc["offset"] + loc["size"])

    expected = [[{"decodes": [], "gets": []} for _ in range(4)] for _ in range(STEPS)]
    texts_read = [set() for _ in range(2)]  # docs whose text a replica's ranks have read
    for s in range(STEPS):
        ident = [identify(batches[d][s]) for d in range(2)]
        flat = [(d, i) for d in range(2) for i in range(len(ident[d][0]))]
        plan = plan_encoder_work([int(batches[d][s].grid_thw[i].prod()) for d, i in flat], 4)
        for rank in range(4):
            pp, d = divmod(rank, 2)  # global rank = pp_rank * dp + dp_rank
            groups: dict = {}
            mine = (plan.items_of(rank) if cfg.parallel.dep else
                    [k for k, (rep, _) in enumerate(flat) if rep == d and pp == 0])
            for k in mine:
                src, sample, seg, chunk = ident[flat[k][0]][0][flat[k][1]]
                groups.setdefault((src, sample, seg), []).append(chunk)
            want = expected[s][rank]
            for (src, sample, seg), chunks in groups.items():
                meta = stream.reader.doc_meta(src, sample)
                sg = meta.segs[seg]
                frames = ()
                if sg.kind == "video":
                    idx = stream.media._frames(sg.meta)
                    frames = tuple(i for c in chunks for i in idx[c * fpc:(c + 1) * fpc])
                want["decodes"].append(("decode", sg.kind, f"{meta.name}.{sg.member}", frames))
                want["gets"].append(member_get(src, sample, sg.member))
            # PP2: stage 0 reads the token ids, stage 1 the labels: each the text of its
            # replica's documents, once per worker while it is cached (a few dozen documents)
            for doc in dict.fromkeys(ident[d][1]):
                if doc in texts_read[d]:
                    continue
                members = dict.fromkeys(sg.member for sg in stream.reader.doc_meta(*doc).segs
                                        if sg.kind == "text")
                want["gets"] += [member_get(*doc, m) for m in members]
        for d in range(2):
            texts_read[d] |= set(ident[d][1])
        all_items = [it for d in range(2) for it in ident[d][0]]
        assert len(all_items) == len(set(all_items))  # each item appears once in the step
    return expected, batches


@pytest.mark.parametrize("dep", [True, False], ids=["dep", "no_dep"])
def test_pp2_dp2_each_rank_reads_and_decodes_what_the_plan_gives_it(ds, tmp_path, dep):
    from collections import Counter

    from tests.dist import run_distributed

    cfg = _run_cfg(ds, tmp_path / "run", *PP2_DP2_DEP, f"--parallel.dep={str(dep).lower()}")
    expected, batches = _expected(ds, cfg)
    assert sum(len(b.grid_thw) for per in batches for b in per) > 4  # real vision work
    out = run_distributed(_counted_training, 4, cfg, timeout=300)
    totals = Counter()
    for s in range(STEPS):
        decoded = []
        for rank, (per_step, steps) in enumerate(out):
            assert steps == STEPS
            got = per_step[s]
            decodes = [e for e in got if e[0] == "decode"]
            gets = [e for e in got if e[0] == "get"]
            assert Counter(decodes) == Counter(expected[s][rank]["decodes"]), (s, rank)
            assert Counter(gets) == Counter(expected[s][rank]["gets"]), (s, rank)
            decoded += [(name, f) for _, _, name, frames in decodes for f in (frames or (None,))]
            totals[rank, "gets"] += len(gets)
            totals[rank, "decodes"] += len(decodes)
        assert len(decoded) == len(set(decoded)), f"step {s}: a media item decoded twice"
    # With DEP every rank decodes (the encoder is spread); without it stage 0 (ranks 0, 1) only.
    if dep:
        assert all(totals[r, "decodes"] > 0 for r in range(4)), totals
    else:
        assert totals[0, "decodes"] + totals[1, "decodes"] > 0, totals
        assert totals[2, "decodes"] == totals[3, "decodes"] == 0, totals
    print("DEP" if dep else "no DEP", "GETs / decodes per rank over", STEPS, "steps:",
          {r: (totals[r, "gets"], totals[r, "decodes"]) for r in range(4)})


def test_uint8_pixels_are_normalised_on_their_device_to_the_full_readers_float32(ds):
    """The loader hands on uint8 patches; normalising them where they are encoded gives the
    float32 values data.vision.patchify gives (the encoder input of before), computed on the
    input's device."""
    import numpy as np

    from data.vision import VisionPreprocess, normalize_patches, patch_bytes, patchify
    from tests.simulated_device import simulated_device

    cfg = _cfg(ds)
    pre = VisionPreprocess.from_config(cfg)
    batch = next(b for b in _take(_loader(ds), BATCHES) if len(b.grid_thw))
    assert batch.pixel_patches.dtype == torch.uint8
    frames = np.random.default_rng(0).integers(0, 256, (2, 28, 56, 3), dtype=np.uint8)
    assert np.array_equal(patchify(frames, pre),
                          normalize_patches(torch.from_numpy(patch_bytes(frames, pre)), pre).numpy())
    want = normalize_patches(batch.pixel_patches, pre)
    with simulated_device() as dev:  # a CPU constant mixed into device math would raise here
        got = normalize_patches(batch.pixel_patches.to(dev), pre)
        assert got.device == dev and got.dtype == torch.float32
        assert torch.equal(got.cpu(), want)


def test_under_roles_an_unreadable_document_keeps_its_slot_on_every_stage(ds, tmp_path):
    """A truncated text shard and a corrupt JPEG, met by role readers: every stage keeps the
    intact layout (positions, documents, items are metadata), the text readers make the
    unreadable document loss-free, the decoder gives zero pixels; each is a counted skip."""
    import shutil
    from dataclasses import replace

    from tests.test_loader import _overwrite_member, _planned_units

    root = tmp_path / "ds"
    shutil.copytree(ds.url, root)
    bad = replace(ds, url=str(root))
    probe = _loader(bad)
    units = _planned_units(probe, 4)
    catalog = probe.stream.catalog
    image = next(d for d in units if catalog.kinds[d.source] == "image"
                 and "jpg" in catalog.entry(d.source, d.sample)[1]["members"])
    _overwrite_member(root, probe, image, "jpg", lambda b: b"\0" * 64 + b[64:])
    text = next(d for d in units if catalog.kinds[d.source] == "text")
    shard_key, entry = catalog.entry(text.source, text.sample)
    tar = root / shard_key
    tar.write_bytes(tar.read_bytes()[:entry["members"]["txt"]["offset"] + 10])
    broken = {(catalog.names[d.source], *catalog.locate(d.source, d.sample)): kind
              for d, kind in ((image, "image"), (text, "text"))}

    intact = _take(_loader(ds), BATCHES)
    stage0 = _take(_loader(bad, ReadRole(True, False, "replica")), BATCHES)
    last = _take(_loader(bad, ReadRole(False, True, None)), BATCHES)
    middle = _take(_loader(bad, ReadRole(False, False, None)), BATCHES)
    met = set()
    for j, good in enumerate(intact):
        for got in (stage0[j], last[j], middle[j]):
            _equal(good, got, METADATA, f"batch {j}")  # the layout does not shift
        assert middle[j].skipped == []  # it read nothing, so met nothing
        at, zeroed = {}, []
        for r, source, shard, member, _, lo, hi in good.sample_ids.tolist():
            start = at.get(r, 0)
            at[r] = start + hi - lo
            kind = broken.get((catalog.names[source], shard, member))
            if kind is None:
                continue
            met.add(kind)
            assert (catalog.names[source], shard, member) in {s[:3] for s in stage0[j].skipped}
            if kind == "text":  # both text readers met it: no loss on that piece
                assert (catalog.names[source], shard, member) in {s[:3] for s in last[j].skipped}
                assert not last[j].loss_mask[r, start:start + hi - lo].any()
                assert (last[j].labels[r, start:start + hi - lo] == -100).all()
            else:  # the items of the corrupt image's piece
                zeroed += [i for i, (row, pos, _) in enumerate(good.vision_spans.tolist())
                           if row == r and start <= pos < start + hi - lo]
        # stage 0's pixels: zeros for the corrupt image's items, the intact pixels elsewhere
        per = good.grid_thw.prod(1).tolist()
        for i, n in enumerate(per):
            a = sum(per[:i])
            want = good.pixel_patches[a:a + n]
            assert torch.equal(stage0[j].pixel_patches[a:a + n],
                               torch.zeros_like(want) if i in zeroed else want), (j, i)
    assert met == {"image", "text"}, met  # the broken documents were in these batches


def test_a_dep_selector_walks_a_global_batch_of_many_windows_forward(ds):
    """16 windows per global batch (more than the cursor keeps): the selector's item list of
    every replica equals the full readers' grids, on the last replica too."""
    data = dict(window_sequences=2, global_batch_size=32)
    full = [_take(_loader(ds, dp_rank=d, dp_size=2, **data), 2) for d in range(2)]
    for rank in range(2):
        got = _take(_loader(ds, ReadRole(False, False, lambda patches: []), dp_rank=rank,
                            dp_size=2, **data), 2)
        for j, b in enumerate(got):
            want = torch.tensor([(d, *g) for d in range(2) for g in full[d][j].grid_thw.tolist()],
                                dtype=torch.int64).reshape(-1, 4)
            assert torch.equal(b.global_items, want), (rank, j)
            assert len(b.pixel_items) == 0 and len(b.pixel_patches) == 0


def _inspected_step(rank, world, cfg, hand_zeroed):
    """One training step. Returns this rank's own skips (before they are shared), what reached
    training_step (input ids, loss mask, token categories) and the step's metrics.
    hand_zeroed: {rank: [(row, first position, count)]} given no loss by hand first."""
    import train.trainer
    from train.trainer import Trainer

    seen: dict = {}
    step = train.trainer.training_step

    def inspected(rt, batch, **kwargs):  # the runtime batch, after the skips were shared
        seen.update({k: None if batch[k] is None else batch[k].clone()
                     for k in ("input_ids", "loss_mask", "token_category")})
        return step(rt, batch, **kwargs)

    train.trainer.training_step = inspected

    class Inspected(Trainer):
        def train_step(self, batch):
            seen["own_skips"] = [s[:3] for s in batch.skipped]
            for r, at, n in hand_zeroed.get(rank, []):
                batch.labels[r, at:at + n] = -100
                batch.loss_mask[r, at:at + n] = False
                batch.token_category[r, at:at + n] = -1
            seen["metrics"] = super().train_step(batch)
            return seen["metrics"]

    Inspected(cfg).fit()
    return seen


def test_pp2_dp2_dep_an_image_that_fails_on_another_rank_gives_its_document_no_loss(ds, tmp_path):
    """A corrupt still image (JPEG or PNG, whichever the first global batch holds) decoded (under
    DEP) by a rank that is not the last stage of its document's replica: every rank learns of it before the forward, the document gets no loss on the last
    stage and padding ids on stage 0, the skip is counted once in the step's metrics, and the
    losses equal those of the intact data with that document's loss mask zeroed by hand."""
    import shutil
    from dataclasses import replace
    from types import SimpleNamespace

    from parallel.dep_plan import plan_encoder_work
    from tests.dist import run_distributed
    from tests.test_loader import _overwrite_member

    cfg = _run_cfg(ds, tmp_path / "ref", *PP2_DP2_DEP, "--train.steps=1")
    full = [DataLoaderWithState(cfg, dp_rank=d, dp_size=2) for d in range(2)]
    batches = [_take(loader, 1)[0] for loader in full]
    stream, tok = full[0].stream, full[0].stream.reader.tokenizer
    ident = [_identify(stream, b) for b in batches]
    flat = [(d, i) for d in range(2) for i in range(len(ident[d][0]))]
    plan = plan_encoder_work([int(batches[d].grid_thw[i].prod()) for d, i in flat], 4)
    decoder = {k: rank for rank in range(4) for k in plan.items_of(rank)}

    def pieces_of(doc):  # (replica, row, first position, count) of the document's pieces
        return [(d, r, at, hi - lo) for d in range(2) for r, at, lo, hi, *src in ident[d][1]
                if tuple(src) == doc]

    def fits(k):  # a still image decoded off its replica's last stage, whose document takes loss
        d, i = flat[k]
        source, sample, seg, _ = ident[d][0][i]
        member = stream.reader.doc_meta(source, sample).segs[seg].member
        return (member.endswith(("jpg", "png")) and decoder[k] != 2 + d
                and any(batches[e].loss_mask[r, at:at + n].any()
                        for e, r, at, n in pieces_of((source, sample))))

    # preferably off rank 0 too, so that only the shared count reaches the step's metrics
    k = min((k for k in range(len(flat)) if fits(k)), key=lambda k: (decoder[k] == 0, k))
    d, i = flat[k]
    source, sample, seg, _ = ident[d][0][i]
    pieces = pieces_of((source, sample))
    root = tmp_path / "ds"
    shutil.copytree(ds.url, root)
    _overwrite_member(root, full[0], SimpleNamespace(source=source, sample=sample),
                      stream.reader.doc_meta(source, sample).segs[seg].member,
                      lambda b: b"\0" * 64 + b[64:])
    catalog_name = stream.catalog.names[source]
    key = (catalog_name, *stream.catalog.locate(source, sample))

    bad = _run_cfg(replace(ds, url=str(root)), tmp_path / "bad", *PP2_DP2_DEP, "--train.steps=1")
    got = run_distributed(_inspected_step, 4, bad, {}, timeout=300)
    hand = {}
    for e, r, at, n in pieces:
        hand.setdefault(2 + e, []).append((r, at, n))
    ref = run_distributed(_inspected_step, 4, cfg, hand, timeout=300)

    # only the decoding rank met the failure, which is not the last stage of the replica
    assert [rank for rank in range(4) if key in got[rank]["own_skips"]] == [decoder[k]], (
        catalog_name, decoder[k], d)
    print(f"{catalog_name} item of replica {d} decoded by rank {decoder[k]}; pieces {pieces}")
    special = torch.tensor([tok.image_id, tok.video_id, tok.media_begin_id, tok.media_end_id,
                            tok.special["eos"]])
    for e, r, at, n in pieces:
        assert not got[2 + e]["loss_mask"][r, at:at + n].any()  # no loss on the last stage
        assert (got[2 + e]["token_category"][r, at:at + n] == -1).all()
        intact = batches[e].input_ids[r, at:at + n]  # stage 0: padding around the media
        want = torch.where(torch.isin(intact, special), intact, torch.full_like(intact, tok.pad_id))
        assert torch.equal(got[e]["input_ids"][r, at:at + n], want)
    assert got[0]["metrics"]["skipped_docs"] == 1  # counted once, on the logging rank
    assert "skipped_docs" not in ref[0]["metrics"]
    mine, theirs = got[0]["metrics"], ref[0]["metrics"]
    assert mine["loss_tokens"] == theirs["loss_tokens"]
    losses = sorted(name for name in theirs if name.startswith("loss") and name != "loss_tokens")
    assert sorted(name for name in mine if name.startswith("loss") and name != "loss_tokens") \
        == losses
    for name in losses:
        assert mine[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), name

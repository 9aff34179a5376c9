"""The loader on the real corpus (local directory): determinism, resume, DP/worker changes, mix,
batch structure, bad data. S3 and fault-injection tests are in test_loader_s3.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.loader import DataLoaderWithState, plan_report
from data.stream import ResumeError
from tests.corpus_fixtures import make_dataset
from train.config import load_config

SEQ, WINDOW, GLOBAL = 256, 8, 4
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("loader"))


def _cfg(ds, **data):
    over = {"manifest": ds.url, "tokenizer": str(ds.tokenizer), "seq_len": SEQ,
            "window_sequences": WINDOW, "global_batch_size": GLOBAL, **data}
    return load_config(TINY, [f"--data.{k}={json.dumps(v)}" for k, v in over.items()])


def _loader(ds, dp_rank=0, dp_size=1, **data):
    return DataLoaderWithState(_cfg(ds, **data), dp_rank=dp_rank, dp_size=dp_size)


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _digests(batches):
    return [b.digest() for b in batches]


def test_same_seed_gives_byte_identical_batches_and_another_seed_another_order(ds):
    a = _take(_loader(ds), 6)
    b = _take(_loader(ds), 6)
    assert _digests(a) == _digests(b)
    c = _take(_loader(ds, seed=1), 6)
    ids = lambda bs: [tuple(map(tuple, x.sample_ids[:, 1:5].tolist())) for x in bs]  # noqa: E731
    assert ids(a) != ids(c)


def test_resume_gives_the_batches_of_an_uninterrupted_run(ds):
    straight = _digests(_take(_loader(ds), 9))
    first = _loader(ds)
    head = _digests(_take(first, 4))
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    assert set(state) >= {"fingerprint", "seed", "sequences_consumed", "window", "plan_state"}
    second = _loader(ds)
    second.load_state_dict(state)
    assert head + _digests(_take(second, 5)) == straight


def test_resume_after_changing_the_number_of_workers(ds):
    straight = _digests(_take(_loader(ds, num_workers=0), 7))
    first = _loader(ds, num_workers=2)
    head = _digests(_take(first, 3))
    second = _loader(ds, num_workers=1)
    second.load_state_dict(first.state_dict())
    assert head + _digests(_take(second, 4)) == straight


def _global_rows(per_rank_batches):
    """Concatenate the ranks' rows of each step back into global batches."""
    return [torch.cat([b.input_ids for b in step]) for step in zip(*per_rank_batches)]


def test_resume_after_changing_the_data_parallel_size(ds):
    straight = _take(_loader(ds), 6)
    two = [_loader(ds, dp_rank=r, dp_size=2) for r in range(2)]
    head = [_take(l, 2) for l in two]
    assert all(b.rows == GLOBAL // 2 for b in head[0])
    states = [l.state_dict() for l in two]
    assert states[0] == states[1]  # every rank holds the same O(1) state
    four = [_loader(ds, dp_rank=r, dp_size=4) for r in range(4)]
    for l in four:
        l.load_state_dict(states[0])
    tail = [_take(l, 4) for l in four]
    rows = _global_rows(head) + _global_rows(tail)
    assert all(torch.equal(x, y.input_ids) for x, y in zip(rows, straight))
    assert [torch.cat([b.sequence_ids for b in s]).tolist() for s in zip(*tail)] == \
           [b.sequence_ids.tolist() for b in straight[2:]]
    # Each rank's share carries its own vision items: pixel rows match the rank's grids.
    for step in zip(*tail):
        for b in step:
            assert b.pixel_patches.shape[0] == int(b.grid_thw.prod(dim=1).sum())


def test_a_fingerprint_mismatch_on_resume_is_an_error_naming_both(ds):
    loader = _loader(ds)
    state = loader.state_dict()
    state["fingerprint"] = "0" * 64
    with pytest.raises(ResumeError) as e:
        loader.load_state_dict(state)
    assert "0" * 64 in str(e.value) and loader.fingerprint in str(e.value)
    state = loader.state_dict()
    state["seed"] = 99
    with pytest.raises(ResumeError, match="seed"):
        loader.load_state_dict(state)


def test_vision_share_holds_at_every_prefix_within_one_document(ds):
    loader = _loader(ds)
    cursor = loader.stream.new_cursor()
    windows = [cursor.get(k) for k in range(60)]
    drawn = sorted([d for w in windows for d in w.docs] + windows[-1].end_state.carry,
                   key=lambda d: d.index)
    assert [d.index for d in drawn] == list(range(len(drawn)))
    vision = total = biggest = 0
    for d in drawn:  # the mixed stream, unit by unit
        vision, total, biggest = vision + d.vision, total + d.tokens, max(biggest, d.tokens)
        assert abs(vision - 0.1 * total) <= biggest, (d.index, vision, total)
    assert abs(vision / total - 0.1) < 0.01
    # What the model sees, window by window: the placed units lag the stream by a few deferrals.
    vision = total = 0
    for w in windows:
        vision += sum(d.vision for d in w.docs)
        total += w.tokens()
        held = sum(d.tokens for d in w.end_state.carry)
        assert abs(vision - 0.1 * total) <= biggest + held
    rep = plan_report(loader.stream, 60)
    assert abs(rep["mix"]["vision_share"] - 0.1) < 0.01
    assert rep["packing_efficiency"] > 0.9
    assert set(rep["mix"]["sources"]) == {"text", "images", "videos", "interleaved"}


def _runs(spans_by_doc: dict) -> list[tuple]:
    """(doc..., lo, hi) of the maximal contiguous runs of each document's spans; a span seen
    twice or overlapping another stays visible as its own run."""
    out = []
    for doc, spans in spans_by_doc.items():
        spans = sorted(spans)
        runs = [list(spans[0])]
        for lo, hi in spans[1:]:
            if lo == runs[-1][1]:
                runs[-1][1] = hi
            else:
                runs.append([lo, hi])
        out += [(*doc, lo, hi) for lo, hi in runs]
    return sorted(out)


def test_batches_are_consistent_and_cover_every_planned_unit_once(ds, tmp_path):
    loader = _loader(ds)
    batches = _take(loader, 8)  # 8 batches x 4 rows = windows 0..3
    cursor = loader.stream.new_cursor()
    planned = sorted((d.source, d.sample, d.epoch, d.offset, d.offset + d.tokens)
                     for k in range(4) for d in cursor.get(k).docs)
    pieces = {}
    tok = loader.stream.reader.tokenizer
    for b in batches:
        B, S = b.input_ids.shape
        assert (B, S) == (GLOBAL, SEQ)
        placeholder = (b.input_ids == tok.image_id) | (b.input_ids == tok.video_id)
        # One placeholder per LM vision token; the spans point at whole placeholder runs.
        assert int(placeholder.sum()) == int((b.grid_thw[:, 1] // 2 * (b.grid_thw[:, 2] // 2)).sum())
        assert int(b.vision_spans[:, 2].sum()) == int(placeholder.sum())
        for r, start, n in b.vision_spans.tolist():
            assert placeholder[r, start:start + n].all()
            assert b.input_ids[r, start - 1] == tok.media_begin_id and b.input_ids[r, start + n] == tok.media_end_id
        assert b.pixel_patches.shape == (int(b.grid_thw.prod(dim=1).sum()), 3 * 14 * 14)
        # Labels: next token within the piece's document, no loss on placeholders/media_end/padding.
        assert not b.loss_mask[placeholder.roll(1, dims=1) & placeholder].any()
        assert torch.equal(b.labels != -100, b.loss_mask)
        targets = b.labels[b.loss_mask]
        assert not ((targets == tok.image_id) | (targets == tok.video_id) | (targets == tok.media_end_id)).any()
        same_doc = b.doc_ids[:, 1:] == b.doc_ids[:, :-1]
        inner = b.loss_mask[:, :-1] & same_doc
        assert torch.equal(b.labels[:, :-1][inner], b.input_ids[:, 1:][inner])
        # Position ids restart per piece; cu_seqlens covers every segment of every row.
        starts = torch.ones_like(b.doc_ids, dtype=torch.bool)
        starts[:, 1:] = ~same_doc
        assert (b.position_ids[starts] == 0).all()
        assert torch.equal(b.position_ids[:, 1:][same_doc], b.position_ids[:, :-1][same_doc] + 1)
        assert int(b.cu_seqlens[-1]) == B * S and int(b.cu_seqlens.diff().min()) > 0
        for row in b.sample_ids.tolist():
            r, src, shard, member, epoch, lo, hi = row
            sample = loader.stream.catalog.catalogs[src].sample_of(shard, member)
            pieces.setdefault((src, sample, epoch), []).append((lo, hi))
    # Every planned unit is in the batches exactly once, as contiguous pieces. Both sides are
    # compared as maximal runs per document: two units of one long document may be adjacent.
    planned_spans = {}
    for src, sample, epoch, lo, hi in planned:
        planned_spans.setdefault((src, sample, epoch), []).append((lo, hi))
    assert _runs(pieces) == _runs(planned_spans)


def test_a_batch_feeds_the_vision_tower_and_the_language_model(ds):
    from data.vision import VisionPreprocess, normalize_patches
    from train.model.lm import DecoderLM
    from train.model.vision import VisionTower

    cfg = _cfg(ds)
    batch = next(b for b in _take(_loader(ds), 8) if len(b.grid_thw))
    tower = VisionTower(cfg.vision, cfg.model.hidden_size)
    lm = DecoderLM(cfg.model)
    with torch.no_grad():
        assert batch.pixel_patches.dtype == torch.uint8  # normalised where it is encoded
        emb = tower(normalize_patches(batch.pixel_patches, VisionPreprocess.from_config(cfg)),
                    batch.grid_thw)
        h = lm.embed_tokens(batch.input_ids, emb)  # checks placeholder count == embeddings
    assert h.shape == (*batch.input_ids.shape, cfg.model.hidden_size)


# ---------------------------------------------------------------------------------------------
# Bad data: counted, deterministic skips or clear errors, never a hang.


def _planned_units(loader, windows):
    cursor = loader.stream.new_cursor()
    return [d for k in range(windows) for d in cursor.get(k).docs]


def _overwrite_member(root: Path, loader, draw, ext, make_bad):
    """Replace one member's bytes inside its tar (same size: the index stays valid)."""
    shard_key, entry = loader.stream.catalog.entry(draw.source, draw.sample)
    member = next(e for e in entry["members"] if e.endswith(ext))
    loc = entry["members"][member]
    path = root / shard_key
    data = bytearray(path.read_bytes())
    old = bytes(data[loc["offset"]:loc["offset"] + loc["size"]])
    data[loc["offset"]:loc["offset"] + loc["size"]] = make_bad(old)
    path.write_bytes(bytes(data))
    return shard_key


@pytest.fixture(scope="module")
def bad_ds(ds, tmp_path_factory):
    """A copy of the dataset with a corrupt JPEG, a truncated MP4 and a truncated text shard,
    chosen among the units of the first windows so the loader meets them early."""
    import shutil
    from dataclasses import replace

    root = tmp_path_factory.mktemp("bad") / "ds"
    shutil.copytree(ds.url, root)
    copy = replace(ds, url=str(root))
    loader = _loader(copy)
    units = _planned_units(loader, 8)
    kinds = loader.stream.catalog.kinds
    image = next(d for d in units if kinds[d.source] == "image"
                 and "jpg" in loader.stream.catalog.entry(d.source, d.sample)[1]["members"])
    video = next(d for d in units if kinds[d.source] == "video")
    _overwrite_member(root, loader, image, "jpg", lambda b: b"\0" * 64 + b[64:])  # no JPEG header
    _overwrite_member(root, loader, video, "mp4", lambda b: b[:len(b) // 2] + b"\0" * (len(b) - len(b) // 2))
    # Truncate the tar holding a text unit: every member past the cut is gone.
    text = next(d for d in units if kinds[d.source] == "text")
    shard_key, entry = loader.stream.catalog.entry(text.source, text.sample)
    cut = entry["members"]["txt"]["offset"] + 10
    tar = root / shard_key
    tar.write_bytes(tar.read_bytes()[:cut])
    return copy, {"image": image, "video": video, "text": text}


def test_corrupt_media_and_truncated_shards_are_counted_deterministic_skips(ds, bad_ds):
    copy, broken = bad_ds
    a, b = _take(_loader(copy), 16), _take(_loader(copy), 16)
    assert _digests(a) == _digests(b)  # deterministic, also with the failures
    skipped = [s for batch in a for s in batch.skipped]
    reasons = " | ".join(s[3] for s in skipped)
    for expected in ("not a readable JPEG", "cannot decode", "truncated tar"):
        assert expected in reasons, reasons
    assert {"images", "videos", "text"} <= {s[0] for s in skipped}
    # The stream does not shift: each batch holds the intact dataset's pieces minus the skipped
    # units (whose slots became padding without loss).
    intact = _take(_loader(ds), 16)
    names = [x["name"] for x in json.loads((Path(ds.url) / "manifest.json").read_text())["sources"]]
    for good, bad in zip(intact, a):
        gone = {s[:3] for s in bad.skipped}
        keep = [row for row in good.sample_ids.tolist() if (names[row[1]], row[2], row[3]) not in gone]
        assert keep == bad.sample_ids.tolist()
        assert bad.loss_mask.sum() <= good.loss_mask.sum()
    # With workers the same batches come out.
    assert _digests(_take(_loader(copy, num_workers=2), 16)) == _digests(a)


def test_a_missing_catalog_file_is_a_clear_error_naming_it(ds, tmp_path):
    import shutil

    from data.shards import ShardError

    root = tmp_path / "ds"
    shutil.copytree(ds.url, root)
    victim = sorted(root.glob("gen-*/images/catalog.cols"))[0]
    victim.unlink()
    with pytest.raises(ShardError, match=f"{victim.parent.name}/{victim.name}.*missing column file"):
        DataLoaderWithState(_cfg(ds, manifest=str(root)))


def test_a_dataset_without_column_files_loads_from_its_json_indexes_with_the_same_stream(ds, tmp_path):
    import shutil

    from data.shards import ShardError

    root = tmp_path / "ds"
    shutil.copytree(ds.url, root)
    manifest = json.loads((root / "manifest.json").read_text())
    for c in manifest.pop("catalogs"):  # the manifest of a dataset ingested before column files
        (root / c["key"]).unlink()
    (root / "manifest.json").write_text(json.dumps(manifest))
    old = _loader(ds, manifest=str(root))
    assert old.stream.catalog.derived_plans == old.stream.catalog.names
    assert _digests(_take(old, 5)) == _digests(_take(_loader(ds), 5))
    victim = sorted(root.glob("gen-*/images/*.idx.json"))[0]
    victim.unlink()
    with pytest.raises(ShardError, match=f"{victim.parent.name}/{victim.name}.*missing shard index"):
        DataLoaderWithState(_cfg(ds, manifest=str(root)))


def test_mmpt_data_inspect_prints_the_report_and_renders_a_sequence(ds, tmp_path, capsys):
    from PIL import Image

    from train.cli import main

    png = tmp_path / "seq.png"
    rc = main(["data", "inspect", "--manifest", ds.url, "--tokenizer", str(ds.tokenizer),
               "--config", str(TINY), "--window-sequences", str(WINDOW), "--windows", "10",
               "--png", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    for needle in ("vision share", "packing efficiency", "cache:", "images", "wrote"):
        assert needle in out, out
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[1] > 600 and img.shape[0] > 60
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # photo pixels were pasted in place


def test_micro_batch_split_keeps_each_rows_vision_items_and_segments(ds):
    batch = next(b for b in _take(_loader(ds, global_batch_size=8), 6) if len(b.grid_thw) >= 2)
    parts = batch.split(4)
    assert torch.equal(torch.cat([p.input_ids for p in parts]), batch.input_ids)
    assert torch.equal(torch.cat([p.pixel_patches for p in parts]), batch.pixel_patches)
    assert torch.equal(torch.cat([p.grid_thw for p in parts]), batch.grid_thw)
    for i, p in enumerate(parts):
        assert p.pixel_patches.shape[0] == int(p.grid_thw.prod(dim=1).sum())
        assert int(p.cu_seqlens[0]) == 0 and int(p.cu_seqlens[-1]) == p.input_ids.numel()
        for r, start, n in p.vision_spans.tolist():
            assert (p.input_ids[r, start:start + n] == batch.input_ids[2 * i + r, start:start + n]).all()
    with pytest.raises(ValueError, match="micro-batches"):
        batch.split(3)


def test_source_weights_split_a_modality_by_tokens_and_bad_weights_are_rejected(ds):
    from train.errors import ConfigError

    loader = _loader(ds, source_weights="images=1,videos=1,interleaved=2")
    rep = plan_report(loader.stream, 40)["mix"]["sources"]
    vision = {k: rep[k]["tokens"] for k in ("images", "videos", "interleaved")}
    total = sum(vision.values())
    assert abs(vision["interleaved"] / total - 0.5) < 0.1 and abs(vision["videos"] / total - 0.25) < 0.1
    with pytest.raises(ConfigError, match="data.source_weights"):
        _cfg(ds, source_weights="images=-1")
    with pytest.raises(ValueError, match="unknown source.*nosuch"):
        _loader(ds, source_weights="nosuch=1")


def test_augmentation_is_keyed_and_changes_only_image_pixels(ds):
    plain = _take(_loader(ds), 4)
    aug = _take(_loader(ds, augment=True), 4)
    again = _take(_loader(ds, augment=True, num_workers=2), 4)
    assert _digests(aug) == _digests(again)  # keyed by (seed, sample, epoch): any worker, any run
    with_images = [i for i, b in enumerate(plain) if b.grid_thw.shape[0] > 0 and (b.grid_thw[:, 0] == 1).any()]
    assert with_images, "the first batches hold no image to augment"
    for p, a in zip(plain, aug):
        # Same tokens, layout and grids: augmentation keeps the image size, so the plan holds.
        assert torch.equal(p.input_ids, a.input_ids) and torch.equal(p.grid_thw, a.grid_thw)
        assert p.pixel_patches.shape == a.pixel_patches.shape
    i = with_images[0]
    assert not torch.equal(plain[i].pixel_patches, aug[i].pixel_patches)


def test_mmpt_data_inspect_refuses_a_sequence_beyond_its_planning_limit(ds, tmp_path):
    """Refused before the dataset is even opened (it would plan windows for minutes), naming the
    limit; a sequence inside the limit is still rendered."""
    from data.inspect import MAX_PLAN_WINDOWS
    from train.cli import main

    with pytest.raises(SystemExit) as info:
        main(["data", "inspect", "--manifest", str(tmp_path / "no-such-dataset"), "--sequence", "99999999"])
    msg = str(info.value)
    assert "--sequence 99999999 is beyond what inspect plans" in msg
    assert f"--max-windows {MAX_PLAN_WINDOWS}" in msg and "data.window_sequences 32" in msg
    args = ["data", "inspect", "--manifest", ds.url, "--tokenizer", str(ds.tokenizer), "--config",
            str(TINY), "--window-sequences", str(WINDOW), "--windows", "2", "--batches", "1",
            "--max-windows", "3", "--png", str(tmp_path / "s.png")]
    with pytest.raises(SystemExit, match=f"sequences 0..{3 * WINDOW - 1} "):
        main(args + ["--sequence", str(3 * WINDOW)])
    assert main(args + ["--sequence", str(3 * WINDOW - 1)]) == 0 and (tmp_path / "s.png").exists()

"""Stage-aware reading (data/loader.py ReadRole): a rank reads only what its pipeline stage or
its DEP encoder work needs, and what it builds equals the full reader's batch where they overlap.
The distributed count of store GETs and media decodes per rank is at the end."""

import json
from pathlib import Path

import pytest
import torch

from data.loader import DataLoaderWithState, ReadRole
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
        loader.stream.store = Counting(loader.stream.store, gets)
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
